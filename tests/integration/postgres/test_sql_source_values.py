"""A PostgreSQL source table holding values psycopg cannot turn into Python (a date
'infinity'): the SQL adapter rejects that row and publishes the others."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine

from producers.sql_advice import check_warnings
from producers.sql_config import SqlSourceConfig
from producers.sql_cursor import CursorState
from producers.sql_polling import SqlPollingAdapter
from producers.sql_rows import RejectedRow, SourceChange


def _table(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _adapter(url: str, table: str, column: str) -> SqlPollingAdapter:
    """The `sql` adapter on `table`, its `column` mapped to the full name."""
    config = SqlSourceConfig(
        source="province-01", url=url, entity="citizen", table=table,
        key_column="so_dinh_danh", pk_column="id", updated_at_column="cap_nhat",
        fields={"full_name": column}, batch_size=100,
    )  # fmt: skip
    return SqlPollingAdapter(config)


def _poll(adapter: SqlPollingAdapter, state: CursorState) -> list[Any]:
    """One poll to its end, each page remembered."""
    changes: list[Any] = []
    for page in adapter.pages(state):
        changes += page
        adapter.remember(state, page)
    return changes


def test_a_date_psycopg_cannot_read_rejects_its_row_only(postgres_store_url: str) -> None:
    _table(
        postgres_store_url,
        "CREATE TABLE giay_to (id integer PRIMARY KEY, so_dinh_danh text NOT NULL, "
        "het_han date, cap_nhat timestamp NOT NULL)",
        "INSERT INTO giay_to VALUES (1, '001190000001', '2030-01-01', '2025-08-01 08:00'), "
        "(2, '001190000002', 'infinity', '2025-08-01 08:01'), "
        "(3, '001190000003', '2031-01-01', '2025-08-01 08:02')",
    )
    adapter = _adapter(postgres_store_url, "giay_to", "het_han")
    try:
        assert adapter.snapshot  # a PostgreSQL table: capture by transaction snapshot
        state = CursorState()
        changes = _poll(adapter, state)
        kinds = [(c.pk, type(c)) for c in changes]
        assert kinds == [(1, SourceChange), (2, RejectedRow), (3, SourceChange)]
        assert state.updated_at is not None
        assert datetime.fromisoformat(state.updated_at) == datetime(2025, 8, 1, 8, 2)
    finally:
        adapter.close()


def test_a_query_the_server_cannot_compute_for_one_row_rejects_that_row(
    postgres_store_url: str,
) -> None:
    """A `query` source whose CAST fails on the server for one row: that error aborts its
    transaction, so each try of the bisection has a connection of its own."""
    engine = create_engine(postgres_store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE tho (id integer PRIMARY KEY, so_dinh_danh text NOT NULL, "
            "ngay text, cap_nhat timestamp NOT NULL)"
        )
        conn.exec_driver_sql(
            "INSERT INTO tho SELECT n, lpad(n::text, 12, '0'), "
            "CASE WHEN n = 6 THEN 'không rõ' ELSE '1990-03-05' END, "
            "timestamp '2025-08-01 08:00' + n * interval '1 minute' FROM generate_series(1, 9) n"
        )
    engine.dispose()
    config = SqlSourceConfig(
        source="province-01", url=postgres_store_url, entity="citizen", table="tho",
        query="SELECT id, so_dinh_danh, CAST(ngay AS date) AS ngay_sinh, cap_nhat FROM tho",
        key_column="so_dinh_danh", pk_column="id", updated_at_column="cap_nhat",
        fields={"date_of_birth": "ngay_sinh"}, batch_size=4, lookback_seconds=0,
    )  # fmt: skip
    adapter = SqlPollingAdapter(config)
    try:
        state = CursorState()
        changes = []
        for page in adapter.pages(state):
            changes += page
            adapter.remember(state, page)
        assert [(c.pk, type(c).__name__) for c in changes] == [
            (n, "RejectedRow" if n == 6 else "SourceChange") for n in range(1, 10)
        ]
    finally:
        adapter.close()


def test_a_page_after_the_first_begins_its_index_range_at_the_cursor(
    postgres_store_url: str,
) -> None:
    """`updated_at > X OR (updated_at = X AND pk > Y)` gives PostgreSQL no index range:
    each page walked the `(updated_at, id)` index from its start, and a first poll of a
    province's table took time in the square of its rows."""
    from sqlalchemy import event

    engine = create_engine(postgres_store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE cong_dan (id integer PRIMARY KEY, so_dinh_danh text NOT NULL, "
            "ho_ten text, cap_nhat timestamp NOT NULL)"
        )
        conn.exec_driver_sql(
            "INSERT INTO cong_dan SELECT n, lpad(n::text, 12, '0'), 'Nguyễn Văn An', "
            "timestamp '2025-08-01 08:00' + (n / 3) * interval '1 second' "
            "FROM generate_series(1, 20000) n"
        )
        conn.exec_driver_sql("CREATE INDEX cong_dan_cursor ON cong_dan (cap_nhat, id)")
        conn.exec_driver_sql("ANALYZE cong_dan")
    config = SqlSourceConfig(
        source="province-01", url=postgres_store_url, entity="citizen", table="cong_dan",
        key_column="so_dinh_danh", pk_column="id", updated_at_column="cap_nhat",
        fields={"full_name": "ho_ten"}, batch_size=500, lookback_seconds=0,
    )  # fmt: skip
    adapter = SqlPollingAdapter(config)
    pages: list[tuple[str, Any]] = []

    def seen(_c: Any, _k: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "cong_dan" in statement and "LIMIT" in statement.upper():
            pages.append((statement, parameters))

    event.listen(adapter.engine, "before_cursor_execute", seen)
    try:
        state = CursorState()
        read = 0
        for page in adapter.pages(state):
            read += len(page)
            adapter.remember(state, page)
        assert read == 20000
    finally:
        adapter.close()
    statement, parameters = pages[-2]  # a page near the end, after the cursor moved on
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
    engine.dispose()
    text = json.dumps(plan)
    ranges = re.findall(r'"Index Cond": "([^"]*)"', text)
    assert any("cap_nhat >= '2025-08-01 09:" in cond for cond in ranges), text


def test_an_infinite_cursor_time_leaves_its_row_unread_and_the_source_going(
    postgres_store_url: str,
) -> None:
    """`cap_nhat = 'infinity'`: psycopg cannot read it, so not even the rows' places could be
    read, and the source stopped (fatal) at every poll. Such a row has no place in the
    cursor's order, as one without a time: never read, counted."""
    _table(
        postgres_store_url,
        "CREATE TABLE cong_dan_vo_han (id integer PRIMARY KEY, so_dinh_danh text NOT NULL, "
        "ho_ten text, cap_nhat timestamptz)",
        "INSERT INTO cong_dan_vo_han VALUES "
        "(1, '001190000001', 'An', '2025-08-01 08:00+07'), "
        "(2, '001190000002', 'Bình', 'infinity'), "
        "(3, '001190000003', 'Châu', '-infinity'), "
        "(4, '001190000004', 'Dũng', '2025-08-01 08:02+07')",
    )
    adapter = _adapter(postgres_store_url, "cong_dan_vo_han", "ho_ten")
    try:
        changes = _poll(adapter, CursorState())
        assert [(c.pk, type(c)) for c in changes] == [(1, SourceChange), (4, SourceChange)]
        assert adapter.rows_without_cursor_time() == 2
        # `adapters check` reads the newest cursor times too: it failed on `infinity`
        notes = check_warnings(adapter)
        assert any("2 rows have no cap_nhat (or an infinite one)" in note for note in notes)
    finally:
        adapter.close()


def test_a_source_session_is_bounded_on_the_province_s_server(postgres_store_url: str) -> None:
    """No statement or idle transaction limit and the kernel's keepalive (two hours): a
    query hung by a network partition held the producer's thread and the server's
    session for hours. A URL's own options win."""
    from producers.sdk import source_engine

    def settings(url: str) -> tuple[str, str, str]:
        engine = source_engine(url)
        try:
            with engine.connect() as conn:
                shown = [
                    conn.exec_driver_sql(f"SHOW {name}").scalar_one()
                    for name in ("statement_timeout", "idle_in_transaction_session_timeout")
                ]
                keepalive = conn.connection.driver_connection.info.get_parameters()
                return shown[0], shown[1], keepalive.get("keepalives_idle", "")
        finally:
            engine.dispose()

    assert settings(postgres_store_url) == ("10min", "5min", "10")
    separator = "&" if "?" in postgres_store_url else "?"
    own = f"{postgres_store_url}{separator}options=-c%20statement_timeout%3D1000"
    assert settings(own)[0] == "1s"
