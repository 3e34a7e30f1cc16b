"""`portal-sync dlq`: list, show and re-drive dead letters.

A dead letter's id is `<partition>:<offset>` in the dead-letter topic (the topic has one
partition, so the offset alone is accepted too). Re-driving re-publishes the original
bytes to the original topic, with header `ps.attempt` carrying the attempt count, and
records it in the store (`dead_letter_redrives`): each dead letter is re-driven once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from consumers.reconciler import Message
from consumers.store import Store, dead_letter_redrives, utcnow
from portal_sync.kafka_range import Selection, open_consumer, read, resolve
from portal_sync.settings import Settings
from portal_sync.topics import dead_letter_topic
from producers.publisher import Publisher
from schemas.dead_letter import read_headers


@dataclass(frozen=True)
class DeadLetterRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason_code: str
    reason: str
    origin_topic: str
    origin_partition: str
    origin_offset: str
    failed_at: datetime | None
    attempt: int
    source: str | None  # from the event, when it could be read

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def redrivable(self) -> bool:
        """Only events read from a change topic go back to one; rows a producer rejected
        are fixed at their source."""
        return not self.origin_topic.startswith("source:")


@dataclass(frozen=True)
class Filters:
    reasons: list[str] | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ids: list[str] | None = None

    def keep(self, letter: DeadLetterRecord) -> bool:
        if (
            self.ids is not None
            and letter.id not in self.ids
            and str(letter.offset) not in self.ids
        ):
            return False
        if self.reasons and letter.reason_code not in self.reasons:
            return False
        if self.source and letter.source != self.source:
            return False
        when = letter.failed_at
        if self.since and (when is None or when < self.since):
            return False
        return not (self.until and (when is None or when >= self.until))


def read_dead_letters(settings: Settings, filters: Filters | None = None) -> list[DeadLetterRecord]:
    """Every dead letter the topic retains that passes the filters, oldest first."""
    filters = filters or Filters()
    consumer = open_consumer(settings)
    try:
        ranges = resolve(consumer, Selection([dead_letter_topic(settings)]))
        letters = [_letter(m) for batch in read(consumer, ranges) for m in batch]
    finally:
        consumer.close()
    return [letter for letter in letters if filters.keep(letter)]


def _letter(message: Message) -> DeadLetterRecord:
    headers = read_headers(list(message.headers))
    failed = headers.get("ps.failed_at")
    return DeadLetterRecord(
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        reason_code=headers.get("ps.reason.code", "unknown"),
        reason=headers.get("ps.reason.message", ""),
        origin_topic=headers.get("ps.origin.topic", ""),
        origin_partition=headers.get("ps.origin.partition", ""),
        origin_offset=headers.get("ps.origin.offset", ""),
        failed_at=datetime.fromisoformat(failed) if failed else None,
        attempt=int(headers.get("ps.attempt", "1") or 1),
        source=_source_of(message.value),
    )


def _source_of(value: bytes | None) -> str | None:
    try:
        source = json.loads(value or b"").get("source")
    except (ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and len(source) <= 64 else None


def counts_by_reason(letters: Iterable[DeadLetterRecord]) -> Counter[str]:
    return Counter(letter.reason_code for letter in letters)


@dataclass
class RedriveSummary:
    redriven: int = 0
    already_redriven: int = 0
    not_redrivable: int = 0


def redrive(settings: Settings, store: Store, letters: list[DeadLetterRecord]) -> RedriveSummary:
    """Re-publish each selected dead letter to its original topic once, and record it."""
    summary = RedriveSummary()
    topic = dead_letter_topic(settings)
    done = _redriven(store, topic)
    publisher = Publisher(settings, client_id="portal-sync-redrive")
    try:
        for letter in letters:
            if (letter.partition, letter.offset) in done:
                summary.already_redriven += 1
                continue
            if not letter.redrivable:
                summary.not_redrivable += 1
                continue
            headers = [("ps.attempt", str(letter.attempt).encode())]
            publisher.send(letter.origin_topic, letter.key, letter.value, headers)
            publisher.flush()  # recorded only once the broker has it
            with store.write_transaction() as conn:
                conn.execute(
                    dead_letter_redrives.insert().values(
                        topic=topic, partition=letter.partition, offset=letter.offset,
                        reason_code=letter.reason_code, target_topic=letter.origin_topic,
                        redriven_at=utcnow(),
                    )
                )  # fmt: skip
            summary.redriven += 1
    finally:
        publisher.close()
    return summary


def _redriven(store: Store, topic: str) -> set[tuple[int, int]]:
    query = select(dead_letter_redrives.c.partition, dead_letter_redrives.c.offset).where(
        dead_letter_redrives.c.topic == topic
    )
    with store.engine.connect() as conn:
        return {(p, o) for p, o in conn.execute(query)}
