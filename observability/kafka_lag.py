"""Reading consumer lag from Kafka (and the store): the I/O half of `observability.lag`.

Offsets: for every consumer group, Kafka's committed group offsets. For portal-sync's own
reconciler group, with `offsets_from="store"` (the default), the store's `applied_offsets`
instead: they are what the store holds, whereas Kafka's group offsets are only a copy that
the worker copies after each batch. Time lag: the timestamp of the message at the committed offset
(the oldest not yet applied), read from Kafka and cached while the offset does not move.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Literal

from observability.lag import Sample, Status, Window, group_status, lag_seconds, partition_status
from schemas.errors import ConfigurationError, TransientError
from store import SchemaOutdated, Store
from transport.admin import NO_MESSAGE, Cluster
from transport.config import KafkaConnection
from transport.topics import Topics

log = logging.getLogger(__name__)
OffsetsFrom = Literal["kafka", "store"]
TP = tuple[str, int]


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int
    end: int
    lag_seconds: float | None
    status: Status = Status.OK

    @property
    def lag_messages(self) -> int:
        return max(0, self.end - self.committed)


@dataclass(frozen=True)
class GroupLag:
    group: str
    members: int
    state: str
    partitions: list[PartitionLag]

    @property
    def status(self) -> Status:
        return group_status(p.status for p in self.partitions)


class LagUnreadable(TransientError):
    """No partition's lag could be read in a poll (no leader answers)."""


@dataclass
class Filters:
    group: str | None = None  # regular expressions, matched in full
    topic: str | None = None

    def __post_init__(self) -> None:
        """A pattern that does not compile is refused at once: the exporter polled with it
        and failed every poll, /readyz false, paging as blind."""
        for flag, pattern in (("--group", self.group), ("--topic", self.topic)):
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigurationError(
                    f"{flag}: not a regular expression ({error.msg} at position {error.pos})"
                ) from None

    def group_ok(self, group: str) -> bool:
        return self.group is None or re.fullmatch(self.group, group) is not None

    def topic_ok(self, topic: str) -> bool:
        return self.topic is None or re.fullmatch(self.topic, topic) is not None


# A poll's requests fail after this long: a broker back from a crash may accept the
# connection and not answer yet, and with kafka-python's 30 s each question of a poll could
# wait that long, the lag going unreported meanwhile (seen once in the broker drill: no lag
# for the 40 s after a node came back). A failed poll drops its clients; the next one
# starts afresh.
REQUEST_TIMEOUT_MS = 5_000
# The store's offsets are read with the same deadline, in a thread of their own: a database
# that accepts the connection and never answers (a hung server or proxy, packets dropped)
# would otherwise hold every poll, the lag of every group frozen at its last values while
# the real lag grows. Past it the reconciler group's offsets in Kafka stand in; a read still
# hanging from an earlier poll is not started again.
STORE_READ_SECONDS = REQUEST_TIMEOUT_MS / 1000


