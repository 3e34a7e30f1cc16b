"""The worker's health: ready while no batch retries; healthy until a batch has retried,
or one batch has taken, longer than the stall threshold (a call that blocks counts too)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import REGISTRY

from consumers.metrics import WorkerHealth


def waiting() -> float:
    value = REGISTRY.get_sample_value("portal_sync_worker_retrying_seconds")
    assert value is not None
    return value


def test_a_batch_that_blocks_past_the_threshold_is_a_stall_and_its_end_clears_it() -> None:
    health = WorkerHealth(stall_after_seconds=0.05)
    assert health.ready() and not health.stalled()
    health.busy()  # one attempt that blocks: nothing retried yet
    time.sleep(0.1)
    assert health.ready() and health.stalled()
    health.free()
    assert not health.stalled()


def test_a_batch_in_hand_past_a_few_seconds_is_not_ready(monkeypatch: Any) -> None:
    """A dead letter sent to a topic that is gone blocks one attempt a minute (the
    producer's flush) before it fails and is retried: /readyz said 200 all that minute."""
    import consumers.metrics

    monkeypatch.setattr(consumers.metrics, "BUSY_UNREADY_SECONDS", 0.05)
    health = WorkerHealth(stall_after_seconds=300)
    health.busy()
    assert health.ready()  # a batch just begun
    time.sleep(0.1)
    assert not health.ready() and not health.stalled()
    health.free()
    assert health.ready()


def test_retrying_past_the_threshold_is_a_stall_until_the_batch_passes() -> None:
    health = WorkerHealth(stall_after_seconds=0.05)
    health.busy()
    health.retrying("StoreUnavailable")
    assert not health.ready()
    time.sleep(0.1)
    assert health.stalled()
    health.free()
    assert health.stalled()  # still retrying: the time since it began counts
    health.progressed()
    assert health.ready() and not health.stalled()


def test_the_stall_alert_s_gauge_sees_a_batch_that_blocks_as_healthz_does() -> None:
    """PortalSyncWorkerStalled reads the gauge: a commit that hangs (no exception, nothing
    retried) kept it at 0 while /healthz failed and the pod was restarted."""
    health = WorkerHealth(stall_after_seconds=0.05)
    assert waiting() == 0.0
    health.busy()
    time.sleep(0.1)
    assert waiting() >= 0.1 and health.stalled()
    health.free()
    assert waiting() == 0.0
    health.retrying("StoreUnavailable")  # between batches: the offsets' read at assignment
    time.sleep(0.06)
    assert waiting() >= 0.06
    health.recovered()
    assert waiting() == 0.0


def shown() -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for metric in REGISTRY.collect()
        if metric.name == "portal_sync_worker_waiting_for"
        for sample in metric.samples
    }


def test_the_reason_the_retries_wait_for_is_shown_while_they_last() -> None:
    """The stall alert's `waiting_for` annotation names it (`portal_sync_worker_waiting_for`): the
    retry's reason first, else the failing fetches', and none once both pass."""
    health = WorkerHealth(stall_after_seconds=300)
    assert shown() == {}
    health.fetch_failed("fetch: KafkaConnectionError")
    assert shown() == {"fetch: KafkaConnectionError": 1.0}
    health.retrying("StoreUnavailable")
    assert shown() == {"StoreUnavailable": 1.0}
    health.retrying("StoreMisconfigured")
    assert shown() == {"StoreMisconfigured": 1.0}
    health.recovered()
    assert shown() == {"fetch: KafkaConnectionError": 1.0}
    health.fetched()
    assert shown() == {}
