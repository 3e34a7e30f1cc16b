"""A stop ends the worker's waits for an away store at once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from consumers.metrics import WorkerHealth
from consumers.worker import ReconcilerLoop
from observability.http import Liveness
from store import Store
from transport.local import free_port


def test_a_stop_ends_the_wait_for_the_stores_offsets_at_an_assignment_at_once() -> None:
    """The wait (with backoff to 30 s) runs inside the group's rebalance, which a member's
    stop waits for: the stop was seen only after the next sleep and read, up to about 40 s
    late. The store here is a PostgreSQL address nobody listens on: every read fails."""
    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.store = Store(f"postgresql+psycopg://portal@127.0.0.1:{free_port()}/none")
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    health = WorkerHealth()
    loop.processor = SimpleNamespace(health=health)  # type: ignore[assignment]

    async def wait() -> tuple[object, float]:
        asyncio.get_running_loop().call_later(0.6, loop.stop_event.set)  # in the 2nd wait
        began = time.monotonic()
        stored = await loop._stored_offsets({("portal.changes.citizen", 0)})
        return stored, time.monotonic() - began

    try:
        stored, took = asyncio.run(wait())
    finally:
        loop.store.close()
    assert stored is None
    assert took < 1.3, took  # the wait before: about 1.5 s
    # the wait counted as a batch's retries (not ready; the stall alert's gauge runs)
    assert not health.ready() and health.reason == "StoreUnavailable"


def test_a_batch_that_retried_and_then_met_a_gap_leaves_the_worker_ready() -> None:
    """A batch retried (the store away), then found another member had applied it
    (OffsetGap): it is over, and its retries with it. Left set, /readyz stayed 503 until a
    later batch, and /healthz failed on a quiet partition."""
    from store.core import OffsetGap

    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    health = WorkerHealth(stall_after_seconds=0.05)
    noted: list[tuple[object, object]] = []
    reconciler = SimpleNamespace(note_offsets=lambda tps, stored: noted.append((set(tps), stored)))
    loop.processor = SimpleNamespace(health=health, reconciler=reconciler)  # type: ignore[assignment]
    loop.store = SimpleNamespace(stored_offsets=lambda partitions: {("t", 0): 7})  # type: ignore[assignment]
    loop.applied = {("t", 0): 9}

    async def check_topics(topics: object, stored: object) -> None:
        return None

    loop._check_topics = check_topics  # type: ignore[method-assign]
    seeks: list[object] = []

    async def seek(offsets: object) -> None:
        seeks.append(offsets)

    member = SimpleNamespace(assignment=lambda: {("t", 0)}, seek=seek)

    async def batch() -> None:
        health.busy()
        health.retrying("StoreUnavailable")
        health.free()
        raise OffsetGap("t:0 starts at 9, the store is at 7")

    async def run() -> str:
        loop.idle = asyncio.Event()
        task = asyncio.ensure_future(batch())
        outcome, _ = await loop._finished(member, task, [])  # type: ignore[arg-type]
        return outcome

    assert asyncio.run(run()) == "reseek"
    assert seeks == [{("t", 0): 7}]
    # the store's offsets are what the worker has applied again, and what the store must keep
    assert loop.applied == {("t", 0): 7} and noted == [({("t", 0)}, {("t", 0): 7})]
    time.sleep(0.06)
    assert health.ready() and not health.stalled()
