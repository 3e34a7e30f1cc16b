"""Reading a bounded range of Kafka records with a consumer of its own (kafka-python).

The consumer is assigned partitions explicitly and never joins or commits for a group, so
reading a range never moves the live reconciler's offsets and can run beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from consumers.reconciler import Message
from portal_sync.settings import Settings

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


def open_consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1_048_576,
        client_id="portal-sync-range-reader",
    )


def resolve(consumer: KafkaConsumer, selection: Selection) -> dict[TopicPartition, OffsetRange]:
    """Offsets per partition for the selection; times resolve to the first offset at or
    after them (Kafka's ListOffsets by timestamp)."""
    partitions = [
        TopicPartition(topic, p)
        for topic in selection.topics
        for p in sorted(consumer.partitions_for_topic(topic) or ())
        if selection.partitions is None or p in selection.partitions
    ]
    if not partitions:
        return {}
    first = consumer.beginning_offsets(partitions)
    last = consumer.end_offsets(partitions)
    start = dict(first)
    end = dict(last)
    if selection.since is not None:
        start = _at_time(consumer, partitions, selection.since, last)
    if selection.until is not None:
        end = _at_time(consumer, partitions, selection.until, last)
    if selection.from_offset is not None:
        start = {tp: max(first[tp], selection.from_offset) for tp in partitions}
    if selection.to_offset is not None:
        end = {tp: min(last[tp], selection.to_offset) for tp in partitions}
    return {tp: (start[tp], end[tp]) for tp in partitions if end[tp] > start[tp]}


def _at_time(
    consumer: KafkaConsumer,
    partitions: list[TopicPartition],
    moment: datetime,
    last: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    millis = int(moment.timestamp() * 1000)
    found = consumer.offsets_for_times({tp: millis for tp in partitions})
    return {tp: found[tp].offset if found.get(tp) else last[tp] for tp in partitions}


def read(
    consumer: KafkaConsumer, ranges: dict[TopicPartition, OffsetRange], batch: int = 2000
) -> Iterator[list[Message]]:
    """Batches of the records in the ranges, each partition in offset order."""
    if not ranges:
        return
    consumer.assign(list(ranges))
    for tp, (start, _) in ranges.items():
        consumer.seek(tp, start)
    open_partitions = set(ranges)
    while open_partitions:
        polled = consumer.poll(timeout_ms=1000, max_records=batch)
        messages: list[Message] = []
        for tp, records in polled.items():
            end = ranges[tp][1]
            messages += [_message(r) for r in records if r.offset < end]
        for tp in list(open_partitions):
            if consumer.position(tp) >= ranges[tp][1]:
                open_partitions.discard(tp)
                consumer.pause(tp)
        if messages:
            yield messages


def _message(record: Any) -> Message:
    """A kafka-python ConsumerRecord as the reconciler's Message."""
    headers = tuple((name, value or b"") for name, value in (record.headers or []))
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.value,
        record.key,
        record.timestamp,
        headers,
    )
