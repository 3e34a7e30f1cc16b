"""The systemd units (deploy/systemd) for hosts without Kubernetes: systemd reads them
without a warning, their sandbox scores "OK" in `systemd-analyze security`, their command
lines are ones portal-sync takes, and every setting they name is one it reads.

systemd-analyze checks the files offline (no service is started: this machine's init is
not systemd); `deploy/install-system.sh --postgres` installs it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portal_sync.settings import Settings
from transport.config import KafkaConnection

ROOT = Path(__file__).resolve().parents[3]
UNITS = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
INSTANCES = {
    "portal-sync-worker@.service": "portal-sync-worker@9310.service",
    "portal-sync-producer@.service": "portal-sync-producer@province-79.service",
    "portal-sync-lag-exporter.service": "portal-sync-lag-exporter.service",
}


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: deploy/install-system.sh --postgres installs it"
    return found


def installed(tmp_path: Path, unit: str) -> Path:
    """The unit as instantiated, its portal-sync the one of this environment."""
    text = (UNITS / unit).read_text().replace("/opt/portal-sync/venv/bin", str(BIN))
    path = tmp_path / INSTANCES[unit]
    path.write_text(text)
    return path


@pytest.mark.parametrize("unit", sorted(INSTANCES))
def test_systemd_reads_the_unit_without_a_warning(tmp_path: Path, unit: str) -> None:
    result = subprocess.run(
        [analyze(), "verify", str(installed(tmp_path, unit))], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("unit", sorted(INSTANCES))
def test_the_units_sandbox_scores_ok(tmp_path: Path, unit: str) -> None:
    """At most 2.0 of 10 ("OK"): no root, no capabilities, a read-only system, private
    /tmp and devices, its own user; the network, which it needs, is most of what is left."""
    result = subprocess.run(
        [analyze(), "security", "--offline=true", "--threshold=20", str(installed(tmp_path, unit))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overall exposure level" in result.stdout


def _exec_start(unit: str) -> list[str]:
    (line,) = [v for v in _values(unit, "ExecStart")]
    instance = INSTANCES[unit].split("@")[-1].removesuffix(".service")
    line = line.replace("%i", instance)
    line = re.sub(r"\$\{([A-Z_]+)\}", lambda m: f"/run/{m.group(1).lower()}", line)
    return shlex.split(line)


def _values(unit: str, key: str) -> list[str]:
    lines = (UNITS / unit).read_text().splitlines()
    return [line.split("=", 1)[1] for line in lines if line.startswith(f"{key}=")]


@pytest.mark.parametrize("unit", sorted(INSTANCES))
def test_the_units_command_line_is_one_portal_sync_takes(unit: str) -> None:
    program, *args = _exec_start(unit)
    assert program == "/opt/portal-sync/venv/bin/portal-sync"
    result = subprocess.run(
        [str(BIN / "portal-sync"), *args, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _known_settings() -> set[str]:
    names = {f"PORTAL_SYNC_{name.upper()}" for name in Settings.model_fields}
    names |= {f"PORTAL_SYNC_KAFKA_{name.upper()}" for name in KafkaConnection.model_fields}
    for source in (ROOT / "portal_sync" / "cli").glob("*.py"):
        names |= set(re.findall(r'envvar="(PORTAL_SYNC_[A-Z_]+)"', source.read_text()))
    return names


def test_every_setting_the_units_name_is_one_portal_sync_reads() -> None:
    named = set()
    for unit in INSTANCES:
        for value in _values(unit, "Environment"):
            named.add(value.split("=", 1)[0])
    example = (UNITS / "portal-sync.env.example").read_text().splitlines()
    named |= {line.split("=", 1)[0] for line in example if line and not line.startswith("#")}
    portal = {name for name in named if name.startswith("PORTAL_SYNC_")}
    assert portal - _known_settings() == set()
    assert named - portal == {"PYTHONDONTWRITEBYTECODE"}


def test_secrets_reach_the_services_as_credential_files_never_the_environment() -> None:
    for unit in INSTANCES:
        text = (UNITS / unit).read_text()
        for value in _values(unit, "Environment"):
            name = value.split("=", 1)[0]
            assert not re.search(r"PASSWORD$|_URL$|KEY$", name), (unit, name)
        if "STORE_URL_FILE" in text:
            assert "LoadCredential=store-url:" in text and "%d/store-url" in text
    example = (UNITS / "portal-sync.env.example").read_text()
    assert not re.search(r"^PORTAL_SYNC_\w*(PASSWORD|STORE_URL)=", example, re.MULTILINE)


def test_the_lag_exporter_exports_the_workers_group_only() -> None:
    """Without `--group` it exported every group the cluster shows: an old group with lag
    and no members pages PortalSyncConsumerStalled for ever."""
    (line,) = _values("portal-sync-lag-exporter.service", "ExecStart")
    assert "--group=${PORTAL_SYNC_GROUP_ID}" in shlex.split(line)
    example = (UNITS / "portal-sync.env.example").read_text().splitlines()
    assert any(setting.startswith("PORTAL_SYNC_GROUP_ID=") for setting in example)
