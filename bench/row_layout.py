"""PostgreSQL's CPU per event for two layouts of the store's current state: a decision aid.

Today the store keeps every source's view in `source_views` and the merged record in
`records`: a batch reads both for its records and upserts both (two rows an event). The
other layout, not built, keeps a record's views in its own row (a `views` JSON column): one
read and one upsert. This replays the peer harness's citizen events (`--peer`, as
`bench/instructions.py` makes them: three in four update a record, a fifth from a second
source) in batches of 2,000 through each layout's statements, as `store.batch` sends them
(binary arrays, `unnest`, `ON CONFLICT`; the reads by index), on a throwaway PostgreSQL
(fsync off), and prints the server backend's CPU per event (`/proc/<pid>/stat`, so the
neighbours' load counts less than in a wall time), the wall time per event (both sides)
and the tables' size. History, conflicts and offsets are the same in both layouts and left
out; the merge is the worker's (`consumers.merge.merge`).

    .venv/bin/python bench/row_layout.py --peer ../shared/bench/peer_jdbc_sink
    .venv/bin/python bench/row_layout.py --peer ../shared/bench/peer_jdbc_sink --rounds 3

docs/performance.md, twenty-second round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from consumers.config import load_rules
from consumers.merge import merge
from schemas.views import CanonicalRecord, SourceView
from store.pg_arrays import bigint_array, bool_array, register_dumpers, text_array, utf8_array

BATCH = 2000
Event = tuple[str, str, int, str, datetime, dict[str, Any]]  # key, source, version, id, time, data

TABLES = """
CREATE TABLE source_views (entity varchar(16), key varchar(64), source varchar(64),
  version bigint NOT NULL, event_id varchar(36) NOT NULL, occurred_at timestamp NOT NULL,
  deleted boolean NOT NULL, data json, applied_at timestamp NOT NULL,
  PRIMARY KEY (entity, key, source));
CREATE TABLE records (entity varchar(16), key varchar(64), data json NOT NULL,
  sources json NOT NULL, updated_at timestamp NOT NULL, provenance json,
  PRIMARY KEY (entity, key));
CREATE TABLE records_with_views (entity varchar(16), key varchar(64), data json NOT NULL,
  sources json NOT NULL, updated_at timestamp NOT NULL, provenance json,
  views json NOT NULL, PRIMARY KEY (entity, key));
