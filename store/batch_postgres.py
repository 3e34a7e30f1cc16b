"""The batch's reads and writes on PostgreSQL (`store.batch`): arrays in PostgreSQL's
binary form through `unnest`, one fixed statement per table, in psycopg's pipeline; the
history by binary `COPY` when the batch settles."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from schemas.views import CanonicalRecord, RecordKey, SourceView
from store.batch import (
    WRITES,
    WRITES_SQL,
    BatchIO,
    BatchReads,
    Conflicts,
    OffsetRange,
    SourcePartition,
    TopicPartition,
    canonical_by_record,
    dump_json,
    dump_json_utf8,
    history_row,
    split_conflicts,
    view_json_utf8,
    views_by_record,
    write_count,
)
from store.pg_arrays import bigint_array, bool_array, int_array, text_array, utf8_array
from store.times import aware_utc, naive_utc

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


class PostgresBatchIO(BatchIO):
    """Arrays and `unnest`: one fixed statement per table and per read. A batch's reads go
    in one round trip and its writes in another (psycopg's pipeline mode)."""

    @contextlib.contextmanager
    def _pipeline(self) -> Iterator[None]:
        """psycopg's pipeline, then one more round trip that ends as a statement does.

        psycopg leaves a pipeline with a Sync and, when the results have not all come yet
        (a busy server, a lock waited for), a Flush; PostgreSQL, reading a Flush, stops the
        session's `idle_in_transaction_session_timeout` until its next Sync. A worker
        stopped after such a pipeline (SIGSTOP, a paused VM) held its batch's locks for
        ever: the others retried their batches until it came back. An empty query is
        answered as a statement is, and starts the timer again (a fault review; test:
        test_store_connection.py)."""
        with self.dbapi.pipeline():
            yield
        self.dbapi.pgconn.exec_(b"")

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
        with self._pipeline():
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
            views_by_record(self._rows(views)) if views is not None else {},
            canonical_by_record(self._rows(canonical)) if canonical is not None else {},
            write_count(self._rows(writes)),
        )

    def records(
        self, keys: Sequence[RecordKey]
    ) -> tuple[dict[RecordKey, dict[str, SourceView]], dict[RecordKey, dict[str, Any]]]:
        if not keys:
            return {}, {}
        with self._pipeline():
            views = self._send(VIEWS_SQL, _key_arrays(keys), planned=True)
            canonical = self._send(CANONICAL_SQL, _key_arrays(keys), planned=True)
        return views_by_record(self._rows(views)), canonical_by_record(self._rows(canonical))

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
        self._sending: contextlib.ExitStack | None = None  # the writes' pipeline, open
        self._pending: list[tuple[list[tuple[str, str, str, Any]], Any]] = []
        self._history: list[Mapping[str, Any]] = []  # copied when the batch settles

    def send(self, *args: Any, **kwargs: Any) -> None:
        """Every statement sent without waiting for the one before (pipeline mode): the
        server executes them while the caller builds the next ones, and the batch waits
        once, in `settle`, instead of once per statement. Errors surface there."""
        if self._sending is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._pipeline())
            self._sending = stack
        self.new_conflicts.extend(self.write_all(*args, **kwargs))

    def settle(self) -> list[tuple[str, str]]:
        if self._sending is not None:
            stack, self._sending = self._sending, None
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
        if self._sending is not None:
            stack, self._sending = self._sending, None
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
                utf8_array([view_json_utf8(v.data) for _, _, v in rows]),
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
                    utf8_array([dump_json_utf8(r.data) for _, r in present]),
                    utf8_array([dump_json_utf8(r.sources) for _, r in present]),
                    utf8_array([dump_json_utf8(r.origins) for _, r in present]),
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
                write(history_row(r, naive, dump_json_utf8))

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
        replaced, found, fresh = split_conflicts(current, absent)
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
                    [dump_json(s) for _, _, _, s in rows],
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
