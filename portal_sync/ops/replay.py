"""`portal-sync replay` and `rebuild`: re-apply what the change topics retain.

A replay reads a range with its own consumer (transport.reader) and re-applies it
through the reconciler's own code path with `replay=True`: the version rule makes it
idempotent and the live worker's offsets are left alone. A dry run does the same work in
transactions that are rolled back, so its report is what the real run would do.
Invalid events are counted, not dead-lettered again: the live worker already did that
(a rebuild therefore stops at the live store's offsets, `rebuild_until`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from consumers.cache import RecordCache
from consumers.checks import Checked, DeadLetter, classify
from consumers.config import load_rules
from consumers.reconciler import BatchReport, Reconciler, starts_after
from consumers.registry import Registry
from consumers.validators import Rules, Validators
from portal_sync.settings import Settings, default_validator_processes
from schemas.errors import NOT_THE_DATAS
from schemas.views import RecordKey
from store import HistoryEntry, Store, TopicPartition
from transport.reader import Message, RangeReader, Selection

SAMPLE_SIZE = 20
Classified = tuple[list[Checked], list[DeadLetter]]
# A batch read ahead: its messages, where its partitions' reads began, its checks' verdict.
Ahead = tuple[list[Message], dict[TopicPartition, int] | None, Classified]
log = logging.getLogger(__name__)


@dataclass
class ReplaySummary:
    read: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # applied, unchanged, stale, ...
    by_entity: Counter[tuple[str, str]] = field(default_factory=Counter)  # (entity, outcome)
    changed_records: Counter[str] = field(default_factory=Counter)  # entity -> records changed
    invalid: Counter[str] = field(default_factory=Counter)  # the refused ones' reason codes
    sample: list[dict[str, Any]] = field(default_factory=list)  # field-level differences
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


OUTCOME_NAMES = {"applied": "applied", "duplicate": "unchanged", "stale": "stale"}


def replay(
    settings: Settings,
    selection: Selection,
    store: Store,
    source: str | None = None,
    entity: str | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    track_offsets: bool = False,
    until: Mapping[TopicPartition, int] | None = None,
) -> ReplaySummary:
    """Re-apply the selected records; `on_progress(done, total)` after each batch.

    `track_offsets` (for a rebuild into a fresh store) records the offsets as the live
    worker would, so that the rebuilt store can take over from where the rebuild ended.
    `until`: read each partition only up to this offset, and no partition it leaves out
    (a rebuild stops at the live store's offsets, `rebuild_until`).
    """
    import time

    registry, authority = load_rules(settings.registry, settings.authority_file)
    # A rebuild fills a store nobody else writes: the records it applied are kept, as the
    # worker keeps them, and read again only when another write came meanwhile.
    kept = settings.record_cache_records if track_offsets else 0
    reconciler = Reconciler(store, authority, cache=RecordCache(kept) if kept else None)
    summary = ReplaySummary()
    began = time.perf_counter()
    with RangeReader(settings.connection()) as reader, _Checks(settings, registry) as checks:
        ranges = reader.resolve(selection)
        if until is not None:
            ranges = {
                tp: (start, min(end, until[tp]))
                for tp, (start, end) in ranges.items()
                if tp in until and min(end, until[tp]) > start
            }
        total = sum(end - start for start, end in ranges.values())
        checks.start(total)
        for batch, starts, (valid, dead) in checks.ahead(reader, ranges, track_offsets):
            summary.read += len(batch)
            if source is not None or entity is not None:
                # invalid events of the sources and topics a filter leaves out are its
                # skipped, not this replay's failures, where their message says whose
                mine = [d for d in dead if _may_be_of(d.message, source, entity, settings)]
                summary.outcomes["skipped"] += len(dead) - len(mine)
                dead = mine
            summary.outcomes["dead_lettered"] += len(dead)
            summary.invalid.update(letter.code for letter in dead)
            wanted = [
                c for c in valid
                if (source is None or c.event.source == source)
                and (entity is None or c.event.entity == entity)
            ]  # fmt: skip
            summary.outcomes["skipped"] += len(valid) - len(wanted)
            apply = partial(reconciler.apply, replay=not track_offsets, dry_run=dry_run)
            for report in _isolating(apply, wanted, batch, starts, summary):
                _count(summary, report.outcomes, report.changes)
            if on_progress:
                on_progress(summary.read, total)
    summary.seconds = time.perf_counter() - began
    return summary


# A range this long is checked in validator processes (as the worker checks a backlog),
# each batch while the one before is applied; a shorter one in this process, at once: a
# child's start (a second or more) would outlast it.
CHECKED_APART_FROM = 20_000


class _Checks:
    """The reading and contract checks of a replay's batches (`classify`), each batch's
    while the one read before it is applied: the checks in the worker's validator processes
    (`PORTAL_SYNC_VALIDATOR_PROCESSES`) for a long range, else in this process. Batches of
    `PORTAL_SYNC_BATCH_MAX_EVENTS`, as the worker's."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.validators: Validators | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="replay-checks")

    def __enter__(self) -> _Checks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        if self.validators is not None:
            self.validators.close()

    def start(self, total: int) -> None:
        if total < CHECKED_APART_FROM:
            return
        processes = self.settings.validator_processes
        if processes is None:
            processes = default_validator_processes()
        if processes <= 0:
            return
        rules = Rules(self.registry, self.settings.topics(), self.settings.max_clock_skew_seconds)
        try:
            self.validators = Validators(processes, rules)
        except Exception as error:  # no process could start: slower, never wrong
            log.warning("validator processes did not start (%s): checked here",
                        type(error).__name__)  # fmt: skip

    def _classify(self, batch: Sequence[Message]) -> Classified:
        if self.validators is not None:
            return self.validators.classify(batch)
        return classify(
            batch,
            self.registry,
            topics=self.settings.topics(),
            max_clock_skew_seconds=self.settings.max_clock_skew_seconds,
        )

    def ahead(
        self, reader: RangeReader, ranges: Mapping[TopicPartition, Any], track_offsets: bool
    ) -> Iterator[Ahead]:
        """Each batch read, with where its partitions' reads began (a rebuild's offsets)
        and its checks' verdict. The reading and the checks run in this object's one
        thread, the next batch's while the caller applies this one: the reader's client is
        used by that thread alone, one step at a time, and closed after it is done."""
        batches = reader.read(dict(ranges), self.settings.batch_max_events)

        def next_batch() -> Ahead | None:
            batch = next(batches, None)
            if batch is None:
                return None
            starts = dict(reader.batch_starts) if track_offsets else None
            return batch, starts, self._classify(batch)

        try:
            coming = self.thread.submit(next_batch)
            while (ready := coming.result()) is not None:
                coming = self.thread.submit(next_batch)
                yield ready
        finally:
            # the reader's generator ended by the thread that used it, after its last step
            close = getattr(batches, "close", None)
            if close is not None:
                try:
                    self.thread.submit(close).result()
                except RuntimeError:  # the thread is shut down: none uses the reader now
                    close()


def _may_be_of(
    message: Message, source: str | None, entity: str | None, settings: Settings
) -> bool:
    """Whether an invalid event may be of `source` and `entity`, by its topic and its
    message key's last part (`<entity>:<key>:<source>`); one whose key says nothing
    (none, or not of that form) may be anyone's."""
    if entity is not None and message.topic != settings.topics().change_topic(entity):
        return False
    if source is None or not message.key or message.key.count(b":") < 2:
        return True
    return message.key.rsplit(b":", 1)[1] == source.encode()


def rebuild_until(live: Store) -> dict[TopicPartition, int]:
    """Where a rebuild stops: the live store's offsets. A rebuild counts the invalid
    events it reads and skips those the store refuses, without dead letters, since the
    live worker sent them; past the live store's offsets it has not, and a rebuilt store
    that took over would hold offsets past events that are nowhere (neither applied nor
    dead-lettered). The worker on the rebuilt store reads the rest, as the live one
    would have; a partition the live store holds no offset for is the worker's from its
    log start."""
    return live.all_offsets()


def _isolating(
    apply: Callable[..., BatchReport],
    events: Sequence[Checked],
    batch: Sequence[Message],
    starts: Mapping[TopicPartition, int] | None,
    summary: ReplaySummary,
) -> Iterator[BatchReport]:
    """Apply a batch; when the store refuses it, halve it until the event it refuses alone
    is found and skip that one (the live worker dead-lettered it as `apply_failed`), as
    the worker does, so that one such event never stops a replay or a rebuild."""
    try:
        yield apply(events, batch, starts=starts)
        return
    except NOT_THE_DATAS:  # as the worker: memory short skips no event, it stops the run
        raise
    except Exception as error:  # a record error, or a bug met by some data
        if len(batch) == 1:
            message = batch[0]
            log.error("event at %s:%d:%d cannot be applied (%s): skipped", message.topic,
                      message.partition, message.offset, type(error).__name__)  # fmt: skip
            summary.outcomes["apply_failed"] += 1
            yield apply([], batch, starts=starts)
            return
    middle = len(batch) // 2
    first, second = batch[:middle], batch[middle:]
    in_first = {(m.tp, m.offset) for m in first}
    yield from _isolating(
        apply, [c for c in events if (c.message.tp, c.message.offset) in in_first], first,
        starts, summary,
    )  # fmt: skip
    yield from _isolating(
        apply, [c for c in events if (c.message.tp, c.message.offset) not in in_first],
        second, starts_after(first, starts), summary,
    )  # fmt: skip


def _count(summary: ReplaySummary, outcomes: list[Any], changes: list[HistoryEntry]) -> None:
    for item in outcomes:
        name = OUTCOME_NAMES[item.outcome]
        summary.outcomes[name] += 1
        summary.by_entity[(item.entity, name)] += 1
    for change in changes:
        summary.changed_records[change["entity"]] += 1
        if len(summary.sample) < SAMPLE_SIZE:
            summary.sample.append(
                {"entity": change["entity"], "key": change["key"], "source": change["source"],
                 "changes": change["changes"]}
            )  # fmt: skip


DIFFERENCES = ("only_live", "only_rebuilt", "different")
COMPARE_SAMPLES = 5
COMPARE_CHUNK = 1000  # differing records checked against the live store's times at once


@dataclass
class Comparison:
    """`compare_stores`'s finding: per kind of difference, how many and the first few."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIFFERENCES, 0))
    samples: dict[str, list[RecordKey]] = field(
        default_factory=lambda: {name: [] for name in DIFFERENCES}
    )
    meanwhile: int = 0  # differing, but moved ahead in the live store since the rebuild began

    def any(self) -> bool:
        return any(self.counts.values())

    def add(self, name: str, key: RecordKey) -> None:
        self.counts[name] += 1
        if len(self.samples[name]) < COMPARE_SAMPLES:
            self.samples[name].append(key)


def _moved_ahead(live: dict[str, int], rebuilt: dict[str, int]) -> bool:
    """Whether a record's views in the live store are the rebuilt store's moved on: every
    source's view there, at the same or a later version, and one at least later or new."""
    return live != rebuilt and all(live.get(s, 0) >= v for s, v in rebuilt.items())


def compare_stores(
    live: Store, rebuilt: Store, changed_since: datetime | None = None
) -> Comparison:
    """Records only in the live store, only in the rebuilt one, or different: both stores
    read in one pass each, in the same order (bounded memory, whatever their size). With
    `changed_since`, a difference whose record the live store changed at or after it, and
    only by moving ahead (`_moved_ahead`: its workers ran on while the rebuild read up to
    the offsets it started from), is counted apart, as `meanwhile`, and is not a
    difference. A record the live store holds less of (a `source purge`, offsets reset
    past events, a restore) is a difference however recently it changed."""
    found = Comparison()
    pending: list[tuple[str, RecordKey]] = []

    def check(flush: bool = False) -> None:
        if not pending or (not flush and len(pending) < COMPARE_CHUNK):
            return
        later = (
            set()
            if changed_since is None
            else live.changed_since([key for _, key in pending], changed_since)
        )
        if later:
            keys = sorted(later)
            ahead, behind = live.view_versions(keys), rebuilt.view_versions(keys)
            later = {k for k in later if _moved_ahead(ahead.get(k, {}), behind.get(k, {}))}
        for name, key in pending:
            if key in later:
                found.meanwhile += 1
            else:
                found.add(name, key)
        pending.clear()

    left, right = live.iter_records(), rebuilt.iter_records()
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[:2] < b[:2]):
            pending.append(("only_live", (a[0], a[1])))  # type: ignore[index]
            a = next(left, None)
        elif a is None or b[:2] < a[:2]:
            pending.append(("only_rebuilt", (b[0], b[1])))
            b = next(right, None)
        else:
            if a[2:4] != b[2:4]:  # data and sources
                pending.append(("different", (a[0], a[1])))
            a, b = next(left, None), next(right, None)
        check()
    check(flush=True)
    return found
