"""The reconciler's hot path: one batch read and one batch write, set-based, per backend.

Every statement has a fixed text whatever the batch size, so the driver parses it once and
the database plans it once:

- PostgreSQL: the rows of a table travel as a handful of arrays (`unnest(%b::text[], …)`),
  one statement per table: `INSERT … SELECT FROM unnest … ON CONFLICT … DO UPDATE`, reads
  as index lookups per key of `unnest` (`VIEWS_SQL`), deletes as `DELETE … USING unnest …
  RETURNING`. The arrays go in PostgreSQL's binary form, built by `store.pg_arrays` (JSON
  documents as orjson's bytes); no multi-row `VALUES` text is built or parsed. In pipeline
  mode: a batch's reads are answered in one round trip, and its writes are sent without
  waiting (`send`, part after part while the reconciler merges the next) and waited for
  once (`settle`), before the commit. History, append-only, is the exception: its rows
  are kept and go by binary `COPY` when the batch settles (`COPY` cannot run in a
  pipeline; PostgreSQL inserts copied rows in bulk).
- SQLite: `executemany` of one prepared statement per table (the C loop of `sqlite3`); the
  keys of a read go into a temporary table joined on the primary key.

Both run on the DBAPI connection of the SQLAlchemy transaction the store opened, so the
batch still commits (or rolls back) as one unit with its offsets. Values are written in
the forms SQLAlchemy's column types read back (`store.tables`): naive UTC timestamps, JSON
text (`json` on PostgreSQL), so every other reader of the store is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from schemas.errors import ConfigurationError
from schemas.json_text import loads_exact
from schemas.views import CanonicalRecord, RecordKey, SourceView
from store.pg_arrays import bigint_array, bool_array, int_array, text_array, utf8_array
from store.times import aware_utc, naive_utc, utc_text

TopicPartition = tuple[str, int]
OffsetRange = tuple[int, int, int]  # first offset, next offset, messages
SourcePartition = tuple[str, str, int]  # source, topic, partition
Conflicts = dict[RecordKey, dict[str, list[list[str]]]]
# A batch's reads: stored offsets, every source's view and the canonical data per record,
# and the store's count of record writes by anything but a live batch (`WRITES`).
BatchReads = tuple[
    dict[TopicPartition, int],
    dict[RecordKey, dict[str, SourceView]],
    dict[RecordKey, dict[str, Any]],
    int,
]
# The `store_meta` row counting the transactions that wrote records without owning their
# partitions' offsets (replay, remerge, source purge, the retention purge, offset resets and
# skips): a worker that keeps records it applied in memory (`consumers.cache`) compares it.
WRITES = "record_writes"


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads_or_none(text: str | None) -> Any:
    try:
        return None if text is None else orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # compared as it is


def _json_utf8(value: Any) -> bytes | None:
    """`_json` as UTF-8, for PostgreSQL's arrays (`store.pg_arrays.utf8_array`)."""
    return None if value is None else orjson.dumps(value)


def _view_json_utf8(data: Any) -> bytes | None:
    """A view's data as JSON, UTF-8 (orjson takes a dict, not any mapping)."""
    if data is None:
        return None
    return orjson.dumps(data if type(data) is dict else dict(data))


def _view_json(data: Any) -> str | None:
    """A view's data as JSON text."""
    encoded = _view_json_utf8(data)
    return None if encoded is None else encoded.decode()


def _history_row(
    row: Mapping[str, Any], applied_at: Any, json: Callable[[Any], Any] = _json
) -> tuple[Any, ...]:
    """A history entry's values in the order of both backends' statements (entity, key,
    event id, source, version, changes as JSON by `json`, applied at in the backend's
    form)."""
    return (
        row["entity"],
        row["key"],
        row["event_id"],
        row["source"],
        row["version"],
        json(row["changes"]),
        applied_at,
    )


def _loads(value: Any) -> Any:
    if value is None or not isinstance(value, str | bytes):
        return value  # psycopg hands JSON over already decoded
    return loads_exact(value)


