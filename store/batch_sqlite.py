"""The batch's reads and writes on SQLite (`store.batch`): `executemany` of one prepared
statement per table; a read's keys in a temporary table joined on the primary key."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
    history_row,
    load_json_or_text,
    new_conflicts,
    split_conflicts,
    view_json,
    views_by_record,
    write_count,
)
from store.times import aware_utc, utc_text


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
        writes = write_count(self.dbapi.execute(WRITES_SQL))
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
        return views_by_record(
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
        return canonical_by_record(
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
                    view_json(v.data),
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
                (e, k, dump_json(r.data), dump_json(r.sources), updated, dump_json(r.origins))
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
            [history_row(r, utc_text(r["applied_at"])) for r in rows],
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
        replaced, found, fresh = split_conflicts(current, absent)
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
            new = new_conflicts(found, kept) + new
        detected = utc_text(now)

        def since(e: str, k: str, f: str, sources: str | None) -> str:
            """When detected: then, while the groups are the same (as on PostgreSQL), as
            values: a row an older release wrote has other spacing."""
            stored = kept.get((e, k, f))
            if stored is None:
                return detected
            same = stored[0] == sources or load_json_or_text(stored[0]) == load_json_or_text(
                sources
            )
            return stored[1] if same else detected

        # As on PostgreSQL: a stored row where none was expected is replaced.
        rows = [(e, k, f, dump_json(s)) for e, k, f, s in found + fresh]
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
