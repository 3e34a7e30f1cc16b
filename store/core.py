"""The national store (SQLAlchemy 2 Core): source views, canonical records, applied offsets.

SQLite is the embedded default; PostgreSQL is the production target. The store is the only
code that touches the tables or the engine. A reconciler batch is one unit of work:

    with store.batch(partitions, keys) as tx:   # one read: offsets, views, canonical data
        ...merge in memory...
        tx.write(changes)                        # one write: every table, offsets last

and the transaction commits the data together with the next Kafka offset of each
partition it read: that is the exactly-once effect. Driver errors are translated here into
the project's families: an unreachable or failing database is `TransientError`, a value
the database refuses is `RecordError` (`apply_failed`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import ColumnElement

from schemas.identifiers import ReferenceKey, key_reference
from schemas.redaction import redacted_url as redacted_url  # the one redaction, re-exported
from schemas.values import value_class
from schemas.views import CanonicalRecord, RecordKey, SourceView, expand_provenance
from store.batch import BatchIO, batch_io
from store.batch import Conflicts as Conflicts
from store.batch import SourcePartition as SourcePartition
from store.engine import IDLE_IN_TRANSACTION_SECONDS, create_store_engine
from store.failures import OffsetGap, translated
from store.fills import CATCH_UP_AFTER, CATCH_UP_LEASE, fill_freshness_row
from store.tables import (
    REDRIVE_CLAIM,
    SOURCE_PURGE_PROGRESS,
    UTCDateTime,
    access_log,
    applied_offsets,
    apply_journal,
    dead_letter_redrives,
    dossier_anomalies,
    offset_changes,
    record_deletions,
    record_history,
    records,
    source_freshness,
    source_purges,
    source_views,
    store_meta,
    topic_ids,
)
from store.times import aware_utc

if TYPE_CHECKING:
    from store.purge import SourcePurge
    from store.roles import Granted

CHUNK = 500
# Rows of the history or the access log one retention transaction deletes.
RETENTION_CHUNK = 5000
# A `record_deletions` time that is already past: checked at the retention's next run.
DUE_AT_ONCE = datetime(1970, 1, 1, tzinfo=UTC)
TopicPartition = tuple[str, int]
OffsetRange = tuple[int, int, int]  # first offset, next offset, messages


@value_class
class ViewRow:
    entity: str
    key: str
    view: SourceView


class HistoryEntry(TypedDict):
    entity: str
    key: str
    event_id: str | None
    source: str
    version: int | None
    changes: dict[str, list[Any]]
    applied_at: datetime


class Anomaly(TypedDict):
    key: str
    source: str
    from_status: int
    to_status: int
    event_id: str
    detected_at: datetime


@dataclass
class BatchChanges:
    """Everything one batch writes, computed in memory by the reconciler."""

    views: list[ViewRow] = field(default_factory=list)
    records: dict[RecordKey, CanonicalRecord | None] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    conflicts: Conflicts = field(default_factory=dict)
    # Records of `conflicts` known to have none stored: nothing to delete before.
    conflicts_absent: set[RecordKey] = field(default_factory=set)
    document_owners: dict[RecordKey, RecordKey | None] = field(default_factory=dict)
    offsets: dict[TopicPartition, OffsetRange] = field(default_factory=dict)
    # A live batch's newest applied `occurred_at` per (source, topic, partition).
    freshness: dict[SourcePartition, datetime] = field(default_factory=dict)
    purged_views: list[tuple[str, str, str]] = field(default_factory=list)  # entity, key, source
    purge: SourcePurge | None = None  # the audit row of a `source purge`, counts so far


@dataclass(frozen=True)
class Freshness:
    source: str
    last_change: datetime
    last_applied: datetime


class Store:
    def __init__(
        self,
        url: str,
        lock_wait: float | None = None,
        idle_in_transaction: float | None = IDLE_IN_TRANSACTION_SECONDS,
    ) -> None:
        self.url = url
        self.engine = create_store_engine(url, lock_wait, idle_in_transaction)

    def create_schema(self) -> None:
        """Create a new store at the newest schema revision (an old one must be upgraded)."""
        from store.schema import ensure_current

        with translated():
            ensure_current(self.engine)

    def require_schema(self) -> None:
        """Refuse a store without the newest schema, creating nothing (reading commands):
        a SQLite file that does not exist is not opened (opening would create it)."""

        from store.schema import no_schema, require_current

        database = make_url(self.url).database if self.url.startswith("sqlite") else None
        in_a_file = database and database != ":memory:" and not database.startswith("file:")
        if in_a_file and not Path(str(database)).expanduser().exists():
            raise no_schema()
        with translated():
            require_current(self.engine)

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the store's schema to the newest revision; return (from, to)."""
        from store.schema import upgrade

        with translated():
            return upgrade(self.engine)

    def grant(self, role: str, access_log_floor_days: int) -> Granted:
        """Give a second PostgreSQL role what the worker and the commands need, and no
        more (`store grant`; store/roles.py); run as the owner."""
        from store.roles import grant

        with translated():
            return grant(self.engine, role, access_log_floor_days)

    def drop_schema(self) -> None:
        """Drop the project's tables (and Alembic's version table), nothing else."""
        from store.schema import drop_project_tables

        with translated():
            drop_project_tables(self.engine)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    # -- the reconciler's unit of work ----------------------------------------------------
    @contextmanager
    def batch(
        self,
        partitions: Iterable[TopicPartition],
        keys: Iterable[RecordKey],
        use_offsets: bool = True,
        commit: bool = True,
        known: Collection[RecordKey] = (),
    ) -> Iterator[BatchTransaction]:
        """One writer transaction for a batch: reads the partitions' stored offsets (locked
        on PostgreSQL), every source's view and the canonical data of the records (locked),
        hands them over, and commits what `write` was given (rolls back when `commit` is
        False, for a dry run, or on any error). Set-based, fixed statements: store.batch.

        The records in `known` are locked but not read (the caller holds them: a live
        worker's `consumers.cache`): `tx.writes` is the count of record writes by other
        transactions than live batches, which the caller compares before trusting what it
        holds, and `tx.read_known()` reads them after all. A batch without offsets
        (`use_offsets` False: replay, remerge, purge) is such a transaction: it counts
        itself in that count (`store_meta` `record_writes`) when it commits."""
        with translated(), self.write_transaction(commit) as conn:
            io = batch_io(conn.dialect.name, conn.connection.driver_connection)
            offsets, views, canonical, writes = io.read(
                sorted(set(keys)), sorted(set(partitions)), use_offsets, known
            )
            try:
                yield BatchTransaction(io, offsets, views, canonical, conn, writes, known)
                io.settle()  # anything sent and not waited for yet, before the commit
                if not use_offsets:
                    io.count_write(utcnow())
            except BaseException:
                io.abandon()
                raise

    # -- reads --------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write_transaction(self, commit: bool = True) -> Iterator[Connection]:
        """One writer transaction: committed on success (unless `commit` is False, for a
        dry run), rolled back on error."""
        with self.engine.connect().execution_options(writer=True) as conn:
            transaction = conn.begin()
            try:
                yield conn
            except BaseException:
                transaction.rollback()
                raise
            if commit:
                transaction.commit()
            else:
                transaction.rollback()

    # -- reads --------------------------------------------------------------------------
    def _offsets(
        self, conn: Connection, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The stored offsets, locked for an operator's change (on PostgreSQL, with the
        partitions' own locks, which a batch takes too: a partition without a row yet)."""
        wanted = sorted(set(partitions))
        result: dict[TopicPartition, int] = {}
        if conn.dialect.name == "postgresql":
            batch_io(conn.dialect.name, conn.connection.driver_connection).lock((), wanted)
        for chunk in _chunks(wanted):
            query = select(
                applied_offsets.c.topic, applied_offsets.c.partition, applied_offsets.c.next_offset
            ).where(tuple_(applied_offsets.c.topic, applied_offsets.c.partition).in_(chunk))
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            for topic, partition, next_offset in conn.execute(query):
                result[(topic, partition)] = next_offset
        return result

    def all_offsets(self) -> dict[TopicPartition, int]:
        """Every partition's next offset to apply."""
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(select(applied_offsets))
            return {(row.topic, row.partition): row.next_offset for row in rows}

    def holds_data(self) -> bool:
        """Whether any of the project's tables holds a row (False for a new database)."""
        from sqlalchemy import inspect

        with translated(), self.engine.connect() as conn:
            present = set(inspect(conn).get_table_names())
            for table in (source_views, records, applied_offsets, record_history):
                if table.name in present and conn.execute(select(table).limit(1)).first():
                    return True
        return False

    def lock_capacity(self) -> int | None:
        """How many locks PostgreSQL's shared lock table is sized for:
        max_locks_per_transaction × (max_connections + max_prepared_transactions). A batch
        holds one advisory lock per record it merges (and one per partition) until it
        commits, a purge chunk one per key. None on SQLite (writers are serialised, no lock
        table)."""
        if self.backend != "postgresql":
            return None
        with translated(), self.engine.connect() as conn:
            capacity = conn.exec_driver_sql(
                "SELECT current_setting('max_locks_per_transaction')::int"
                " * (current_setting('max_connections')::int"
                " + current_setting('max_prepared_transactions')::int)"
            ).scalar()
            conn.rollback()
        assert capacity is not None
        return int(capacity)

    def stored_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to apply of these partitions (absent: none applied yet)."""
        with translated(), self.engine.connect() as conn:
            io = batch_io(conn.dialect.name, conn.connection.driver_connection)
            found = io.offsets(sorted(set(partitions)), lock=False)
            conn.rollback()
            return found

    def reset_offsets(
        self,
        targets: dict[TopicPartition, int],
        operator: str,
        reason: str,
        ids: Mapping[str, str] | None = None,
    ) -> None:
        """Set partitions' next offsets (an operator's reset) and record who did it, why,
        and from where, in one transaction; `ids`: the cluster's id of each topic reset,
        now the store's (the reset's offsets are in that topic's log)."""
        if not targets:  # nothing moved, nothing to record
            return
        now = utcnow()
        with translated(), self.write_transaction() as conn:
            if ids:
                rows = [{"topic": t, "topic_id": i, "recorded_at": now} for t, i in ids.items()]
                _upsert(conn, topic_ids, rows, ["topic"])
            before = self._offsets(conn, targets)
            conn.execute(
                insert(offset_changes),
                [
                    {
                        "kind": "reset",
                        "topic": topic,
                        "partition": partition,
                        "from_offset": before.get((topic, partition)),
                        "to_offset": target,
                        "operator": operator,
                        "reason": reason,
                        "changed_at": now,
                    }
                    for (topic, partition), target in targets.items()
                ],
            )
            for (topic, partition), target in targets.items():
                conn.execute(
                    delete(applied_offsets).where(
                        applied_offsets.c.topic == topic, applied_offsets.c.partition == partition
                    )
                )
                conn.execute(
                    insert(applied_offsets).values(
                        topic=topic, partition=partition, next_offset=target, updated_at=now
                    )
                )
            batch_io(conn.dialect.name, conn.connection.driver_connection).count_write(now)

    def topic_ids(self) -> dict[str, str]:
        """The cluster's id of each change topic as the store first saw it (`topic_ids`)."""
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(select(topic_ids.c.topic, topic_ids.c.topic_id))
            return {topic: found for topic, found in rows}

    def record_topic_ids(self, ids: Mapping[str, str]) -> None:
        """Record the ids of topics the store has none of yet; a recorded one is replaced
        only while no partition of its topic has an applied offset (the store holds no
        position in the earlier log: a topic created again before any event of it was
        applied)."""
        now = utcnow()
        rows = [{"topic": t, "topic_id": i, "recorded_at": now} for t, i in ids.items()]
        applied = select(applied_offsets.c.topic).where(
            applied_offsets.c.topic == topic_ids.c.topic, applied_offsets.c.next_offset > 0
        )
        with translated(), self.write_transaction() as conn:
            _insert_missing(conn, topic_ids, rows, ["topic"])
            for topic, found in ids.items():
                conn.execute(
                    update(topic_ids)
                    .where(
                        topic_ids.c.topic == topic,
                        topic_ids.c.topic_id != found,
                        ~applied.exists(),
                    )
                    .values(topic_id=found, recorded_at=now)
                )

    def skip_offset(
        self,
        tp: TopicPartition,
        offset: int,
        log_start: int,
        operator: str,
        reason: str,
        next_offset: int | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Move a partition past the one message at `offset`, which must be the next one to
        apply (`log_start` when the store has none for it yet); journaled and recorded.
        `next_offset`: the store's next offset the caller read, when the message lies past
        it (the offsets between hold no message: a transaction's marker, or an event the
        log cleaner removed); it must still be the store's. `before` runs once that is
        checked, with the partition's offset locked and before anything is written (the
        message copied to the dead letters): a worker cannot apply it meanwhile, and if
        `before` fails nothing moves."""
        now = utcnow()
        first = offset if next_offset is None else next_offset
        with translated(), self.write_transaction() as conn:
            stored = self._offsets(conn, [tp]).get(tp)
            expected = log_start if stored is None else stored
            if first != expected or offset < first:
                raise OffsetGap(
                    f"{tp[0]}[{tp[1]}]: the next offset to apply is {expected}, not {offset}: "
                    "only the message the worker is at can be skipped"
                )
            if before is not None:
                before()
            conn.execute(
                insert(offset_changes).values(
                    kind="skip", topic=tp[0], partition=tp[1], from_offset=stored,
                    to_offset=offset + 1, operator=operator, reason=reason, changed_at=now,
                )
            )  # fmt: skip
            io = batch_io(conn.dialect.name, conn.connection.driver_connection)
            io.write_offsets({tp: (first, offset + 1, 1)}, now)
            io.count_write(now)

    def record_group_reset(
        self,
        group: str,
        moves: Mapping[TopicPartition, tuple[int | None, int]],
        operator: str,
        reason: str,
    ) -> None:
        """Record an operator's reset of another consumer group's offsets in Kafka (from,
        to per partition); the store's own offsets are not moved."""
        now = utcnow()
        if not moves:  # nothing moved, nothing to record
            return
        with translated(), self.write_transaction() as conn:
            conn.execute(
                insert(offset_changes),
                [
                    {
                        "kind": "reset",
                        "topic": topic,
                        "partition": partition,
                        "from_offset": before,
                        "to_offset": target,
                        "operator": operator,
                        "reason": reason,
                        "changed_at": now,
                        "consumer_group": group,
                    }
                    for (topic, partition), (before, target) in moves.items()
                ],
            )

    def offset_changes(self) -> list[dict[str, Any]]:
        """Every recorded reset and skip, oldest first."""
        query = select(offset_changes).order_by(offset_changes.c.id)
        with translated(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def server_now(self) -> datetime:
        """The database server's clock (PostgreSQL's `now()`); on SQLite, this host's."""
        if self.backend != "postgresql":
            return utcnow()
        with translated(), self.engine.connect() as conn:
            moment = conn.execute(text("SELECT now()")).scalar_one()
        return aware_utc(moment).astimezone(UTC)

    def meta(self, name: str) -> str | None:
        with translated(), self.engine.connect() as conn:
            row = conn.execute(select(store_meta.c.value).where(store_meta.c.name == name))
            value = row.scalar_one_or_none()
            return None if value is None else str(value)

    def catch_up_due(self, now: datetime) -> bool:
        """Whether the fills of the tables batches keep are due again (`store.fills`)."""
        when = self.meta(CATCH_UP_AFTER)
        return when is not None and datetime.fromisoformat(when) <= now

    def catch_up(self, now: datetime, stop: threading.Event | None = None) -> bool:
        """Fill `source_freshness` and `record_deletions` from the views again (`store.fills`)
        when due, once: the worker that takes the schedule's row runs it, moving the row an
        hour on (a lease, renewed while it runs: another worker takes over should it stop),
        and removes the row when done. False: not due, taken by another worker, or stopped
        by `stop` (the row is then due again at once).

        Every read is a short one and every write a chunk in a short transaction: the
        freshness's aggregate is read, then its few rows written; the deletions are read
        in keyset pages along the views' primary key, each page's notes written at once.
        No batch waits on the scan, and no transaction stays open across it."""
        seen = self.meta(CATCH_UP_AFTER)
        if seen is None or datetime.fromisoformat(seen) > now:
            return False
        if stop is not None and stop.is_set():
            return False
        taken = self._take_over(seen, now)
        if taken is None:
            return False
        lease, renewed = taken, time.monotonic()

        def go_on() -> bool:
            """Whether to go on: not stopped (the row is handed back), and the lease still
            this worker's (renewed once a quarter of it has passed)."""
            nonlocal lease, renewed
            if stop is not None and stop.is_set():
                self._hand_back(lease, seen)
                return False
            if time.monotonic() - renewed > CATCH_UP_LEASE.total_seconds() / 4:
                taken = self._take_over(lease, utcnow())
                if taken is None:  # taken over meanwhile: that worker goes on
                    return False
                lease, renewed = taken, time.monotonic()
            return True

        with translated(), self.engine.connect() as conn:
            newest = conn.execute(
                select(
                    source_views.c.source,
                    func.max(source_views.c.occurred_at),
                    func.max(source_views.c.applied_at),
                ).group_by(source_views.c.source)
            ).all()
        if not go_on():
            return False
        # No views (no source has sent yet, or all purged): nothing to fill, and an
        # `executemany` of no rows runs its statement once without parameters and fails.
        with translated(), self.write_transaction() as conn:
            # As the migration's fill: a row only moves forward, and a source whose views
            # a `source purge` removed since the read gets none.
            typed = [bindparam(n, type_=UTCDateTime()) for n in ("change", "applied")]
            fills = [
                {"source": source, "change": aware_utc(change), "applied": aware_utc(applied)}
                for source, change, applied in newest
            ]
            if fills:
                conn.execute(text(fill_freshness_row(conn.dialect.name)).bindparams(*typed), fills)
        only_tombstones = func.sum(case((source_views.c.deleted, 0), else_=1)) == 0
        page = (
            select(source_views.c.entity, source_views.c.key, func.max(source_views.c.applied_at))
            .group_by(source_views.c.entity, source_views.c.key)
            .having(only_tombstones)
            .order_by(source_views.c.entity, source_views.c.key)
            .limit(CHUNK)
        )
        after: RecordKey | None = None
        while True:
            if not go_on():
                return False
            query = page
            if after is not None:
                key = tuple_(source_views.c.entity, source_views.c.key)
                query = page.where(key > tuple_(*after))
            with translated(), self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                break
            with translated(), self.write_transaction() as conn:
                _insert_missing(conn, record_deletions, [
                    {"entity": e, "key": k, "deleted_at": aware_utc(at)} for e, k, at in rows
                ], ["entity", "key"])  # fmt: skip
            after = (rows[-1][0], rows[-1][1])
        with translated(), self.write_transaction() as conn:
            mine = and_(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == lease)
            conn.execute(delete(store_meta).where(mine))
        return True

    def _take_over(self, seen: str, now: datetime) -> str | None:
        """Move the catch-up's row from `seen` to a lease an hour after `now`; None when
        the row no longer says `seen` (another worker took it)."""
        lease = (now + CATCH_UP_LEASE).isoformat()
        with translated(), self.write_transaction() as conn:
            taken = conn.execute(
                update(store_meta)
                .where(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == seen)
                .values(value=lease, updated_at=utcnow())
            ).rowcount
        return lease if taken else None

    def _hand_back(self, lease: str, seen: str) -> None:
        """A stopped catch-up's row, due again (unless another worker took it meanwhile)."""
        with translated(), self.write_transaction() as conn:
            conn.execute(
                update(store_meta)
                .where(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == lease)
                .values(value=seen, updated_at=utcnow())
            )

    def set_meta(self, name: str, value: str) -> None:
        with translated(), self.write_transaction() as conn:
            _upsert(
                conn,
                store_meta,
                [{"name": name, "value": value, "updated_at": utcnow()}],
                ["name"],
            )

    def journal(self) -> dict[TopicPartition, list[tuple[int, int]]]:
        """Every partition's applied ranges [first, next) in commit order."""
        query = select(
            apply_journal.c.topic,
            apply_journal.c.partition,
            apply_journal.c.first_offset,
            apply_journal.c.next_offset,
        ).order_by(apply_journal.c.id)
        result: dict[TopicPartition, list[tuple[int, int]]] = {}
        with translated(), self.engine.connect() as conn:
            for topic, partition, first, end in conn.execute(query):
                result.setdefault((topic, partition), []).append((first, end))
        return result

    def freshness(self) -> list[Freshness]:
        """Per source, the newest `occurred_at` live batches applied, and when the last
        was applied (a small table kept by each batch: no scan of the views)."""
        query = select(
            source_freshness.c.source,
            func.max(source_freshness.c.last_change),
            func.max(source_freshness.c.last_applied),
        ).group_by(source_freshness.c.source)
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            Freshness(source, aware_utc(change), aware_utc(applied))
            for source, change, applied in rows
            if change is not None and applied is not None
        ]

    def sync_lags(self) -> list[float]:
        """`applied_at - occurred_at` in seconds of every current source view, sorted."""
        query = select(source_views.c.occurred_at, source_views.c.applied_at)
        with translated(), self.engine.connect() as conn:
            return sorted((a - o).total_seconds() for o, a in conn.execute(query))

    def view_version(self, entity: str, key: str, source: str) -> int | None:
        """The version of a source's stored view of a record (a tombstone's included)."""
        query = select(source_views.c.version).where(
            source_views.c.entity == entity,
            source_views.c.key == key,
            source_views.c.source == source,
        )
        with translated(), self.engine.connect() as conn:
            version: int | None = conn.execute(query).scalar_one_or_none()
            return version

    def redriven(
        self, topic: str, topic_id: str = "", starts: Mapping[int, int] | None = None
    ) -> dict[tuple[int, int], datetime | None]:
        """The dead letters of `topic` already re-driven, by (partition, offset): None for
        a redrive recorded with this topic's id (KIP-516), else the time of the latest one
        recorded without an id (before migration 0014, or the id unknown then). A topic
        created again numbers its letters from 0 again: the earlier topic's redrives are
        not its letters', and one recorded without an id stands only for a letter written
        before it (`portal_sync.ops.dlq`). `starts`: each partition's first offset still in
        the topic; those below are left out, their letters gone with the retention (a
        redrive read every row it ever recorded, millions after a few years)."""
        table = dead_letter_redrives.c
        query = select(table.partition, table.offset, table.topic_id, table.redriven_at).where(
            table.topic == topic, table.topic_id.in_({"", topic_id})
        )
        if starts:
            kept = [and_(table.partition == p, table.offset >= o) for p, o in starts.items()]
            query = query.where(or_(table.partition.not_in(list(starts)), *kept))
        done: dict[tuple[int, int], datetime | None] = {}
        with translated(), self.engine.connect() as conn:
            for partition, offset, recorded_id, at in conn.execute(query):
                place = (partition, offset)
                if topic_id and recorded_id == topic_id:
                    done[place] = None
                elif place not in done or (done[place] is not None and at > done[place]):
                    done[place] = at
        return done

    @contextmanager
    def claim_redrive(
        self,
        topic: str,
        partition: int,
        offset: int,
        reason_code: str,
        target_topic: str,
        topic_id: str = "",
        operator: str | None = None,
        earlier_before: datetime | None = None,
    ) -> Iterator[bool]:
        """Claim a dead letter's redrive: yield whether its row is this caller's, in a
        transaction that commits when the caller's block ends and rolls back if it raises.
        The caller publishes the letter inside the block: two redrives at once send it
        once (the second waits for the first's row, then finds it), and a redrive that
        fails to publish records nothing. A row recorded without the topic's id ('') at
        the same place may be an earlier topic's letter's: it is this letter's claim only
        if recorded at or after `earlier_before`, else it is taken over (None: always)."""
        table = dead_letter_redrives
        with translated(), self.write_transaction() as conn:
            insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            statement = insert_fn(table).values(
                topic=topic,
                topic_id=topic_id,
                partition=partition,
                offset=offset,
                reason_code=reason_code,
                target_topic=target_topic,
                redriven_at=utcnow(),
                operator=operator,
            )
            keys = ["topic", "topic_id", "partition", "offset"]
            if topic_id:
                claim = statement.on_conflict_do_nothing(index_elements=keys)
            else:
                update = {n: statement.excluded[n] for n in REDRIVE_CLAIM}
                older = None if earlier_before is None else table.c.redriven_at < earlier_before
                claim = statement.on_conflict_do_update(
                    index_elements=keys, set_=update, where=older
                )
            yield conn.execute(claim.returning(table.c.offset)).first() is not None

    def iter_records(
        self, entity: str | None = None, page: int = CHUNK
    ) -> Iterator[tuple[str, str, dict[str, Any], dict[str, int], dict[str, Any] | None]]:
        """Canonical records (entity, key, data, sources, provenance), sorted by entity and
        the key's bytes (on every backend: one dump for both).

        Read in keyset pages of `page` records along the primary key, each in a short
        transaction of its own: no snapshot is held between pages, however long the
        reader takes (`export` into a slow pipe, `rebuild --compare` waiting on the other
        store), and a store of any size is read in bounded memory without a sort. Each
        record is as it was when its page was read; one written meanwhile ahead of the
        read is read as written."""
        after: tuple[str, str] | None = None
        while True:
            query = select(records).order_by(records.c.entity, records.c.key).limit(page)
            if entity is not None:
                query = query.where(records.c.entity == entity)
                if after is not None:  # by the key alone: SQLite began at the entity's first
                    query = query.where(records.c.key > after[1])
            elif after is not None:
                query = query.where(tuple_(records.c.entity, records.c.key) > tuple_(*after))
            with translated(), self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                origins = row.provenance
                provenance = None if origins is None else expand_provenance(origins, row.sources)
                yield row.entity, row.key, row.data, row.sources, provenance
            if len(rows) < page:
                return
            after = (rows[-1].entity, rows[-1].key)

    def changed_since(self, keys: Sequence[RecordKey], moment: datetime) -> set[RecordKey]:
        """Of these records, those changed at or after `moment`: a view of theirs applied,
        or the merged record written (`rebuild --compare` sets apart what the live
        workers applied while the rebuild ran). By primary key, a chunk at a time."""
        found: set[RecordKey] = set()
        with translated(), self.engine.connect() as conn:
            for chunk in _chunks(list(keys)):
                for table, column in (
                    (source_views, source_views.c.applied_at),
                    (records, records.c.updated_at),
                ):
                    pair = tuple_(table.c.entity, table.c.key)
                    query = select(table.c.entity, table.c.key).where(
                        pair.in_(chunk), column >= moment
                    )
                    found.update((row.entity, row.key) for row in conn.execute(query.distinct()))
        return found

    def record_keys(
        self, entity: str | None = None, after: RecordKey | None = None, limit: int | None = None
    ) -> list[RecordKey]:
        """(entity, key) some source has a view of, in order: every one, or the `limit`
        after `after` (keyset pages along the primary key: a store of any size is read in
        bounded memory, page by page)."""
        query = select(source_views.c.entity, source_views.c.key).distinct()
        if entity is not None:
            query = query.where(source_views.c.entity == entity)
        if after is not None:
            query = query.where(tuple_(source_views.c.entity, source_views.c.key) > tuple_(*after))
        query = query.order_by(source_views.c.entity, source_views.c.key)
        if limit is not None:
            query = query.limit(limit)
        with translated(), self.engine.connect() as conn:
            return [(e, k) for e, k in conn.execute(query)]

    def record_key_pages(
        self, entity: str | None = None, size: int = CHUNK
    ) -> Iterator[list[RecordKey]]:
        """`record_keys` page by page, to the end."""
        after = None
        while page := self.record_keys(entity, after, size):
            yield page
            if len(page) < size:
                return
            after = page[-1]

    def count_record_keys(self, entity: str | None = None) -> int:
        """How many (entity, key) some source has a view of."""
        keys = select(source_views.c.entity, source_views.c.key).distinct()
        if entity is not None:
            keys = keys.where(source_views.c.entity == entity)
        with translated(), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(keys.subquery())).scalar_one())

    def keys_without_provenance(self) -> list[RecordKey]:
        """Records written before the store kept provenance (migrated first-schema stores)."""
        query = select(records.c.entity, records.c.key).where(records.c.provenance.is_(None))
        with self.engine.connect() as conn:
            return sorted((e, k) for e, k in conn.execute(query))

    def count_records(self) -> dict[str, int]:
        with translated(), self.engine.connect() as conn:
            query = select(records.c.entity, func.count()).group_by(records.c.entity)
            return {entity: count for entity, count in conn.execute(query)}

    # -- the access log -----------------------------------------------------------------
    def log_access(
        self,
        operator: str,
        command: str,
        reason: str,
        targets: Iterable[tuple[str | None, str | None]],
        now: datetime | None = None,
    ) -> None:
        """Append one row per (entity, reference) read, at `now` (default: the clock), in
        one transaction (one row without either when `targets` is empty). The caller shows
        nothing before this returned."""
        now = now or utcnow()
        rows = [
            {"accessed_at": now, "operator": operator, "command": command,
             "entity": entity, "reference": reference, "reason": reason}
            for entity, reference in (list(targets) or [(None, None)])
        ]  # fmt: skip
        with translated(), self.write_transaction() as conn:
            conn.execute(insert(access_log), rows)

    def access_entries(
        self, since: datetime | None = None, operators: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        """The access log, oldest first; from `since` on, of the `operators` (one person's
        names, as written)."""
        query = select(access_log).order_by(access_log.c.id)
        if since is not None:
            query = query.where(access_log.c.accessed_at >= since)
        if operators is not None:
            query = query.where(access_log.c.operator.in_(sorted(set(operators))))
        with translated(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- retention ----------------------------------------------------------------------
    def prune_history(self, older_than: datetime) -> int:
        """Drop history entries applied before `older_than`; return how many."""
        return self.prune_history_within(older_than)[0]

    def prune_history_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """`prune_history` a chunk at a time until none is left or `seconds` have passed
        (a chunk begun is finished; one at least); also whether none is left."""
        return self._delete_in_chunks(record_history, record_history.c.applied_at,
                                      older_than, seconds)  # fmt: skip

    def purge_access_log(self, older_than: datetime) -> int:
        """Delete access log rows written before `older_than` (the only delete of the log:
        on PostgreSQL its trigger lets a DELETE through only in a transaction that says it
        is this purge); return how many."""
        return self.purge_access_log_within(older_than)[0]

    def purge_access_log_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """`purge_access_log` a chunk at a time, as `prune_history_within`."""
        return self._delete_in_chunks(access_log, access_log.c.accessed_at, older_than,
                                      seconds, "portal_sync_purge_access_log")  # fmt: skip

    def purge_journal_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """Delete the batches' journal rows committed before `older_than`, as
        `prune_history_within` (on PostgreSQL through the journal's purge function, which
        keeps the last `store.roles.JOURNAL_FLOOR_DAYS` whatever it is asked). By id: of
        the oldest rows those old enough, until none of them is (the ids rise with the
        commits; no index of the time, which a large journal's migration would have had to
        build while every batch waited)."""
        return self._delete_in_chunks(apply_journal, apply_journal.c.committed_at, older_than,
                                      seconds, "portal_sync_purge_apply_journal",
                                      by_id=True)  # fmt: skip

    def _delete_in_chunks(
        self,
        table: Table,
        column: ColumnElement[Any],
        older_than: datetime,
        seconds: float | None,
        purge_function: str | None = None,
        by_id: bool = False,
    ) -> tuple[int, bool]:
        """Delete the rows whose `column` is before `older_than`, RETENTION_CHUNK of them a
        transaction (by the column's index), until none is left or `seconds` have passed:
        a worker's retention run never holds its batches for long, whatever a lowered
        retention or days of failed runs have left due."""
        deadline = None if seconds is None else time.monotonic() + seconds
        chosen = (
            select(table.c.id).where(column < older_than).order_by(column).limit(RETENTION_CHUNK)
        )
        # On PostgreSQL the access log's and the journal's rows go through their purge
        # functions (migrations 0017, 0018), which run as the store's owner: the role
        # running this need not be able to delete from them (`store grant`).
        purging = (
            None
            if purge_function is None
            else getattr(func, purge_function)(
                bindparam("before", older_than, type_=UTCDateTime()), RETENTION_CHUNK
            )
        )
        deleted = 0
        while True:
            with translated(), self.write_transaction() as conn:
                if purging is not None and conn.dialect.name == "postgresql":
                    done = int(conn.execute(select(purging)).scalar_one())
                    deleted += done
                    # a purge beside (another worker's) deletes some of a chunk: done when
                    # none is left, not when a chunk comes out short
                    more = done > 0
                elif by_id:
                    oldest = select(table.c.id, column).order_by(table.c.id)
                    rows = conn.execute(oldest.limit(RETENTION_CHUNK)).all()
                    ids = [row_id for row_id, at in rows if at < older_than]
                    more = bool(ids)
                    if ids:
                        result = conn.execute(delete(table).where(table.c.id.in_(ids)))
                        deleted += int(result.rowcount or 0)
                else:
                    ids = [row_id for (row_id,) in conn.execute(chosen)]
                    more = len(ids) == RETENTION_CHUNK
                    if ids:
                        result = conn.execute(delete(table).where(table.c.id.in_(ids)))
                        deleted += int(result.rowcount or 0)
            if not more:
                return deleted, True
            if deadline is not None and time.monotonic() >= deadline:
                return deleted, False

    def purge_deleted(
        self, older_than: datetime, secret: ReferenceKey | None = None
    ) -> tuple[int, int]:
        """Forget records every source deleted before `older_than`: the old and new values
        of their history entries become null, the entries' key its reference (keyed with
        `secret`; without one, an opaque name) and their event id null (an event id derives
        from the key, without a secret); the entries stay, marked `purged_at`, under that
        name. Their tombstones go. Return (history entries emptied, tombstones
        removed)."""
        emptied, removed, _ = self.purge_deleted_within(older_than, secret=secret)
        return emptied, removed

    def purge_deleted_within(
        self,
        older_than: datetime,
        seconds: float | None = None,
        secret: ReferenceKey | None = None,
    ) -> tuple[int, int, bool]:
        """`purge_deleted`, chunk after chunk until none is due or `seconds` have passed
        (a chunk begun is finished; one at least); the third value says whether none is
        due any more.

        The candidates are the rows of `record_deletions` due before `older_than` (an index
        range, not a scan of the views). Each chunk of them is locked (as a batch locks its
        records) and checked against the views inside its transaction: a record every
        source deleted before `older_than` is forgotten; one deleted since waits for its
        newest tombstone's time; one that came back leaves the table; one with no view at all
        (a source purge took the last) is forgotten at its note's time. So every chunk
        leaves the due ones, and the next is read afresh."""
        deadline = None if seconds is None else time.monotonic() + seconds
        emptied = removed = 0
        due = (
            select(record_deletions.c.entity, record_deletions.c.key)
            .where(record_deletions.c.deleted_at < older_than)
            .order_by(record_deletions.c.deleted_at)
            .limit(CHUNK)
        )
        first = True  # a chunk at least, whatever time is left
        while first or deadline is None or time.monotonic() < deadline:
            first = False
            with translated(), self.engine.connect() as conn:
                chunk = sorted((entity, key) for entity, key in conn.execute(due))
            if not chunk:
                return emptied, removed, True
            with translated(), self.write_transaction() as conn:
                io = batch_io(conn.dialect.name, conn.connection.driver_connection)
                io.lock(chunk)
                newest = io.only_tombstones(chunk)
                keys = sorted(k for k, at in newest.items() if at < older_than)
                # A record a source purge left with no view at all: its note's time (the
                # purge's, or an earlier delete's) is the last time it was held.
                held = io.with_views(chunk)
                keys += [k for k in chunk if k not in held]
                keys.sort()
                later = {k: at for k, at in newest.items() if at >= older_than}
                io.forget_deletions([k for k in chunk if k not in later])
                if later:
                    io.move_deletions(later)
                if not keys:
                    continue
                of_keys = tuple_(record_history.c.entity, record_history.c.key).in_(keys)
                entries = conn.execute(
                    select(
                        record_history.c.id, record_history.c.key, record_history.c.changes
                    ).where(of_keys, record_history.c.purged_at.is_(None))
                ).all()
                # Keyed, the reference finds them again (`history`, with the same secret);
                # without a secret an opaque name per record: a masked key is shared by
                # one record in a hundred, and would list other people's entries.
                aliases = {
                    key: key_reference(key, secret)
                    if secret is not None
                    else f"forgotten:{uuid.uuid4().hex[:16]}"
                    for key in {key for _, key, _ in entries}
                }
                if entries:
                    conn.execute(
                        update(record_history)
                        .where(record_history.c.id == bindparam("entry_id"))
                        .values(
                            changes=bindparam("emptied"),
                            key=bindparam("reference"),
                            event_id=None,
                            purged_at=utcnow(),
                        ),
                        [
                            {
                                "entry_id": entry_id,
                                "emptied": {f: [None, None] for f in changes},
                                "reference": aliases[key],
                            }
                            for entry_id, key, changes in entries
                        ],
                    )
                emptied += len(entries)
                result = conn.execute(
                    delete(source_views).where(
                        tuple_(source_views.c.entity, source_views.c.key).in_(keys)
                    )
                )
                removed += int(result.rowcount or 0)
                # A forgotten dossier's unforeseen status changes go with it: they name it,
                # and are kept while the record exists (privacy.md).
                dossiers = [key for entity, key in keys if entity == "dossier"]
                if dossiers:
                    conn.execute(
                        delete(dossier_anomalies).where(dossier_anomalies.c.key.in_(dossiers))
                    )
                io.count_write(utcnow())
        return emptied, removed, False


class BatchTransaction:
    """A batch's open transaction: what the store holds for it, and its one write."""

    def __init__(
        self,
        io: BatchIO,
        offsets: dict[TopicPartition, int],
        views: dict[RecordKey, dict[str, SourceView]],
        canonical: dict[RecordKey, dict[str, Any]],
        conn: Connection,
        writes: int = 0,
        known: Collection[RecordKey] = (),
    ) -> None:
        self._io = io
        self._conn = conn
        self.offsets = offsets
        self.views = views
        self.canonical = canonical
        self.writes = writes  # record writes by other than live batches, counted so far
        self._known = known

    def read_known(self) -> None:
        """Read the records `batch` was told were known (locked already) into `views` and
        `canonical`, after all."""
        views, canonical = self._io.records(sorted(set(self._known)))
        self.views.update(views)
        self.canonical.update(canonical)
        self._known = ()

    def attributions(
        self, keys: Sequence[RecordKey]
    ) -> dict[RecordKey, tuple[dict[str, int], dict[str, dict[str, Any]]]]:
        """The stored records' contributing sources (source -> version) and provenance
        (field -> source and version), read in this transaction."""
        found: dict[RecordKey, tuple[dict[str, int], dict[str, dict[str, Any]]]] = {}
        for chunk in _chunks(list(keys)):
            pair = tuple_(records.c.entity, records.c.key)
            query = select(
                records.c.entity, records.c.key, records.c.sources, records.c.provenance
            ).where(pair.in_(chunk))
            for row in self._conn.execute(query):
                provenance = expand_provenance(row.provenance or {}, row.sources)
                found[(row.entity, row.key)] = (row.sources, provenance)
        return found

    @property
    def overlaps(self) -> bool:
        """Whether `send` returns while the database still works (PostgreSQL): a caller
        can then write a batch in parts and prepare the next part meanwhile."""
        return self._io.overlaps

    def write(self, changes: BatchChanges, now: datetime) -> list[tuple[str, str]]:
        """Write a batch's changes (or its last part), offsets last, and wait; return
        (entity, field) of the new conflicts since the last wait."""
        return self._io.write(*self._before(changes, now), now)

    def send(self, changes: BatchChanges, now: datetime) -> None:
        """Send a part of a batch's changes (not its last) without waiting where the
        backend overlaps (`overlaps`). Later parts may write the same records again: each
        statement applies after the ones before."""
        self._io.send(*self._before(changes, now), now)

    def settle(self) -> list[tuple[str, str]]:
        """Wait for everything sent; return (entity, field) of the new conflicts since the
        last wait. A failure of any statement sent is raised here at the latest."""
        return self._io.settle()

    def _before(self, changes: BatchChanges, now: datetime) -> tuple[Any, ...]:
        """Checks and the writes outside the backend's statements; `write_all`'s rows."""
        if changes.offsets:
            self.check_contiguous(changes.offsets)
        if changes.purged_views or changes.purge is not None:
            # Statements of our own, outside what was sent: let it settle first (keeping
            # what it found for the next wait).
            self._io.new_conflicts = self._io.settle()
        if changes.purged_views:
            purged = {(e, k) for e, k, _ in changes.purged_views}
            emptied = [k for k in purged if k in changes.records and changes.records[k] is None]
            # Of these, the records deleted before this purge (every view a tombstone):
            # their values were last held at their newest tombstone, read before it goes.
            deleted = self._io.only_tombstones(emptied) if emptied else {}
            self._io.delete_views(changes.purged_views)
            if emptied:
                # Left with tombstones only: due for the retention's next check, from the
                # newest tombstone's own time, not from this purge's.
                self._io.note_deletions(emptied, DUE_AT_ONCE, due=True)
                # Left with no view at all: their history's values and anomalies go a
                # deleted record's retention after the time its values were last held:
                # its last delete, or this purge for one that was live (an earlier note
                # may be of a delete the record came back from: never counted from).
                self._io.note_removals({key: deleted.get(key, now) for key in emptied})
        if changes.purge is not None:
            _upsert(self._conn, source_purges, [changes.purge.row()], ["id"],
                    updated=SOURCE_PURGE_PROGRESS)  # fmt: skip
        return (
            [(row.entity, row.key, row.view) for row in changes.views],
            changes.records,
            changes.history,  # the entries as they are: the store only reads them
            changes.anomalies,
            changes.conflicts,
            changes.conflicts_absent,
            changes.document_owners,
            changes.offsets,
            changes.freshness,
        )

    def check_contiguous(self, ranges: dict[TopicPartition, OffsetRange]) -> None:
        """Each partition's range must start at its stored next offset (a partition the
        store has never seen may start anywhere: the log may begin after 0)."""
        for (topic, partition), (first, _, _) in ranges.items():
            stored = self.offsets.get((topic, partition))
            if stored is not None and first != stored:
                raise OffsetGap(
                    f"{topic}[{partition}]: batch starts at offset {first}, the store's next "
                    f"offset is {stored}"
                )


def _upsert(
    conn: Connection,
    table: Table,
    values: list[dict[str, Any]],
    keys: list[str],
    guard: str | None = None,
    updated: Sequence[str] | None = None,
) -> None:
    """Multi-row insert-or-update; with `guard`, a row only replaces a smaller guard value;
    with `updated`, a row found updates those columns only (else all but the keys).

    `values` must hold one row per key (the callers deduplicate per batch): one statement
    cannot update a row twice. The RETURNING clause makes SQLAlchemy send the rows as
    multi-row `INSERT ... VALUES (...), (...) ON CONFLICT` pages ("insertmanyvalues") from
    one cached compiled statement, instead of compiling a statement per batch.
    """
    if not values:
        return
    insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert_fn(table)
    names = [c.name for c in table.columns if c.name not in keys] if updated is None else updated
    update = {name: statement.excluded[name] for name in names}
    where = None if guard is None else and_(table.c[guard] < statement.excluded[guard])
    upsert = statement.on_conflict_do_update(index_elements=keys, set_=update, where=where)
    conn.execute(upsert.returning(table.c[keys[0]]), values)


def _insert_missing(
    conn: Connection, table: Table, values: list[dict[str, Any]], keys: list[str]
) -> None:
    """Multi-row insert of the rows whose keys the table does not hold yet."""
    if values:
        insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(insert_fn(table).on_conflict_do_nothing(index_elements=keys), values)


def _chunks(items: list[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def utcnow() -> datetime:
    return datetime.now(UTC)
