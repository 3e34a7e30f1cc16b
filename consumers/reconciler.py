"""Applying a batch of change messages to the store, exactly once per partition offset.

`consumers.checks.classify` (pure) turns raw messages into valid events and dead letters.
`Reconciler` opens one store unit of work per batch: it gets the stored offsets and the
current views of every record the batch touches, skips what is already applied, applies
the version rule per (source, entity, key), re-merges every touched record in memory, and
hands the store one set of typed changes (views, records, history, conflicts, anomalies,
owners, offsets).
A live worker's reconciler keeps the records its batches applied (`consumers.cache`) and
takes them instead of reading them back while the store confirms nothing else wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from time import perf_counter
from typing import Any

from consumers.cache import RecordCache
from consumers.checks import AcceptedEvent, Checked
from consumers.merge import (
    Authority,
    Outcome,
    decide,
    field_conflicts,
    merge,
    record_changes,
    same_version,
    unusual_transition,
)
from schemas import ChangeEvent
from schemas.values import value_class
from schemas.views import CanonicalRecord, RecordKey, SourceView
from store import (
    Anomaly,
    BatchChanges,
    Conflicts,
    HistoryEntry,
    OffsetGap,
    OffsetRange,
    SourcePartition,
    Store,
    TopicPartition,
    ViewRow,
    utcnow,
)
from store.purge import PurgeCounts, SourcePurge
from transport.reader import Message


@value_class
class EventOutcome:
    source: str
    entity: str
    outcome: Outcome
    occurred_at: datetime


@dataclass(frozen=True)
class Remerged:
    """What a remerge changed: records whose values changed (a history entry each), and
    records whose values stayed and whose provenance moved (which source a field is
    credited to, as `show` and `export --provenance` name it); apart, records whose field
    conflicts changed (rules that compare values otherwise: a revision that folds tone
    marks clears conflicts and changes no value)."""

    values: int = 0
    credit_only: int = 0
    conflicts: int = 0

    @property
    def total(self) -> int:
        return self.values + self.credit_only

    def __add__(self, other: Remerged) -> Remerged:
        return Remerged(
            self.values + other.values,
            self.credit_only + other.credit_only,
            self.conflicts + other.conflicts,
        )


@dataclass
class BatchReport:
    outcomes: list[EventOutcome] = field(default_factory=list)
    committed_at: datetime | None = None
    already_applied: int = 0
    new_conflicts: list[tuple[str, str]] = field(default_factory=list)  # (entity, field)
    anomalies: int = 0
    changes: list[HistoryEntry] = field(default_factory=list)  # history entries written
    records_kept: int = 0  # records taken from the worker's cache instead of read
    records_read: int = 0  # records read from the store
    # Wall time of the transaction's phases, in seconds (`PHASES`).
    phases: dict[str, float] = field(default_factory=dict)

    def applied(self) -> list[tuple[str, datetime]]:
        """(source, occurred_at) of every event this batch applied."""
        return [(o.source, o.occurred_at) for o in self.outcomes if o.outcome == "applied"]


# A batch's store transaction, in order: `read` (the records' locks, the stored offsets, the
# records not kept), `merge` (the events merged; on PostgreSQL the parts but the last sent
# meanwhile), `write` (the last part written and everything sent waited for, then the dead
# letters' acknowledgements), `commit`.
PHASES = ("read", "merge", "write", "commit")


def starts_after(
    first: Sequence[Message], starts: Mapping[TopicPartition, int] | None
) -> dict[TopicPartition, int] | None:
    """Where the reads of a batch's second half began, when its first half is `first`:
    just after the first half's last message of each partition (a compacted log may have
    none between them), elsewhere where the batch's own reads began."""
    if starts is None:
        return None
    after = dict(starts)
    after.update({m.tp: m.offset + 1 for m in first})
    return after


def offset_ranges(messages: Iterable[Message]) -> dict[TopicPartition, OffsetRange]:
    """Per partition: first offset, the offset after the last, and the message count."""
    result: dict[TopicPartition, OffsetRange] = {}
    for message in messages:
        first, end, count = result.get(message.tp, (message.offset, message.offset + 1, 0))
        result[message.tp] = (min(first, message.offset), max(end, message.offset + 1), count + 1)
    return result


