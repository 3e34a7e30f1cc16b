"""`portal-sync demo` end to end (smaller population) on its own secured local broker."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from transport.local import LocalKafka

pytestmark = pytest.mark.kafka


def test_demo_runs_end_to_end_on_its_secured_broker_and_its_self_check_passes(
    tmp_path: Path,
) -> None:
    """No cluster configured: the demo starts its own broker with `--secure` (SASL_SSL,
    ACLs) in its own data dir; each source produces as its principal, the forgers hold a
    source's credentials but not its key."""
    env = os.environ | {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "PORTAL_SYNC_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PORTAL_SYNC_METRICS_PORT": "0",
        "COLUMNS": "300",
    }
    for name in [name for name in env if name.startswith("PORTAL_SYNC_KAFKA_")]:
        del env[name]
    broker = LocalKafka(tmp_path / "data" / "portal-sync" / "demo-kafka")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "portal_sync", "demo", "--people", "600", "--reset"],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
    finally:
        broker.down()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert broker.secure  # its own data dir, never the default broker's
    assert re.search(r"Kafka\s*│\s*127\.0\.0\.1:\d+ SASL_SSL \(SCRAM-SHA-512\) with ACLs", output)
    assert re.search(r"a source reading the change topics\s*│\s*refused by the ACLs", output)
    # The forgers send with a source's own credentials: the broker lets them in.
    assert re.search(r"forged: claims province-01, unsigned\s*│\s*User:province-01", output)
    assert re.search(r"province-79 signs as province-01\s*│\s*User:province-79", output)
    config = (tmp_path / "data" / "portal-sync" / "demo" / "province-79.toml").read_text()
    assert 'sasl_username = "province-79"' in config and "sasl_password =" not in config
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


def test_demo_runs_on_a_configured_cluster_as_it_is(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A configured (here plaintext) cluster is used with its own settings: no broker of
    the demo's, no principals; the refusals are the worker's alone."""
    env = os.environ | {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "PORTAL_SYNC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "PORTAL_SYNC_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PORTAL_SYNC_METRICS_PORT": "0",
        "COLUMNS": "300",
    }
    result = subprocess.run(
        [sys.executable, "-m", "portal_sync", "demo", "--people", "200", "--reset"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "self-check PASS" in output and "refusal check PASS" in output
    assert re.search(r"Kafka\s*│\s*\S+ \(PLAINTEXT\), no ACLs", output)
    assert not (tmp_path / "data" / "portal-sync" / "demo-kafka").exists()
