"""The lag exporter's status windows run on the monotonic clock. On the wall clock, a step
of the host's clock back by an hour (NTP, a VM restored) made every window span an hour of
samples: a stalled partition stayed OK, and its page silent, for that hour."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import observability.kafka_lag as kafka_lag
from observability.kafka_lag import LagReader
from observability.lag import Status
from transport.config import KafkaConnection
from transport.topics import Topics

TP = ("p.changes.citizen", 0)


class StalledGroup(LagReader):
    """One group, one member, stuck at offset 5 of 10: the cluster's answers, as its
    admin client gives them (the I/O is not what is tested)."""

    def _committed(self) -> dict[str, dict[tuple[str, int], int]]:
        return {"portal-sync": {TP: 5}}

    def _members(self, groups: list[str]) -> dict[str, tuple[int, str]]:
        return {"portal-sync": (1, "Stable")}

    def _oldest_timestamps(self, wanted: Any, ends: Any, timeout: float = 5.0) -> Any:
        return {(*TP, 5): 1_700_000_000_000}


class Clock:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 100.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_a_step_of_the_wall_clock_moves_no_window(
    monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    clock = Clock()
    monkeypatch.setattr(kafka_lag, "time", clock)
    reader = StalledGroup(
        KafkaConnection(bootstrap="127.0.0.1:1"),
        Topics(prefix="p"),
        "portal-sync",
        "sqlite:///unused.db",
        offsets_from="kafka",
        window_seconds=3.0,
    )
    reader._cluster = SimpleNamespace(  # type: ignore[assignment]
        end_offsets_by_leader=lambda partitions: ({TP: 10}, set()), close=lambda: None
    )
    statuses = []
    for poll in range(4):
        if poll == 1:
            clock.wall += step  # the host's clock stepped, once
        (group,) = reader.read()
        statuses.append(group.status)
        clock.wall += 2.0
        clock.mono += 2.0
    # 6 s of samples, none moved: a full window of a stalled partition, whatever the clock
    assert statuses[:2] == [Status.OK, Status.OK]
    assert statuses[2:] == [Status.STALL, Status.STALL]
