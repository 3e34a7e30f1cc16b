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

`Store` is this unit of work, the schema's commands and the dead letters' redrive claims,
with the store's other concerns from their own modules: the offsets and operators' changes
of them (`store.offsets`), reads outside a batch (`store.reads`), the catch-up of the
batches' side tables (`store.catch_up`), the access log and the retention
(`store.retention`); what they share is `store.base`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from sqlalchemy import Connection, and_, or_, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from schemas.redaction import redacted_url as redacted_url  # the one redaction, re-exported
from schemas.values import value_class
from schemas.views import CanonicalRecord, RecordKey, SourceView, expand_provenance
from store.base import CHUNK as CHUNK
from store.base import OffsetRange as OffsetRange
from store.base import TopicPartition as TopicPartition
from store.base import chunks, upsert
from store.base import utcnow as utcnow
from store.batch import BatchIO, WriteCount, batch_io
from store.batch import Conflicts as Conflicts
from store.batch import SourcePartition as SourcePartition
from store.catch_up import StoreCatchUp
from store.engine import make_parent_dir
from store.failures import OffsetGap, translated
from store.offsets import StoreOffsets
from store.reads import Freshness as Freshness
from store.reads import StoreReads
from store.retention import StoreRetention
from store.tables import (
    REDRIVE_CLAIM,
    SOURCE_PURGE_PROGRESS,
    applied_offsets,
    dead_letter_redrives,
    field_conflicts,
    record_history,
    records,
    source_purges,
    source_views,
)
from store.times import aware_utc

if TYPE_CHECKING:
    from store.purge import SourcePurge
    from store.roles import Granted

# A `record_deletions` time that is already past: checked at the retention's next run.
DUE_AT_ONCE = datetime(1970, 1, 1, tzinfo=UTC)


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


class Store(StoreOffsets, StoreReads, StoreCatchUp, StoreRetention):
    """The national store: the parts (`store.base`) and the batch's unit of work."""

    def create_schema(self) -> None:
        """Create a new store at the newest schema revision (an old one must be upgraded)."""
        from store.schema import ensure_current

        make_parent_dir(self.url)
        with translated():
            ensure_current(self.engine)

    def require_schema(self) -> None:
        """Refuse a store without the newest schema, creating nothing (reading commands):
        a SQLite file that does not exist is not opened (opening would create it)."""

        from store.schema import no_schema, require_current

        if self._no_file():
            raise no_schema()
        with translated():
            require_current(self.engine)

    def _no_file(self) -> bool:
        """A SQLite store in a file that does not exist (opening it would make it)."""
        database = make_url(self.url).database if self.url.startswith("sqlite") else None
        in_a_file = database and database != ":memory:" and not database.startswith("file:")
        return bool(in_a_file) and not Path(str(database)).expanduser().exists()

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the store's schema to the newest revision; return (from, to)."""
        from store.schema import upgrade

        make_parent_dir(self.url)
        with translated():
            return upgrade(self.engine)

    def grant(self, role: str, access_log_floor_days: int) -> Granted:
        """Give a second PostgreSQL role what the worker and the commands need, and no
        more (`store grant`; store/roles.py); run as the owner."""
        from store.roles import grant

        with translated():
            return grant(self.engine, role, access_log_floor_days)

    def drop_schema(self) -> None:
        """Drop the project's tables (and Alembic's version table), nothing else (a SQLite
        file that does not exist holds none: nothing is made)."""
        from store.schema import drop_project_tables

        if self._no_file():
            return
        with translated():
            drop_project_tables(self.engine)

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
        transactions than live batches, with the time of its last change, which the caller
        compares before trusting what it holds, and `tx.read_known()` reads them after all.
        A batch without offsets (`use_offsets` False: replay, remerge, purge) is such a
        transaction: it counts itself in that count (`store_meta` `record_writes`) when it
        commits."""
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

    def holds_data(self) -> bool:
        """Whether any of the project's tables holds a row (False for a new database; a
        SQLite file that does not exist is not made, nor its directory)."""
        from sqlalchemy import inspect

        if self._no_file():
            return False
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

    def server_now(self) -> datetime:
        """The database server's clock (PostgreSQL's `now()`); on SQLite, this host's."""
        if self.backend != "postgresql":
            return utcnow()
        with translated(), self.engine.connect() as conn:
            moment = conn.execute(text("SELECT now()")).scalar_one()
        return aware_utc(moment).astimezone(UTC)

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


class BatchTransaction:
    """A batch's open transaction: what the store holds for it, and its one write."""

    def __init__(
        self,
        io: BatchIO,
        offsets: dict[TopicPartition, int],
        views: dict[RecordKey, dict[str, SourceView]],
        canonical: dict[RecordKey, dict[str, Any]],
        conn: Connection,
        writes: WriteCount = (0, ""),
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
        for chunk in chunks(list(keys)):
            pair = tuple_(records.c.entity, records.c.key)
            query = select(
                records.c.entity, records.c.key, records.c.sources, records.c.provenance
            ).where(pair.in_(chunk))
            for row in self._conn.execute(query):
                provenance = expand_provenance(row.provenance or {}, row.sources)
                found[(row.entity, row.key)] = (row.sources, provenance)
        return found

    def stored_conflicts(self, keys: Sequence[RecordKey]) -> Conflicts:
        """The stored records' field conflicts (field -> groups of sources), read in this
        transaction: what a remerge compares its own with."""
        found: Conflicts = {}
        for chunk in chunks(list(keys)):
            pair = tuple_(field_conflicts.c.entity, field_conflicts.c.key)
            query = select(
                field_conflicts.c.entity,
                field_conflicts.c.key,
                field_conflicts.c.field,
                field_conflicts.c.sources,
            ).where(pair.in_(chunk))
            for row in self._conn.execute(query):
                found.setdefault((row.entity, row.key), {})[row.field] = row.sources
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
            upsert(self._conn, source_purges, [changes.purge.row()], ["id"],
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