OWNER_ENTITIES = frozenset({"citizen", "organization"})
# Events merged per part of a batch on a store whose writes overlap the merge (PostgreSQL):
# small enough that the database starts early, big enough that a statement's fixed cost
# stays small per event (docs/performance-log.md).
PART_EVENTS = 500


@dataclass
class _Batch:
    """What one transaction accumulates before it writes."""

    views: dict[RecordKey, dict[str, SourceView]]
    canonical: dict[RecordKey, dict[str, Any]]
    changed: dict[tuple[RecordKey, str], ViewRow] = field(default_factory=dict)
    merged: dict[RecordKey, CanonicalRecord | None] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    # Per record the batch changed: its conflicts as the store holds them (from the views
    # read, then as the last part wrote them). A record whose conflicts come out the same
    # is not rewritten. None (remerge, purge): every changed record's are rewritten.
    conflicts_before: Conflicts | None = field(default_factory=dict)

    def touch(self, record_key: RecordKey) -> None:
        """Before a record's views change: keep the conflicts the store has for it."""
        before = self.conflicts_before
        if before is not None and record_key not in before:
            views = self.views.get(record_key)
            before[record_key] = field_conflicts(views.values()) if views else {}

    def take(self) -> BatchChanges:
        """The changes made since the last `take` (a part of a batch), and start afresh;
        the views and canonical data stay: later parts merge on top of them."""
        changes = self.changes()
        if self.conflicts_before is not None:
            self.conflicts_before.update(changes.conflicts)
        self.changed, self.merged = {}, {}
        self.history, self.anomalies = [], []
        return changes

    def conflicts(self) -> tuple[Conflicts, set[RecordKey]]:
        """The conflicts of the changed records that differ from the store's, and which of
        those records the store has none for."""
        before = self.conflicts_before
        result: Conflicts = {}
        absent: set[RecordKey] = set()
        for record_key in self.merged:
            found = field_conflicts(self.views.get(record_key, {}).values())
            if before is None:
                result[record_key] = found
                continue
            stored = before.get(record_key)
            if stored != found:
                result[record_key] = found
                if stored == {}:
                    absent.add(record_key)
        return result, absent

    def changes(self) -> BatchChanges:
        """The typed changes the store writes for this batch (offsets added by the caller)."""
        merged = self.merged
        conflicts, absent = self.conflicts()
        return BatchChanges(
            views=list(self.changed.values()),
            records=merged,
            history=self.history,
            anomalies=self.anomalies,
            conflicts=conflicts,
            conflicts_absent=absent,
            document_owners={k: document_owner(r) for k, r in merged.items() if k[0] == "document"},
        )


