"""The real check: a real Prometheus scrapes a running producer, worker and lag exporter,
all three over TLS with basic auth (one web config file, the scrape config of
docs/operations.md); every PromQL expression of the dashboard and of the alert rules returns
data; a scrape with a wrong password is refused; stopping the worker makes the
stalled-consumer alert fire."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from observability.alerts import Thresholds, rule_file, rules
from observability.dashboard import SOURCES_QUERY, dashboard, expressions
from portal_sync.settings import Settings
from tests.conftest import unavailable
from tests.support.certificates import issue, make_authority
from tests.support.kafka_helpers import ensure_topics
from tests.support.pipeline_helpers import start_worker
from tests.support.prometheus_server import Prometheus, PrometheusUnavailable
from transport.local import free_port

pytestmark = pytest.mark.kafka

# Short `for:` durations and rate windows, so alerts can fire within the test.
FAST = Thresholds(
    window="30s", for_short="2s", for_long="2s", never_delivered_for="2s", for_missing="2s"
)
JOB = {
    "worker": "portal-sync-worker",
    "exporter": "portal-sync-lag-exporter",
    "producer": "portal-sync-producer",
}
# The worker's registry: the producer's source, and one registered that never delivers.
REGISTRY = """\
[sources.province-01]
kind = "province"
name = "Hệ thống TTHC Thành phố Hà Nội"
province_code = "01"

[sources.province-79]
kind = "province"
name = "Hệ thống TTHC Thành phố Hồ Chí Minh"
province_code = "79"
"""
GRAFANA = {"$__rate_interval": "30s", "$source": ".*", "$entity": ".*"}


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for a dashboard expression with every variable at "All"."""
    for variable, value in GRAFANA.items():
        expr = expr.replace(variable, value)
    variable_query = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr)
    if variable_query:
        return variable_query[1]
    result_query = re.fullmatch(r"query_result\((.+)\)", expr)  # sent as an instant query
    return result_query[1] if result_query else expr


SCRAPE_PASSWORD = "scrape-pw-31b7"


def _secured(directory: Path) -> dict[str, Any]:
    """A CA, a server certificate, a web config (TLS, one bcrypt user) and the scrape
    options Prometheus needs for it: the recipe of docs/operations.md."""
    directory.mkdir()
    authority = make_authority(directory, "metrics CA")
    server = issue(authority, directory, "metrics", dns=("localhost",), ips=("127.0.0.1",))
    hashed = bcrypt.hashpw(SCRAPE_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = {
        "tls_server_config": {"cert_file": server.cert.name, "key_file": server.key.name},
        "basic_auth_users": {"prometheus": hashed},
    }
    (directory / "web-config.yml").write_text(yaml.safe_dump(config))
    (directory / "scrape.password").write_text(SCRAPE_PASSWORD + "\n")
    (directory / "wrong.password").write_text("not-the-password\n")

    def scrape(password_file: str) -> dict[str, Any]:
        return {
            "scheme": "https",
            "tls_config": {"ca_file": str(authority.path)},
            "basic_auth": {
                "username": "prometheus",
                "password_file": str(directory / password_file),
            },
        }

    return {
        "web_config": str(directory / "web-config.yml"),
        "ca": str(authority.path),
        "scrape": scrape("scrape.password"),
        "wrong": scrape("wrong.password"),
    }


@pytest.fixture
def pipeline(settings_for: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY, encoding="utf-8")
    settings: Settings = settings_for(f"sqlite:///{tmp_path / 'store.db'}", registry=registry)
    ensure_topics(settings)
    secured = _secured(tmp_path / "tls")
    web = {"PORTAL_SYNC_METRICS_WEB_CONFIG_FILE": secured["web_config"]}
    env = os.environ | settings.as_env() | web
    ports = {name: free_port() for name in ("worker", "exporter", "producer")}
    procs: dict[str, subprocess.Popen[Any]] = {}
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ports}
    producer = [sys.executable, "-m", "tests.support.producer_process"]
    producer += [str(tmp_path / "source.db"), str(tmp_path / "state"), str(ports["producer"])]
    procs["producer"] = subprocess.Popen(producer, env=env, stdout=logs["producer"], stderr=-2)
    procs["worker"] = start_worker(
        settings, "--metrics-port", str(ports["worker"]), PORTAL_SYNC_BATCH_MAX_WAIT_SECONDS="0.2",
        **web,
    )  # fmt: skip
    exporter = [sys.executable, "-m", "portal_sync", "lag-exporter", "--port"]
    exporter += [str(ports["exporter"]), "--interval", "1", "--window", "5"]
    exporter += ["--group", settings.group_id]
    procs["exporter"] = subprocess.Popen(exporter, env=env, stdout=logs["exporter"], stderr=-2)
    yield {"settings": settings, "ports": ports, "procs": procs, "dir": tmp_path, **secured}
    for process in procs.values():
        if process.poll() is None:
            process.terminate()
    for process in procs.values():
        process.wait(timeout=60)
    for handle in logs.values():
        handle.close()


