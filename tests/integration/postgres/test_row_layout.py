"""bench/row_layout.py: both layouts, fed the same events, hold the same records, and the
one-row layout's views are the `source_views` rows the store's own statements wrote; its
variants of the two-row layout (keys led by the key, `unnest` in select lists) write the
same rows as the store's statements."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from bench.row_layout import (
    Event,
    SelectUnnestIO,
    create_tables,
    key_first,
    replay,
    select_unnest,
)
from store.batch_postgres import PostgresBatchIO


def _data(name: str, phone: str, line: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"full_name": name, "date_of_birth": "1980-05-01", "phone": phone}
    if line is not None:
        data["permanent_address"] = {"province_code": "92", "ward_code": "31150", "line": line}
    return data


def _at(minute: int) -> datetime:
    return datetime(2025, 7, 9, 2, minute)


EVENTS: list[Event] = [
    ("092180003839", "ministry-bca", 1, "e-1", _at(1), _data("Phan Thị Oanh", "0943458128")),
    (
        "092180003839",
        "province-92",
        1,
        "e-2",
        _at(2),
        _data("Phan Thị Oanh", "0911111111", "Số 72"),
    ),
    ("092180003839", "ministry-bca", 3, "e-3", _at(3), _data("Phan Thị Oánh", "0943458128")),
    ("092180003839", "ministry-bca", 2, "e-4", _at(4), _data("stale", "0900000000")),  # stale
    ("079085001234", "ministry-bca", 1, "e-5", _at(5), _data("Nguyễn Văn An", "0987654321")),
    ("079085001234", "ministry-bca", 1, "e-6", _at(6), _data("duplicate", "0987654321")),
]


def _json_rows(connection: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    return list(connection.execute(sql).fetchall())


def test_both_layouts_hold_the_same_records_and_views(postgres_store_url: str) -> None:
    create_tables(postgres_store_url)
    url = postgres_store_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as connection:
        replay(connection, EVENTS, one_row=False)
        replay(connection, EVENTS, one_row=True)
        two = _json_rows(
            connection, "SELECT key, data, sources, provenance FROM records ORDER BY key"
        )
        one = _json_rows(
            connection,
            "SELECT key, data, sources, provenance FROM records_with_views ORDER BY key",
        )
        views = _json_rows(
            connection,
            "SELECT key, source, version, event_id, data FROM source_views ORDER BY key, source",
        )
        held = _json_rows(connection, "SELECT key, views FROM records_with_views ORDER BY key")
    assert one == two
    assert [key for key, *_ in two] == ["079085001234", "092180003839"]
    record = {key: (data, sources) for key, data, sources, _ in two}["092180003839"]
    # The later view (ministry-bca, version 3) gives its fields, the other source the rest;
    # the stale version 2 changed nothing.
    assert record[0]["full_name"] == "Phan Thị Oánh"
    assert record[0]["permanent_address"]["line"] == "Số 72"
    assert record[1] == {"ministry-bca": 3, "province-92": 1}
    in_rows = sorted(
        (key, source, view["version"], view["event_id"], view["data"])
        for key, every in held
        for source, view in every.items()
    )
    assert in_rows == sorted(tuple(row) for row in views)
    assert ("079085001234", "ministry-bca", 1, "e-5") in [row[:4] for row in in_rows]


def test_the_variants_write_what_the_store_s_statements_write(postgres_store_url: str) -> None:
    create_tables(postgres_store_url)
    url = postgres_store_url.replace("postgresql+psycopg", "postgresql")
    query = (
        "SELECT v.key, v.source, v.version, v.event_id, v.data::text, r.data::text,"
        " r.sources::text, r.provenance::text FROM source_views v JOIN records r"
        " ON r.entity = v.entity AND r.key = v.key ORDER BY v.key, v.source"
    )
    held: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(url) as connection:
        for name, io, led_by_key in [
            ("as is", PostgresBatchIO, False),
            ("select lists", SelectUnnestIO, False),
            ("key first", PostgresBatchIO, True),
        ]:
            connection.execute("TRUNCATE source_views, records")
            connection.commit()
            key_first(connection, led_by_key)
            replay(connection, EVENTS, False, io)
            held[name] = _json_rows(connection, query)
        leading = connection.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = i.indkey[0] WHERE i.indrelid = 'source_views'::regclass"
            " AND i.indisprimary"
        ).fetchone()
    assert len(held["as is"]) == 3  # two records, one of them with two sources
    assert held["select lists"] == held["as is"]
    assert held["key first"] == held["as is"]
    assert leading == ("key",)  # the last one ran with the key leading


def test_select_unnest_rewrites_the_rows_source_and_nothing_else() -> None:
    sql = (
        "INSERT INTO t (a, b) SELECT e, CAST(j AS json) FROM unnest(%b::text[], %b::text[])"
        " AS u(e, j) ON CONFLICT (a) DO NOTHING"
    )
    assert select_unnest(sql) == (
        "INSERT INTO t (a, b) SELECT e, CAST(j AS json) FROM (SELECT unnest(%b::text[]) AS e,"
        " unnest(%b::text[]) AS j) AS u ON CONFLICT (a) DO NOTHING"
    )
    assert select_unnest("DELETE FROM t USING unnest(%b::text[]) AS w(k)") == (
        "DELETE FROM t USING unnest(%b::text[]) AS w(k)"
    )