class Reconciler:
    def __init__(
        self,
        store: Store,
        authority: Authority,
        part_events: int | None = None,
        cache: RecordCache | None = None,
    ) -> None:
        self.store = store
        self.authority = authority
        # Events per part of a batch; None: PART_EVENTS where writes overlap, else whole.
        self.part_events = part_events
        # The records live batches applied, as they left them (a live worker's): taken
        # instead of read back when the store confirms nothing else wrote them.
        self.cache = cache
        # The partitions the store is known to hold an offset for (this reconciler committed
        # one, or the worker was given one at an assignment): it must still (`_apply`).
        self.held: set[TopicPartition] = set()

    def apply(
        self,
        events: Sequence[Checked],
        batch: Sequence[Message],
        replay: bool = False,
        dry_run: bool = False,
        before_commit: Callable[[], None] | None = None,
        starts: Mapping[TopicPartition, int] | None = None,
        after_offsets: Callable[[Mapping[TopicPartition, int]], None] | None = None,
    ) -> BatchReport:
        """Apply valid events and advance the partitions' offsets in one store transaction.

        `batch` is every message the events came from, dead letters included: the offsets
        advance past all of them. Messages the store already applied are skipped.

        A `replay` re-applies events whatever the store's offsets say and leaves the offsets
        alone (the live worker owns them); the version rule keeps it idempotent. A `dry_run`
        does all the work in a transaction that is rolled back. `before_commit` runs after
        the writes, before the commit: if it raises, nothing is committed. `after_offsets` is
        called with the stored offsets as soon as they are read (locked), before any write;
        `{}` for a replay. `starts`: where
        the read of each partition began, when a compacted log may have no record there.
        """
        cache = self.cache if not (replay or dry_run) else None
        try:
            return self._apply(
                events, batch, replay, dry_run, before_commit, starts, after_offsets, cache
            )
        except BaseException:
            if cache is not None:
                cache.drop()  # the batch rolled back, or its commit's outcome is unknown
            raise

    def _apply(
        self,
        events: Sequence[Checked],
        batch: Sequence[Message],
        replay: bool,
        dry_run: bool,
        before_commit: Callable[[], None] | None,
        starts: Mapping[TopicPartition, int] | None,
        after_offsets: Callable[[Mapping[TopicPartition, int]], None] | None,
        cache: RecordCache | None,
    ) -> BatchReport:
        report = BatchReport()
        began = perf_counter()
        partitions = {m.tp for m in batch}
        keys = {(c.event.entity, c.event.key) for c in events}
        known = cache.held(keys) if cache is not None else set()
        with self.store.batch(
            partitions, keys, use_offsets=not replay, commit=not dry_run, known=known
        ) as tx:
            stored = tx.offsets
            conflicts: Conflicts = {}  # of the records kept: as the store has them
            if cache is not None:
                if cache.usable(tx.writes, partitions, stored):
                    cache.take(known, tx.views, tx.canonical, conflicts)
                    report.records_kept = len(known)
                elif known:
                    tx.read_known()
            report.records_read = len(keys) - report.records_kept
            read = perf_counter()
            ranges: dict[TopicPartition, OffsetRange] = {}
            if not replay:
                unapplied = [m for m in batch if m.offset >= stored.get(m.tp, 0)]
                ranges = offset_ranges(unapplied)
                for tp, start in (starts or {}).items():
                    if tp in ranges and start >= stored.get(tp, start):
                        first, end, count = ranges[tp]
                        ranges[tp] = (min(first, start), end, count)
                # A gap is refused before `after_offsets` sends the batch's dead letters:
                # the batch read again would send them a second time.
                self._check_offsets_held(ranges, stored)
                tx.check_contiguous(ranges)
            if after_offsets is not None:
                after_offsets(stored)
            todo = [c for c in events if c.message.offset >= stored.get(c.message.tp, 0)]
            report.already_applied = len(events) - len(todo)
            work = _Batch(tx.views, tx.canonical, conflicts_before=conflicts)
            now = utcnow()
            todo.sort(key=lambda c: (c.message.tp, c.message.offset))
            # Where the store's statements run while we go on (PostgreSQL), the batch is
            # merged and sent in parts: the database writes one part while the next is
            # merged. A record changed again in a later part is written again.
            part = self.part_events or (PART_EVENTS if tx.overlaps else max(1, len(todo)))
            history: list[HistoryEntry] = []
            anomalies = 0
            newest: dict[SourcePartition, datetime] = {}  # applied, per source and partition
            for start in range(0, len(todo), part):
                for checked in todo[start : start + part]:
                    outcome = self._apply_event(work, checked, now)
                    event = checked.event
                    report.outcomes.append(
                        EventOutcome(event.source, event.entity, outcome, event.occurred_at)
                    )
                    if outcome == "applied":
                        where = (event.source, *checked.message.tp)
                        seen = newest.get(where)
                        if seen is None or seen < event.occurred_at:
                            newest[where] = event.occurred_at
                if start + part < len(todo):
                    history.extend(work.history)
                    anomalies += len(work.anomalies)
                    tx.send(work.take(), now)
            history.extend(work.history)
            anomalies += len(work.anomalies)
            changes = work.changes()
            conflicts.update(changes.conflicts)  # as the store will have them
            if not replay:
                changes.offsets = ranges
                changes.freshness = newest
            merged = perf_counter()
            report.new_conflicts = tx.write(changes, now)
            report.anomalies = anomalies
            report.changes = history
            if before_commit is not None:
                before_commit()
            written = perf_counter()
        report.committed_at = utcnow()
        committed = perf_counter()
        if not (replay or dry_run):
            self.held.update(ranges)
        report.phases = {
            "read": read - began,
            "merge": merged - read,
            "write": written - merged,
            "commit": committed - written,
        }
        if cache is not None:
            ends = {tp: end for tp, (_, end, _) in changes.offsets.items()}
            cache.put(
                keys,
                work.views,
                work.canonical,
                {tp: ends.get(tp, stored.get(tp)) for tp in partitions},
                conflicts,
            )
        return report

    def note_offsets(
        self, partitions: Iterable[TopicPartition], stored: Mapping[TopicPartition, int]
    ) -> None:
        """The worker sought these partitions from the store's offsets (an assignment, a
        return to the store's offsets): those it has must stay (`_check_offsets_held`);
        the others start at their log's beginning."""
        for tp in partitions:
            if tp in stored:
                self.held.add(tp)
            else:
                self.held.discard(tp)

    def _check_offsets_held(
        self, ranges: Mapping[TopicPartition, OffsetRange], stored: Mapping[TopicPartition, int]
    ) -> None:
        """The store accepts a partition it holds no offset for at any offset (its log may
        begin after 0). One it held (this reconciler committed it, or the worker was sought
        from it) must still be there: if not, the store lost it (restored from a backup, or
        failed over to a replica behind it) and a batch from where this worker is would
        skip what was lost. Refused once (`OffsetGap`): the worker then goes back to the
        store's offsets, here the log's start, and applies it all again."""
        lost = sorted(tp for tp in ranges if tp in self.held and tp not in stored)
        if lost:
            self.held.difference_update(lost)
            where = ", ".join(f"{topic}[{partition}]" for topic, partition in lost)
            raise OffsetGap(
                f"{where}: the store no longer holds the offset it held while this worker "
                "ran (restored from a backup, or failed over to a replica behind it?)"
            )

    def remerge(
        self, keys: Sequence[RecordKey], source: str = "remerge", dry_run: bool = False
    ) -> Remerged:
        """Re-merge records from their stored views (after an authority change), in one
        transaction; every record whose data changed gets a history entry. Return how many
        changed: their data, or only which source a field is credited to. A `dry_run`
        rolls the transaction back."""
        with self.store.batch((), keys, use_offsets=False, commit=not dry_run) as tx:
            work = _Batch(tx.views, tx.canonical, conflicts_before=None)
            stored = tx.attributions(keys)
            attributed = 0  # records whose data is the same and whose provenance is not
            now = utcnow()
            for record_key in keys:
                record = merge(
                    record_key[0], work.views.get(record_key, {}).values(), self.authority
                )
                work.merged[record_key] = record
                before = work.canonical.get(record_key)
                changes = record_changes(before, record.data if record else None)
                if changes or (before is None) != (record is None):
                    work.history.append(
                        {
                            "entity": record_key[0],
                            "key": record_key[1],
                            "event_id": None,
                            "source": source,
                            "version": None,
                            "changes": changes,
                            "applied_at": now,
                        }
                    )
                elif record is not None and stored.get(record_key) != (
                    record.sources,
                    record.provenance,
                ):
                    attributed += 1
            written = work.changes()
            stored_conflicts = tx.stored_conflicts(keys)
            conflicted = sum(
                found != stored_conflicts.get(record_key, {})
                for record_key, found in written.conflicts.items()
            )
            tx.write(written, now)
        return Remerged(len(work.history), attributed, conflicted)

    def purge(
        self, source: str, keys: Sequence[RecordKey], audit: SourcePurge, dry_run: bool = False
    ) -> PurgeCounts:
        """Remove `source`'s views and tombstones of these records and re-merge each from
        the views that remain, in one transaction that locks the records as a batch does.
        A record no source contributes to any more goes from `records`; every changed
        record gets a history entry (source `purge`, event: the purge's id). `audit`, with
        the counts of the chunks before, is written in the same transaction with this
        chunk's added. A `dry_run` rolls back. Return this chunk's counts."""
        with self.store.batch((), keys, use_offsets=False, commit=not dry_run) as tx:
            work = _Batch(tx.views, tx.canonical, conflicts_before=None)
            now = utcnow()
            purged: list[tuple[str, str, str]] = []
            views = tombstones = remerged = changed = removed = 0
            for record_key in sorted(set(keys)):
                view = work.views.get(record_key, {}).pop(source, None)
                if view is None:  # gone meanwhile (the retention's tombstone purge)
                    continue
                purged.append((record_key[0], record_key[1], source))
                tombstones += view.deleted
                views += not view.deleted
                before = work.canonical.get(record_key)
                record = merge(
                    record_key[0], work.views.get(record_key, {}).values(), self.authority
                )
                work.merged[record_key] = record
                remerged += record is not None
                removed += before is not None and record is None
                fields = record_changes(before, record.data if record else None)
                appeared_or_went = (before is None) != (record is None)  # even with no fields
                changed += (bool(fields) or appeared_or_went) and record is not None
                if fields or appeared_or_went:
                    work.history.append(
                        {
                            "entity": record_key[0],
                            "key": record_key[1],
                            "event_id": audit.id,
                            "source": "purge",
                            "version": None,
                            "changes": fields,
                            "applied_at": now,
                        }
                    )
            counts = PurgeCounts(views, tombstones, remerged, changed, removed)
            changes = work.changes()
            changes.purged_views = purged
            changes.purge = audit.add(counts)
            tx.write(changes, now)
        return counts

    def _apply_event(self, work: _Batch, checked: Checked, now: datetime) -> Outcome:
        event = checked.event
        record_key = (event.entity, event.key)
        current = work.views.get(record_key, {}).get(event.source)
        outcome = decide(current, event.version)
        if outcome == "duplicate" and current is not None:
            deleted = event.op == "delete"
            outcome = same_version(
                current, str(event.event_id), deleted, checked.data_dict(), event.occurred_at
            )
        if outcome != "applied":
            return outcome
        event_id = str(event.event_id)
        # source, version, event id, time, deleted, data (positional: a call per event)
        view = SourceView(
            event.source,
            event.version,
            event_id,
            event.occurred_at,
            event.op == "delete",
            checked.data_dict(),
        )
        if event.entity == "dossier":
            self._check_lifecycle(work, event, current, view, now)
        work.touch(record_key)
        work.views.setdefault(record_key, {})[event.source] = view
        work.changed[(record_key, event.source)] = ViewRow(event.entity, event.key, view)
        record = merge(event.entity, work.views[record_key].values(), self.authority)
        work.merged[record_key] = record
        after = record.data if record else None
        before = work.canonical.get(record_key)
        changes = record_changes(before, after)
        # a record of no fields created or removed changes none, and is an entry all the same
        if changes or (before is None) != (after is None):
            work.history.append(
                {
                    "entity": event.entity,
                    "key": event.key,
                    "event_id": event_id,
                    "source": event.source,
                    "version": event.version,
                    "changes": changes,
                    "applied_at": now,
                }
            )
        if after is None:
            work.canonical.pop(record_key, None)
        else:
            work.canonical[record_key] = after
        return outcome

    def _check_lifecycle(
        self,
        work: _Batch,
        event: ChangeEvent | AcceptedEvent,
        current: SourceView | None,
        view: SourceView,
        now: datetime,
    ) -> None:
        """A source stays the truth for its own dossier: flag, never refuse, odd changes."""
        if current is None or current.data is None or view.data is None:
            return
        old, new = current.data.get("status"), view.data.get("status")
        if isinstance(old, int) and isinstance(new, int) and unusual_transition(old, new):
            work.anomalies.append(
                {
                    "key": event.key,
                    "source": event.source,
                    "from_status": old,
                    "to_status": new,
                    "event_id": str(event.event_id),
                    "detected_at": now,
                }
            )


def document_owner(record: CanonicalRecord | None) -> RecordKey | None:
    """The (entity, key) of a document's owner, when the record names one."""
    if record is None:
        return None
    kind, owner_id = record.data.get("owner_kind"), record.data.get("owner_id")
    if kind in OWNER_ENTITIES and isinstance(owner_id, str):
        return (kind, owner_id)
    return None
