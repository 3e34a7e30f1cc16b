"""The benchmarks' short runs, for correctness only (never timed): the end-to-end bench's
smoke run and the fault suite's short run, each on its own real broker and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_e2e_smoke_run_leaves_the_pure_merge_in_both_stores() -> None:
    result = _run("bench/e2e.py", "--smoke", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("OK: store = pure merge") == 2
    # and the same views, history, provenance and conflicts on both backends
    assert "store digests agree" in result.stdout and "(2 stores)" in result.stdout


def test_fault_suite_short_run_loses_nothing() -> None:
    result = _run("bench/faults.py", "--short", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for line in ("records lost", "records divergent", "dead letters missing"):
        values = [row.split()[-1] for row in output.splitlines() if row.startswith(line)]
        assert values == ["0"], (line, output[-5000:])


def test_broker_drill_short_run_loses_nothing_and_the_lag_recovers() -> None:
    """Three nodes, two workers, the lag exporter; two nodes kill -9ed one after the other:
    the pure merge, contiguous journals, and the lag reported again after each restart."""
    result = _run("bench/faults.py", "--drill", "brokers", "--short", timeout=420)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    for line in ("records lost", "records divergent", "feed lines never published"):
        values = [row.split()[-1] for row in output.splitlines() if row.startswith(line)]
        assert values == ["0"], (line, output[-5000:])
    journal = [row for row in output.splitlines() if row.startswith("journal gaps")]
    assert journal and journal[0].endswith("0 / 0 / 0"), output[-5000:]
    assert "PROBLEM" not in output