"""
# The store's statements (store.batch), and the one-row layout's in the same form.
WRITE_VIEWS = (
    "INSERT INTO source_views (entity, key, source, version, event_id, occurred_at, deleted,"
    " data, applied_at) SELECT e, k, s, v, i, o, d, CAST(j AS json), %b FROM unnest(%b::text[],"
    " %b::text[], %b::text[], %b::bigint[], %b::text[], %b::timestamp[], %b::bool[], %b::text[])"
    " AS u(e, k, s, v, i, o, d, j) ON CONFLICT (entity, key, source) DO UPDATE SET"
    " version = excluded.version, event_id = excluded.event_id,"
    " occurred_at = excluded.occurred_at, deleted = excluded.deleted, data = excluded.data,"
    " applied_at = excluded.applied_at WHERE source_views.version < excluded.version"
)
WRITE_RECORDS = (
    "INSERT INTO records (entity, key, data, sources, updated_at, provenance)"
    " SELECT e, k, CAST(d AS json), CAST(s AS json), %b, CAST(p AS json)"
    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[]) AS u(e, k, d, s, p)"
    " ON CONFLICT (entity, key) DO UPDATE SET data = excluded.data, sources = excluded.sources,"
    " updated_at = excluded.updated_at, provenance = excluded.provenance"
)
WRITE_ONE_ROW = (
    "INSERT INTO records_with_views (entity, key, data, sources, updated_at, provenance, views)"
    " SELECT e, k, CAST(d AS json), CAST(s AS json), %b, CAST(p AS json), CAST(w AS json)"
    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[])"
    " AS u(e, k, d, s, p, w) ON CONFLICT (entity, key) DO UPDATE SET data = excluded.data,"
    " sources = excluded.sources, updated_at = excluded.updated_at,"
    " provenance = excluded.provenance, views = excluded.views"
)
_LOOKUP = (
    "FROM unnest(%b::text[], %b::text[]) AS w(entity, key) CROSS JOIN LATERAL"
    " (SELECT * FROM {table} s WHERE s.entity = w.entity AND s.key = w.key OFFSET 0) AS r"
)
READ_VIEWS = (
    "SELECT r.entity, r.key, r.source, r.version, r.event_id, r.occurred_at, r.deleted, r.data "
    + _LOOKUP.format(table="source_views")
)
READ_RECORDS = "SELECT r.entity, r.key, r.data " + _LOOKUP.format(table="records")
READ_ONE_ROW = "SELECT r.entity, r.key, r.data, r.views " + _LOOKUP.format(
    table="records_with_views"
)


def peer_events(harness: Path, count: int) -> list[Event]:
    from instructions import peer_pairs

    events: list[Event] = []
    for _, value in peer_pairs(harness, count)[:count]:
        event = orjson.loads(value)
        occurred = datetime.fromisoformat(event["occurred_at"]).astimezone(UTC)
        events.append(
            (
                event["key"],
                event["source"],
                event["version"],
                event["event_id"],
                occurred.replace(tzinfo=None),
                event["data"],
            )
        )
    return events


def _view_json(view: SourceView) -> dict[str, Any]:
    return {
        "version": view.version,
        "event_id": view.event_id,
        "occurred_at": view.occurred_at.isoformat(),
        "deleted": view.deleted,
        "data": view.data,
    }


def replay(connection: Any, events: Sequence[Event], one_row: bool) -> tuple[float, float]:
    """Apply the events in batches through one layout; (server CPU, wall) in seconds."""
    _, authority = load_rules(None, None)
    backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
    tick = os.sysconf("SC_CLK_TCK")

    def server_cpu() -> float:
        """The backend's user and system time; NaN when the server is not on this host."""
        try:
            fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / tick

    views: dict[str, dict[str, SourceView]] = {}  # what the reads return, kept in memory
    now = datetime(2026, 12, 3)
    cpu, wall = server_cpu(), time.perf_counter()
    for start in range(0, len(events), BATCH):
        batch = events[start : start + BATCH]
        keys = list(dict.fromkeys(key for key, *_ in batch))
        lookup = [text_array(["citizen"] * len(keys)), text_array(keys)]
        for sql in (READ_ONE_ROW,) if one_row else (READ_VIEWS, READ_RECORDS):
            connection.execute(sql, lookup, prepare=False).fetchall()
        changed: dict[tuple[str, str], SourceView] = {}
        merged: dict[str, CanonicalRecord] = {}
        for key, source, version, event_id, occurred, data in batch:
            current = views.setdefault(key, {})
            known = current.get(source)
            if known is not None and known.version >= version:
                continue
            view = SourceView(source, version, event_id, occurred, False, data)
            current[source] = changed[(key, source)] = view
            record = merge("citizen", current.values(), authority)
            assert record is not None
            merged[key] = record
        rows = list(merged.items())
        records = [
            now,
            text_array(["citizen"] * len(rows)),
            text_array([key for key, _ in rows]),
            utf8_array([orjson.dumps(record.data) for _, record in rows]),
            utf8_array([orjson.dumps(record.sources) for _, record in rows]),
            utf8_array([orjson.dumps(record.origins) for _, record in rows]),
        ]
        if one_row:
            every_view = [
                orjson.dumps({s: _view_json(v) for s, v in views[key].items()}) for key, _ in rows
            ]
            connection.execute(WRITE_ONE_ROW, [*records, utf8_array(every_view)])
        else:
            items = list(changed.items())
            connection.execute(
                WRITE_VIEWS,
                [
                    now,
                    text_array(["citizen"] * len(items)),
                    text_array([key for (key, _), _ in items]),
                    text_array([source for (_, source), _ in items]),
                    bigint_array([view.version for _, view in items]),
                    text_array([view.event_id for _, view in items]),
                    [view.occurred_at for _, view in items],
                    bool_array([view.deleted for _, view in items]),
                    utf8_array([orjson.dumps(view.data) for _, view in items]),
                ],
            )
            connection.execute(WRITE_RECORDS, records)
        connection.commit()
    return server_cpu() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="the peer harness's directory")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per layout")
    args = parser.parse_args()

    import psycopg

    from tests.support.postgres_server import start_postgres

    events = peer_events(args.peer, args.events)
    register_dumpers()
    postgres = start_postgres(settings={"fsync": "off", "synchronous_commit": "off"})
    try:
        url = postgres.url("postgres").replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(url) as connection:
            connection.execute(TABLES)
            connection.commit()
            layouts: list[tuple[str, bool, str]] = [
                ("views and records, two rows an event", False, "source_views, records"),
                ("a record's views in its row, one row", True, "records_with_views"),
            ]

            def size(tables: str) -> int:
                query = "SELECT pg_total_relation_size(%s)"
                return sum(
                    connection.execute(query, [t.strip()]).fetchone()[0] for t in tables.split(",")
                )

            for round_ in range(1, args.rounds + 1):
                for name, one_row, tables in layouts:
                    connection.execute(f"TRUNCATE {tables}")
                    connection.commit()
                    cpu, wall = replay(connection, events, one_row)
                    print(
                        f"round {round_}  {name:38}  server CPU {cpu / len(events) * 1e6:5.1f}"
                        f" µs/event  wall {wall / len(events) * 1e6:5.1f} µs/event"
                        f"  tables {size(tables) / 1e6:5.1f} MB",
                        flush=True,
                    )
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
