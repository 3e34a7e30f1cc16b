"""Cluster administration and metadata: topics, end offsets, consumer groups.

`Cluster` keeps one admin client and one metadata consumer open for a caller that asks
often (the lag exporter); the module functions open one for a single question.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from kafka import TopicPartition
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ConfigResource,
    ConfigResourceType,
    OffsetSpec,
    ResourcePattern,
    ResourceType,
    UserScramCredentialUpsertion,
)
from kafka.errors import (
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    NodeNotReadyError,
    NoError,
    NotCoordinatorError,
    TopicAlreadyExistsError,
    for_code,
)
from kafka.structs import OffsetAndMetadata

from schemas.errors import ConfigurationError, Refused
from transport import clients
from transport.config import KafkaConnection
from transport.local_secure import SecureSetup, grants
from transport.topics import Topics

log = logging.getLogger(__name__)
TP = tuple[str, int]
NO_MESSAGE = -1  # `first_timestamps`: no committed message up to the partition's end
T = TypeVar("T")
# A group's coordinator moved (its broker died or restarted).
# Why a topic's cleanup policy matters, for the refusal's message.
TOPIC_POLICIES = {
    "compact": "a change topic keeps each record's latest events for a rebuild; 'delete' "
    "removes them after the retention",
    "delete": "the dead letters are kept for their retention, each; 'compact' keeps one a key",
}


MOVED = (NotCoordinatorError, CoordinatorNotAvailableError)


class Cluster:
    """Questions to the cluster over long-lived clients; close it when done."""

    def __init__(
        self,
        connection: KafkaConnection,
        client_id: str = "portal-sync-admin",
        request_timeout_ms: int | None = None,
    ) -> None:
        self.connection = connection
        self.client_id = client_id
        # None: kafka-python's 30 s. A poller that asks again soon sets less: a request to
        # a node that is back but not yet answering then fails instead of holding the poll;
        # and so does the first connection's (the bootstrap kept its own 30 s: a broker
        # that accepts connections and never answers held each poll that long).
        self._timeouts = (
            {}
            if request_timeout_ms is None
            else {
                "request_timeout_ms": request_timeout_ms,
                "bootstrap_timeout_ms": request_timeout_ms,
            }
        )
        self._admin: Any = None
        self._consumer: Any = None
        self._committed_consumer: Any = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def admin(self) -> Any:
        if self._admin is None:
            self._admin = clients.admin(self.connection, self.client_id, **self._timeouts)
        return self._admin

    @property
    def consumer(self) -> Any:
        """Offsets, partitions, times: its `end_offsets` are the logs' ends (high
        watermarks), retried by the client through a leader's election."""
        if self._consumer is None:
            self._consumer = self._new_consumer("read_uncommitted")
        return self._consumer

    @property
    def committed_consumer(self) -> Any:
        """Reads what the worker reads (transport.group): committed records, past a
        transactional writer's markers and aborted events."""
        if self._committed_consumer is None:
            self._committed_consumer = self._new_consumer("read_committed")
        return self._committed_consumer

    def _new_consumer(self, isolation_level: str) -> Any:
        return clients.consumer(
            self.connection,
            self.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
            max_partition_fetch_bytes=64 * 1024,
            **self._timeouts,
        )

    def _forget_coordinators(self) -> None:
        """kafka-python's admin client caches every group's coordinator and never forgets
        it: once a coordinator moved, only a new admin client finds the new one."""
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def close(self) -> None:
        for client in (self._consumer, self._committed_consumer, self._admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._consumer = self._committed_consumer = self._admin = None

    def _any_node(self, call: Callable[[], T], attempts: int = 6) -> T:
        """A question any node may answer first (metadata, the cluster, a group's
        coordinator). kafka-python sends it to one node it knows and fails at once when
        that node is down: a node killed outright stays in the metadata until the controller
        fences it. The node that failed is then in reconnect backoff, so asking again goes
        to another, but only while the backoff lasts: 50 ms after a first failure, doubling
        with each. On a loaded machine the next question came later than that, and picked
        the dead node again (a random pick among those not backed off) three times running
        in one CI run; with six attempts, the fifth failure backs it off for 0.8 s."""
        for _ in range(attempts - 1):
            with contextlib.suppress(KafkaConnectionError, NodeNotReadyError):
                return call()
        return call()

    # -- topics -----------------------------------------------------------------------
    def topic_names(self) -> set[str]:
        return set(self._any_node(self.admin.list_topics))

    def topic_ids(self, topics: Iterable[str]) -> dict[str, str]:
        """The cluster's id of each topic that exists (`clients.described_topic_ids`)."""
        wanted = sorted(set(topics))
        if not wanted:
            return {}
        return clients.described_topic_ids(
            self._any_node(partial(self.admin.describe_topics, wanted))
        )

    def partitions(self, topics: Iterable[str]) -> list[TP]:
        return [
            (topic, partition)
            for topic in topics
            for partition in sorted(
                self._any_node(partial(self.consumer.partitions_for_topic, topic)) or ()
            )
        ]

    def ensure_topics(self, topics: Topics, needed: Iterable[str] | None = None) -> list[str]:
        """Create missing topics; return the names created (existing ones stay as they are).

        On a cluster with ACLs a principal sees only the topics it may describe, and may
        create none: those it may not create are refused (Refused, naming the principal and
        the topics) when `needed` (default: all), else left to whoever needs them."""
        needed = None if needed is None else list(needed)  # read twice
        existing = self.topic_names()
        specs = topics.specs()
        missing = {name: spec for name, spec in specs.items() if name not in existing}
        self._check_topic_configs({n: s for n, s in specs.items() if n in existing}, needed)
        if not missing:
            return []
        try:  # errors per topic: another process may create them concurrently
            response = self.admin.create_topics(missing, timeout_ms=30_000, raise_errors=False)
        except KafkaError as error:
            raise clients.translate(error, "create topics", self.connection) from None
        refused = []
        for topic in response.get("topics", []):
            error_type = for_code(topic["error_code"])
            if error_type.__name__.endswith("AuthorizationFailedError"):
                refused.append(topic["name"])
            elif error_type.__name__ in CREATE_REFUSALS:
                said = f": {topic['error_message']}" if topic.get("error_message") else ""
                raise ConfigurationError(
                    f"Kafka would not create the topic {topic['name']}: {error_type.__name__}"
                    f"{said} ({CREATE_REFUSALS[error_type.__name__]})"
                )
            elif error_type not in (NoError, TopicAlreadyExistsError):
                raise clients.translate(error_type(), "create topics", self.connection)
        required = set(missing if needed is None else needed)
        if set(refused) & required:
            raise Refused(
                f"Kafka: {self.connection.principal()} does not see the topics "
                f"{', '.join(sorted(set(refused) & required))} and may not create them: the "
                "cluster's administrator creates them (`portal-sync topics` with the admin's "
                "settings) and grants this principal access (docs/operations.md)"
            )
        created = [name for name in missing if name not in refused]
        if created:
            try:
                self.admin.wait_for_topics(created, timeout_ms=30_000)
            except KafkaError as error:
                raise clients.translate(error, "wait for new topics", self.connection) from None
        return sorted(created)

    def _check_topic_configs(
        self, specs: dict[str, dict[str, Any]], needed: Iterable[str] | None
    ) -> None:
        """Compare the configs of existing topics with those the project creates them with.

        Refused (ConfigurationError), naming the `kafka-configs.sh` command that mends it:
        a topic that takes smaller messages (one an administrator made with the cluster's 1
        MB default: an event near the contract's limit was refused at every retry, and its
        source never got past it), or with another `cleanup.policy` (a change topic that
        deletes old segments loses records a rebuild needs; a dead-letter topic that
        compacts drops letters). Logged as a warning, as the worker goes on without them:
        a timestamp type other than the broker's (a replay judges a message's time
        otherwise than the live worker), superseded events kept longer than the retention
        promises (`max.compaction.lag.ms`), fewer in-sync replicas than asked. A principal
        that may not describe topic configs gets no answer: not judged."""
        chosen = None if needed is None else set(needed)
        wanted = [name for name in specs if chosen is None or name in chosen]
        if not wanted:
            return
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted]
        try:
            # "all": a topic left at the cluster's default reports no value otherwise
            ask = partial(self.admin.describe_configs, resources, config_filter="all")
            answer = self._any_node(ask)
        except KafkaError as error:
            if "Authorization" in type(error).__name__:
                return
            raise clients.translate(
                error, "describe the topics' configs", self.connection
            ) from None
        for name in wanted:
            configs = answer.get("topic", {}).get(name, {})
            asked = specs[name]["configs"]

            def value(key: str, configs: Mapping[str, Any] = configs) -> str | None:
                found = configs.get(key)
                return None if found is None else str(found["value"])

            def fix(key: str, name: str = name, asked: Mapping[str, Any] = asked) -> str:
                return (
                    f"kafka-configs.sh --alter --entity-type topics --entity-name {name} "
                    f"--add-config {key}={asked[key]}"
                )

            size = value("max.message.bytes")
            if size is not None and int(size) < int(asked["max.message.bytes"]):
                raise ConfigurationError(
                    f"the topic {name} takes messages of at most {size} bytes; portal-sync "
                    f"sends up to {asked['max.message.bytes']}: raise its max.message.bytes "
                    f"({fix('max.message.bytes')})"
                )
            policy = value("cleanup.policy")
            if policy is not None and policy != asked["cleanup.policy"]:
                raise ConfigurationError(
                    f"the topic {name} has cleanup.policy={policy}, portal-sync needs "
                    f"{asked['cleanup.policy']} ({TOPIC_POLICIES[asked['cleanup.policy']]}): "
                    f"{fix('cleanup.policy')}"
                )
            drifted = []
            stamp = value("message.timestamp.type")
            if "message.timestamp.type" in asked and stamp not in (
                None,
                asked["message.timestamp.type"],
            ):
                drifted.append("message.timestamp.type")
            lag = value("max.compaction.lag.ms")
            if "max.compaction.lag.ms" in asked and int(lag or 0) > int(
                asked["max.compaction.lag.ms"]
            ):
                drifted.append("max.compaction.lag.ms")
            in_sync = value("min.insync.replicas")
            if in_sync is not None and int(in_sync) < int(asked["min.insync.replicas"]):
                drifted.append("min.insync.replicas")
            if drifted:
                log.warning(
                    "the topic %s has %s other than portal-sync creates it with "
                    '(docs/operations.md, "Change topics created before the time and '
                    'compaction settings"): %s',
                    name,
                    ", ".join(f"{key}={value(key)}" for key in drifted),
                    "; ".join(fix(key) for key in drifted),
                )

    def check_partition_counts(self, topics: Topics) -> None:
        """Refuse (ConfigurationError) a change topic that exists with another number of
        partitions than `change_partitions`: the worker checks each event's partition by
        that number (the key rule), and dead-lettered valid events as `key_mismatch` while
        its setting differed from the topics'. (Producers place events by the topic's own
        count: the setting is not theirs to get right.)"""
        existing = self.topic_names()
        counted = {
            name: len(self._any_node(partial(self.consumer.partitions_for_topic, name)) or ())
            for name in topics.change_topics()
            if name in existing
        }
        wrong = [
            f"{name} has {n}"
            for name, n in sorted(counted.items())
            if n not in (0, topics.change_partitions)
        ]
        if wrong:
            raise ConfigurationError(
                f"PORTAL_SYNC_CHANGE_PARTITIONS is {topics.change_partitions}, but "
                f"{', '.join(wrong)} partitions: set it to the change topics' real count in "
                "every process (workers, producers, operator tools); the worker checks each "
                "event's partition by it (docs/operations.md)"
            )

    # -- security (a secured cluster) -------------------------------------------------------
    def add_scram_users(self, users: dict[str, str]) -> None:
        """Create or update SCRAM-SHA-512 users (name: password)."""
        if not users:
            return
        upserts = [
            UserScramCredentialUpsertion(name, "SCRAM-SHA-512", password)
            for name, password in users.items()
        ]
        failed = {
            name: message
            for name, message in self.admin.alter_user_scram_credentials(upserts).items()
            if message
        }
        if failed:
            raise Refused(f"SCRAM users not created: {', '.join(sorted(failed))}")

    def create_acls(self, setup: SecureSetup) -> int:
        """The pipeline's ACLs (`local_secure.grants`); creating one twice is harmless."""
        acls = [
            ACL(
                principal=f"User:{grant.principal}",
                host="*",
                operation=ACLOperation[grant.operation],
                permission_type=ACLPermissionType.ALLOW,
                resource_pattern=ResourcePattern(
                    ResourceType[grant.resource],
                    grant.name,
                    ACLResourcePatternType.PREFIXED
                    if grant.prefixed
                    else ACLResourcePatternType.LITERAL,
                ),
            )
            for grant in grants(setup)
        ]
        result = self.admin.create_acls(acls)
        if result["failed"]:
            names = sorted({type(error).__name__ for error in result["failed"]})
            raise Refused(f"{len(result['failed'])} ACLs not created: {', '.join(names)}")
        return len(acls)

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
        """The logs' ends (high watermarks), an open transaction's events and the markers
        included: where a store's offsets may be, whatever a consumer reading committed
        records can reach yet (the last stable offset, which an open transaction holds
        back; a worker before read_committed may have applied past it)."""
        tps = [TopicPartition(t, p) for t, p in sorted(set(partitions))]
        if not tps:
            return {}
        return {(tp.topic, tp.partition): o for tp, o in self.consumer.end_offsets(tps).items()}

    def end_offsets_by_leader(self, partitions: Iterable[TP]) -> tuple[dict[TP, int], set[TP]]:
        """Log-end offsets asked of each partition's leader alone: `(read, unread)`.

        kafka-python's `end_offsets` fails every partition when one leader does not answer,
        and a node killed outright stays the leader of its partitions until the controller
        fences it (the broker session timeout, 9 s by default). Here the partitions of such
        a leader (or of none) come back unread and the others are still read."""
        wanted = sorted(set(partitions))
        read: dict[TP, int] = {}
        unread: set[TP] = set()
        if not wanted:
            return read, unread
        by_leader: dict[int, list[TP]] = {}
        leaders = self.leaders({t for t, _ in wanted})
        for tp in wanted:
            by_leader.setdefault(leaders.get(tp, -1), []).append(tp)
        for leader, tps in sorted(by_leader.items()):
            if leader < 0:
                unread.update(tps)
                continue
            # The client looks the leaders up again first (metadata, from any node it
            # knows): a first question to the dead node must not cost the live leaders'
            # partitions (a CI run left several of them unread right after a node was killed).
            specs = {TopicPartition(t, p): OffsetSpec.LATEST for t, p in tps}
            try:
                found = self._any_node(partial(self.admin.list_partition_offsets, specs))
            except KafkaError:
                unread.update(tps)
                continue
            read.update({(tp.topic, tp.partition): o.offset for tp, o in found.items()})
        return read, unread

    def leaders(self, topics: Iterable[str]) -> dict[TP, int]:
        """Each partition's leader in the cluster's metadata (-1: none now)."""
        names = sorted(set(topics))
        described = self._any_node(lambda: self.admin.describe_topics(names))
        return {
            (topic["name"], partition["partition_index"]): int(partition["leader_id"])
            for topic in described
            for partition in topic.get("partitions", ())
        }

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
        self,
        wanted: set[tuple[str, int, int]],
        timeout: float = 5.0,
        ends: Mapping[TP, int] | None = None,
    ) -> dict[tuple[str, int, int], int]:
        """Timestamp (ms) of the first message at or after each (topic, partition, offset);
        `NO_MESSAGE` for one whose partition holds no committed message from it up to its
        end in `ends` (only a transactional writer's markers or aborted events); an offset
        not answered within `timeout` is left out.

        A partition may be asked at several offsets (groups reading it at different
        positions): each is read from its lowest offset still unanswered, a fetch answers
        every offset it reaches, and the partition is sought on to the next one (never read
        through between them). One deadline for them all."""
        found: dict[tuple[str, int, int], int] = {}
        pending: dict[TP, list[int]] = {}
        for t, p, offset in sorted(wanted):
            pending.setdefault((t, p), []).append(offset)
        if not pending:
            return found
        consumer = self.committed_consumer
        consumer.assign([TopicPartition(t, p) for t, p in pending])
        try:
            for (t, p), asked in pending.items():
                consumer.seek(TopicPartition(t, p), asked[0])
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for tp, records in consumer.poll(timeout_ms=200).items():
                    key = (tp.topic, tp.partition)
                    offsets = pending.get(key)
                    if not offsets or not records:
                        continue
                    # The messages from the offset sought on, in order (gaps: compacted
                    # away, transaction markers): the first at or after each offset reached.
                    index = 0
                    while offsets and offsets[0] <= records[-1].offset:
                        while records[index].offset < offsets[0]:
                            index += 1
                        found[(*key, offsets.pop(0))] = records[index].timestamp
                    if offsets:
                        consumer.seek(tp, offsets[0])
                    else:
                        del pending[key]
                        consumer.pause(tp)
                for key in [k for k in pending if k in (ends or {})]:
                    tp = TopicPartition(*key)
                    if consumer.position(tp) >= (ends or {})[key]:  # read to the end
                        found.update({(*key, offset): NO_MESSAGE for offset in pending[key]})
                        del pending[key]
                        consumer.pause(tp)
        finally:
            consumer.assign([])
        return found

    # -- consumer groups ----------------------------------------------------------------
    def consumer_groups(self) -> list[str]:
        """The consumer groups of every broker that answers. Each broker lists the groups it
        coordinates; kafka-python fails the whole list when one broker is down, so each is
        asked alone and one that does not answer is skipped (its groups move to a live
        coordinator within the session timeout). Raises only when no broker answers."""
        brokers = [b["broker_id"] for b in self._any_node(self.admin.describe_cluster)["brokers"]]
        names: set[str] = set()
        failures: list[KafkaError] = []
        for broker in brokers:
            try:
                listed = self.admin.list_groups(broker_ids=[broker])
            except KafkaError as error:
                failures.append(error)
                continue
            names.update(
                g["group_id"]
                for g in listed
                if g.get("protocol_type", "consumer") in ("consumer", "")
            )
        if failures and len(failures) == len(brokers):
            raise clients.translate(failures[0], "list consumer groups", self.connection)
        return sorted(names)

    def retention_ms(self, topic: str) -> int | None:
        """The topic's `retention.ms` as the cluster applies it (its own setting or the
        broker's default); None: kept for ever (-1)."""
        wanted = ConfigResource(ConfigResourceType.TOPIC, topic, {"retention.ms": None})
        ask = partial(self.admin.describe_configs, [wanted], config_filter="all")
        try:
            answer = self._any_node(ask)
        except KafkaError as error:
            action = f"describe {topic}'s configs"
            raise clients.translate(error, action, self.connection) from None
        # A principal without DESCRIBE_CONFIGS gets an empty answer, not an error.
        config = answer.get("topic", {}).get(topic, {}).get("retention.ms")
        if config is None:
            who = self.connection.principal()
            raise Refused(f"Kafka: {who} read no retention.ms of {topic} (DESCRIBE_CONFIGS)")
        value = int(config["value"])
        return None if value < 0 else value

    def describe_group(self, group: str, timeout: float = 15.0) -> dict[str, Any]:
        """The group's state and members. Its coordinator may not be known yet (a group
        never used, a broker just started): asked again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                described: dict[str, Any] = self._any_node(
                    lambda: self.admin.describe_groups([group])
                ).get(group, {})
                return described
            except KafkaError as error:
                if isinstance(error, MOVED):
                    self._forget_coordinators()
                if not getattr(error, "retriable", False) or time.monotonic() > deadline:
                    raise clients.translate(
                        error, f"describe group {group}", self.connection
                    ) from None
                time.sleep(0.5)

    def active_members(self, group: str) -> int:
        return len(self.describe_group(group).get("members") or [])

    def group_offsets(
        self, groups: list[str], partitions: Iterable[TP] | None = None
    ) -> dict[str, dict[TP, int]]:
        """Committed offsets per group (only the committed ones, >= 0)."""
        wanted = None if partitions is None else [TopicPartition(t, p) for t, p in partitions]
        result: dict[str, dict[TP, int]] = {}

        def listed_offsets() -> Any:
            return self._any_node(
                lambda: self.admin.list_group_offsets(dict.fromkeys(groups, wanted))
            )

        try:
            listed = listed_offsets()
        except MOVED:
            self._forget_coordinators()
            listed = listed_offsets()
        for group, offsets in listed.items():
            result[group] = {
                (tp.topic, tp.partition): meta.offset
                for tp, meta in offsets.items()
                if meta.offset >= 0
            }
        return result

    def group_offsets_by_group(
        self, groups: list[str]
    ) -> tuple[dict[str, dict[TP, int]], list[str]]:
        """`group_offsets` asked group by group: `(read, unread)`. A group whose coordinator
        does not answer (its node died; the group moves within the session timeout) comes
        back unread, and the other groups are still read."""
        read: dict[str, dict[TP, int]] = {}
        unread: list[str] = []
        for group in groups:
            try:
                read.update(self.group_offsets([group]))
            except KafkaError:
                unread.append(group)
        return read, unread

    def alter_group_offsets(self, group: str, offsets: dict[TP, int]) -> None:
        """Commit `offsets` for `group`; `Refused` naming the partitions the coordinator
        did not take (kafka-python answers per partition and raises nothing: a member
        that joined meanwhile, a principal without the group's READ, a coordinator that
        moved)."""
        answers = self.admin.alter_group_offsets(
            group,
            {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
        )
        errors = {(tp.topic, tp.partition): error for tp, error in answers.items()}
        failed = [
            f"{t}[{p}]: {getattr(errors.get((t, p)), '__name__', 'no answer')}"
            for t, p in sorted(offsets)
            if errors.get((t, p)) is not NoError
        ]
        if failed:
            raise Refused(f"group {group}'s offsets not moved on {', '.join(failed)}")

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


# What the cluster answers to a topic it will not create as asked: the settings must change
# (retrying cannot help).
CREATE_REFUSALS = {
    "InvalidReplicationFactorError": "PORTAL_SYNC_REPLICATION_FACTOR is above the brokers "
    "the cluster has",
    "InvalidPartitionsError": "PORTAL_SYNC_CHANGE_PARTITIONS must be at least 1",
    "InvalidConfigurationError": "the cluster refuses a topic setting",
    "PolicyViolationError": "the cluster's topic creation policy refuses it",
    "InvalidTopicError": "PORTAL_SYNC_TOPIC_PREFIX makes an invalid topic name",
}


@contextlib.contextmanager
def cluster(connection: KafkaConnection, client_id: str = "portal-sync-admin") -> Iterator[Cluster]:
    """A Cluster for a few questions; what the cluster's ACLs refuse raises Refused."""
    with Cluster(connection, client_id) as opened:
        try:
            yield opened
        except KafkaError as error:
            if "Authorization" not in type(error).__name__:
                raise
            raise clients.translate(error, "ask the cluster", connection) from None


