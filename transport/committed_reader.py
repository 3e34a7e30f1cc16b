"""Reading another cluster's topics under a consumer group's committed offsets.

A province that runs Debezium publishes its change events on its own Kafka cluster; the
`debezium` adapter reads them with this reader and commits the group's offsets only after
the contract events it made of them were acknowledged by our cluster (the producer's
checkpoint). The reader assigns the partitions itself and never joins the group (no
rebalance, no member to lose): it commits as a "simple" consumer, and a check run that
reads without committing moves nothing.

`ExternalConnection` describes that other cluster from explicit values only: the
`PORTAL_SYNC_KAFKA_*` environment, which describes our own cluster, never leaks into it.
"""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from transport import clients
from transport.config import KafkaConnection
from transport.reader import TP, Message, to_message


class ExternalConnection(KafkaConnection):
    """A connection to a cluster that is not ours, from the values given and nothing else."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class CommittedOffsetReader:
    """Reads `topics` from `max(committed offset of group, saved position)` per partition
    on; `commit` stores positions as the group's offsets. Close it when done."""

    def __init__(
        self,
        connection: KafkaConnection,
        group_id: str,
        topics: list[str],
        client_id: str = "portal-sync-committed-reader",
        max_partition_fetch_bytes: int = clients.MAX_PARTITION_FETCH_BYTES,
    ) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        self._connection = connection
        self._client_id = client_id
        self._admin: Any = None  # for the topics' ids, made on first use
        self._consumer = clients.consumer(
            connection,
            client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Connect with exactly-once source support writes in transactions: never read
            # what it aborted.
            isolation_level="read_committed",
            max_partition_fetch_bytes=max_partition_fetch_bytes,
        )
        self._assigned: list[Any] = []
        # Per partition, the messages between the last position known (the group's or the
        # saved one) and the log's start at `start`: removed by retention unread.
        self.expired: dict[TP, int] = {}

    def close(self) -> None:
        self._consumer.close(autocommit=False)
        if self._admin is not None:
            self._admin.close()

    def topic_ids(self) -> dict[str, str]:
        """The id the cluster gave each of the topics that exist (KIP-516, Kafka 2.8 on). A
        topic deleted and created again gets a new one, whatever its offsets look like.
        None is named for a topic of a cluster that gives no ids."""
        try:
            if self._admin is None:
                self._admin = clients.admin(self._connection, f"{self._client_id}-ids")
            described = self._admin.describe_topics(self.topics)
        except KafkaError as error:
            raise clients.translate(error, "describe the topics") from None
        return clients.described_topic_ids(described)

    def compaction_lags(self) -> dict[str, int]:
        """The topics whose `cleanup.policy` compacts them, and each one's
        `min.compaction.lag.ms` (how long a message is kept from the cleaner). A principal
        that may not describe the topics' configs gets no answer: none is named."""
        wanted = [
            ConfigResource(
                ConfigResourceType.TOPIC,
                topic,
                {"cleanup.policy": None, "min.compaction.lag.ms": None},
            )
            for topic in self.topics
        ]
        if not wanted:
            return {}
        try:
            if self._admin is None:
                self._admin = clients.admin(self._connection, f"{self._client_id}-ids")
            # "all": a topic left at the cluster's defaults reports no value otherwise
            answer = self._admin.describe_configs(wanted, config_filter="all")
        except KafkaError as error:
            if "Authorization" in type(error).__name__:
                return {}
            raise clients.translate(error, "describe the topics' configs") from None
        lags: dict[str, int] = {}
        for topic, configs in (answer.get("topic") or {}).items():
            policy = str((configs.get("cleanup.policy") or {}).get("value") or "")
            if "compact" in policy.split(","):
                lag = (configs.get("min.compaction.lag.ms") or {}).get("value")
                lags[str(topic)] = int(lag or 0)
        return lags

    def start(self, saved: dict[TP, int]) -> dict[TP, int]:
        """Assign every partition of the topics (those that exist yet) and seek each to the
        later of the group's committed offset and `saved`; return the start positions
        (a partition with neither starts at its beginning)."""
        try:
            return self._start(saved)
        except KafkaError as error:
            raise clients.translate(
                error, f"read the committed offsets of {self.group_id}"
            ) from None

    def _start(self, saved: dict[TP, int]) -> dict[TP, int]:
        consumer = self._consumer
        partitions = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        self._assigned = partitions
        consumer.assign(partitions)
        if not partitions:
            return {}
        beginning = consumer.beginning_offsets(partitions)
        start: dict[TP, int] = {}
        committed_now = self.committed()
        self.expired = {}
        for tp in partitions:
            committed = committed_now.get((tp.topic, tp.partition))
            candidates = [
                o for o in (committed, saved.get((tp.topic, tp.partition))) if o is not None
            ]
            # Retention may have removed what the group last saw: then the oldest kept,
            # and how many messages went unread (`expired`).
            if candidates and max(candidates) < beginning[tp]:
                self.expired[(tp.topic, tp.partition)] = beginning[tp] - max(candidates)
            offset = max([beginning[tp], *candidates])
            consumer.seek(tp, offset)
            start[(tp.topic, tp.partition)] = offset
        return start

    def end_offsets(self) -> dict[TP, int]:
        """The end offsets of the assigned partitions now."""
        if not self._assigned:
            return {}
        try:
            ends = self._consumer.end_offsets(self._assigned)
        except KafkaError as error:
            raise clients.translate(error, "read end offsets") from None
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    def position(self, tp: TP) -> int:
        return int(self._consumer.position(TopicPartition(*tp)))

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Message]:
        """The next records of the assigned partitions, each partition in offset order."""
        if not self._assigned:
            return []
        try:
            polled = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        except KafkaError as error:
            raise clients.translate(error, "poll") from None
        return [to_message(record) for records in polled.values() for record in records]

    def commit(self, offsets: dict[TP, int]) -> None:
        """Store `offsets` (the next offset to read, per partition) as the group's."""
        if not offsets:
            return
        try:
            self._consumer.commit(
                {
                    TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                    for (t, p), o in offsets.items()
                }
            )
        except KafkaError as error:
            raise clients.translate(error, f"commit the offsets of {self.group_id}") from None

    def committed(self) -> dict[TP, int]:
        """The group's committed offsets of the assigned partitions (those it has)."""
        found: dict[TP, int] = {}
        for tp in self._assigned:
            offset = self._consumer.committed(tp)
            if offset is not None and offset >= 0:
                found[(tp.topic, tp.partition)] = int(offset)
        return found
