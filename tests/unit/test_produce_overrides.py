"""`produce --metrics-host --state-dir` override the deployment file: in a container the file
is a read-only ConfigMap, its state must go to a volume and its endpoints must be reachable
from the kubelet (the Helm chart passes both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from portal_sync.cli import app

CONFIG = """
[producer]
state_dir = "state"
metrics_host = "127.0.0.1"
metrics_port = 9312

[kafka]
bootstrap = "127.0.0.1:1"

[[sources]]
id = "drop-citizens"
source = "province-01"
adapter = "filedrop"

[sources.connection]
directory = "drop"

[sources.mapping]
entity = "citizen"
key_field = "so_dinh_danh"
occurred_at_field = "cap_nhat"
"""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`produce` with the HTTP server, topic creation and the sources' run stubbed out."""
    import observability.http
    import producers.produce
    import transport.admin

    seen: dict[str, Any] = {}

    def serve(port: int, host: str, *args: Any, **kwargs: Any) -> None:
        seen["serve"] = (port, host)

    def run(deployment: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
        seen["state_dir"] = deployment.state_dir
        seen["bootstrap"] = connection.bootstrap
        return kwargs["result"]

    monkeypatch.setattr(observability.http, "serve", serve)
    monkeypatch.setattr(transport.admin, "ensure_topics", lambda *args: None)
    monkeypatch.setattr(producers.produce, "produce", run)
    return seen


def test_without_flags_the_file_decides(tmp_path: Path, calls: dict[str, Any]) -> None:
    config = tmp_path / "sources.toml"
    config.write_text(CONFIG)
    result = CliRunner().invoke(app, ["produce", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert calls["serve"] == (9312, "127.0.0.1")
    assert calls["state_dir"] == tmp_path / "state"


def test_flags_override_the_bind_address_and_the_state_dir(
    tmp_path: Path, calls: dict[str, Any]
) -> None:
    config = tmp_path / "sources.toml"
    config.write_text(CONFIG)
    state = tmp_path / "volume" / "state"
    result = CliRunner().invoke(
        app,
        ["produce", "--config", str(config), "--once", "--metrics-host", "0.0.0.0",
         "--state-dir", str(state)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls["serve"] == (9312, "0.0.0.0")
    assert calls["state_dir"] == state


def test_without_a_host_in_the_file_the_setting_decides_as_for_every_process(
    tmp_path: Path, calls: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PORTAL_SYNC_METRICS_HOST binds the worker's, the lag exporter's and `produce`'s
    endpoints alike; the deployment file's own `metrics_host`, when it has one, wins."""
    monkeypatch.setenv("PORTAL_SYNC_METRICS_HOST", "0.0.0.0")
    config = tmp_path / "sources.toml"
    config.write_text(CONFIG.replace('metrics_host = "127.0.0.1"\n', ""))
    result = CliRunner().invoke(app, ["produce", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert calls["serve"] == (9312, "0.0.0.0")

    config.write_text(CONFIG)  # the file says 127.0.0.1
    result = CliRunner().invoke(app, ["produce", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert calls["serve"] == (9312, "127.0.0.1")


def test_a_relative_state_dir_is_the_current_directory_s(
    tmp_path: Path, calls: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As any path given on a command line (and `--signing-key-file`): it was taken as
    relative to the deployment file's folder, the read-only ConfigMap the flag avoids."""
    files = tmp_path / "config"
    files.mkdir()
    config = files / "sources.toml"
    config.write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["produce", "--config", str(config), "--once", "--state-dir", "volume"]
    )
    assert result.exit_code == 0, result.output
    assert calls["state_dir"] == tmp_path / "volume"


def test_the_bootstrap_flag_wins_over_the_file_s(tmp_path: Path, calls: dict[str, Any]) -> None:
    """The file's `[kafka] bootstrap` silently replaced `--bootstrap` (README: flags
    override)."""
    config = tmp_path / "sources.toml"
    config.write_text(CONFIG)
    produce = ["produce", "--config", str(config), "--once"]
    assert CliRunner().invoke(app, produce).exit_code == 0
    assert calls["bootstrap"] == "127.0.0.1:1"
    result = CliRunner().invoke(app, [*produce, "--bootstrap", "127.0.0.1:2"])
    assert result.exit_code == 0, result.output
    assert calls["bootstrap"] == "127.0.0.1:2"
    # the environment (the chart's, for every pod) does not override the file
    result = CliRunner().invoke(app, produce, env={"PORTAL_SYNC_KAFKA_BOOTSTRAP": "127.0.0.1:3"})
    assert result.exit_code == 0, result.output
    assert calls["bootstrap"] == "127.0.0.1:1"
