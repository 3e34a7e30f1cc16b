"""Small Kafka admin helpers shared by the CLI, the demo and the tests."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from portal_sync.settings import Settings
from portal_sync.topics import change_topics


def end_offsets(settings: Settings, topics: list[str] | None = None) -> dict[tuple[str, int], int]:
    """The log-end offset of every partition of the change topics (or of `topics`)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap(), enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics or change_topics(settings)
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = consumer.end_offsets(partitions)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
    finally:
        consumer.close()


def delete_topics(settings: Settings, names: list[str], timeout: float = 60.0) -> None:
    """Delete topics and wait until the cluster no longer lists them."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        present = [name for name in names if name in set(admin.list_topics())]
        if present:
            admin.delete_topics(present, timeout_ms=30_000)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and set(present) & set(admin.list_topics()):
            time.sleep(0.2)
    finally:
        admin.close()


def delete_group(settings: Settings, group_id: str) -> None:
    """Forget a consumer group's committed offsets (best effort: it may not exist)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        admin.delete_groups([group_id])
    except Exception:
        pass
    finally:
        admin.close()


def wait_group_stable(settings: Settings, group_id: str, timeout: float = 60.0) -> bool:
    """Wait until a consumer group has members and a settled assignment."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            group = admin.describe_groups([group_id]).get(group_id, {})
            if group.get("group_state") == "Stable" and group.get("members"):
                return True
            time.sleep(0.2)
        return False
    finally:
        admin.close()
