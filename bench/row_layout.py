"""PostgreSQL's CPU per event for two layouts of the store's current state: a decision aid.

Today the store keeps every source's view in `source_views` and the merged record in
`records`: a batch reads both for its records and upserts both (two rows an event). The
other layout, not built, keeps a record's views in its own row (a `views` JSON column): one
read and one upsert. This replays the peer harness's citizen events (`--peer`, as
`bench/instructions.py` makes them: three in four update a record, a fifth from a second
source) in batches of 2,000 through each layout's statements, as the store sends them
(binary arrays, `unnest`, `ON CONFLICT`; the reads by index), on a throwaway PostgreSQL
(fsync off; the two-row layout in the store's own schema and statements,
`store.batch_postgres.PostgresBatchIO`), and prints the server backend's CPU per event
(`/proc/<pid>/stat`, so the neighbours' load counts less than in a wall time), the wall
time per event (both sides) and the tables' size. History, conflicts and offsets are the
same in both layouts and left out; the merge is the worker's (`consumers.merge.merge`).

    .venv/bin/python bench/row_layout.py --peer ../shared/bench/peer_jdbc_sink
    .venv/bin/python bench/row_layout.py --peer ../shared/bench/peer_jdbc_sink --rounds 3

docs/performance-log.md, twenty-second round. `--variant` compares the two-row layout as it
is with one change of it instead (thirty-ninth round): `key-first`, the primary keys of
views and records led by the key (`(key, entity, source)`, `(key, entity)`; the statements
unchanged, `ON CONFLICT` finds an index by its columns in any order), or `select-unnest`,
the upserts' rows taken from `unnest` in a select list instead of `FROM unnest(…)`.

    .venv/bin/python bench/row_layout.py --peer ../shared/bench/peer_jdbc_sink \
        --variant key-first --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
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
from store.batch_postgres import CANONICAL_SQL, VIEWS_SQL, PostgresBatchIO
from store.core import Store
from store.pg_arrays import text_array, utf8_array

BATCH = 2000
Event = tuple[str, str, int, str, datetime, dict[str, Any]]  # key, source, version, id, time, data

# The one-row layout: the store's `records` with a `views` column, and its statements in
# the form of the store's own (`store.batch`), which the two-row layout runs as they are.
ONE_ROW_TABLE = """
CREATE TABLE records_with_views (entity varchar(16), key varchar(64), data json NOT NULL,
  sources json NOT NULL, updated_at timestamp NOT NULL, provenance json,
  views json NOT NULL, PRIMARY KEY (entity, key))
"""
WRITE_ONE_ROW = (
    "INSERT INTO records_with_views (entity, key, data, sources, updated_at, provenance, views)"
    " SELECT e, k, CAST(d AS json), CAST(s AS json), %b, CAST(p AS json), CAST(w AS json)"
    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[])"
    " AS u(e, k, d, s, p, w) ON CONFLICT (entity, key) DO UPDATE SET data = excluded.data,"
    " sources = excluded.sources, updated_at = excluded.updated_at,"
    " provenance = excluded.provenance, views = excluded.views"
)
READ_ONE_ROW = (
    "SELECT r.entity, r.key, r.data, r.views FROM unnest(%b::text[], %b::text[])"
    " AS w(entity, key) CROSS JOIN LATERAL (SELECT * FROM records_with_views s"
    " WHERE s.entity = w.entity AND s.key = w.key OFFSET 0) AS r"
)


# `FROM unnest(a, b, …) AS u(x, y, …)` as `FROM (SELECT unnest(a) AS x, …) AS u`.
_FROM_UNNEST = re.compile(r"FROM unnest\((?P<arrays>[^)]*)\)\s*AS u\((?P<names>[^)]*)\)")


def select_unnest(sql: str) -> str:
    """A statement whose `FROM unnest(…)` rows come from `unnest` in a select list."""
    found = _FROM_UNNEST.search(sql)
    if found is None:
        return sql
    arrays = [a.strip() for a in found.group("arrays").split(",")]
    names = [n.strip() for n in found.group("names").split(",")]
    columns = ", ".join(f"unnest({a}) AS {n}" for a, n in zip(arrays, names, strict=True))
    return f"{sql[: found.start()]}FROM (SELECT {columns}) AS u{sql[found.end() :]}"


class SelectUnnestIO(PostgresBatchIO):
    """The store's statements, their `FROM unnest(…)` as `select_unnest` writes it."""

    def _run(self, sql: str, params: Sequence[Any], planned: bool = False) -> list[Any]:
        return super()._run(select_unnest(sql), params, planned)


