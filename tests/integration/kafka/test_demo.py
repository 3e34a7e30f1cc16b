"""`portal-sync demo` end to end (smaller population) on the session's real broker."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def test_demo_runs_end_to_end_and_its_self_check_passes(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = os.environ | {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "PORTAL_SYNC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "PORTAL_SYNC_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PORTAL_SYNC_METRICS_PORT": "0",
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-m", "portal_sync", "demo", "--people", "600", "--reset"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "self-check PASS" in output
    assert "missing 0, extra 0, differing 0" in output
    # Every injected event (malformed, forged, out of scope) was dead-lettered by the
    # reconciler, each with its expected reason, the forged ones shown.
    injected = re.search(r"events injected \(malformed, forged, out of scope\)\s*│\s*(\d+)", output)
    dead = re.search(r"dead-lettered by the reconciler\s*│\s*(\d+)", output)
    assert injected and dead and int(injected[1]) == int(dead[1]) > 0, output
    assert "refusal check PASS" in output
    for shown in ("forged: claims province-01, unsigned", "province-79 signs as province-01",
                  "province-01 takes a Hồ Chí Minh City dossier"):  # fmt: skip
        assert shown in output, shown
    for code in ("unsigned", "bad_signature", "out_of_scope"):
        count = re.search(rf"of which {code}\s*│\s*(\d+)", output)
        assert count and int(count[1]) > 0, code
    keys = tmp_path / "data" / "portal-sync" / "demo" / "keys"
    assert {path.name for path in keys.iterdir()} >= {"province-01.key", "ministry-btp.key"}
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in keys.iterdir())


def test_demo_refuses_to_reset_an_external_cluster_without_the_flag(kafka_bootstrap: str) -> None:
    env = os.environ | {"PORTAL_SYNC_KAFKA_BOOTSTRAP": kafka_bootstrap}
    result = subprocess.run(
        [sys.executable, "-m", "portal_sync", "demo"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "--reset" in result.stderr
