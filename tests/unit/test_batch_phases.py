"""Where a batch's time goes: the phases of its store transaction, their histogram, the
worker's closing line and the bench's reading of it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prometheus_client import REGISTRY

from bench.e2e import phases
from consumers.metrics import (
    PHASE_NAMES,
    phase_summary,
    phase_totals,
    record_batch,
    record_check,
)
from consumers.reconciler import PHASES
from store import Store
from tests.support.store_helpers import CITIZEN, CITIZEN_2, Feed, event


def observed(phase: str) -> float:
    labels = {"phase": phase}
    return REGISTRY.get_sample_value("portal_sync_batch_phase_duration_seconds_count", labels) or 0


def test_a_batch_reports_its_transaction_phases_and_they_are_observed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()
    try:
        feed = Feed(store)
        began = time.perf_counter()
        report = feed.apply(
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "Nguyễn Văn An"}),
            event("citizen", CITIZEN_2, "province-79", 1, {"full_name": "Trần Thị Bình"}),
        )
        elapsed = time.perf_counter() - began
    finally:
        store.close()
    assert list(report.phases) == list(PHASES)
    assert all(seconds >= 0 for seconds in report.phases.values())
    assert sum(report.phases.values()) <= elapsed
    before = {phase: observed(phase) for phase in PHASE_NAMES}
    started = phase_totals()
    record_batch(report, 60.0)
    record_check(0.02)
    assert {phase: observed(phase) - before[phase] for phase in before} == dict.fromkeys(before, 1)
    batches, line = phase_summary(started, phase_totals())
    assert batches == 1  # a check is not a batch
    assert line.startswith("check 0.020 s, read ")


def test_the_bench_reads_the_workers_closing_lines(tmp_path: Path) -> None:
    logs = []
    zero: dict[str, float] = dict.fromkeys(PHASE_NAMES, 0.0)
    for number, seconds in enumerate((1.0, 3.0)):
        # ten batches of `seconds` split evenly over the transaction's phases, checks apart
        totals = {phase: 10 * seconds / 4 for phase in PHASES} | {"check": seconds}
        batches, line = phase_summary((0, zero), (10, totals))
        path = tmp_path / f"worker-{number}.log"
        handler = logging.FileHandler(path)
        logger = logging.getLogger(f"test.worker.{number}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.info("%d batches; time by phase: %s", batches, line)
        handler.close()
        logs.append(path)
    # 20 batches: 4 s of checks (200 ms a batch), 10 s in each phase (500 ms a batch)
    assert phases(logs) == "check 200, read 500, merge 500, write 500, commit 500"
    assert phases([tmp_path / "absent.log"]) == ""
