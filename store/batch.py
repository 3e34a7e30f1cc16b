"""The reconciler's hot path: one batch read and one batch write, set-based, per backend.

Every statement has a fixed text whatever the batch size, so the driver parses it once and
the database plans it once:

- PostgreSQL: the rows of a table travel as a handful of arrays (`unnest(%b::text[], …)`),
  one statement per table: `INSERT … SELECT FROM unnest … ON CONFLICT … DO UPDATE`, reads
  as index lookups per key of `unnest` (`store.batch_postgres.VIEWS_SQL`), deletes as
  `DELETE … USING unnest … RETURNING`. The arrays go in PostgreSQL's binary form, built by
  `store.pg_arrays` (JSON documents as orjson's bytes); no multi-row `VALUES` text is
  built or parsed. In pipeline mode: a batch's reads are answered in one round trip, and
  its writes are sent without waiting (`send`, part after part while the reconciler merges
  the next) and waited for once (`settle`), before the commit. History, append-only, is
  the exception: its rows are kept and go by binary `COPY` when the batch settles (`COPY`
  cannot run in a pipeline; PostgreSQL inserts copied rows in bulk).
- SQLite: `executemany` of one prepared statement per table (the C loop of `sqlite3`); the
  keys of a read go into a temporary table joined on the primary key.

This module holds what both share (`BatchIO`, the rows' JSON, the conflicts' rows) and
`batch_io`, which picks the backend's: `store.batch_postgres`, `store.batch_sqlite`. Both
run on the DBAPI connection of the SQLAlchemy transaction the store opened, so the
batch still commits (or rolls back) as one unit with its offsets. Values are written in
the forms SQLAlchemy's column types read back (`store.tables`): naive UTC timestamps, JSON
text (`json` on PostgreSQL), so every other reader of the store is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from schemas.errors import ConfigurationError
from schemas.json_text import loads_exact
from schemas.views import CanonicalRecord, RecordKey, SourceView
from store.times import aware_utc

TopicPartition = tuple[str, int]
OffsetRange = tuple[int, int, int]  # first offset, next offset, messages
SourcePartition = tuple[str, str, int]  # source, topic, partition
Conflicts = dict[RecordKey, dict[str, list[list[str]]]]
# The count of `WRITES` and the time of its last change, as the store holds them: a store
# restored from a backup and counted once more can be back at a count a worker saw before,
# never at the same time as well.
WriteCount = tuple[int, str]
# A batch's reads: stored offsets, every source's view and the canonical data per record,
# and the store's count of record writes by anything but a live batch (`WRITES`).
BatchReads = tuple[
    dict[TopicPartition, int],
    dict[RecordKey, dict[str, SourceView]],
    dict[RecordKey, dict[str, Any]],
    WriteCount,
]
# The `store_meta` row counting the transactions that wrote records without owning their
# partitions' offsets (replay, remerge, source purge, the retention purge, offset resets and
# skips): a worker that keeps records it applied in memory (`consumers.cache`) compares it.
WRITES = "record_writes"


def dump_json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def load_json_or_text(text: str | None) -> Any:
    try:
        return None if text is None else orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # compared as it is


def dump_json_utf8(value: Any) -> bytes | None:
    """`dump_json` as UTF-8, for PostgreSQL's arrays (`store.pg_arrays.utf8_array`)."""
    return None if value is None else orjson.dumps(value)


def view_json_utf8(data: Any) -> bytes | None:
    """A view's data as JSON, UTF-8 (orjson takes a dict, not any mapping)."""
    if data is None:
        return None
    return orjson.dumps(data if type(data) is dict else dict(data))


def view_json(data: Any) -> str | None:
    """A view's data as JSON text."""
    encoded = view_json_utf8(data)
    return None if encoded is None else encoded.decode()


def history_row(
    row: Mapping[str, Any], applied_at: Any, json: Callable[[Any], Any] = dump_json
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


def load_json(value: Any) -> Any:
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


def found_conflicts(current: Conflicts) -> list[tuple[str, str, str, list[list[str]]]]:
    return [
        (e, k, f, sources) for (e, k), fields in current.items() for f, sources in fields.items()
    ]


def split_conflicts(
    current: Conflicts, absent: Collection[RecordKey]
) -> tuple[list[RecordKey], list[tuple[str, str, str, Any]], list[tuple[str, str, str, Any]]]:
    """The records whose stored conflicts go first, the conflicts found on them, and
    those found on the records known to have none (`absent`)."""
    if not absent:
        return list(current), found_conflicts(current), []
    replaced = [key for key in current if key not in absent]
    found = found_conflicts({key: current[key] for key in replaced})
    fresh = found_conflicts({key: current[key] for key in current if key in absent})
    return replaced, found, fresh


def new_conflicts(
    found: Sequence[tuple[str, str, str, Any]], before: Iterable[tuple[str, str, str]]
) -> list[tuple[str, str]]:
    """(entity, field) of the conflicts found that were not there before."""
    known = set(before)
    return [(e, f) for e, k, f, _ in found if (e, k, f) not in known]


def views_by_record(rows: Iterable[Any]) -> dict[RecordKey, dict[str, SourceView]]:
    result: dict[RecordKey, dict[str, SourceView]] = {}
    for entity, key, source, version, event_id, occurred, deleted, data in rows:
        view = SourceView(
            source, version, event_id, aware_utc(occurred), bool(deleted), load_json(data)
        )
        result.setdefault((entity, key), {})[source] = view
    return result


def canonical_by_record(rows: Iterable[Any]) -> dict[RecordKey, dict[str, Any]]:
    return {(e, k): load_json(d) for e, k, d in rows}


def write_count(rows: Iterable[Any]) -> WriteCount:
    return next(((int(value), str(at)) for value, at in rows), (0, ""))


WRITES_SQL = f"SELECT value, updated_at FROM store_meta WHERE name = '{WRITES}'"


def batch_io(dialect: str, dbapi: Any) -> BatchIO:
    """The batch reads and writes of the store's backend, on the transaction's DBAPI
    connection."""
    if dialect == "postgresql":
        from store.batch_postgres import PostgresBatchIO

        return PostgresBatchIO(dbapi)
    if dialect == "sqlite":
        from store.batch_sqlite import SqliteBatchIO

        return SqliteBatchIO(dbapi)
    raise ConfigurationError(f"no batch writer for {dialect} (the store is SQLite or PostgreSQL)")
