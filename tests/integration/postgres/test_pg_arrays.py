"""The batch's binary arrays (`store.pg_arrays`) as a real PostgreSQL reads them: typed as
the statements cast them, NULLs and empty arrays included, and text PostgreSQL cannot hold
refused by the server as a data error."""

from __future__ import annotations

import orjson
import psycopg
import pytest

from store.core import Store
from store.pg_arrays import bigint_array, bool_array, int_array, text_array, utf8_array


def test_arrays_read_back_as_sent(postgres_store_url: str) -> None:
    store = Store(postgres_store_url)  # registers the dumpers before its first connection
    document = {"họ_tên": "Nguyễn Văn Ân", "địa_chỉ": {"tỉnh": "79"}, "n": [1, 2.5, None]}
    try:
        with store.engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            cursor = dbapi.cursor()
            cursor.execute(
                "SELECT %b::text[], pg_typeof(%b), %b::bigint[], %b::int[], %b::bool[],"
                " (SELECT array_agg(CAST(j AS json)::text) FROM unnest(%b::text[]) AS j),"
                " cardinality(%b::text[]), cardinality(%b::bigint[])",
                [
                    text_array(["092180003839", "Phan Thị Oanh", ""]),
                    text_array(["a"]),
                    bigint_array([-(2**63), 0, 2**63 - 1]),
                    int_array([0, 11, -(2**31)]),
                    bool_array([True, False]),
                    utf8_array([orjson.dumps(document), None]),
                    text_array([]),
                    bigint_array([]),
                ],
            )
            row = cursor.fetchone()
            conn.rollback()
    finally:
        store.close()
    assert row is not None
    texts, typed, bigints, ints, bools, documents, empty_text, empty_bigint = row
    assert texts == ["092180003839", "Phan Thị Oanh", ""]
    assert typed == "text[]"
    assert bigints == [-(2**63), 0, 2**63 - 1]
    assert ints == [0, 11, -(2**31)]
    assert bools == [True, False]
    assert documents[1] is None and orjson.loads(documents[0]) == document
    assert (empty_text, empty_bigint) == (0, 0)


def test_text_postgresql_cannot_hold_is_refused_by_the_server(postgres_store_url: str) -> None:
    store = Store(postgres_store_url)
    try:
        with store.engine.connect() as conn:
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            for bad in (text_array(["ok", "nul\x00inside"]), utf8_array([b"\xff\xfe"])):
                with pytest.raises(psycopg.DataError):
                    dbapi.cursor().execute("SELECT %b::text[]", [bad])
                dbapi.rollback()
    finally:
        store.close()