def key_first(connection: Any, on: bool) -> None:
    """The primary keys of views and records led by the key (`on`) or as the store has them."""
    views, records = ("key, entity, source", "key, entity") if on else (
        "entity, key, source", "entity, key")  # fmt: skip
    connection.execute("ALTER TABLE source_views DROP CONSTRAINT source_views_pkey")
    connection.execute("ALTER TABLE records DROP CONSTRAINT records_pkey")
    connection.execute(f"ALTER TABLE source_views ADD PRIMARY KEY ({views})")
    connection.execute(f"ALTER TABLE records ADD PRIMARY KEY ({records})")
    connection.commit()


def create_tables(store_url: str) -> None:
    """The store's schema (its migrations; this also registers the binary arrays' dumpers
    for the connections made after it) and the one-row layout's table beside it."""
    store = Store(store_url)
    try:
        store.create_schema()
        with store.engine.begin() as conn:
            conn.exec_driver_sql(ONE_ROW_TABLE)
    finally:
        store.close()


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


def replay(
    connection: Any,
    events: Sequence[Event],
    one_row: bool,
    io: type[PostgresBatchIO] = PostgresBatchIO,
) -> tuple[float, float]:
    """Apply the events in batches through one layout (the two-row one through `io`'s
    statements); (server CPU, wall) in seconds."""
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

    store = io(connection)  # the store's own statements for views and records
    views: dict[str, dict[str, SourceView]] = {}  # what the reads return, kept in memory
    now = datetime(2026, 12, 3)
    cpu, wall = server_cpu(), time.perf_counter()
    for start in range(0, len(events), BATCH):
        batch = events[start : start + BATCH]
        keys = list(dict.fromkeys(key for key, *_ in batch))
        lookup = [text_array(["citizen"] * len(keys)), text_array(keys)]
        for sql in (READ_ONE_ROW,) if one_row else (VIEWS_SQL, CANONICAL_SQL):
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
        if one_row:
            rows = list(merged.items())
            connection.execute(
                WRITE_ONE_ROW,
                [
                    now,
                    text_array(["citizen"] * len(rows)),
                    text_array([key for key, _ in rows]),
                    utf8_array([orjson.dumps(record.data) for _, record in rows]),
                    utf8_array([orjson.dumps(record.sources) for _, record in rows]),
                    utf8_array([orjson.dumps(record.origins) for _, record in rows]),
                    utf8_array(
                        [
                            orjson.dumps({s: _view_json(v) for s, v in views[key].items()})
                            for key, _ in rows
                        ]
                    ),
                ],
            )
        else:
            store.write_views([("citizen", key, view) for (key, _), view in changed.items()], now)
            store.write_records({("citizen", key): record for key, record in merged.items()}, now)
        connection.commit()
    return server_cpu() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, required=True, help="the peer harness's directory")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per layout")
    parser.add_argument(
        "--variant",
        choices=["one-row", "key-first", "select-unnest"],
        default="one-row",
        help="what the two-row layout is compared with (default: the one-row layout)",
    )
    args = parser.parse_args()

    import psycopg

    from tests.support.postgres_server import start_postgres

    two_rows = "views and records, two rows an event"
    # name, one row, tables, the two-row layout's statements, primary keys led by the key
    layouts: list[tuple[str, bool, str, type[PostgresBatchIO], bool]] = [
        (two_rows, False, "source_views, records", PostgresBatchIO, False),
        {
            "one-row": ("a record's views in its row, one row", True, "records_with_views",
                        PostgresBatchIO, False),
            "key-first": (f"{two_rows}, keys led by the key", False, "source_views, records",
                          PostgresBatchIO, True),
            "select-unnest": (f"{two_rows}, unnest in select lists", False,
                              "source_views, records", SelectUnnestIO, False),
        }[args.variant],
    ]  # fmt: skip
    events = peer_events(args.peer, args.events)
    postgres = start_postgres(settings={"fsync": "off", "synchronous_commit": "off"})
    try:
        create_tables(postgres.url("postgres"))
        url = postgres.url("postgres").replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(url) as connection:

            def size(tables: str) -> int:
                query = "SELECT pg_total_relation_size(%s)"
                return sum(
                    connection.execute(query, [t.strip()]).fetchone()[0] for t in tables.split(",")
                )

            for round_ in range(1, args.rounds + 1):
                for name, one_row, tables, io, led_by_key in layouts:
                    connection.execute(f"TRUNCATE {tables}")
                    connection.commit()
                    if args.variant == "key-first":
                        key_first(connection, led_by_key)
                    cpu, wall = replay(connection, events, one_row, io)
                    print(
                        f"round {round_}  {name:52}  server CPU {cpu / len(events) * 1e6:5.1f}"
                        f" µs/event  wall {wall / len(events) * 1e6:5.1f} µs/event"
                        f"  tables {size(tables) / 1e6:5.1f} MB",
                        flush=True,
                    )
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
