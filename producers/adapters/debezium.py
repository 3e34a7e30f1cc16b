"""Built-in `debezium`: log-based capture from a province's own Debezium (Kafka Connect).

It reads the change-event topics of one table (JSON converter, with or without inline
schemas) on the province's cluster, maps `after` through the same declarative field mapping
as `sql`, and turns `c`/`u`/`r` into upserts and `d` into deletes (tombstones skipped);
version and `occurred_at` come from the connector's `source` block
(`producers.debezium_events`). Its position is the consumer group's offsets on the
province's cluster: each checkpoint commits them, after our cluster acknowledged every
contract event made of the messages before it (and after the state file, which holds the
same offsets, was saved). A run reads up to the end offsets seen when it started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producers import debezium_events as dbz
from producers.mapping import FieldMapping, map_fields
from producers.metrics import SOURCE_ERRORS
from producers.sdk import (
    Adapter,
    Checkpoint,
    ConfigurationError,
    FatalError,
    Item,
    Record,
    SkippableRecord,
    State,
)
from schemas.dead_letter import Reason
from schemas.events import MAX_VERSION, Entity
from transport.committed_reader import CommittedOffsetReader, ExternalConnection
from transport.config import ClusterSecurity
from transport.reader import TP, Message

log = logging.getLogger(__name__)

# How long a compacted province topic must keep each message from the log cleaner: the
# longest pause of a source the adapter is built for (`_refuse_compaction`).
MIN_COMPACTION_LAG_MS = 7 * 86_400_000
# What Debezium writes for a value the database did not send (unavailable.value.placeholder).
UNAVAILABLE = "__debezium_unavailable_value"


class DebeziumMapping(FieldMapping, ClusterSecurity):
    """The province's cluster and topics, and how one table's columns map to the contract."""

    model_config = ConfigDict(extra="forbid")

    # -- connection: the province's Kafka cluster (never our PORTAL_SYNC_KAFKA_* settings)
    # (and its security settings: `ClusterSecurity`'s fields)
    bootstrap: str = Field(description="host:port[,host:port…] of the province's cluster")
    group_id: str | None = Field(
        default=None, description="consumer group on the province's cluster (portal-sync-<source>)"
    )
    # -- mapping
    topics: list[str] = Field(min_length=1, description="Debezium topics of one table")
    entity: Entity
    key_column: str
    version: dbz.VersionFrom = "lsn"
    snapshot_reads: dbz.SnapshotReads = "below_changes"
    local_time_columns: list[str] = Field(
        default_factory=list,
        description="timestamp-without-zone columns of bare payloads (no inline schema)",
    )
    checkpoint_every: int = Field(default=1000, gt=0, description="messages per checkpoint")
    idle_seconds: float = Field(
        default=3.0, gt=0, description="a run ends after this long without a new message"
    )


def group_of(source: str, group_id: str | None) -> str:
    """The consumer group whose offsets are an entry's position on the province's cluster."""
    return group_id or f"portal-sync-{source}"


class DebeziumAdapter(Adapter):
    """Debezium change events of one table from the province's Kafka cluster."""

    key = "key_column"
    cursor = "consumer group offsets on the province's cluster"
    sorted_output = False  # partitions interleave; per record the version rises
    emits_deletes = True
    Config = DebeziumMapping

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, DebeziumMapping)
        self.mapping = config
        self.entity = config.entity
        self.zone = ZoneInfo(config.timezone)
        self.group_id = group_of(source, config.group_id)
        self._local_times = frozenset(config.local_time_columns)
        self._reader: CommittedOffsetReader | None = None
        self._topic_ids: dict[str, str] = {}  # topic -> the cluster's id, saved with offsets
        # `ts_ms`: per partition, the version given last (saved with the offsets), so that
        # versions rise along a partition whatever the commit times do (`_ts_version`).
        self._last: dict[TP, int] = {}
        SOURCE_ERRORS.labels(source, "expired_unread")  # at 0: increase() sees the first
        try:
            self.connection()  # a wrong combination refuses the start, not the first run
        except ValidationError as error:
            problems = "; ".join(e["msg"] for e in error.errors(include_input=False))
            raise ConfigurationError(f"connection: {problems}") from None

    def connection(self) -> ExternalConnection:
        """The province's cluster; relative certificate paths are relative to the file."""
        config = self.mapping
        return ExternalConnection(bootstrap=config.bootstrap, **config.security(self.base_dir))

    @property
    def reader(self) -> CommittedOffsetReader:
        """Connected on first use: constructing an adapter never touches the cluster."""
        if self._reader is None:
            self._reader = CommittedOffsetReader(
                self.connection(),
                self.group_id,
                self.mapping.topics,
                client_id=f"portal-sync-{self.source}-debezium",
            )
        return self._reader

    def read(self, state: State) -> Iterator[Item]:
        reader = self.reader
        ids = reader.topic_ids()
        saved_ids = {str(t): str(i) for t, i in (state.get("topic_ids") or {}).items()}
        saved = _offsets(state)
        # a version above the contract's largest, kept by a release before, is dropped
        self._last = {
            tp: v for tp, v in _offsets(state, "last_versions").items() if v <= MAX_VERSION
        }
        # Only a topic with a position to lose: one with none is read from its start anyway.
        placed = {t for (t, _), offset in saved.items() if offset > 0}
        recreated = sorted(
            t for t, i in saved_ids.items() if t in placed and t in ids and ids[t] != i
        )
        if recreated:
            # Its log may already reach past the saved position: the check of the ends
            # below would pass, and the messages below the position be skipped unseen.
            raise FatalError(
                f"topics created again since the saved position: {', '.join(recreated)} "
                "(their ids changed). Decide what the new log holds, then start the adapter "
                'from its beginning (docs/adapters.md, "A topic behind the state") and restart'
            )
        self._topic_ids = saved_ids | ids
        self._refuse_compaction(reader)
        positions = reader.start(saved)
        for (topic, partition), count in sorted(reader.expired.items()):
            # Lost before this source read them: loud, counted (an alert pages), and the
            # reading goes on from the oldest message kept; a re-snapshot mends it.
            SOURCE_ERRORS.labels(self.source, "expired_unread").inc()
            log.warning(
                "%s: %s[%d]: %d messages expired unread (the topic's retention removed "
                "them before this source read them): take a new snapshot of the table "
                '(docs/adapters.md, "A topic behind the state")', self.source, topic,
                partition, count,
            )  # fmt: skip
        ends = reader.end_offsets()
        behind = sorted(tp for tp, end in ends.items() if positions.get(tp, 0) > end)
        if behind:
            # Reading on would skip, unseen, every message of the new log below the old
            # position (topics deleted and created again, a connector reset, a cluster
            # restored), and commit the old position to the group.
            where = ", ".join(f"{t}[{p}] at {positions[(t, p)]}, its end {ends[(t, p)]}"
                              for t, p in behind)  # fmt: skip
            raise FatalError(
                f"the saved position is past the log's end: {where} (the topic created "
                "again?). Decide what the new log holds, then start the adapter from its "
                'beginning (docs/adapters.md, "A topic behind the state") and restart'
            )
        unsaved = 0
        idle = 0.0
        poll_seconds = min(1.0, self.mapping.idle_seconds)
        while any(positions.get(tp, 0) < end for tp, end in ends.items()):
            batch = reader.poll(max_records=500, timeout=poll_seconds)
            if not batch:
                # Transaction markers hold offsets too: the position passes them unseen.
                positions = {tp: reader.position(tp) for tp in positions}
                idle += poll_seconds
                if idle >= self.mapping.idle_seconds:
                    break  # an open transaction of a transactional writer: next run
                continue
            idle = 0.0
            for message in batch:
                yield from self._items(message)
            for tp in {m.tp for m in batch}:
                positions[tp] = reader.position(tp)
            unsaved += len(batch)
            if unsaved >= self.mapping.checkpoint_every:
                yield self._checkpoint(positions)
                unsaved = 0
        if positions:  # also when nothing came: the state and the group agree again
            yield self._checkpoint(positions)

    def _checkpoint(self, positions: dict[TP, int]) -> Checkpoint:
        offsets = dict(positions)
        reader = self.reader
        return Checkpoint(self._state(offsets), commit=lambda: reader.commit(offsets))

    def _state(self, offsets: dict[TP, int]) -> State:
        state: State = {
            "group_id": self.group_id,
            "offsets": {f"{t}:{p}": o for (t, p), o in offsets.items()},
            "topic_ids": dict(sorted(self._topic_ids.items())),
        }
        if self.mapping.version == "ts_ms":
            state["last_versions"] = {f"{t}:{p}": v for (t, p), v in sorted(self._last.items())}
        return state

    def _items(self, message: Message) -> list[Record | SkippableRecord]:
        """The records of one message: none for a tombstone; for an update that changed
        the record's key (its `before`, with REPLICA IDENTITY FULL, names another), the
        old record's delete first (one version below with `lsn`); else one."""
        item, before = self._mapped(message)
        if not isinstance(item, Record) or item.op != "upsert" or before is None:
            return [] if item is None else [item]
        old = before.get(self.mapping.key_column)
        if old is None or old == "" or str(old) == item.key:
            return [item]
        # With `lsn`, the version a delete at that position has (a change ranks one
        # above it). With `ts_ms`, one below collided with the old record's previous
        # change (at the offset before, in the same millisecond), and the reconciler
        # dropped the delete as its duplicate: the old record stayed live. The new
        # record's own version is free for it: another record.
        below = 1 if self.mapping.version == "lsn" else 0
        gone = Record(str(old), item.version - below, item.occurred_at, None, item.origin,
                      op="delete")  # fmt: skip
        return [gone, item]

    def _mapped(
        self, message: Message
    ) -> tuple[Record | SkippableRecord | None, dict[str, Any] | None]:
        """The record of one message (None for a tombstone), and an update's `before` row
        when the event carries one. A message that cannot be mapped is dead-lettered with
        its bytes, and the reading goes on: a message read again from the same offset at
        every run would stop the source for good."""
        origin = f"{message.topic}:{message.partition}:{message.offset}"
        if message.unreadable is not None:  # a batch the Kafka client could not read
            code, reason = message.unreadable
            return SkippableRecord(
                code, reason, origin, self.entity, None, message.value or b""
            ), None
        if message.value is None:
            return None, None
        key: str | None = None
        try:
            event = dbz.parse(message.value, self._local_times)
            key = self._key(event)
            version = dbz.version(
                event, message.offset, self.mapping.version, self.mapping.snapshot_reads
            )
            occurred_at = dbz.occurred_at(event)
            if self.mapping.version == "ts_ms":
                version = self._ts_version(message.tp, version)
            op: Literal["upsert", "delete"] = "delete" if event.is_delete else "upsert"
            data = None if event.is_delete else self._data(event.row, origin, event.before)
        except dbz.Unmappable as problem:
            return SkippableRecord(
                problem.code, problem.message, origin, self.entity, key, message.value
            ), None
        except FatalError:
            raise
        except (ValueError, TypeError, ArithmeticError, RecursionError, OSError) as error:
            # Nesting beyond the parser's depth, a decimal with an absurd scale, a value
            # the mapping cannot convert, a time beyond the platform's (`fromtimestamp`:
            # OSError). The type only: messages can quote the value.
            problem_text = f"a value the mapping cannot convert ({type(error).__name__})"
            return SkippableRecord(
                Reason.UNMAPPABLE_RECORD, problem_text, origin, self.entity, key, message.value
            ), None
        return Record(key, version, occurred_at, data, origin, op=op), event.before

    def _refuse_compaction(self, reader: CommittedOffsetReader) -> None:
        """Stop the source (`FatalError`) on a compacted topic whose cleaner may take a
        message within `MIN_COMPACTION_LAG_MS`: it drops a delete's event once the
        tombstone after it supersedes it, and a source paused that long reads the tombstone
        only (nothing to send): the record stays live nationally, and nothing counts it
        (compaction moves no beginning offset)."""
        short = sorted(
            t for t, lag in reader.compaction_lags().items() if lag < MIN_COMPACTION_LAG_MS
        )
        if short:
            raise FatalError(
                f"topics compacted sooner than {MIN_COMPACTION_LAG_MS // 86_400_000} days: "
                f"{', '.join(short)}: the log cleaner drops deletes a paused source has not "
                "read. Give them cleanup.policy=delete, or a min.compaction.lag.ms of at "
                f"least {MIN_COMPACTION_LAG_MS} (docs/adapters.md, debezium), and restart"
            )

    def _ts_version(self, tp: TP, derived: int) -> int:
        """A `ts_ms` version that rises along its partition: `derived`
        (`ts_ms * 1000 + offset % 1000`), or one above the partition's last when that is
        not above it. Two changes of one record in one millisecond 1,000 offsets apart (a
        busy source; a MySQL binlog's whole seconds) got one version for two contents, and
        the reconciler kept the first; a commit time that went back gave a later change a
        lower version (stale). Read again from a saved position, the same messages get
        the same versions (the last one is saved with the position). A version above the
        contract's largest is a dead letter and is not kept: kept, it made every later
        change of the partition one above it, and a dead letter too."""
        version = max(derived, self._last.get(tp, 0) + 1)
        if version > MAX_VERSION:  # never kept: every later change would be above it too
            raise dbz.Unmappable(Reason.INVALID_FIELD, dbz.TS_MS_PAST_VERSIONS)
        self._last[tp] = version
        return version

    def _data(
        self, row: dict[str, Any], origin: str, before: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`after` through the field mapping. A mapped column the event lacks means the
        table changed: the source stops (a null would erase the field in the store) until
        the mapping is fixed. A value PostgreSQL did not send (an unchanged TOASTed column:
        Debezium's placeholder) is the `before` row's value when that has it (REPLICA
        IDENTITY FULL); else the event is dead-lettered. Left out, the field was "not
        provided", and the reconciler, which takes each event as the source's whole view,
        erased the value nobody changed."""
        missing = sorted(c for c in self.mapping.fields.values() if c not in row)
        if missing:
            raise FatalError(
                f"{origin}: mapped columns not in the event: {', '.join(missing)} "
                "(the table changed? fix the mapping, then restart)"
            )
        unsent = [c for c in dict.fromkeys(self.mapping.fields.values()) if row[c] == UNAVAILABLE]
        if unsent:
            known = before or {}
            gaps = [c for c in unsent if c not in known or known[c] == UNAVAILABLE]
            if gaps:
                raise dbz.Unmappable(
                    Reason.UNMAPPABLE_RECORD,
                    f"columns Debezium did not send (unchanged TOASTed values): "
                    f"{', '.join(gaps)}; give the table REPLICA IDENTITY FULL",
                )
            row = row | {c: known[c] for c in unsent}
        return map_fields(row, self.mapping, self.zone)

    def _key(self, event: dbz.ChangeEvent) -> str:
        """The record's key. A key column an upsert's row lacks is a table changed (the
        column dropped or renamed): the source stops, as for a mapped column, instead of
        dead-lettering every change of the table (raw Debezium events, which cannot be
        re-driven) while the offsets move past them."""
        column = self.mapping.key_column
        if not event.is_delete and column not in event.row:
            raise FatalError(
                f"the key column {column} is not in the event "
                "(the table changed? fix the mapping, then restart)"
            )
        value = event.row.get(column)
        if value is None or value == "":
            side = "before" if event.is_delete else "after"
            hint = (
                ": give the table REPLICA IDENTITY FULL (or an identity index with the column)"
                if event.is_delete
                else ""
            )
            raise dbz.Unmappable(Reason.MISSING_FIELD, f"the key column is empty in `{side}`{hint}")
        return str(value)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _offsets(state: State, kind: str = "offsets") -> dict[TP, int]:
    """What a checkpoint saved per partition: {"topic:partition": number} (the positions:
    the next offset; `last_versions`: the last `ts_ms` version)."""
    saved: dict[TP, int] = {}
    for name, number in (state.get(kind) or {}).items():
        topic, _, partition = str(name).rpartition(":")
        saved[(topic, int(partition))] = int(number)
    return saved
