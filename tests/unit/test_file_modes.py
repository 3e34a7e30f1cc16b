"""What the command line creates is private to the user: files 0600, directories 0700."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.unit.test_store_cli import run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_export_and_their_directories_are_private(tmp_path: Path) -> None:
    store = tmp_path / "fresh" / "store.db"
    out = tmp_path / "out" / "records.jsonl"
    out.parent.mkdir()
    upgraded = run_cli("store", "upgrade", "--store", f"sqlite:///{store}")
    assert upgraded.returncode == 0, upgraded.stderr
    exported = run_cli(
        "export", "--store", f"sqlite:///{store}", "-o", str(out), "--reason", "test"
    )
    assert exported.returncode == 0, exported.stderr
    assert _mode(store.parent) == 0o700
    assert _mode(store) == 0o600
    assert _mode(out) == 0o600
