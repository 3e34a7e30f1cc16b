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

from portal_sync.settings import Settings
from schemas.dead_letter import read_headers
from store import Store
from transport.publisher import Publisher
from transport.reader import Message, RangeReader, Selection


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
    with RangeReader(settings.connection()) as reader:
        ranges = reader.resolve(Selection([settings.topics().dead_letters]))
        letters = [_letter(m) for batch in reader.read(ranges) for m in batch]
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
    topic = settings.topics().dead_letters
    done = store.redriven(topic)
    publisher = Publisher(settings.connection(), settings.topics(), client_id="portal-sync-redrive")
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
            store.record_redrive(
                topic, letter.partition, letter.offset, letter.reason_code, letter.origin_topic
            )
            summary.redriven += 1
    finally:
        publisher.close()
    return summary