@pytest.fixture
def prometheus(pipeline: dict[str, Any], tmp_path: Path) -> Iterator[Prometheus]:
    jobs = {JOB[name]: port for name, port in pipeline["ports"].items()}
    scrape = {job: pipeline["scrape"] for job in jobs}
    jobs["wrong-password"] = pipeline["ports"]["worker"]  # not a portal-sync- job: no alerts
    scrape["wrong-password"] = pipeline["wrong"]
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    try:
        server = Prometheus(workdir, jobs, rule_file(FAST), scrape)
    except PrometheusUnavailable as error:
        unavailable(str(error))
    yield server
    server.stop()


def _wait_for_data(prom: Prometheus, exprs: list[str], timeout: float) -> list[str]:
    """Wait until every expression returns data; return those that never did."""
    deadline = time.monotonic() + timeout
    missing = list(exprs)
    while missing and time.monotonic() < deadline:
        missing = [expr for expr in missing if not prom.query(expr)]
        if missing:
            time.sleep(1)
    return missing


def _firing_sources(prom: Prometheus, alert: str, expected: list[str], timeout: float) -> list[str]:
    """The sources `alert` fires for, once they are `expected` (or when `timeout` ends: an
    instance pending from before the data arrived may still be resolving)."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(
            a["labels"]["source"]
            for a in prom.api("alerts")["alerts"]
            if a["labels"]["alertname"] == alert and a["state"] == "firing"
        )
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_dashboard_and_alert_expressions_have_data_and_a_stopped_worker_alerts(
    pipeline: dict[str, Any], prometheus: Prometheus
) -> None:
    board = [grafana_to_promql(expr) for expr in expressions(dashboard())]
    alert_rules = rules(FAST)
    measures = [rule.measure for rule in alert_rules]
    for rule in alert_rules:
        prometheus.query(rule.expr)  # valid PromQL (a parse error raises)

    missing = _wait_for_data(prometheus, board + measures, timeout=60)

    assert not missing, f"no data for: {missing}"
    trusting = ssl.create_default_context(cafile=pipeline["ca"])
    for name, port in pipeline["ports"].items():
        for probe in ("healthz", "readyz"):  # over TLS, without credentials
            url = f"https://127.0.0.1:{port}/{probe}"
            answer = urllib.request.urlopen(url, timeout=5, context=trusting)
            assert answer.status == 200, (name, probe)
    targets = prometheus.api("targets")["activeTargets"]
    health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
    assert all(health[JOB[name]] == ("up", "") for name in pipeline["ports"]), health
    assert health["wrong-password"][0] == "down" and "401" in health["wrong-password"][1]
    for rule_group in prometheus.api("rules")["groups"]:
        for rule in rule_group["rules"]:
            assert rule["health"] == "ok", rule
    assert "PortalSyncConsumerStalled" not in prometheus.firing()
    assert not {"PortalSyncWorkerMissing", "PortalSyncLagExporterMissing"} & prometheus.firing()
    never = "PortalSyncSourceNeverDelivered"
    assert _firing_sources(prometheus, never, ["province-79"], timeout=30) == ["province-79"]
    # The dashboard's source list has it too, delivered or not.
    listed = {row["metric"]["source"] for row in prometheus.query(SOURCES_QUERY)}
    assert "province-79" in listed and len(listed) > 1, listed
    group = pipeline["settings"].group_id
    ages = f'max(portal_sync_consumer_lag_seconds{{group="{group}"}})'

    worker = pipeline["procs"]["worker"]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)

    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and "PortalSyncConsumerStalled" not in prometheus.firing():
        time.sleep(1)
    assert "PortalSyncConsumerStalled" in prometheus.firing()
    stop = prometheus.query(f'portal_sync_consumer_status{{group="{group}"}}')
    assert [float(s["value"][1]) for s in stop] == [3.0]
    before = float(prometheus.query(ages)[0]["value"][1])
    time.sleep(3)
    assert float(prometheus.query(ages)[0]["value"][1]) > before, "time lag must keep rising"
