"""Kafka records as the project sees them, and reading a bounded range of them.

The range reader has a consumer of its own, assigned partitions explicitly; it never joins
or commits for a group, so reading a range never moves the live reconciler's offsets and can
run beside it (replay, rebuild, dead letters).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from schemas.errors import Refused, TransientError
from transport import clients
from transport.config import KafkaConnection
from transport.guard import first_offset, unreadable
from transport.message import TP as TP  # re-exported: the transport's record types
from transport.message import Message as Message

OffsetRange = tuple[int, int]  # [start, end)


@dataclass(frozen=True)
class Selection:
    """Which records: topics (and partitions), by time or by offsets."""

    topics: list[str]
    partitions: list[int] | None = None
    since: datetime | None = None
    until: datetime | None = None
    from_offset: int | None = None
    to_offset: int | None = None


class RangeReader:
    """Reads selected ranges of topics; use as a context manager."""

    def __init__(self, connection: KafkaConnection, client_id: str = "portal-sync-range-reader"):
        self.connection = connection
        # Per partition of the last batch read: the offset the read started from. On a
        # compacted topic the batch's first record may come later (the ones between were
        # compacted away): a rebuild records the range from here, without a gap.
        self.batch_starts: dict[TP, int] = {}
        self._consumer = clients.consumer(
            connection,
            client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # what the worker applies (transport.group)
            max_partition_fetch_bytes=clients.MAX_PARTITION_FETCH_BYTES,
        )

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def stable_end(self, tp: TP) -> int:
        """The partition's last stable offset: how far committed records can be read now
        (below the log's end while a transaction is open)."""
        partition = TopicPartition(*tp)
        try:
            return int(self._consumer.end_offsets([partition])[partition])
        except KafkaError as error:
            raise clients.translate(error, "read topics", self.connection) from None

    def resolve(self, selection: Selection) -> dict[TP, OffsetRange]:
        """Offsets per partition for the selection; times resolve to the first offset at or
        after them (Kafka's ListOffsets by timestamp)."""
        try:
            return self._resolve(selection)
        except KafkaError as error:
            raise clients.translate(error, "read topics", self.connection) from None

    def _resolve(self, selection: Selection) -> dict[TP, OffsetRange]:
        consumer = self._consumer
        found = {topic: consumer.partitions_for_topic(topic) for topic in selection.topics}
        if unseen := sorted(topic for topic, known in found.items() if not known):
            # read as empty before: `dlq list` said "dead letters (0)" to a principal that
            # may not see the topic, and under a mistyped topic prefix
            raise Refused(
                f"Kafka: {self.connection.principal()} sees no topic {', '.join(unseen)}: it "
                "does not exist (check PORTAL_SYNC_TOPIC_PREFIX) or the cluster's ACLs do not "
                "let this principal describe it"
            )
        partitions = [
            TopicPartition(topic, p)
            for topic in selection.topics
            for p in sorted(found[topic] or ())
            if selection.partitions is None or p in selection.partitions
        ]
        if not partitions:
            return {}
        first = consumer.beginning_offsets(partitions)
        last = consumer.end_offsets(partitions)
        start = dict(first)
        end = dict(last)
        if selection.since is not None:
            start = self._at_time(partitions, selection.since, last)
        if selection.until is not None:
            end = self._at_time(partitions, selection.until, last)
        if selection.from_offset is not None:
            start = {tp: max(first[tp], selection.from_offset) for tp in partitions}
        if selection.to_offset is not None:
            end = {tp: min(last[tp], selection.to_offset) for tp in partitions}
        return {
            (tp.topic, tp.partition): (start[tp], end[tp])
            for tp in partitions
            if end[tp] > start[tp]
        }

    def _at_time(
        self, partitions: list[Any], moment: datetime, last: dict[Any, int]
    ) -> dict[Any, int]:
        millis = int(moment.timestamp() * 1000)
        found = self._consumer.offsets_for_times({tp: millis for tp in partitions})
        return {tp: found[tp].offset if found.get(tp) else last[tp] for tp in partitions}

    def read(
        self, ranges: dict[TP, OffsetRange], batch: int = 2000, deadline: float | None = None
    ) -> Iterator[list[Message]]:
        """Batches of the records in the ranges, each partition in offset order; past
        `deadline` (monotonic) with a range not read to its end: `ReadTimedOut`."""
        try:
            yield from self._read(ranges, batch, deadline)
        except KafkaError as error:
            raise clients.translate(error, "read topics", self.connection) from None

    def _read(
        self, ranges: dict[TP, OffsetRange], batch: int, deadline: float | None
    ) -> Iterator[list[Message]]:
        if not ranges:
            return
        consumer = self._consumer
        assigned = {TopicPartition(t, p): span for (t, p), span in ranges.items()}
        consumer.assign(list(assigned))
        for tp, (start, _) in assigned.items():
            consumer.seek(tp, start)
        open_partitions = set(assigned)
        while open_partitions:
            if deadline is not None and time.monotonic() > deadline:
                raise ReadTimedOut(f"{len(open_partitions)} partitions not read to their end")
            before = {tp: consumer.position(tp) for tp in open_partitions}
            polled = consumer.poll(timeout_ms=1000, max_records=batch)
            messages: list[Message] = []
            for tp, records in polled.items():
                end = assigned[tp][1]
                # A batch the guard could not read is one record at its last offset: kept
                # when the batch begins within the range.
                messages += [to_message(r) for r in records if first_offset(r) < end]
            for tp in list(open_partitions):
                if consumer.position(tp) >= assigned[tp][1]:
                    open_partitions.discard(tp)
                    consumer.pause(tp)
            if messages:
                self.batch_starts = {
                    (tp.topic, tp.partition): before[tp] for tp in polled if tp in before
                }
                yield messages


LOG_APPEND_TIME = 1  # a record's timestamp type (0: CreateTime) in both Kafka clients


def to_message(record: Any) -> Message:
    """A kafka-python ConsumerRecord as a Message."""
    marked = unreadable(record.headers)
    read = record.headers[1:] if marked is not None else record.headers or []
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.value,
        record.key,
        record.timestamp,
        tuple((name, value or b"") for name, value in read),
        record.timestamp_type == LOG_APPEND_TIME,
        marked,
    )


class ReadTimedOut(TransientError):
    """A range was not read to its end within the time given (a leader away)."""


class OpenTransaction(TransientError):
    """A transaction still open holds back the records of a range (Kafka's last stable
    offset is below its end): whether they are events is known once it ends."""


def nothing_before(
    connection: KafkaConnection, tp: TP, start: int, end: int, timeout: float = 5.0
) -> bool:
    """Whether the partition holds no committed message in [start, end): only a
    transactional writer's markers or aborted events, or offsets the log cleaner emptied.
    Reads up to the first message, for at most `timeout` seconds (`ReadTimedOut`); a range
    that an open transaction holds back raises `OpenTransaction`."""
    deadline = time.monotonic() + timeout
    with RangeReader(connection, "portal-sync-caught-up") as reader:
        stable = reader.stable_end(tp)
        if stable < end:
            raise OpenTransaction(
                f"{tp[0]}:{tp[1]}: an open transaction holds back offsets {stable} to {end}"
            )
        selection = Selection([tp[0]], [tp[1]], from_offset=start, to_offset=end)
        return not any(batch for batch in reader.read(reader.resolve(selection), 100, deadline))