class BatchIO:
    """One backend's statements for a batch, on a DBAPI connection inside a transaction."""

    # Whether statements sent run in the database while the caller goes on (the reconciler
    # then writes a batch in parts, merging the next part meanwhile).
    overlaps = False

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi
        self.new_conflicts: list[tuple[str, str]] = []

    def send(self, *args: Any, **kwargs: Any) -> None:
        """Write (`write_all`'s arguments); a backend that overlaps may return before the
        database is done: `settle` waits for it."""
        self.new_conflicts.extend(self.write_all(*args, **kwargs))

    def write(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        """Write and wait; return (entity, field) of the new conflicts since the last
        `settle`."""
        self.send(*args, **kwargs)
        return self.settle()

    def settle(self) -> list[tuple[str, str]]:
        """Wait for everything sent; return (entity, field) of the new conflicts."""
        new, self.new_conflicts = self.new_conflicts, []
        return new

    def abandon(self) -> None:
        """The transaction failed: leave any pending state (it is rolled back)."""
        self.new_conflicts = []

    # -- what each backend provides ----------------------------------------------------------
    def read(
        self,
        keys: Sequence[RecordKey],
        partitions: Sequence[TopicPartition],
        use_offsets: bool,
        known: Collection[RecordKey] = (),
    ) -> BatchReads:
        """A batch's reads: its records locked against other writers (replays beside the
        live worker), then the partitions' stored offsets (locked), the count of other
        writes, every source's view and the canonical data of the records but the `known`
        ones (locked all the same)."""
        raise NotImplementedError

    def records(
        self, keys: Sequence[RecordKey]
    ) -> tuple[dict[RecordKey, dict[str, SourceView]], dict[RecordKey, dict[str, Any]]]:
        """Every source's view and the canonical data of these (locked) records."""
        raise NotImplementedError

    def count_write(self, now: datetime) -> None:
        """Count this transaction as a write of records by other than a live batch."""
        raise NotImplementedError

    def lock(self, keys: Sequence[RecordKey], partitions: Sequence[TopicPartition] = ()) -> None:
        """Serialise writers of the same records, and of the same partitions' offsets (a
        batch's `read` does it too)."""

    def offsets(
        self, partitions: Sequence[TopicPartition], lock: bool = True
    ) -> dict[TopicPartition, int]:
        """The stored next offsets; `lock` holds them until the transaction ends."""
        raise NotImplementedError

    def write_all(
        self,
        views: Sequence[tuple[str, str, SourceView]],
        records: dict[RecordKey, CanonicalRecord | None],
        history: Sequence[Mapping[str, Any]],
        anomalies: Sequence[Mapping[str, Any]],
        conflicts: Conflicts,
        conflicts_absent: Collection[RecordKey],
        document_owners: dict[RecordKey, RecordKey | None],
        offsets: dict[TopicPartition, OffsetRange],
        freshness: dict[SourcePartition, datetime],
        now: datetime,
    ) -> list[tuple[str, str]]:
        """Write everything; offsets last. Return (entity, field) of new conflicts."""
        self.write_views(views, now)
        self.write_records(records, now)
        self.append_history(history)
        self.add_anomalies(anomalies)
        new = self.replace_conflicts(conflicts, now, conflicts_absent)
        if document_owners:
            self.document_owners(document_owners, now)
        if freshness:
            self.write_freshness(freshness, now)
        if offsets:
            self.write_offsets(offsets, now)
        return new

    def write_views(self, rows: Sequence[tuple[str, str, SourceView]], now: datetime) -> None:
        raise NotImplementedError

    def delete_views(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Remove sources' views (tombstones too) of records: (entity, key, source)."""
        raise NotImplementedError

    def write_records(
        self, records: dict[RecordKey, CanonicalRecord | None], now: datetime
    ) -> None:
        raise NotImplementedError

    def append_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def add_anomalies(self, rows: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def replace_conflicts(
        self, current: Conflicts, now: datetime, absent: Collection[RecordKey] = ()
    ) -> list[tuple[str, str]]:
        """Each record's conflicts become `current`'s. The records in `absent` are known
        to have none stored: nothing to delete, every conflict found is new. Return
        (entity, field) of the new conflicts, or leave them for `settle`."""
        raise NotImplementedError

    def document_owners(self, owners: dict[RecordKey, RecordKey | None], now: datetime) -> None:
        raise NotImplementedError

    def note_deletions(self, keys: Sequence[RecordKey], at: datetime, due: bool = False) -> None:
        """Note records left with no canonical record, for the retention's tombstone purge
        (those with views left: one with none has nothing to purge): a row new to
        `record_deletions` at `at`; an existing row keeps its (earlier) time, unless `due`,
        which sets it to `at` (a time already past: checked at its next run)."""
        raise NotImplementedError

    def note_removals(self, times: Mapping[RecordKey, datetime]) -> None:
        """Note records left with no view at all (a source purge took the last), each at
        its time, whatever a row of them said: its time may be of a delete the record
        came back from, or `DUE_AT_ONCE` from a purge that left tombstones."""
        raise NotImplementedError

    def with_views(self, keys: Sequence[RecordKey]) -> set[RecordKey]:
        """Of these records, those with a view (a tombstone or not)."""
        raise NotImplementedError

    # -- the retention's tombstone purge, a chunk of noted records at a time --------------
    def only_tombstones(self, keys: Sequence[RecordKey]) -> dict[RecordKey, datetime]:
        """Of these records, those whose every view is a tombstone: when the newest was
        applied."""
        raise NotImplementedError

    def forget_deletions(self, keys: Sequence[RecordKey]) -> None:
        """Remove these records' notes."""
        raise NotImplementedError

    def move_deletions(self, due: dict[RecordKey, datetime]) -> None:
        """Set these records' notes to these times."""
        raise NotImplementedError

    def write_freshness(self, newest: dict[SourcePartition, datetime], now: datetime) -> None:
        """Advance each (source, topic, partition)'s newest applied `occurred_at` (never
        back) and set when it was applied to `now`."""
        raise NotImplementedError

    def write_offsets(self, ranges: dict[TopicPartition, OffsetRange], now: datetime) -> None:
        raise NotImplementedError


def _found_conflicts(current: Conflicts) -> list[tuple[str, str, str, list[list[str]]]]:
    return [
        (e, k, f, sources) for (e, k), fields in current.items() for f, sources in fields.items()
    ]


def _split_conflicts(
    current: Conflicts, absent: Collection[RecordKey]
) -> tuple[list[RecordKey], list[tuple[str, str, str, Any]], list[tuple[str, str, str, Any]]]:
    """The records whose stored conflicts go first, the conflicts found on them, and
    those found on the records known to have none (`absent`)."""
    if not absent:
        return list(current), _found_conflicts(current), []
    replaced = [key for key in current if key not in absent]
    found = _found_conflicts({key: current[key] for key in replaced})
    fresh = _found_conflicts({key: current[key] for key in current if key in absent})
    return replaced, found, fresh


def _new_conflicts(
    found: Sequence[tuple[str, str, str, Any]], before: Iterable[tuple[str, str, str]]
) -> list[tuple[str, str]]:
    """(entity, field) of the conflicts found that were not there before."""
    known = set(before)
    return [(e, f) for e, k, f, _ in found if (e, k, f) not in known]


COPY_HISTORY_SQL = (
    "COPY record_history (entity, key, event_id, source, version, changes, applied_at)"
    " FROM STDIN (FORMAT BINARY)"
)
# `changes` goes as orjson's UTF-8 bytes, dumped as they are (`bytea`'s binary dumper): a
# binary `COPY` sends each field's bytes and the server reads them as the column's type, and
# json's binary form is its text. Neither decoded to `str` here nor encoded back by psycopg.
HISTORY_TYPES = ["text", "text", "text", "text", "int8", "bytea", "timestamp"]
PARTITION_LOCK = "#partition:"  # no entity's name starts so: no record's lock is a partition's
LOCK_SQL = (
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0)"
    " AS h FROM unnest(%b::text[]) AS k ORDER BY h) AS ordered"
)
OFFSETS_SQL = (
    "SELECT a.topic, a.partition, a.next_offset FROM applied_offsets a"
    " JOIN unnest(%b::text[], %b::int[]) AS w(topic, partition)"
    " ON a.topic = w.topic AND a.partition = w.partition"
)
# The batch's records looked up key by key in the primary key's index, whatever the
# planner estimates: a lateral subquery that `OFFSET 0` keeps from being flattened into a
# join. As a join, PostgreSQL hashed the whole table for a batch's keys while it held
# tens of thousands of rows (2,000 keys among 40,000 views: 49-67 ms against 25-38 for
# the index lookups; docs/performance-log.md, nineteenth round) and chose the index only once
# the table was much larger.
VIEWS_SQL = (
    "SELECT v.entity, v.key, v.source, v.version, v.event_id, v.occurred_at, v.deleted,"
    " v.data FROM unnest(%b::text[], %b::text[]) AS w(entity, key) CROSS JOIN LATERAL"
    " (SELECT * FROM source_views s WHERE s.entity = w.entity AND s.key = w.key OFFSET 0)"
    " AS v"
)
CANONICAL_SQL = (
    "SELECT r.entity, r.key, r.data FROM unnest(%b::text[], %b::text[]) AS w(entity, key)"
    " CROSS JOIN LATERAL"
    " (SELECT * FROM records s WHERE s.entity = w.entity AND s.key = w.key OFFSET 0) AS r"
)


def _key_arrays(keys: Sequence[RecordKey]) -> list[Any]:
    return [text_array([e for e, _ in keys]), text_array([k for _, k in keys])]


def _partition_arrays(partitions: Sequence[TopicPartition]) -> list[Any]:
    return [text_array([t for t, _ in partitions]), int_array([p for _, p in partitions])]


def _offsets(rows: Iterable[Any]) -> dict[TopicPartition, int]:
    return {(t, p): o for t, p, o in rows}


def _views(rows: Iterable[Any]) -> dict[RecordKey, dict[str, SourceView]]:
    result: dict[RecordKey, dict[str, SourceView]] = {}
    for entity, key, source, version, event_id, occurred, deleted, data in rows:
        view = SourceView(
            source, version, event_id, aware_utc(occurred), bool(deleted), _loads(data)
        )
        result.setdefault((entity, key), {})[source] = view
    return result


def _canonical(rows: Iterable[Any]) -> dict[RecordKey, dict[str, Any]]:
    return {(e, k): _loads(d) for e, k, d in rows}


def _writes(rows: Iterable[Any]) -> int:
    return next((int(value) for (value,) in rows), 0)


WRITES_SQL = f"SELECT value FROM store_meta WHERE name = '{WRITES}'"


class PostgresBatchIO(BatchIO):
    """Arrays and `unnest`: one fixed statement per table and per read. A batch's reads go
    in one round trip and its writes in another (psycopg's pipeline mode)."""

    def _send(self, sql: str, params: Sequence[Any], planned: bool = False) -> Any:
        """Send a statement; its rows (if any) are read later with `_rows`. Binary
        parameters (%b): arrays travel without being quoted as text, which costs a regular
        expression per element in the driver.

        `planned`: planned for these parameters at every execution, never prepared. For the
        statements that look rows up by the batch's keys (reads, deletes `USING unnest`):
        psycopg prepares a statement after its fifth run, and PostgreSQL may then keep the
        generic plan it made while the table was small: a hash join over a sequential
        scan, whose cost grows with the table. A worker that started on an empty store kept
        it while the store grew (steady load, 80,000 views: 8.6 ms per read of a
        100-event batch, against 0.9 for the index lookups a fresh plan chooses;
        docs/performance-log.md, thirteenth round)."""
        cursor = self.dbapi.cursor()
        cursor.execute(sql, params, prepare=False if planned else None)
        return cursor

    @staticmethod
    def _rows(cursor: Any) -> list[Any]:
        with cursor:
            return list(cursor.fetchall())

    def _run(self, sql: str, params: Sequence[Any], planned: bool = False) -> list[Any]:
        cursor = self._send(sql, params, planned)
        if self.dbapi.pgconn.pipeline_status:  # pipeline mode: the rows are not here yet
            cursor.close()
            return []
        with cursor:
            return list(cursor.fetchall()) if cursor.description else []

    def read(
        self,
        keys: Sequence[RecordKey],
        partitions: Sequence[TopicPartition],
        use_offsets: bool,
        known: Collection[RecordKey] = (),
    ) -> BatchReads:
        """The lock and the reads sent together, answered in one round trip: the server
        runs them in order, so the reads see the records once they are locked."""
        with self.dbapi.pipeline():
            self.lock(keys, partitions if use_offsets else ())
            offsets = views = canonical = None
            if use_offsets and partitions:
                offsets = self._send(
                    OFFSETS_SQL + " FOR UPDATE OF a", _partition_arrays(partitions)
                )
            writes = self._send(WRITES_SQL, ())
            wanted = [key for key in keys if key not in known] if known else keys
            if wanted:
                views = self._send(VIEWS_SQL, _key_arrays(wanted), planned=True)
                canonical = self._send(CANONICAL_SQL, _key_arrays(wanted), planned=True)
        return (
            _offsets(self._rows(offsets)) if offsets is not None else {},
            _views(self._rows(views)) if views is not None else {},
            _canonical(self._rows(canonical)) if canonical is not None else {},
            _writes(self._rows(writes)),
        )

    def records(
        self, keys: Sequence[RecordKey]
    ) -> tuple[dict[RecordKey, dict[str, SourceView]], dict[RecordKey, dict[str, Any]]]:
        if not keys:
            return {}, {}
        with self.dbapi.pipeline():
            views = self._send(VIEWS_SQL, _key_arrays(keys), planned=True)
            canonical = self._send(CANONICAL_SQL, _key_arrays(keys), planned=True)
        return _views(self._rows(views)), _canonical(self._rows(canonical))

    def count_write(self, now: datetime) -> None:
        self._run(
            "INSERT INTO store_meta (name, value, updated_at) VALUES (%s, '1', %s)"
            " ON CONFLICT (name) DO UPDATE"
            " SET value = (store_meta.value::bigint + 1)::text, updated_at = excluded.updated_at",
            [WRITES, naive_utc(now)],
        )

    overlaps = True

    def __init__(self, dbapi: Any) -> None:
        super().__init__(dbapi)
        self._pipeline: contextlib.ExitStack | None = None
        self._pending: list[tuple[list[tuple[str, str, str, Any]], Any]] = []
        self._history: list[Mapping[str, Any]] = []  # copied when the batch settles

    def send(self, *args: Any, **kwargs: Any) -> None:
        """Every statement sent without waiting for the one before (pipeline mode): the
        server executes them while the caller builds the next ones, and the batch waits
        once, in `settle`, instead of once per statement. Errors surface there."""
        if self._pipeline is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.dbapi.pipeline())
            self._pipeline = stack
        self.new_conflicts.extend(self.write_all(*args, **kwargs))

    def settle(self) -> list[tuple[str, str]]:
        if self._pipeline is not None:
            stack, self._pipeline = self._pipeline, None
            stack.close()  # sync: waits for every statement; raises the first error
        self._copy_history()
        pending, self._pending = self._pending, []
        new, self.new_conflicts = self.new_conflicts, []
        for found, inserted in pending:
            added = {(e, k, f) for e, k, f, new_row in self._rows(inserted) if new_row}
            new.extend((e, f) for e, k, f, _ in found if (e, k, f) in added)
        return new

    def abandon(self) -> None:
        self._pending, self.new_conflicts, self._history = [], [], []
        if self._pipeline is not None:
            stack, self._pipeline = self._pipeline, None
            with contextlib.suppress(Exception):  # the error that got here is the one to see
                stack.close()

    def lock(self, keys: Sequence[RecordKey], partitions: Sequence[TopicPartition] = ()) -> None:
        """The records' locks and, for a batch that writes offsets, one per partition: a
        partition the store has no offset for yet has no row for `FOR UPDATE` to lock, so
        two workers (one a zombie after a rebalance) taking the same first batch without a
        record in common (dead letters only) would both apply it and journal overlapping
        ranges. Taken in one statement, in the hashes' order: no deadlock between batches."""
        names = [f"{entity}:{key}" for entity, key in keys]
        names += [f"{PARTITION_LOCK}{topic}:{partition}" for topic, partition in partitions]
        if names:
            self._run(LOCK_SQL, [text_array(names)])

    def offsets(
        self, partitions: Sequence[TopicPartition], lock: bool = True
    ) -> dict[TopicPartition, int]:
        if not partitions:
            return {}
        sql = OFFSETS_SQL + (" FOR UPDATE OF a" if lock else "")
        return _offsets(self._rows(self._send(sql, _partition_arrays(partitions))))

    def write_views(self, rows: Sequence[tuple[str, str, SourceView]], now: datetime) -> None:
        if not rows:
            return
        self._run(
            "INSERT INTO source_views (entity, key, source, version, event_id, occurred_at,"
            " deleted, data, applied_at)"
            " SELECT e, k, s, v, i, o, d, CAST(j AS json), %b FROM unnest(%b::text[],"
            " %b::text[], %b::text[], %b::bigint[], %b::text[], %b::timestamp[], %b::bool[],"
            " %b::text[]) AS u(e, k, s, v, i, o, d, j)"
            " ON CONFLICT (entity, key, source) DO UPDATE SET version = excluded.version,"
            " event_id = excluded.event_id, occurred_at = excluded.occurred_at,"
            " deleted = excluded.deleted, data = excluded.data, applied_at = excluded.applied_at"
            # the same version too: another change of it that orders after (merge.same_version)
            " WHERE source_views.version <= excluded.version",
            [
                naive_utc(now),
                text_array([e for e, _, _ in rows]),
                text_array([k for _, k, _ in rows]),
                text_array([v.source for _, _, v in rows]),
                bigint_array([v.version for _, _, v in rows]),
                text_array([v.event_id for _, _, v in rows]),
                [naive_utc(v.occurred_at) for _, _, v in rows],
                bool_array([v.deleted for _, _, v in rows]),
                utf8_array([_view_json_utf8(v.data) for _, _, v in rows]),
            ],
        )

    def delete_views(self, rows: Sequence[tuple[str, str, str]]) -> None:
        self._run(
            "DELETE FROM source_views v USING unnest(%b::text[], %b::text[], %b::text[])"
            " AS w(entity, key, source)"
            " WHERE v.entity = w.entity AND v.key = w.key AND v.source = w.source",
            [
                text_array([e for e, _, _ in rows]),
                text_array([k for _, k, _ in rows]),
                text_array([s for _, _, s in rows]),
            ],
            planned=True,
        )

    def write_records(
        self, records: dict[RecordKey, CanonicalRecord | None], now: datetime
    ) -> None:
        present = [(k, r) for k, r in records.items() if r is not None]
        if present:
            self._run(
                "INSERT INTO records (entity, key, data, sources, updated_at, provenance)"
                " SELECT e, k, CAST(d AS json), CAST(s AS json), %b, CAST(p AS json)"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[])"
                " AS u(e, k, d, s, p)"
                " ON CONFLICT (entity, key) DO UPDATE SET data = excluded.data,"
                " sources = excluded.sources, updated_at = excluded.updated_at,"
                " provenance = excluded.provenance",
                [
                    naive_utc(now),
                    text_array([e for (e, _), _ in present]),
                    text_array([k for (_, k), _ in present]),
                    utf8_array([_json_utf8(r.data) for _, r in present]),
                    utf8_array([_json_utf8(r.sources) for _, r in present]),
                    utf8_array([_json_utf8(r.origins) for _, r in present]),
                ],
            )
        gone = [key for key, record in records.items() if record is None]
        if gone:
            self._run(
                "DELETE FROM records r USING unnest(%b::text[], %b::text[]) AS w(entity, key)"
                " WHERE r.entity = w.entity AND r.key = w.key",
                _key_arrays(gone),
                planned=True,
            )
            self.note_deletions(gone, now)

    def note_deletions(self, keys: Sequence[RecordKey], at: datetime, due: bool = False) -> None:
        self._run(
            "INSERT INTO record_deletions (entity, key, deleted_at) SELECT e, k, %b"
            " FROM unnest(%b::text[], %b::text[]) AS u(e, k) WHERE EXISTS (SELECT 1 FROM"
            " source_views v WHERE v.entity = u.e AND v.key = u.k) ON CONFLICT (entity, key)"
            + (" DO UPDATE SET deleted_at = excluded.deleted_at" if due else " DO NOTHING"),
            [naive_utc(at), *_key_arrays(sorted(keys))],
        )

    def note_removals(self, times: Mapping[RecordKey, datetime]) -> None:
        items = sorted(times.items())
        self._run(
            "INSERT INTO record_deletions (entity, key, deleted_at) SELECT e, k, t"
            " FROM unnest(%b::text[], %b::text[], %b::timestamp[]) AS u(e, k, t)"
            " WHERE NOT EXISTS (SELECT 1 FROM source_views v WHERE v.entity = u.e"
            " AND v.key = u.k)"
            " ON CONFLICT (entity, key) DO UPDATE SET deleted_at = excluded.deleted_at",
            [*_key_arrays([k for k, _ in items]), [naive_utc(at) for _, at in items]],
        )

    def with_views(self, keys: Sequence[RecordKey]) -> set[RecordKey]:
        rows = self._run(
            "SELECT w.entity, w.key FROM unnest(%b::text[], %b::text[]) AS w(entity, key)"
            " WHERE EXISTS (SELECT 1 FROM source_views v WHERE v.entity = w.entity"
            " AND v.key = w.key)",
            _key_arrays(keys),
        )
        return {(e, k) for e, k in rows}

    def only_tombstones(self, keys: Sequence[RecordKey]) -> dict[RecordKey, datetime]:
        rows = self._run(
            "SELECT v.entity, v.key, max(v.applied_at) FROM unnest(%b::text[], %b::text[])"
            " AS w(entity, key) JOIN source_views v ON v.entity = w.entity AND v.key = w.key"
            " GROUP BY v.entity, v.key HAVING bool_and(v.deleted)",
            _key_arrays(keys),
            planned=True,
        )
        return {(e, k): aware_utc(at) for e, k, at in rows}

    def forget_deletions(self, keys: Sequence[RecordKey]) -> None:
        self._run(
            "DELETE FROM record_deletions d USING unnest(%b::text[], %b::text[])"
            " AS w(entity, key) WHERE d.entity = w.entity AND d.key = w.key",
            _key_arrays(keys),
            planned=True,
        )

    def move_deletions(self, due: dict[RecordKey, datetime]) -> None:
        items = sorted(due.items())
        self._run(
            "UPDATE record_deletions d SET deleted_at = w.at FROM unnest(%b::text[],"
            " %b::text[], %b::timestamp[]) AS w(entity, key, at)"
            " WHERE d.entity = w.entity AND d.key = w.key",
            [*_key_arrays([k for k, _ in items]), [naive_utc(at) for _, at in items]],
            planned=True,
        )

    def append_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Kept until the batch settles, then copied (`COPY` cannot run in a pipeline).
        PostgreSQL inserts copied rows in bulk: 15.5 → 10.9 µs per row against an
        `INSERT … SELECT FROM unnest`, both sides (docs/performance-log.md, twelfth round)."""
        self._history.extend(rows)

    def _copy_history(self) -> None:
        rows, self._history = self._history, []
        if not rows:
            return
        with self.dbapi.cursor() as cursor, cursor.copy(COPY_HISTORY_SQL) as copy:
            copy.set_types(HISTORY_TYPES)
            write = copy.write_row
            last: datetime | None = None
            naive = datetime.min
            for r in rows:
                if r["applied_at"] is not last:  # a batch's rows share its `now`
                    last = r["applied_at"]
                    naive = naive_utc(last)
                write(_history_row(r, naive, _json_utf8))

    def add_anomalies(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        self._run(
            "INSERT INTO dossier_anomalies (key, source, from_status, to_status, event_id,"
            " detected_at) SELECT * FROM unnest(%b::text[], %b::text[], %b::int[], %b::int[],"
            " %b::text[], %b::timestamp[])",
            [
                [r["key"] for r in rows],
                [r["source"] for r in rows],
                [r["from_status"] for r in rows],
                [r["to_status"] for r in rows],
                [r["event_id"] for r in rows],
                [naive_utc(r["detected_at"]) for r in rows],
            ],
        )

    def replace_conflicts(
        self, current: Conflicts, now: datetime, absent: Collection[RecordKey] = ()
    ) -> list[tuple[str, str]]:
        replaced, found, fresh = _split_conflicts(current, absent)
        if replaced:
            # The replaced records' disagreements that are over go; the others stay, to be
            # updated below (keeping when they were detected while their groups are the same).
            self._run(
                "DELETE FROM field_conflicts f USING unnest(%b::text[], %b::text[])"
                " AS w(entity, key) WHERE f.entity = w.entity AND f.key = w.key AND NOT EXISTS"
                " (SELECT 1 FROM unnest(%b::text[], %b::text[], %b::text[]) AS s(e, k, f)"
                " WHERE s.e = f.entity AND s.k = f.key AND s.f = f.field)",
                [
                    *_key_arrays(replaced),
                    text_array([e for e, _, _, _ in found]),
                    text_array([k for _, k, _, _ in found]),
                    text_array([f for _, _, f, _ in found]),
                ],
                planned=True,
            )
        rows = found + fresh
        if rows:
            # A record said to have none that has one after all (a conflict rule changed
            # since it was stored) gets the row replaced, not a failed batch. A row whose
            # groups changed is detected again now, compared as values (`jsonb`): rows of
            # migration 0008 keep jsonb's spaced text, new ones are written compact;
            # `xmax = 0`: a row inserted, not updated.
            inserted = self._send(
                "INSERT INTO field_conflicts (entity, key, field, sources, detected_at)"
                " SELECT e, k, f, CAST(s AS json), %b FROM unnest(%b::text[], %b::text[],"
                " %b::text[], %b::text[]) AS u(e, k, f, s)"
                " ON CONFLICT (entity, key, field) DO UPDATE SET sources = excluded.sources,"
                " detected_at = CASE WHEN field_conflicts.sources::jsonb ="
                " excluded.sources::jsonb THEN field_conflicts.detected_at"
                " ELSE excluded.detected_at END"
                " RETURNING entity, key, field, xmax = 0",
                [
                    naive_utc(now),
                    [e for e, _, _, _ in rows],
                    [k for _, k, _, _ in rows],
                    [f for _, _, f, _ in rows],
                    [_json(s) for _, _, _, s in rows],
                ],
            )
            # Read when the batch settles: reading rows in a pipeline waits for all before.
            self._pending.append((found, inserted))
        return [(e, f) for e, _, f, _ in fresh]

    def document_owners(self, owners: dict[RecordKey, RecordKey | None], now: datetime) -> None:
        gone = [key for key, owner in owners.items() if owner is None]
        if gone:
            self._run(
                "DELETE FROM document_owners d USING unnest(%b::text[], %b::text[])"
                " AS w(entity, key) WHERE d.entity = w.entity AND d.key = w.key",
                _key_arrays(gone),
                planned=True,
            )
        named = [(key, owner) for key, owner in owners.items() if owner is not None]
        if named:
            self._run(
                "INSERT INTO document_owners (entity, key, owner_entity, owner_key, updated_at)"
                " SELECT e, k, oe, ok, %b FROM unnest(%b::text[], %b::text[], %b::text[],"
                " %b::text[]) AS u(e, k, oe, ok) ON CONFLICT (entity, key) DO UPDATE SET"
                " owner_entity = excluded.owner_entity, owner_key = excluded.owner_key,"
                " updated_at = excluded.updated_at WHERE (document_owners.owner_entity,"
                " document_owners.owner_key) IS DISTINCT FROM"
                " (excluded.owner_entity, excluded.owner_key)",
                [
                    naive_utc(now),
                    [e for (e, _), _ in named],
                    [k for (_, k), _ in named],
                    [o[0] for _, o in named],
                    [o[1] for _, o in named],
                ],
            )

    def write_freshness(self, newest: dict[SourcePartition, datetime], now: datetime) -> None:
        items = sorted(newest.items())
        self._run(
            "INSERT INTO source_freshness (source, topic, partition, last_change,"
            " last_applied) SELECT s, t, p, c, %b FROM unnest(%b::text[], %b::text[],"
            " %b::int[], %b::timestamp[]) AS u(s, t, p, c)"
            " ON CONFLICT (source, topic, partition) DO UPDATE SET"
            " last_change = GREATEST(source_freshness.last_change, excluded.last_change),"
            " last_applied = excluded.last_applied",
            [
                naive_utc(now),
                text_array([s for (s, _, _), _ in items]),
                text_array([t for (_, t, _), _ in items]),
                int_array([p for (_, _, p), _ in items]),
                [naive_utc(c) for _, c in items],
            ],
        )

    def write_offsets(self, ranges: dict[TopicPartition, OffsetRange], now: datetime) -> None:
        items = list(ranges.items())
        topics = text_array([t for (t, _), _ in items])
        partitions = int_array([p for (_, p), _ in items])
        next_offsets = bigint_array([r[1] for _, r in items])
        # The journal's time is the server's: its retention deletes the oldest rows by id
        # (`Store.purge_journal_within`), and rows dated ahead by a worker's clock at the
        # head of that order held back every older row behind them.
        self._run(
            "INSERT INTO apply_journal (topic, partition, first_offset, next_offset, events,"
            " committed_at) SELECT t, p, f, n, c, statement_timestamp() AT TIME ZONE 'UTC'"
            " FROM unnest(%b::text[], %b::int[], %b::bigint[], %b::bigint[], %b::int[])"
            " AS u(t, p, f, n, c)",
            [
                topics,
                partitions,
                bigint_array([r[0] for _, r in items]),
                next_offsets,
                int_array([r[2] for _, r in items]),
            ],
        )
        self._run(
            "INSERT INTO applied_offsets (topic, partition, next_offset, updated_at)"
            " SELECT t, p, n, %b FROM unnest(%b::text[], %b::int[], %b::bigint[]) AS u(t, p, n)"
            " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset,"
            " updated_at = excluded.updated_at"
            " WHERE applied_offsets.next_offset < excluded.next_offset",
            [naive_utc(now), topics, partitions, next_offsets],
        )


class SqliteBatchIO(BatchIO):
    """`executemany` of one prepared statement per table; keys read through a temp table.
    Writers are serialised by the transaction (BEGIN IMMEDIATE): no locks needed.

    Writes do not overlap the merge here: a writer thread for the parts was tried and was
    no faster (80.5 against 82 µs per event, wall): `sqlite3` gives the GIL up and takes it
    back around every row, so the writer and the merge mostly took turns."""

    # The batch's keys go into a temporary table that every read joins with CROSS JOIN:
    # SQLite then loops over the batch's keys and looks each up by primary key. With a
    # plain JOIN its planner chose to scan the whole store table once per batch (no
    # statistics on the temporary table): a cost growing with the store (docs/performance).
    def _keys(self, table: str, keys: Sequence[tuple[Any, Any]]) -> str:
        cursor = self.dbapi.cursor()
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (a, b, PRIMARY KEY (a, b))")
        cursor.execute(f"DELETE FROM {table}")
        cursor.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)", keys)
        return table

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.dbapi.cursor().executemany(sql, rows)

    def read(
        self,
        keys: Sequence[RecordKey],
        partitions: Sequence[TopicPartition],
        use_offsets: bool,
        known: Collection[RecordKey] = (),
    ) -> BatchReads:
        # No record locks: the transaction (BEGIN IMMEDIATE) already excludes other writers.
        offsets = self.offsets(partitions) if use_offsets else {}
        writes = _writes(self.dbapi.execute(WRITES_SQL))
        views, canonical = self.records([k for k in keys if k not in known] if known else keys)
        return offsets, views, canonical, writes

    def records(
        self, keys: Sequence[RecordKey]
    ) -> tuple[dict[RecordKey, dict[str, SourceView]], dict[RecordKey, dict[str, Any]]]:
        return self.views(keys), self.canonical(keys)

    def count_write(self, now: datetime) -> None:
        self.dbapi.execute(
            "INSERT INTO store_meta (name, value, updated_at) VALUES (?, '1', ?)"
            " ON CONFLICT (name) DO UPDATE"
            " SET value = CAST(CAST(store_meta.value AS INTEGER) + 1 AS TEXT),"
            " updated_at = excluded.updated_at",
            (WRITES, utc_text(now)),
        )

    def offsets(
        self, partitions: Sequence[TopicPartition], lock: bool = True
    ) -> dict[TopicPartition, int]:
        if not partitions:
            return {}
        wanted = self._keys("batch_partitions", partitions)
        rows = self.dbapi.execute(
            f"SELECT o.topic, o.partition, o.next_offset FROM {wanted} w"
            " CROSS JOIN applied_offsets o ON o.topic = w.a AND o.partition = w.b"
        )
        return {(t, p): n for t, p, n in rows}

    def views(self, keys: Sequence[RecordKey]) -> dict[RecordKey, dict[str, SourceView]]:
        if not keys:
            return {}
        wanted = self._keys("batch_keys", keys)
        return _views(
            self.dbapi.execute(
                "SELECT v.entity, v.key, v.source, v.version, v.event_id, v.occurred_at,"
                f" v.deleted, v.data FROM {wanted} w CROSS JOIN source_views v"
                " ON v.entity = w.a AND v.key = w.b"
            )
        )

    def canonical(self, keys: Sequence[RecordKey]) -> dict[RecordKey, dict[str, Any]]:
        if not keys:
            return {}
        wanted = self._keys("batch_keys", keys)
        return _canonical(
            self.dbapi.execute(
                f"SELECT r.entity, r.key, r.data FROM {wanted} w"
                " CROSS JOIN records r ON r.entity = w.a AND r.key = w.b"
            )
        )

    def write_views(self, rows: Sequence[tuple[str, str, SourceView]], now: datetime) -> None:
        applied = utc_text(now)
        self._many(
            "INSERT INTO source_views (entity, key, source, version, event_id, occurred_at,"
            " deleted, data, applied_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (entity, key, source) DO UPDATE SET version = excluded.version,"
            " event_id = excluded.event_id, occurred_at = excluded.occurred_at,"
            " deleted = excluded.deleted, data = excluded.data, applied_at = excluded.applied_at"
            # the same version too: another change of it that orders after (merge.same_version)
            " WHERE source_views.version <= excluded.version",
            [
                (
                    e,
                    k,
                    v.source,
                    v.version,
                    v.event_id,
                    utc_text(v.occurred_at),
                    int(v.deleted),
                    _view_json(v.data),
                    applied,
                )
                for e, k, v in rows
            ],
        )

    def delete_views(self, rows: Sequence[tuple[str, str, str]]) -> None:
        self._many("DELETE FROM source_views WHERE entity = ? AND key = ? AND source = ?", rows)

    def write_records(
        self, records: dict[RecordKey, CanonicalRecord | None], now: datetime
    ) -> None:
        updated = utc_text(now)
        self._many(
            "INSERT INTO records (entity, key, data, sources, updated_at, provenance)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entity, key) DO UPDATE SET"
            " data = excluded.data, sources = excluded.sources,"
            " updated_at = excluded.updated_at, provenance = excluded.provenance",
            [
                (e, k, _json(r.data), _json(r.sources), updated, _json(r.origins))
                for (e, k), r in records.items()
                if r is not None
            ],
        )
        gone = [key for key, record in records.items() if record is None]
        self._many("DELETE FROM records WHERE entity = ? AND key = ?", gone)
        if gone:
            self.note_deletions(gone, now)

    def note_deletions(self, keys: Sequence[RecordKey], at: datetime, due: bool = False) -> None:
        self._many(
            "INSERT INTO record_deletions (entity, key, deleted_at) SELECT ?1, ?2, ?3"
            " WHERE EXISTS (SELECT 1 FROM source_views v WHERE v.entity = ?1 AND v.key = ?2)"
            " ON CONFLICT (entity, key)"
            + (" DO UPDATE SET deleted_at = excluded.deleted_at" if due else " DO NOTHING"),
            [(e, k, utc_text(at)) for e, k in sorted(keys)],
        )

    def note_removals(self, times: Mapping[RecordKey, datetime]) -> None:
        self._many(
            "INSERT INTO record_deletions (entity, key, deleted_at) SELECT ?1, ?2, ?3"
            " WHERE NOT EXISTS (SELECT 1 FROM source_views v WHERE v.entity = ?1"
            " AND v.key = ?2) ON CONFLICT (entity, key)"
            " DO UPDATE SET deleted_at = excluded.deleted_at",
            [(e, k, utc_text(at)) for (e, k), at in sorted(times.items())],
        )

    def with_views(self, keys: Sequence[RecordKey]) -> set[RecordKey]:
        if not keys:
            return set()
        wanted = self._keys("batch_keys", keys)
        rows = self.dbapi.execute(
            f"SELECT w.a, w.b FROM {wanted} w WHERE EXISTS (SELECT 1 FROM source_views v"
            " WHERE v.entity = w.a AND v.key = w.b)"
        )
        return {(e, k) for e, k in rows}

    def only_tombstones(self, keys: Sequence[RecordKey]) -> dict[RecordKey, datetime]:
        if not keys:
            return {}
        wanted = self._keys("batch_keys", keys)
        rows = self.dbapi.execute(
            "SELECT v.entity, v.key, max(v.applied_at) FROM"
            f" {wanted} w CROSS JOIN source_views v ON v.entity = w.a AND v.key = w.b"
            " GROUP BY v.entity, v.key HAVING min(v.deleted) = 1"
        )
        return {(e, k): aware_utc(at) for e, k, at in rows}

    def forget_deletions(self, keys: Sequence[RecordKey]) -> None:
        self._many("DELETE FROM record_deletions WHERE entity = ? AND key = ?", keys)

    def move_deletions(self, due: dict[RecordKey, datetime]) -> None:
        self._many(
            "UPDATE record_deletions SET deleted_at = ? WHERE entity = ? AND key = ?",
            [(utc_text(at), e, k) for (e, k), at in sorted(due.items())],
        )

    def append_history(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._many(
            "INSERT INTO record_history (entity, key, event_id, source, version, changes,"
            " applied_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [_history_row(r, utc_text(r["applied_at"])) for r in rows],
        )

    def add_anomalies(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._many(
            "INSERT INTO dossier_anomalies (key, source, from_status, to_status, event_id,"
            " detected_at) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    r["key"],
                    r["source"],
                    r["from_status"],
                    r["to_status"],
                    r["event_id"],
                    utc_text(r["detected_at"]),
                )
                for r in rows
            ],
        )

    def replace_conflicts(
        self, current: Conflicts, now: datetime, absent: Collection[RecordKey] = ()
    ) -> list[tuple[str, str]]:
        replaced, found, fresh = _split_conflicts(current, absent)
        new = [(e, f) for e, _, f, _ in fresh]
        kept: dict[tuple[str, str, str], tuple[str, str]] = {}  # (sources, detected_at)
        if replaced:
            wanted = self._keys("batch_keys", replaced)
            before = self.dbapi.execute(
                f"SELECT f.entity, f.key, f.field, f.sources, f.detected_at FROM {wanted} w"
                " CROSS JOIN field_conflicts f ON f.entity = w.a AND f.key = w.b"
            ).fetchall()
            self.dbapi.execute(
                "DELETE FROM field_conflicts WHERE rowid IN (SELECT f.rowid FROM"
                f" {wanted} w CROSS JOIN field_conflicts f ON f.entity = w.a AND f.key = w.b)"
            )
            kept = {(e, k, f): (sources, at) for e, k, f, sources, at in before}
            new = _new_conflicts(found, kept) + new
        detected = utc_text(now)

        def since(e: str, k: str, f: str, sources: str | None) -> str:
            """When detected: then, while the groups are the same (as on PostgreSQL), as
            values: a row an older release wrote has other spacing."""
            stored = kept.get((e, k, f))
            if stored is None:
                return detected
            same = stored[0] == sources or _loads_or_none(stored[0]) == _loads_or_none(sources)
            return stored[1] if same else detected

        # As on PostgreSQL: a stored row where none was expected is replaced.
        rows = [(e, k, f, _json(s)) for e, k, f, s in found + fresh]
        self._many(
            "INSERT INTO field_conflicts (entity, key, field, sources, detected_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (entity, key, field) DO UPDATE SET"
            " sources = excluded.sources, detected_at = excluded.detected_at",
            [(e, k, f, s, since(e, k, f, s)) for e, k, f, s in rows],
        )
        return new

    def document_owners(self, owners: dict[RecordKey, RecordKey | None], now: datetime) -> None:
        self._many(
            "DELETE FROM document_owners WHERE entity = ? AND key = ?",
            [key for key, owner in owners.items() if owner is None],
        )
        updated = utc_text(now)
        self._many(
            "INSERT INTO document_owners (entity, key, owner_entity, owner_key, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (entity, key) DO UPDATE SET"
            " owner_entity = excluded.owner_entity, owner_key = excluded.owner_key,"
            " updated_at = excluded.updated_at WHERE document_owners.owner_entity IS NOT"
            " excluded.owner_entity OR document_owners.owner_key IS NOT excluded.owner_key",
            [(e, k, o[0], o[1], updated) for (e, k), o in owners.items() if o is not None],
        )

    def write_freshness(self, newest: dict[SourcePartition, datetime], now: datetime) -> None:
        applied = utc_text(now)
        self._many(
            "INSERT INTO source_freshness (source, topic, partition, last_change,"
            " last_applied) VALUES (?, ?, ?, ?, ?) ON CONFLICT (source, topic, partition)"
            " DO UPDATE SET last_change = max(source_freshness.last_change,"
            " excluded.last_change), last_applied = excluded.last_applied",
            [(s, t, p, utc_text(c), applied) for (s, t, p), c in sorted(newest.items())],
        )

    def write_offsets(self, ranges: dict[TopicPartition, OffsetRange], now: datetime) -> None:
        committed = utc_text(now)
        self._many(
            "INSERT INTO apply_journal (topic, partition, first_offset, next_offset, events,"
            " committed_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(t, p, f, n, c, committed) for (t, p), (f, n, c) in ranges.items()],
        )
        self._many(
            "INSERT INTO applied_offsets (topic, partition, next_offset, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE SET"
            " next_offset = excluded.next_offset, updated_at = excluded.updated_at"
            " WHERE applied_offsets.next_offset < excluded.next_offset",
            [(t, p, n, committed) for (t, p), (_, n, _) in ranges.items()],
        )


def batch_io(dialect: str, dbapi: Any) -> BatchIO:
    if dialect == "postgresql":
        return PostgresBatchIO(dbapi)
    if dialect == "sqlite":
        return SqliteBatchIO(dbapi)
    raise ConfigurationError(f"no batch writer for {dialect} (the store is SQLite or PostgreSQL)")