@dataclass
class LagReader:
    """Reads every matching group's lag; keeps one status window per partition."""

    connection: KafkaConnection
    topics: Topics
    own_group: str
    store_url: str
    filters: Filters = field(default_factory=Filters)
    offsets_from: OffsetsFrom = "store"
    window_seconds: float = 120.0
    _windows: dict[tuple[str, str, int], Window] = field(default_factory=dict)
    _timestamps: dict[tuple[str, int, int], int] = field(default_factory=dict)
    # (topic, partition, offset, log end) with no committed message from offset to end
    _nothing: set[tuple[str, int, int, int]] = field(default_factory=set)
    _described: dict[str, tuple[int, str]] = field(default_factory=dict)
    unread: set[TP] = field(default_factory=set, init=False)  # the last poll's, left unread
    _cluster: Cluster | None = None
    _store: Store | None = None
    _store_read: Future[tuple[dict[TP, int], dict[str, str]] | None] | None = None
    # The change topics whose store offsets are of an earlier topic of the same name (the
    # cluster's id of it is not the one the store recorded): the last poll's.
    moved: set[str] = field(default_factory=set, init=False)

    def read(self) -> list[GroupLag]:
        """One poll: offsets, log ends, oldest unapplied timestamps, statuses. A failed poll
        drops the clients: after a broker died, a client may keep asking the dead node
        (kafka-python), and the next poll starts afresh."""
        try:
            return self._read()
        except Exception:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
            raise

    def _read(self) -> list[GroupLag]:
        now = time.time()  # against the messages' timestamps (`lag_seconds`)
        tick = time.monotonic()  # the windows': a step of the host's clock moves none of them
        committed = self._committed()
        members = self._members(list(committed))
        partitions = {tp for offsets in committed.values() for tp in offsets}
        ends, unread = self.cluster.end_offsets_by_leader(partitions)
        self.unread = unread
        if partitions and not ends:
            raise LagUnreadable(f"no leader of the {len(partitions)} partitions answers")
        if unread:
            log.warning(
                "%d of %d partitions unread: their leader does not answer",
                len(unread),
                len(partitions),
            )
        wanted = {
            (t, p, offset)
            for offsets in committed.values()
            for (t, p), offset in offsets.items()
            if ends.get((t, p), 0) > offset
        }
        timestamps = self._oldest_timestamps(wanted, ends)

        def end(tp: TP, offset: int) -> int:
            # A consumer at a transactional writer's marker (or aborted events) at the
            # log's end has nothing left to read: caught up, not 1 behind (paged STALL).
            return offset if timestamps.get((*tp, offset)) == NO_MESSAGE else ends[tp]

        groups = []
        for group, offsets in sorted(committed.items()):
            count, state = members.get(group, (0, "Unknown"))
            moved = self.moved if group == self.own_group else set()
            rows = [
                self._partition(
                    group,
                    tp,
                    offset,
                    end(tp, offset),
                    timestamps,
                    (now, tick),
                    count,
                    tp[0] in moved,
                )
                for tp, offset in sorted(offsets.items())
                if tp in ends
            ]
            if rows:
                groups.append(GroupLag(group, count, state, rows))
        # A partition left unread this poll keeps its window; one no longer committed loses it.
        known = {(g, *tp) for g, offsets in committed.items() for tp in offsets}
        self._windows = {key: w for key, w in self._windows.items() if key in known}
        return groups

    def _partition(
        self,
        group: str,
        tp: TP,
        offset: int,
        end: int,
        timestamps: dict[tuple[str, int, int], int],
        clocks: tuple[float, float],
        members: int,
        moved: bool = False,
    ) -> PartitionLag:
        """`clocks`: the wall clock's time and the monotonic clock's, read at the poll's
        start. A window on the wall clock spanned an hour of samples after the clock
        stepped back an hour, and held a stalled partition OK all that while."""
        now, tick = clocks
        window = self._windows.setdefault((group, *tp), Window(self.window_seconds))
        window.push(Sample(tick, offset, end))
        seconds = lag_seconds(now, end - offset, timestamps.get((*tp, offset)))
        # The worker refuses a topic created again until its offsets are reset.
        status = Status.STOP if moved else partition_status(window, has_members=members > 0)
        return PartitionLag(group, tp[0], tp[1], offset, end, seconds, status)

    # -- Kafka and store I/O ------------------------------------------------------------
    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = Cluster(
                self.connection, client_id="portal-sync-lag", request_timeout_ms=REQUEST_TIMEOUT_MS
            )
        return self._cluster

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_url)
        return self._store

    def _committed(self) -> dict[str, dict[TP, int]]:
        """Committed offsets of every matching group, restricted to matching topics."""
        names = [g for g in self.cluster.consumer_groups() if self.filters.group_ok(g)]
        result: dict[str, dict[TP, int]] = {}
        read, unread = self.cluster.group_offsets_by_group(names)
        if unread:
            log.warning(
                "offsets of %d groups unread: their coordinator does not answer", len(unread)
            )
        for group, offsets in read.items():
            result[group] = {
                tp: offset for tp, offset in offsets.items() if self.filters.topic_ok(tp[0])
            }
        own = self.own_group
        if self.offsets_from == "store" and self.filters.group_ok(own):
            stored = self._store_offsets()
            if stored is not None:
                result[own] = stored
            else:  # Kafka's copy stands in: the store's offsets, and their topics, unread
                self.moved = set()
        return {group: offsets for group, offsets in result.items() if offsets}

    def _store_offsets(self) -> dict[TP, int] | None:
        """The reconciler's applied offsets, every partition of the change topics included
        (at the log's start where nothing was applied, or while the store has no schema).
        None when the store cannot be read within `STORE_READ_SECONDS`: the group's offsets
        in Kafka (the worker's copy, at most a batch behind) stand in, never zeros, which
        would show the whole log as lag and page.

        A topic deleted and created again (or a cluster rebuilt) behind the store: the
        store's offsets point into the earlier log, and the worker refuses to go on
        (`transport.group.check_topic_ids`). Its lag is then counted from the new log's
        start, with the status STOP (`moved`): read against the new log's end, the store's
        offset made the lag look small, or nil."""
        if self._store_read is not None and not self._store_read.done():
            log.warning(
                "store offsets still unread since an earlier poll (the store does not "
                "answer): the reconciler group's offsets in Kafka instead"
            )
            return None
        read: Future[tuple[dict[TP, int], dict[str, str]] | None] = Future()
        self._store_read = read

        def run() -> None:
            try:
                read.set_result(self._applied())
            except BaseException as error:  # pragma: no cover - _applied catches its own
                read.set_exception(error)

        # A daemon thread, not an executor's: a read that never returns must not hold the
        # exporter's exit.
        threading.Thread(target=run, name="lag-store-offsets", daemon=True).start()
        try:
            answer = read.result(timeout=STORE_READ_SECONDS)
        except FutureTimeout:
            log.warning(
                "store offsets not read within %.0f s: the reconciler group's offsets in "
                "Kafka instead",
                STORE_READ_SECONDS,
            )
            return None
        if answer is None:
            return None
        applied, saved = answer
        topics = [t for t in self.topics.change_topics() if self.filters.topic_ok(t)]
        partitions = self.cluster.partitions(topics)
        self._note_moved(applied, saved, topics)
        # A partition the store has never applied is behind by what its log holds: from the
        # log's start (retention may have moved it past 0), not from offset 0.
        missing = [tp for tp in partitions if tp not in applied or tp[0] in self.moved]
        starts: dict[TP, int] = {}
        if missing:
            try:  # all or nothing: one leader away fails it, and 0 stands in as before
                starts = self.cluster.beginning_offsets(missing)
            except Exception as error:
                log.info("log starts not read (%s): 0 for them", type(error).__name__)
        return {
            tp: starts.get(tp, 0) if tp[0] in self.moved else applied.get(tp, starts.get(tp, 0))
            for tp in partitions
        }

    def _note_moved(self, applied: dict[TP, int], saved: dict[str, str], topics: list[str]) -> None:
        """`moved`: the topics the store applied events of whose id in the cluster is not
        the one the store recorded (as the worker's check); a warning when one is new."""
        ours = {topic for (topic, _), offset in applied.items() if offset > 0} & set(topics)
        wanted = sorted(topic for topic in ours if topic in saved)
        try:
            current = self.cluster.topic_ids(wanted) if wanted else {}
        except Exception as error:  # not known: compared again at the next poll
            log.info("topic ids not read (%s)", type(error).__name__)
            return
        moved = {t for t in wanted if t in current and current[t] != saved[t]}
        for topic in sorted(moved - self.moved):
            log.warning(
                "the store's offsets of %s are of an earlier topic of the same name (created "
                "again since, or the cluster rebuilt): lag counted from the new log's start, "
                "STOP until `portal-sync offsets reset`",
                topic,
            )
        self.moved = moved

    def _applied(self) -> tuple[dict[TP, int], dict[str, str]] | None:
        """The store's offsets and its topics' recorded ids (nothing while it has no schema
        yet; None when unreadable)."""
        try:
            store = self.store()
            return store.all_offsets(), store.topic_ids()
        except Exception as error:
            if self._store_is_new():
                return {}, {}
            log.warning(
                "store offsets unreadable (%s): the reconciler group's offsets in Kafka "
                "instead", type(error).__name__,
            )  # fmt: skip
            return None

    def _store_is_new(self) -> bool:
        """Whether the store holds no portal-sync schema yet (the worker makes it)."""
        try:
            self.store().require_schema()
        except ConfigurationError as error:  # none at all, or an older one
            return not isinstance(error, SchemaOutdated)
        except Exception:  # unreachable, failing: not known to be new
            return False
        return False

    def _members(self, groups: list[str]) -> dict[str, tuple[int, str]]:
        """Members and state per group, asked once per poll. A group the cluster cannot
        describe now (its coordinator's node died, no coordinator yet) keeps what was last
        seen, or counts as having no members if it was never described."""
        result: dict[str, tuple[int, str]] = {}
        for name in groups:
            try:
                info = self.cluster.describe_group(name, timeout=0)
            except Exception as error:
                log.info("group %s not described (%s)", name, type(error).__name__)
                result[name] = self._described.get(name, (0, "Unknown"))
                continue
            members = len(info.get("members") or ())
            result[name] = (members, str(info.get("group_state", "Unknown")))
        self._described = result
        return result

    def _oldest_timestamps(
        self, wanted: set[tuple[str, int, int]], ends: dict[TP, int], timeout: float = 5.0
    ) -> dict[tuple[str, int, int], int]:
        """Timestamp (ms) of the first message at or after each (topic, partition, offset)
        (`NO_MESSAGE`: none before the log's end).

        Cached: while a consumer does not move, its oldest unapplied message stays the same;
        an answer of none while the log's end does not move either (with exactly-once
        writers most caught-up partitions end in a marker: read again each poll, they
        shared one deadline).
        """
        found = {key: ts for key, ts in self._timestamps.items() if key in wanted}
        found |= {key: NO_MESSAGE for key in wanted if (*key, ends[key[:2]]) in self._nothing}
        missing = {key for key in wanted if key not in found}
        found |= self.cluster.first_timestamps(missing, timeout, ends)
        self._timestamps = {key: ts for key, ts in found.items() if ts != NO_MESSAGE}
        self._nothing = {(*key, ends[key[:2]]) for key, ts in found.items() if ts == NO_MESSAGE}
        return found

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
        if self._store is not None:
            self._store.close()
