"""A replay's and a rebuild's batch that the store refuses is halved down to the event that
fails alone, as the worker's is; an error that is not the data's (memory short, a guard, a
store away) stops the run instead, as it stops the worker: before, a replay that ran short
of memory skipped every event of its batch, each as `apply_failed`, and moved its offsets
past them."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from portal_sync.ops.replay import ReplaySummary, _isolating
from schemas.errors import ConfigurationError, Refused, TransientError
from transport.message import Message

TOPIC = "ps.citizen.changes"


def _batch(n: int) -> tuple[list[Any], list[Message]]:
    messages = [Message(TOPIC, 0, offset, b"{}") for offset in range(n)]
    return [SimpleNamespace(message=m) for m in messages], messages


class _Store:
    """Applies what it is given, refusing any batch that holds one of `refused` with
    `error`; records each call's offsets."""

    def __init__(self, error: BaseException, refused: set[int]) -> None:
        self.error = error
        self.refused = refused
        self.calls: list[tuple[list[int], list[int]]] = []

    def apply(self, events: Sequence[Any], batch: Sequence[Message], starts: Any = None) -> str:
        offsets = [c.message.offset for c in events]
        if self.refused & set(offsets):
            raise self.error
        self.calls.append((offsets, [m.offset for m in batch]))
        return "report"


def test_an_event_the_store_refuses_alone_is_skipped_and_the_rest_applied() -> None:
    events, batch = _batch(8)
    store = _Store(ValueError("a bug met by some data"), refused={5})
    summary = ReplaySummary()
    reports = list(_isolating(store.apply, events, batch, None, summary))
    assert summary.outcomes["apply_failed"] == 1
    applied = sorted(o for events_applied, _ in store.calls for o in events_applied)
    assert applied == [0, 1, 2, 3, 4, 6, 7]
    assert ([], [5]) in store.calls  # its offset passed, nothing applied
    assert len(reports) == len(store.calls)


@pytest.mark.parametrize(
    "error",
    [MemoryError(), TransientError("away"), Refused("a guard"), ConfigurationError("a setting")],
)
def test_an_error_not_the_datas_stops_the_run_and_skips_nothing(error: BaseException) -> None:
    events, batch = _batch(8)
    store = _Store(error, refused={0, 1, 2, 3, 4, 5, 6, 7})
    summary = ReplaySummary()
    with pytest.raises(type(error)):
        list(_isolating(store.apply, events, batch, None, summary))
    assert summary.outcomes["apply_failed"] == 0
    assert store.calls == []
