"""Consumer lag and consumer status, pure (no I/O): what the exporter and `lag` compute.

Status per partition, over a sliding window of samples in the manner of Burrow, evaluated
in this order:

0. STOP when the committed offset is past the log's end: it is a position in another log
   (the topic created again, the cluster restored), the worker refuses to go on there, and
   every event of this log may be unapplied, whatever its lag of 0 says.
1. OK when the latest lag is 0.
2. STOP when the lag is positive, the group has no members, and the committed offset did
   not move since the previous sample: nobody is consuming.
3. OK when any sample in the window has lag 0 (the consumer caught up within the window).
4. OK while the window is not full (history shorter than the window): not enough evidence.
5. STALL when the committed offset did not move over the whole window although the lag is
   positive throughout: the consumer is a member but makes no progress.
6. WARN when the offset moves but the lag grew at every step of the window: falling behind.
7. OK otherwise.

A group's status is the worst of its partitions'. In Prometheus a status is the numeric
code of `Status` (0 OK, 1 WARN, 2 STALL, 3 STOP), so `max` and `>=` order by severity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import pairwise


class Status(IntEnum):
    OK = 0
    WARN = 1
    STALL = 2
    STOP = 3


@dataclass(frozen=True)
class Sample:
    """One observation of a partition: when, the consumer's next offset, the log end."""

    at: float
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


def lag_seconds(now: float, lag_messages: int, oldest_unapplied_ms: int | None) -> float | None:
    """Age of the oldest message not yet applied: 0 when caught up, unknown (None) when
    there is lag but that message's timestamp could not be read. Measured from the
    message's own timestamp, so it keeps rising while the consumer stops committing."""
    if lag_messages <= 0:
        return 0.0
    if oldest_unapplied_ms is None:
        return None
    return max(0.0, now - oldest_unapplied_ms / 1000.0)


@dataclass
class Window:
    """Samples of one partition covering at least the last `seconds` (once that old)."""

    seconds: float
    samples: list[Sample] = field(default_factory=list)

    def push(self, sample: Sample) -> None:
        """Add a sample and drop those no longer needed: the window keeps the newest sample
        at or before its start, so a full window spans at least `seconds`."""
        self.samples.append(sample)
        start = sample.at - self.seconds
        while len(self.samples) > 1 and self.samples[1].at <= start:
            self.samples.pop(0)

    @property
    def full(self) -> bool:
        return bool(self.samples) and self.samples[0].at <= self.samples[-1].at - self.seconds


def partition_status(window: Window, has_members: bool) -> Status:
    """The status of one partition (rules in the module docstring)."""
    samples = window.samples
    if samples and samples[-1].committed > samples[-1].end:
        return Status.STOP
    if not samples or samples[-1].lag == 0:
        return Status.OK
    latest = samples[-1]
    moved = len(samples) > 1 and samples[-2].committed != latest.committed
    if not has_members and not moved:
        return Status.STOP
    if any(sample.lag == 0 for sample in samples) or not window.full:
        return Status.OK
    if all(sample.committed == latest.committed for sample in samples):
        return Status.STALL
    if all(later.lag > earlier.lag for earlier, later in pairwise(samples)):
        return Status.WARN
    return Status.OK


def group_status(statuses: Iterable[Status]) -> Status:
    """The worst status of a group's partitions (OK when it has none)."""
    return max(statuses, default=Status.OK)


def stale(now: float, last_change: float | None, stale_after: float) -> bool:
    """A source is stale when no change of it reached the store for `stale_after` seconds."""
    return last_change is None or now - last_change > stale_after


def format_age(seconds: float | None) -> str:
    """A short human age: 850ms, 42s, 7m05s, 3h12m, 2d04h."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
