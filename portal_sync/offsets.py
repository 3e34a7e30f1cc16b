"""`portal-sync offsets reset`: move a consumer group to a point in time, safely.

The reconciler resumes from the store's offsets, not from Kafka's: for its own group the
reset moves both (the store's `applied_offsets` and the group's committed offsets). For
any other group only Kafka's committed offsets move. A group with active members is
refused: a running consumer would overwrite the reset with its next commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kafka import KafkaAdminClient, TopicPartition
from kafka.structs import OffsetAndMetadata
from sqlalchemy import delete

from consumers.store import Store, applied_offsets, utcnow
from portal_sync.kafka_range import open_consumer
from portal_sync.settings import Settings
from portal_sync.topics import change_topics


class GroupActive(RuntimeError):
    pass


@dataclass(frozen=True)
class PlanLine:
    topic: str
    partition: int
    kafka_committed: int | None
    store_applied: int | None
    target: int


def active_members(settings: Settings, group: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        described = admin.describe_groups([group]).get(group, {})
        return len(described.get("members") or [])
    finally:
        admin.close()


def plan_reset(
    settings: Settings, group: str, to_time: datetime, topics: list[str] | None = None
) -> list[PlanLine]:
    """Per partition: where the group is now and the first offset at or after `to_time`."""
    consumer = open_consumer(settings)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics or change_topics(settings)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = consumer.end_offsets(partitions)
        found = consumer.offsets_for_times(
            {tp: int(to_time.timestamp() * 1000) for tp in partitions}
        )
        committed = admin.list_group_offsets({group: partitions}).get(group, {})
    finally:
        consumer.close()
        admin.close()
    stored = _store_offsets(settings) if group == settings.group_id else {}
    return [
        PlanLine(
            tp.topic, tp.partition,
            committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None,
            stored.get((tp.topic, tp.partition)),
            found[tp].offset if found.get(tp) else ends[tp],
        )
        for tp in partitions
    ]  # fmt: skip


def _store_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    store = Store(settings.store_url)
    try:
        return store.all_offsets()
    finally:
        store.close()


def apply_reset(settings: Settings, group: str, plan: list[PlanLine]) -> None:
    """Carry out a plan; refuse when the group has active members."""
    if active_members(settings, group):
        raise GroupActive(f"group {group} has active members: stop its consumers first")
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        admin.alter_group_offsets(
            group,
            {
                TopicPartition(p.topic, p.partition): OffsetAndMetadata(p.target, "", -1)
                for p in plan
            },
        )
    finally:
        admin.close()
    if group == settings.group_id:
        _reset_store(settings, plan)


def _reset_store(settings: Settings, plan: list[PlanLine]) -> None:
    store = Store(settings.store_url)
    now = utcnow()
    try:
        with store.write_transaction() as conn:
            for line in plan:
                conn.execute(
                    delete(applied_offsets).where(
                        applied_offsets.c.topic == line.topic,
                        applied_offsets.c.partition == line.partition,
                    )
                )
                conn.execute(
                    applied_offsets.insert().values(
                        topic=line.topic, partition=line.partition, next_offset=line.target,
                        updated_at=now,
                    )
                )  # fmt: skip
    finally:
        store.close()
