"""A consumer-group member that hands out batches of records (aiokafka, asyncio).

The reconciler resumes from the store's offsets, never from Kafka's: on every assignment
`on_assigned(partitions)` is awaited for the offsets to start from, and the partitions are
sought there; a partition the store has never seen starts at the log's beginning. The
store is asked outside the rebalance: aiokafka sends no heartbeat while its listener runs,
so a store away for longer than the session timeout had the member expelled, and every
member's rejoin began another rebalance. The listener pauses the new partitions and starts
the ask; the member goes on beating and polling (nothing is fetched) until they are sought.
A batch fetched from a rebalance's start until the seek is dropped (read again from the
store's offsets), and none is handed out after an assignment failed. `on_revoked` is
awaited before partitions go to another member, so a batch in flight can finish first.
Kafka's committed offsets of the group are written after each store commit, as a copy for
the usual tools (`kafka-consumer-groups`); they are never read back.

Batches come from `getmany`: under backlog a batch fills up at once (up to `max_records`),
under a light load it holds what arrived within `wait` seconds: the batch size follows
the load by itself. With each batch, `starts` says where the fetch of each of its
partitions began (the last seek, or the offset after the member's previous batch): a
compacted log may have no record there, and the batch's first offset is then later.

While the batch in hand takes long (retried while the store is away), the caller calls
`keep_polling`: aiokafka leaves the group once nothing has polled for `max_poll_interval`,
and the member's rejoin rebalanced the whole group once the store was back. The member
polls with its partitions paused: nothing is fetched meanwhile, and what the client had
fetched ahead is fetched again afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from kafka.errors import KafkaError as KafkaPythonError

from schemas.errors import ConfigurationError, TransientError
from transport.clients import MAX_PARTITION_FETCH_BYTES, quiet_client_debug, translate
from transport.config import KafkaConnection
from transport.guard import install as guard_records
from transport.guard import unreadable
from transport.reader import LOG_APPEND_TIME, Message, to_message

log = logging.getLogger(__name__)
TP = tuple[str, int]
# How long the group's coordinator waits for a member to rejoin a rebalance. A member
# first lets its batch in flight finish (the worker waits up to 30 s for it): with the
# client's default (the session timeout, 10 s) it was expelled meanwhile, and its late
# rejoin began another rebalance of the whole group.
REBALANCE_TIMEOUT_MS = 60_000
# aiokafka leaves the group when nothing polled for this long; `keep_polling` polls a tenth
# of it after the last batch was asked for, while the batch in hand is still applied.
MAX_POLL_INTERVAL_MS = 600_000


def _log_ends(connection: KafkaConnection, partitions: list[TP]) -> dict[TP, int]:
    from transport.admin import Cluster

    # Asked while a new assignment waits to be sought: a short timeout, as for the topics'
    # ids, or a leader away would hold the partitions paused.
    with Cluster(connection, "portal-sync-log-ends", request_timeout_ms=5_000) as cluster:
        return cluster.end_offsets(partitions)


def check_within_logs(stored: Mapping[TP, int], ends: Mapping[TP, int]) -> None:
    """Refuse to go on when the store has applied past the end of a partition's log (a
    topic deleted and created again, a cluster restored from an older state): the consumer
    would fall back to the log's start and take every event below the store's offset as
    applied already, skipping them without a word."""
    past = sorted(
        f"{topic}:{partition} (the store at {stored[(topic, partition)]}, the log's end at {end})"
        for (topic, partition), end in ends.items()
        if stored.get((topic, partition), 0) > end
    )
    if past:
        raise ConfigurationError(
            "the store has applied events past the end of "
            + ", ".join(past)
            + ": the topic was created again or the cluster restored; move the store's "
            "offsets with `portal-sync offsets reset` (docs/operations.md, "
            '"A change topic behind the store")'
        )


def check_topic_ids(
    stored: Mapping[TP, int], saved: Mapping[str, str], current: Mapping[str, str]
) -> None:
    """Refuse to go on in a topic the store has applied events of when the cluster's id
    of it (KIP-516) is not the one the store recorded: it was deleted and created again,
    or the cluster rebuilt, and the store's offsets point into another log. Once the new
    log is longer than the store's offsets, `check_within_logs` cannot see it, and every
    new event below them would be taken as applied."""
    applied = {topic for (topic, _), offset in stored.items() if offset > 0}
    changed = sorted(
        topic
        for topic in applied
        if topic in saved and topic in current and saved[topic] != current[topic]
    )
    if changed:
        raise ConfigurationError(
            "the store applied events of an earlier topic of the same name: "
            + ", ".join(changed)
            + " (created again since, or the cluster rebuilt); move the store's offsets "
            "with `portal-sync offsets reset` (docs/operations.md, "
            '"A change topic behind the store")'
        )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.member.settled = False  # a rebalance begins
        self.member.rebalances += 1
        self.member._stop_seeking()  # an assignment not yet sought: its partitions go
        await self.member.on_revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.member._assigned({(tp.topic, tp.partition) for tp in assigned})


class GroupMember:
    """One member of a consumer group over the given topics."""

    def __init__(
        self,
        connection: KafkaConnection,
        topics: list[str],
        group_id: str,
        on_assigned: Callable[[set[TP]], Awaitable[dict[TP, int]]],
        on_revoked: Callable[[set[TP]], Awaitable[None]],
        client_id: str = "portal-sync-reconciler",
        max_partition_fetch_bytes: int = MAX_PARTITION_FETCH_BYTES,
        max_poll_interval_ms: int | None = None,
    ) -> None:
        poll_interval_ms = (
            MAX_POLL_INTERVAL_MS if max_poll_interval_ms is None else max_poll_interval_ms
        )
        options = connection.client_options()
        security: dict[str, Any] = {
            "security_protocol": options["security_protocol"],
            "ssl_context": options.get("ssl_context"),
        }
        if connection.uses_sasl:
            security |= {
                "sasl_mechanism": options["sasl_mechanism"],
                "sasl_plain_username": options["sasl_plain_username"],
                "sasl_plain_password": options["sasl_plain_password"],
            }
        self.topics = topics
        self.connection = connection
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        quiet_client_debug()
        guard_records()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=connection.servers(),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # A transactional writer's aborted (and still open) events are never applied:
            # the client's default, read_uncommitted, delivered them at once.
            isolation_level="read_committed",
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            fetch_max_bytes=4 * max_partition_fetch_bytes,
            session_timeout_ms=10_000,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            heartbeat_interval_ms=3_000,
            max_poll_interval_ms=poll_interval_ms,
            **security,
        )
        self.assignments = 0  # completed assignments (0: not yet serving)
        self._next: dict[TP, int] = {}  # where each partition's next fetch begins
        self.starts: dict[TP, int] = {}  # where the last batch's fetches began
        self.failed: Exception | None = None
        # The partitions' positions are the store's (sought by the last assignment): not
        # from a rebalance's start until its assignment's seek.
        self.settled = False
        # Rebalances begun: a batch fetched before one may hold partitions revoked since,
        # or sought again; its caller compares this before applying it.
        self.rebalances = 0
        self._seeking: asyncio.Task[None] | None = None  # the last assignment's, until sought
        self._poll_every = poll_interval_ms / 10_000  # seconds (`keep_polling`)
        self._polled_at = time.monotonic()  # when a batch was last asked for, or a poll held
        self._held: set[TopicPartition] = set()  # paused by `keep_polling` until the next batch
        self._polling: asyncio.Future[None] | None = None  # `keep_polling`'s poll
        self._poll_failed: Exception | None = None  # its error, for the next batch

    async def start(self) -> None:
        try:
            await self._consumer.start()
        except KafkaError as error:
            await self.stop()
            raise translate(error, "join the consumer group", self.connection) from None
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    async def stop(self) -> None:
        self._stop_seeking()
        if self._polling is not None:
            self._polling.cancel()  # the consumer stops: its count no longer matters
        with contextlib.suppress(Exception):
            await self._consumer.stop()

    def _assigned(self, partitions: set[TP]) -> None:
        """The rebalance's listener: pause the new partitions and start asking the store
        for their offsets, outside the rebalance (the member beats and polls meanwhile)."""
        # aiokafka's fetcher reads newly assigned partitions from Kafka's positions: paused,
        # nothing is fetched (and dropped) while the store's offsets are asked for, however
        # long a store that is away takes to answer.
        self.settled = False
        new = {TopicPartition(t, p) for t, p in partitions}
        self._consumer.pause(*new)
        self._held -= new  # resumed once sought, not before
        self._stop_seeking()
        self._seeking = asyncio.ensure_future(self._seek_assigned(partitions))

    def _stop_seeking(self) -> None:
        if self._seeking is not None and not self._seeking.done():
            self._seeking.cancel()  # its partitions are revoked: sought again if they return
        self._seeking = None

    async def _seek_assigned(self, partitions: set[TP]) -> None:
        try:
            offsets = await self.on_assigned(partitions)
            await self.seek(offsets, partitions)
        except Exception as error:  # never Kafka's offsets: the worker stops on it
            log.error("assignment failed (%s): leaving", type(error).__name__)
            self.failed = error
            return
        self._consumer.resume(*(TopicPartition(t, p) for t, p in partitions))
        self.settled = True  # no await since the seek: no batch fetched before it follows
        self.assignments += 1
        log.info("resumed %d partitions from the store's offsets", len(partitions))

    async def seek(self, offsets: dict[TP, int], partitions: set[TP] | None = None) -> None:
        """Move partitions to the given offsets; those without one to the log's start."""
        wanted = self.assignment() if partitions is None else partitions
        missing = [TopicPartition(t, p) for t, p in wanted if (t, p) not in offsets]
        starts = await self._consumer.beginning_offsets(missing) if missing else {}
        known = [(t, p) for t, p in wanted if (t, p) in offsets]
        # The logs' real ends (high watermarks): this consumer's own `end_offsets` gives the
        # last stable offsets (read_committed), which an open transaction holds back below
        # a store's offset that a worker before read_committed applied.
        try:
            ends = await asyncio.to_thread(_log_ends, self.connection, known) if known else {}
        except (KafkaPythonError, TransientError) as error:  # no leader: not checked now
            log.warning("log ends not read (%s): not checked this time", type(error).__name__)
            ends = {}
        check_within_logs(offsets, ends)
        held = self.assignment()  # a rebalance during the awaits above may have taken some
        for topic, partition in wanted:
            if (topic, partition) not in held:
                continue
            tp = TopicPartition(topic, partition)
            offset = offsets.get((topic, partition), starts.get(tp))
            if offset is not None:
                self._consumer.seek(tp, offset)
                self._next[(topic, partition)] = offset
            else:
                self._next.pop((topic, partition), None)

    def _seek_back(self) -> None:
        """Every partition back to where its last batch ended (no request is sent)."""
        for (topic, partition), offset in list(self._next.items()):
            try:
                self._consumer.seek(TopicPartition(topic, partition), offset)
            except IllegalStateError:  # no longer assigned: sought again if it comes back
                del self._next[(topic, partition)]

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def keep_polling(self) -> None:
        """Keep the member in the group while the batch in hand takes long: called often
        (each second), it polls once a tenth of `max_poll_interval` has passed since the
        last batch was asked for. The assigned partitions are paused first, so the poll
        returns nothing; the records the client had fetched ahead for them are dropped,
        and fetched again from the positions after the batches handed out once the next
        batch is asked for."""
        if self._polling is not None and not self._polling.done():
            return  # a poll waits for a rebalance, which waits for the batch in hand
        if time.monotonic() - self._polled_at < self._poll_every:
            return
        self._polled_at = time.monotonic()
        fetching = self._consumer.assignment() - self._consumer.paused()
        self._consumer.pause(*fetching)
        self._held |= fetching
        # Never cancelled: aiokafka's count of polls in progress would stay up, and with
        # it the member's idle time at 0 for good. Nor waited for here: inside a rebalance,
        # aiokafka's poll waits for the assignment, and the rebalance for the batch in hand,
        # whose end the caller would not see meanwhile (it held a revoke up to 5 s). The
        # next batch waits for it (`batch`).
        self._polling = asyncio.ensure_future(self._held_poll())

    async def _held_poll(self) -> None:
        try:
            found = await self._consumer.getmany(timeout_ms=0)
        except KafkaError as error:
            self._seek_back()  # as after a failed fetch (`batch`)
            # Raised from the next batch: aiokafka raises a group's error once (an ACL
            # removed: `Refused`), and a poll that kept it to itself hid it for good.
            self._poll_failed = translate(error, "fetch records", self.connection)
            return
        for tp, records in found.items():
            # A partition assigned and sought meanwhile, no longer paused: back to where
            # its records began (no await since the poll returned them).
            if records:
                self._consumer.seek(tp, records[0].offset)
        log.info("polled while a batch is held: the member stays in the group")

    def _release(self) -> None:
        """Resume what `keep_polling` paused and is still assigned."""
        held, self._held = self._held, set()
        if held:
            self._consumer.resume(*(held & self._consumer.assignment()))

    async def batch(self, max_records: int, wait: float) -> list[Message]:
        """Up to `max_records` records, waiting at most `wait` seconds for the first."""
        if self._polling is not None:
            polling, self._polling = self._polling, None
            await polling  # never two polls at once
        if self._poll_failed is not None:
            failed, self._poll_failed = self._poll_failed, None
            raise failed
        self._release()
        self._polled_at = time.monotonic()
        try:
            found = await self._consumer.getmany(
                timeout_ms=int(wait * 1000), max_records=max_records
            )
        except KafkaError as error:
            # The client moves each partition's position as it drains it, and one that
            # fails drops what it drained of the others: back to where the batches ended
            # (a partition the store never held takes any first offset).
            self._seek_back()
            raise translate(error, "fetch records", self.connection) from None
        messages: list[Message] = []
        self.starts = {}
        if not self.settled or self.failed is not None:
            # Fetched from Kafka's positions, not the store's (an assignment in progress,
            # or failed): read again once the partitions are sought, or never.
            return messages
        for tp, records in found.items():
            topic, partition = tp.topic, tp.partition
            if not records:
                continue
            start = self._next.get((topic, partition))
            if start is not None and records[0].offset < start:
                # The client moved back on its own: its position was past the log's end
                # (auto_offset_reset), so the log lost what the store applied. From here
                # every record below the store's offset would be taken as applied.
                raise ConfigurationError(
                    f"{topic}:{partition}: the log ends before the store's next offset "
                    f"{start} (the consumer fell back to {records[0].offset}): the log was "
                    "truncated (an unclean leader election, a broker that lost its tail) or "
                    "the topic created again; move the store's offsets with `portal-sync "
                    'offsets reset` (docs/operations.md, "A change topic behind the store")'
                )
            if start is not None:
                self.starts[(topic, partition)] = start
            self._next[(topic, partition)] = records[-1].offset + 1
            messages += [
                Message(
                    topic,
                    partition,
                    r.offset,
                    r.value,
                    r.key,
                    r.timestamp,
                    tuple((name, value or b"") for name, value in r.headers),
                    r.timestamp_type == LOG_APPEND_TIME,
                )
                if unreadable(r.headers) is None
                else to_message(r)  # marked by the guard: its reason, the headers read
                for r in records
            ]
        return messages

    async def commit_copy(self, offsets: dict[TP, int]) -> None:
        """Copy the store's offsets to the group's committed offsets (for the usual tools);
        best effort: a failure is only logged."""
        owned = self.assignment()
        wanted = {
            TopicPartition(t, p): OffsetAndMetadata(o, "")
            for (t, p), o in offsets.items()
            if (t, p) in owned
        }
        if not wanted:
            return
        try:
            await self._consumer.commit(wanted)
        except (KafkaError, TransientError) as error:
            log.info("offsets not copied to Kafka (%s)", type(error).__name__)
