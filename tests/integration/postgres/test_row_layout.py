"""bench/row_layout.py: both layouts, fed the same events, hold the same records, and the
one-row layout's views are the `source_views` rows the store's own statements wrote."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from bench.row_layout import Event, create_tables, replay


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