def ensure_topics(
    connection: KafkaConnection, topics: Topics, needed: Iterable[str] | None = None
) -> list[str]:
    """Create missing topics (`Cluster.ensure_topics`); a producer needs only the change
    topics (on a secured cluster a source may not even see the dead-letter topic)."""
    with cluster(connection) as c:
        return c.ensure_topics(topics, needed)


def check_partition_counts(connection: KafkaConnection, topics: Topics) -> None:
    """`Cluster.check_partition_counts` with a client of its own."""
    with cluster(connection) as c:
        c.check_partition_counts(topics)


def topic_ids(
    connection: KafkaConnection, topic_names: Iterable[str], timeout_ms: int = 5000
) -> dict[str, str]:
    """`Cluster.topic_ids` with a client of its own; a failure as the project's errors.
    A group member asks during a rebalance, when it sends no heartbeats: it gives up
    within `timeout_ms` a request, well within the group's session timeout."""
    try:
        with Cluster(connection, request_timeout_ms=timeout_ms) as c:
            return c.topic_ids(topic_names)
    except KafkaError as error:
        raise clients.translate(error, "describe the topics", connection) from None


def end_offsets(connection: KafkaConnection, topic_names: list[str]) -> dict[TP, int]:
    """The log-end offset of every partition of the topics."""
    with cluster(connection) as c:
        return c.end_offsets(c.partitions(topic_names))


def beginning_offsets(connection: KafkaConnection, topic_names: list[str]) -> dict[TP, int]:
    """The log-start offset of every partition of the topics (retention moves it)."""
    with cluster(connection) as c:
        return c.beginning_offsets(c.partitions(topic_names))
