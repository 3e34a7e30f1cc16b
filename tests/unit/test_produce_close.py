"""`produce`'s shutdown closes the sources' producers side by side."""

from __future__ import annotations

import threading
from typing import Any

from producers.produce import CLOSE_TIMEOUT_SECONDS, ProduceResult, _close_all


class Producer:
    """A producer whose close waits for every other one to be closing too: closed one
    after another (each up to its timeout with the broker away), the first never returns
    in time and the barrier breaks."""

    def __init__(self, barrier: threading.Barrier, closed: list[float]) -> None:
        self.barrier, self.closed = barrier, closed

    def close(self, timeout: float) -> None:
        self.barrier.wait(timeout=5)
        self.closed.append(timeout)


def test_the_sources_producers_close_side_by_side_with_a_short_wait() -> None:
    closed: list[float] = []
    barrier = threading.Barrier(4)
    producers: list[Any] = [Producer(barrier, closed) for _ in range(4)]
    _close_all(producers)
    assert closed == [CLOSE_TIMEOUT_SECONDS] * 4
    assert CLOSE_TIMEOUT_SECONDS * 2 < 30  # both of a Publisher's producers, in the grace


def test_a_source_failing_every_run_is_counted_not_listed() -> None:
    """A source left failing (a decommissioned database still in the deployment) fails a
    run every interval for months: the result counts them, one entry a source."""
    result = ProduceResult()
    for _ in range(10_000):
        result.fail("province-79-citizens")
    result.fail("province-01-citizens")
    assert result.failed == {"province-79-citizens": 10_000, "province-01-citizens": 1}
