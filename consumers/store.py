"""The national store (SQLAlchemy 2 Core): source views, canonical records, applied offsets.

SQLite is the embedded default; PostgreSQL is the production target. Writes are set-based
(multi-row `INSERT ... ON CONFLICT DO UPDATE`), and every batch commits its data together
with the next Kafka offset of each partition it read: that is the exactly-once effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    and_,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.elements import ColumnElement

from consumers.merge import CanonicalRecord, SourceView

CHUNK = 500


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes stored as naive UTC on every backend, read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _json() -> Any:
    return JSON().with_variant(postgresql.JSONB(), "postgresql")


metadata = MetaData()

source_views = Table(
    "source_views",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("data", _json()),
    Column("applied_at", UTCDateTime, nullable=False),
)

records = Table(
    "records",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("data", _json(), nullable=False),
    Column("sources", _json(), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # field -> {"source", "version"}; NULL only for records written before migration 0002
    Column("provenance", _json()),
)

applied_offsets = Table(
    "applied_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# One row per partition per committed batch: [first_offset, next_offset) applied at
# committed_at. Contiguous, non-overlapping ranges prove nothing was lost or applied twice.
apply_journal = Table(
    "apply_journal",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("first_offset", BigInteger, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("events", Integer, nullable=False),
    Column("committed_at", UTCDateTime, nullable=False),
)

# Every change to a canonical record: which event (or remerge) changed which fields.
record_history = Table(
    "record_history",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("entity", String(16), nullable=False),
    Column("key", String(64), nullable=False),
    Column("event_id", String(36)),
    Column("source", String(64), nullable=False),
    Column("version", BigInteger),
    Column("changes", _json(), nullable=False),  # field -> [old, new]
    Column("applied_at", UTCDateTime, nullable=False),
    Index("ix_record_history_record", "entity", "key", "id"),
    Index("ix_record_history_applied_at", "applied_at"),
)

# Fields on which the contributing sources currently disagree (resolved rows are deleted);
# `sources` holds the groups of sources that agree with each other.
field_conflicts = Table(
    "field_conflicts",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("field", String(64), primary_key=True),
    Column("sources", _json(), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
)

# Dossier status changes that the national lifecycle does not foresee (applied anyway).
dossier_anomalies = Table(
    "dossier_anomalies",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("key", String(64), nullable=False, index=True),
    Column("source", String(64), nullable=False),
    Column("from_status", Integer, nullable=False),
    Column("to_status", Integer, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
)

# The owner of every document, and whether the store is still waiting for that owner:
# a document whose owner is not in the store is kept and flagged, never rejected.
document_owners = Table(
    "document_owners",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("owner_entity", String(16), nullable=False),
    Column("owner_key", String(64), nullable=False),
    Column("waiting", Boolean, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_document_owners_owner", "owner_entity", "owner_key"),
)

# Dead letters re-published to their original topic: each is re-driven once.
dead_letter_redrives = Table(
    "dead_letter_redrives",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, primary_key=True),
    Column("reason_code", String(64), nullable=False),
    Column("target_topic", String(255), nullable=False),
    Column("redriven_at", UTCDateTime, nullable=False),
)

RecordKey = tuple[str, str]  # (entity, key)
TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class ViewRow:
    entity: str
    key: str
    view: SourceView


def create_store_engine(url: str) -> Engine:
    """An engine for the store; SQLite gets WAL and writer transactions that lock at BEGIN."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            # Writers take the lock at BEGIN, so a read-then-write batch cannot deadlock.
            writer = connection.get_execution_options().get("writer", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_store_engine(url)

    def create_schema(self) -> None:
        """Create a new store at the newest schema revision (an old one must be upgraded)."""
        from consumers.schema import ensure_current

        ensure_current(self.engine)

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
    def offsets(
        self, conn: Connection, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        wanted = list(set(partitions))
        result: dict[TopicPartition, int] = {}
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
        with self.engine.connect() as conn:
            rows = conn.execute(select(applied_offsets))
            return {(row.topic, row.partition): row.next_offset for row in rows}

    def views(
        self, conn: Connection, keys: Iterable[RecordKey]
    ) -> dict[RecordKey, dict[str, SourceView]]:
        """Every source's current view (tombstones included) of the given records.

        On PostgreSQL the records are locked for the transaction first (advisory locks, in
        one order): a replay or a zombie worker beside the live worker cannot merge from a
        stale snapshot. SQLite writers are serialised by BEGIN IMMEDIATE already.
        """
        wanted = sorted(set(keys))
        if conn.dialect.name == "postgresql":
            _lock_records(conn, wanted)
        result: dict[RecordKey, dict[str, SourceView]] = {}
        for chunk in _chunks(wanted):
            query = select(source_views).where(
                tuple_(source_views.c.entity, source_views.c.key).in_(chunk)
            )
            for row in conn.execute(query):
                view = SourceView(
                    row.source, row.version, row.event_id, row.occurred_at, row.deleted, row.data
                )
                result.setdefault((row.entity, row.key), {})[row.source] = view
        return result

    def iter_records(
        self, entity: str | None = None
    ) -> Iterator[tuple[str, str, dict[str, Any], dict[str, int], dict[str, Any] | None]]:
        """Canonical records (entity, key, data, sources, provenance), sorted by entity, key."""
        key: ColumnElement[Any] = records.c.key
        if self.engine.dialect.name == "postgresql":
            key = key.collate("C")  # byte order, as on SQLite: one dump on every backend
        query = select(records).order_by(records.c.entity, key)
        if entity is not None:
            query = query.where(records.c.entity == entity)
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(query):
                yield row.entity, row.key, row.data, row.sources, row.provenance

    def record_keys(self, entity: str | None = None) -> list[RecordKey]:
        """Every (entity, key) some source has a view of, sorted."""
        query = select(source_views.c.entity, source_views.c.key).distinct()
        if entity is not None:
            query = query.where(source_views.c.entity == entity)
        with self.engine.connect() as conn:
            return sorted((e, k) for e, k in conn.execute(query))

    def keys_without_provenance(self) -> list[RecordKey]:
        """Records written before the store kept provenance (migrated spine stores)."""
        query = select(records.c.entity, records.c.key).where(records.c.provenance.is_(None))
        with self.engine.connect() as conn:
            return sorted((e, k) for e, k in conn.execute(query))

    def count_records(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            query = select(records.c.entity, func.count()).group_by(records.c.entity)
            return {entity: count for entity, count in conn.execute(query)}

    # -- writes -------------------------------------------------------------------------
    def write_views(self, conn: Connection, rows: Sequence[ViewRow], applied_at: datetime) -> None:
        values = [
            {
                "entity": row.entity,
                "key": row.key,
                "source": row.view.source,
                "version": row.view.version,
                "event_id": row.view.event_id,
                "occurred_at": row.view.occurred_at,
                "deleted": row.view.deleted,
                "data": None if row.view.data is None else dict(row.view.data),
                "applied_at": applied_at,
            }
            for row in rows
        ]
        _upsert(conn, source_views, values, ["entity", "key", "source"], guard="version")

    def write_records(
        self,
        conn: Connection,
        merged: dict[RecordKey, CanonicalRecord | None],
        updated_at: datetime,
    ) -> None:
        present = [
            {
                "entity": e,
                "key": k,
                "data": r.data,
                "sources": r.sources,
                "provenance": r.provenance,
                "updated_at": updated_at,
            }
            for (e, k), r in merged.items()
            if r is not None
        ]
        _upsert(conn, records, present, ["entity", "key"])
        gone = [key for key, record in merged.items() if record is None]
        for chunk in _chunks(gone):
            conn.execute(delete(records).where(tuple_(records.c.entity, records.c.key).in_(chunk)))

    def canonical(
        self, conn: Connection, keys: Iterable[RecordKey]
    ) -> dict[RecordKey, dict[str, Any]]:
        """Current canonical data of the given records (absent: no record)."""
        result: dict[RecordKey, dict[str, Any]] = {}
        for chunk in _chunks(list(set(keys))):
            query = select(records.c.entity, records.c.key, records.c.data).where(
                tuple_(records.c.entity, records.c.key).in_(chunk)
            )
            for entity, key, data in conn.execute(query):
                result[(entity, key)] = data
        return result

    def append_history(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            conn.execute(insert(record_history), rows)

    def add_anomalies(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            conn.execute(insert(dossier_anomalies), rows)

    def write_conflicts(
        self,
        conn: Connection,
        current: dict[RecordKey, dict[str, list[list[str]]]],
        detected_at: datetime,
    ) -> list[tuple[str, str]]:
        """Replace the conflicts of these records; return (entity, field) of new ones."""
        keys = list(current)
        before: set[tuple[str, str, str]] = set()
        for chunk in _chunks(keys):
            where = tuple_(field_conflicts.c.entity, field_conflicts.c.key).in_(chunk)
            query = select(field_conflicts.c.entity, field_conflicts.c.key, field_conflicts.c.field)
            before |= {(e, k, f) for e, k, f in conn.execute(query.where(where))}
            conn.execute(delete(field_conflicts).where(where))
        found = [
            (e, k, f, sources)
            for (e, k), fields in current.items()
            for f, sources in fields.items()
        ]
        if found:
            conn.execute(
                insert(field_conflicts),
                [
                    {
                        "entity": e,
                        "key": k,
                        "field": f,
                        "sources": sources,
                        "detected_at": detected_at,
                    }
                    for e, k, f, sources in found
                ],
            )
        return [(e, f) for e, k, f, _ in found if (e, k, f) not in before]

    def write_document_owners(
        self,
        conn: Connection,
        owners: dict[RecordKey, RecordKey | None],
        present: set[RecordKey],
        updated_at: datetime,
    ) -> None:
        """Record each document's owner (None: the document is gone) and whether it waits."""
        for chunk in _chunks(list(owners)):
            where = tuple_(document_owners.c.entity, document_owners.c.key).in_(chunk)
            conn.execute(delete(document_owners).where(where))
        rows = [
            {
                "entity": e,
                "key": k,
                "owner_entity": owner[0],
                "owner_key": owner[1],
                "waiting": owner not in present,
                "updated_at": updated_at,
            }
            for (e, k), owner in owners.items()
            if owner is not None
        ]
        if rows:
            conn.execute(insert(document_owners), rows)

    def set_owner_presence(
        self, conn: Connection, owners: dict[RecordKey, bool], updated_at: datetime
    ) -> None:
        """An owner record appeared (True) or went away (False): update its documents."""
        for present in (True, False):
            keys = [owner for owner, is_present in owners.items() if is_present is present]
            for chunk in _chunks(keys):
                where = tuple_(document_owners.c.owner_entity, document_owners.c.owner_key).in_(
                    chunk
                )
                conn.execute(
                    update(document_owners)
                    .where(where, document_owners.c.waiting.is_(present))
                    .values(waiting=not present, updated_at=updated_at)
                )

    def existing(self, conn: Connection, keys: Iterable[RecordKey]) -> set[RecordKey]:
        """Which of these records exist in the store."""
        found: set[RecordKey] = set()
        for chunk in _chunks(list(set(keys))):
            query = select(records.c.entity, records.c.key).where(
                tuple_(records.c.entity, records.c.key).in_(chunk)
            )
            found |= {(e, k) for e, k in conn.execute(query)}
        return found

    def prune_history(self, older_than: datetime) -> int:
        """Drop history entries applied before `older_than`; return how many."""
        with self.write_transaction() as conn:
            result = conn.execute(
                delete(record_history).where(record_history.c.applied_at < older_than)
            )
            return int(result.rowcount or 0)

    def write_offsets(
        self,
        conn: Connection,
        ranges: dict[TopicPartition, tuple[int, int, int]],
        updated_at: datetime,
    ) -> None:
        """Advance each partition to its range's end and journal the range applied."""
        journal = [
            {
                "topic": t,
                "partition": p,
                "first_offset": first,
                "next_offset": end,
                "events": count,
                "committed_at": updated_at,
            }
            for (t, p), (first, end, count) in ranges.items()
        ]
        if journal:
            conn.execute(insert(apply_journal), journal)
        offsets = {tp: end for tp, (_, end, _) in ranges.items()}
        values = [
            {"topic": t, "partition": p, "next_offset": o, "updated_at": updated_at}
            for (t, p), o in offsets.items()
        ]
        _upsert(conn, applied_offsets, values, ["topic", "partition"], guard="next_offset")


def _upsert(
    conn: Connection,
    table: Table,
    values: list[dict[str, Any]],
    keys: list[str],
    guard: str | None = None,
) -> None:
    """Multi-row insert-or-update; with `guard`, a row only replaces a smaller guard value.

    `values` must hold one row per key (the callers deduplicate per batch): one statement
    cannot update a row twice. The RETURNING clause makes SQLAlchemy send the rows as
    multi-row `INSERT ... VALUES (...), (...) ON CONFLICT` pages ("insertmanyvalues") from
    one cached compiled statement, instead of compiling a statement per batch.
    """
    if not values:
        return
    insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert_fn(table)
    update = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    where = None if guard is None else and_(table.c[guard] < statement.excluded[guard])
    upsert = statement.on_conflict_do_update(index_elements=keys, set_=update, where=where)
    conn.execute(upsert.returning(table.c[keys[0]]), values)


def _lock_records(conn: Connection, keys: list[RecordKey]) -> None:
    if not keys:
        return
    names = [f"{entity}:{key}" for entity, key in keys]
    conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
            " FROM unnest(CAST(:names AS text[])) AS k ORDER BY h) AS ordered"
        ),
        {"names": names},
    )


def _chunks(items: list[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def utcnow() -> datetime:
    return datetime.now(UTC)
