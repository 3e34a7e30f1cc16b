"""Cluster administration and metadata: topics, end offsets, consumer groups.

`Cluster` keeps one admin client and one metadata consumer open for a caller that asks
often (the lag exporter); the module functions open one for a single question.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from transport import clients
from transport.config import KafkaConnection
from transport.topics import Topics

TP = tuple[str, int]


class Cluster:
    """Questions to the cluster over long-lived clients; close it when done."""

    def __init__(self, connection: KafkaConnection, client_id: str = "portal-sync-admin") -> None:
        self.connection = connection
        self.client_id = client_id
        self._admin: Any = None
        self._consumer: Any = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def admin(self) -> Any:
        if self._admin is None:
            self._admin = clients.admin(self.connection, self.client_id)
        return self._admin

    @property
    def consumer(self) -> Any:
        if self._consumer is None:
            self._consumer = clients.consumer(
                self.connection,
                self.client_id,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=64 * 1024,
            )
        return self._consumer

    def close(self) -> None:
        for client in (self._consumer, self._admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._consumer = self._admin = None

    # -- topics -----------------------------------------------------------------------
    def topic_names(self) -> set[str]:
        return set(self.admin.list_topics())

    def partitions(self, topics: Iterable[str]) -> list[TP]:
        return [
            (topic, partition)
            for topic in topics
            for partition in sorted(self.consumer.partitions_for_topic(topic) or ())
        ]

    def ensure_topics(self, topics: Topics) -> list[str]:
        """Create missing topics; return the names created (existing ones stay as they are)."""
        existing = self.topic_names()
        missing = {name: spec for name, spec in topics.specs().items() if name not in existing}
        if missing:
            # Another process may create them concurrently.
            with contextlib.suppress(TopicAlreadyExistsError):
                self.admin.create_topics(missing, timeout_ms=30_000)
            self.admin.wait_for_topics(list(missing), timeout_ms=30_000)
        return sorted(missing)

    def delete_topics(self, names: list[str], timeout: float = 60.0) -> None:
        """Delete topics and wait until the cluster no longer lists them."""
        present = [name for name in names if name in self.topic_names()]
        if present:
            self.admin.delete_topics(present, timeout_ms=30_000)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and set(present) & self.topic_names():
            time.sleep(0.2)

    # -- offsets ----------------------------------------------------------------------
    def end_offsets(self, partitions: Iterable[TP]) -> dict[TP, int]:
        tps = [TopicPartition(t, p) for t, p in sorted(set(partitions))]
        if not tps:
            return {}
        return {(tp.topic, tp.partition): o for tp, o in self.consumer.end_offsets(tps).items()}

    def beginning_offsets(self, partitions: Iterable[TP]) -> dict[TP, int]:
        tps = [TopicPartition(t, p) for t, p in sorted(set(partitions))]
        if not tps:
            return {}
        found = self.consumer.beginning_offsets(tps)
        return {(tp.topic, tp.partition): o for tp, o in found.items()}

    def offsets_at(self, partitions: Iterable[TP], moment: datetime) -> dict[TP, int | None]:
        """The first offset at or after `moment` per partition (None: after the end)."""
        millis = int(moment.timestamp() * 1000)
        tps = [TopicPartition(t, p) for t, p in sorted(set(partitions))]
        found = self.consumer.offsets_for_times({tp: millis for tp in tps}) if tps else {}
        return {
            (tp.topic, tp.partition): (found[tp].offset if found.get(tp) else None) for tp in tps
        }

    def first_timestamps(
        self, wanted: set[tuple[str, int, int]], timeout: float = 5.0
    ) -> dict[tuple[str, int, int], int]:
        """Timestamp (ms) of the first message at or after each (topic, partition, offset)."""
        found: dict[tuple[str, int, int], int] = {}
        missing = {(t, p): offset for t, p, offset in wanted}
        if not missing:
            return found
        consumer = self.consumer
        consumer.assign([TopicPartition(t, p) for t, p in missing])
        for (t, p), offset in missing.items():
            consumer.seek(TopicPartition(t, p), offset)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                key = (tp.topic, tp.partition)
                if key in missing and records:
                    found[(*key, missing.pop(key))] = records[0].timestamp
                    consumer.pause(tp)
        consumer.assign([])
        return found

    # -- consumer groups ----------------------------------------------------------------
    def consumer_groups(self) -> list[str]:
        return [
            g["group_id"]
            for g in self.admin.list_groups()
            if g.get("protocol_type", "consumer") in ("consumer", "")
        ]

    def describe_group(self, group: str, timeout: float = 15.0) -> dict[str, Any]:
        """The group's state and members. Its coordinator may not be known yet (a group
        never used, a broker just started): asked again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                described: dict[str, Any] = self.admin.describe_groups([group]).get(group, {})
                return described
            except KafkaError as error:
                if not getattr(error, "retriable", False) or time.monotonic() > deadline:
                    raise clients.translate(error, f"describe group {group}") from None
                time.sleep(0.5)

    def active_members(self, group: str) -> int:
        return len(self.describe_group(group).get("members") or [])

    def group_offsets(
        self, groups: list[str], partitions: Iterable[TP] | None = None
    ) -> dict[str, dict[TP, int]]:
        """Committed offsets per group (only the committed ones, >= 0)."""
        wanted = None if partitions is None else [TopicPartition(t, p) for t, p in partitions]
        result: dict[str, dict[TP, int]] = {}
        for group, offsets in self.admin.list_group_offsets({g: wanted for g in groups}).items():
            result[group] = {
                (tp.topic, tp.partition): meta.offset
                for tp, meta in offsets.items()
                if meta.offset >= 0
            }
        return result

    def alter_group_offsets(self, group: str, offsets: dict[TP, int]) -> None:
        self.admin.alter_group_offsets(
            group,
            {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
        )

    def delete_group(self, group: str) -> None:
        """Forget a consumer group's committed offsets (it may not exist)."""
        with contextlib.suppress(KafkaError):
            self.admin.delete_groups([group])

    def wait_group_stable(self, group: str, timeout: float = 60.0) -> bool:
        """Wait until a consumer group has members and a settled assignment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            described = self.describe_group(group)
            if described.get("group_state") == "Stable" and described.get("members"):
                return True
            time.sleep(0.2)
        return False


@contextlib.contextmanager
def cluster(connection: KafkaConnection, client_id: str = "portal-sync-admin") -> Iterator[Cluster]:
    with Cluster(connection, client_id) as opened:
        yield opened


def ensure_topics(connection: KafkaConnection, topics: Topics) -> list[str]:
    with cluster(connection) as c:
        return c.ensure_topics(topics)


def end_offsets(connection: KafkaConnection, topic_names: list[str]) -> dict[TP, int]:
    """The log-end offset of every partition of the topics."""
    with cluster(connection) as c:
        return c.end_offsets(c.partitions(topic_names))
