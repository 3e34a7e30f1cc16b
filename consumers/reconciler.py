"""Applying a batch of change messages to the store, exactly once per partition offset.

`classify` is pure: it turns raw messages into valid events and dead letters. `Reconciler`
does the I/O: inside one store transaction it re-reads the applied offsets, skips what is
already applied, applies the version rule per (source, entity, key), re-merges every touched
record and advances the offsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from consumers.merge import Authority, Outcome, SourceView, decide, merge
from consumers.store import RecordKey, Store, TopicPartition, ViewRow, utcnow
from schemas import ChangeEvent, InvalidEvent, parse_event


@dataclass(frozen=True)
class Message:
    """One Kafka record as the reconciler sees it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp_ms: int | None = None

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class DeadLetter:
    message: Message
    code: str
    reason: str


@dataclass(frozen=True)
class Checked:
    message: Message
    event: ChangeEvent
    warnings: list[str]


@dataclass(frozen=True)
class EventOutcome:
    source: str
    entity: str
    outcome: Outcome
    occurred_at: datetime


@dataclass
class BatchReport:
    outcomes: list[EventOutcome] = field(default_factory=list)
    committed_at: datetime | None = None
    already_applied: int = 0


def classify(messages: Iterable[Message]) -> tuple[list[Checked], list[DeadLetter]]:
    """Split messages into contract-valid events and dead letters with their reasons."""
    valid: list[Checked] = []
    dead: list[DeadLetter] = []
    for message in messages:
        try:
            checked = parse_event(message.value)
        except InvalidEvent as error:
            dead.append(DeadLetter(message, error.code, error.message))
            continue
        valid.append(Checked(message, checked.event, checked.warnings))
    return valid, dead


OffsetRange = tuple[int, int, int]  # first offset, next offset, messages


def offset_ranges(messages: Iterable[Message]) -> dict[TopicPartition, OffsetRange]:
    """Per partition: first offset, the offset after the last, and the message count."""
    result: dict[TopicPartition, OffsetRange] = {}
    for message in messages:
        first, end, count = result.get(message.tp, (message.offset, message.offset + 1, 0))
        result[message.tp] = (min(first, message.offset), max(end, message.offset + 1), count + 1)
    return result


class Reconciler:
    def __init__(self, store: Store, authority: Authority) -> None:
        self.store = store
        self.authority = authority

    def unapplied(self, messages: Sequence[Message]) -> list[Message]:
        """The messages of a batch whose offsets the store has not applied yet."""
        with self.store.engine.connect() as conn:
            stored = self.store.offsets(conn, {m.tp for m in messages})
        return [m for m in messages if m.offset >= stored.get(m.tp, 0)]

    def apply(self, events: Sequence[Checked], batch: Sequence[Message]) -> BatchReport:
        """Apply valid events and advance the partitions' offsets in one store transaction.

        `batch` is every message the events came from, dead letters included: the offsets
        advance past all of them. Messages the store already applied are skipped.
        """
        report = BatchReport()
        with self.store.write_transaction() as conn:
            stored = self.store.offsets(conn, {m.tp for m in batch})
            todo = [c for c in events if c.message.offset >= stored.get(c.message.tp, 0)]
            report.already_applied = len(events) - len(todo)
            keys = {(c.event.entity, c.event.key) for c in todo}
            views = self.store.views(conn, keys)
            changed: dict[tuple[RecordKey, str], ViewRow] = {}
            for checked in sorted(todo, key=lambda c: (c.message.tp, c.message.offset)):
                event = checked.event
                record_key = (event.entity, event.key)
                current = views.get(record_key, {}).get(event.source)
                outcome = decide(current, event.version)
                report.outcomes.append(
                    EventOutcome(event.source, event.entity, outcome, event.occurred_at)
                )
                if outcome != "applied":
                    continue
                view = SourceView(
                    source=event.source,
                    version=event.version,
                    event_id=str(event.event_id),
                    occurred_at=event.occurred_at,
                    deleted=event.op == "delete",
                    data=event.data_dict(),
                )
                views.setdefault(record_key, {})[event.source] = view
                changed[(record_key, event.source)] = ViewRow(event.entity, event.key, view)
            touched = {record_key for record_key, _ in changed}
            merged = {k: merge(k[0], views[k].values(), self.authority) for k in touched}
            now = utcnow()
            self.store.write_views(conn, list(changed.values()), now)
            self.store.write_records(conn, merged, now)
            unapplied = [m for m in batch if m.offset >= stored.get(m.tp, 0)]
            self.store.write_offsets(conn, offset_ranges(unapplied), now)
        report.committed_at = utcnow()
        return report
