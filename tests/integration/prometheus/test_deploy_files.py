"""The deploy/ files: generated ones up to date, Prometheus configuration and alert rules
checked by promtool (rule unit tests included), the Grafana dashboard's structure."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from observability import deploy
from observability.alerts import rules
from observability.dashboard import SOURCES_QUERY, expressions
from observability.web_config import load_web_config
from schemas.errors import ConfigurationError
from tests.conftest import unavailable
from tests.support.certificates import issue, make_authority
from transport.local import REPO_ROOT

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
GRAFANA = REPO_ROOT / "deploy" / "grafana"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        unavailable("promtool is missing (Debian package `prometheus`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=PROMETHEUS)


@pytest.mark.parametrize("path", sorted(deploy.files()), ids=str)
def test_generated_deploy_file_is_up_to_date(path: Path) -> None:
    assert (REPO_ROOT / path).read_text(encoding="utf-8") == deploy.files()[path], (
        "stale: run `python -m observability.deploy`"
    )


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rules_for_another_objective_go_to_the_directory_named(tmp_path: Path) -> None:
    """`--alerts-only --objective S OUT_DIR` writes OUT_DIR/alerts.yml alone (docs/metrics.md),
    rules that promtool accepts and that read the objective's bucket edge."""
    deploy.cli(["--alerts-only", "--objective", "30", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alerts.yml"]
    text = (tmp_path / "alerts.yml").read_text(encoding="utf-8")
    assert 'le="30.0"' in text and text != (PROMETHEUS / "alerts.yml").read_text(encoding="utf-8")
    result = promtool("check", "rules", str(tmp_path / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_rule_has_a_promtool_case() -> None:
    from observability.alert_tests import CASES

    assert {rule.alert for rule in rules()} == {case.alert for case in CASES}


def test_promtool_checks_the_scrape_configuration() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    assert {job["job_name"] for job in jobs} == {
        "portal-sync-worker",
        "portal-sync-lag-exporter",
        "portal-sync-producer",
    }


def test_the_commented_tls_and_basic_auth_scrape_options_are_a_valid_configuration(
    tmp_path: Path,
) -> None:
    text = (PROMETHEUS / "prometheus.yml").read_text()
    uncommented = re.sub(r"(?m)^(\s*)# (\s*[a-z_]+:.*)$", r"\1\2", text)
    jobs = yaml.safe_load(uncommented)["scrape_configs"]
    worker = next(job for job in jobs if job["job_name"] == "portal-sync-worker")
    assert worker["scheme"] == "https" and worker["tls_config"]["ca_file"]
    assert set(worker["basic_auth"]) == {"username", "password_file"}  # never a password
    (tmp_path / "prometheus.yml").write_text(uncommented)
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_web_config_passes_promtool_and_portal_sync_applies_it(
    tmp_path: Path,
) -> None:
    example = tmp_path / "web-config.yml"
    shutil.copy(PROMETHEUS / "web-config.example.yml", example)
    authority = make_authority(tmp_path / "ca")
    issue(authority, tmp_path, "metrics", dns=("localhost",))  # metrics.crt, metrics.key

    result = promtool("check", "web-config", str(example))
    assert result.returncode == 0, result.stdout + result.stderr
    # As shipped, its hash is of a published password: refused until replaced.
    with pytest.raises(ConfigurationError, match="the example's hash"):
        load_web_config(example)
    text = example.read_text(encoding="utf-8")
    (published,) = re.findall(r"\$2b\$12\$\S+", text)
    own = bcrypt.hashpw(b"an operator's own", bcrypt.gensalt(10)).decode()
    example.write_text(text.replace(published, own), encoding="utf-8")
    web = load_web_config(example)
    assert web is not None and web.tls is not None and web.auth is not None
    assert web.auth.allows("Basic " + base64.b64encode(b"prometheus:an operator's own").decode())
    assert not web.auth.allows("Basic " + base64.b64encode(b"prometheus:change-me").decode())


def test_every_alert_has_a_summary_a_runbook_and_a_severity() -> None:
    file = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = [rule for group in file["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "PortalSyncSyncLagAboveObjective",
        "PortalSyncSourceStale",
        "PortalSyncConsumerLagGrowing",
        "PortalSyncConsumerStalled",
        "PortalSyncDeadLettersRising",
        "PortalSyncProcessDown",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and len(alert["annotations"]["runbook"]) > 40
    anchors = _metrics_doc()
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].split("#")[1]
        assert f"runbook-{alert['alert'].lower()}" == anchor
        assert f"### Runbook: {alert['alert']}" in anchors, f"{alert['alert']} has no runbook"


def _dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "portal-sync.json").read_text())
    return board


def test_dashboard_structure_variables_and_datasource() -> None:
    board = _dashboard()
    assert board["uid"] == "portal-sync" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "source", "entity"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("source", "entity"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
    assert variables["entity"]["definition"].startswith("label_values(")
    # Registered sources too, not only those that delivered (a silent province is listed).
    assert variables["source"]["definition"] == f"query_result({SOURCES_QUERY})"
    assert "portal_sync_source_registered" in SOURCES_QUERY
    assert variables["source"]["regex"] == '/source="([^"]+)"/'

    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expressions(_dashboard()))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (source, le) (rate(portal_sync_sync" in exprs
    for metric in (
        "portal_sync_source_last_change_timestamp_seconds",
        "portal_sync_consumer_lag_messages",
        "portal_sync_consumer_lag_seconds",
        "portal_sync_consumer_status",
        "portal_sync_events_total",
        "portal_sync_dead_letters_total",
        "portal_sync_store_commit_duration_seconds",
    ):
        assert metric in exprs
    assert "$source" in exprs and "$entity" in exprs
    freshness = next(p for p in _dashboard()["panels"] if p["title"].startswith("Freshness"))
    steps = freshness["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["color"] == "red" and steps[-1]["value"] > 0


def _color(steps: list[dict[str, Any]], value: float) -> str:
    """The color Grafana's absolute thresholds give a value: the last step it reaches."""
    reached = [s for s in steps if s["value"] is None or value >= s["value"]]
    return str(reached[-1]["color"])


def test_dashboard_processes_up_shows_a_process_down_in_red() -> None:
    """Without thresholds, Grafana's defaults (green below 80) showed `up` 0 in green."""
    panel = next(p for p in _dashboard()["panels"] if p["title"] == "Processes up")
    defaults = panel["fieldConfig"]["defaults"]
    (mapping,) = defaults["mappings"]
    assert mapping["type"] == "value"
    shown = {value: (o["text"], o["color"]) for value, o in mapping["options"].items()}
    assert shown == {"0": ("down", "red"), "1": ("up", "green")}
    assert defaults["color"]["mode"] == "thresholds"
    steps = defaults["thresholds"]["steps"]
    assert (_color(steps, 0), _color(steps, 1)) == ("red", "green")
    # each process' `up` now: one gone from discovery is not shown "up" for the time range
    (target,) = panel["targets"]
    assert target["instant"] is True and target["range"] is False
    assert panel["options"]["reduceOptions"]["calcs"] == ["last"]


def test_dashboard_consumer_status_shows_no_data_when_its_series_are_gone() -> None:
    """A blind lag exporter exports no status: the panel says "no data", not the last
    status the time range holds (Grafana's default reducer, lastNotNull, kept a stale OK)."""
    panel = next(p for p in _dashboard()["panels"] if p["title"].startswith("Consumer status"))
    reduce = panel["options"]["reduceOptions"]
    assert reduce["calcs"] == ["last"] and reduce["values"] is False
    assert panel["fieldConfig"]["defaults"]["noValue"] == "no data"
    (target,) = panel["targets"]
    assert target["instant"] is True and target["range"] is False  # its value now, or none
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert _color(steps, 0) not in ("green", "yellow", "red", "dark-red")  # no status' color
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    assert [o["text"] for o in mapping["options"].values()] == ["OK", "WARN", "STALL", "STOP"]


def test_every_metric_used_by_dashboard_and_alerts_is_documented() -> None:
    used = " ".join(expressions(_dashboard()) + [rule.expr for rule in rules()])
    names = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"portal_sync_\w+", used)}
    documented = _metrics_doc()
    assert names, "no metric found"
    for name in names:
        assert f"`{name}`" in documented, f"{name} is not in docs/metrics.md"


def test_grafana_provisioning_files() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "portal-sync.yml").read_text()
    )
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert sources["datasources"][0]["type"] == "prometheus"


def _metrics_doc() -> str:
    return (REPO_ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
