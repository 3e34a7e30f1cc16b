"""The records' key order on PostgreSQL is the bytes', whatever the database's locale
(migration 0019): `export` and `rebuild --compare` read page by page along the primary
key, without a sort of the table and without a snapshot held between pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from store.core import Store
from tests.support.store_helpers import put_records, record_page_statements

# Byte order: upper case before lower; a locale's (ICU en-US): a1 A2 b0 B1.
KEYS = ["a1", "B1", "b0", "A2", "a-1", "a.1", "A10"]


@pytest.fixture
def locale_store_url(postgres_store_url: str) -> Iterator[str]:
    """A database whose default collation is a locale's (ICU en-US), as a cluster created
    with a locale gives every database."""
    name = f"icu_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_store_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
            )
        )
    try:
        yield postgres_store_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_records_are_read_in_the_keys_byte_order_on_a_database_with_a_locale(
    locale_store_url: str,
) -> None:
    store = Store(locale_store_url)
    try:
        store.create_schema()
        put_records(store, KEYS)
        put_records(store, ["B1", "a1"], entity="citizen")
        with store.engine.connect() as conn:  # the database's own order is not the bytes'
            ordered = conn.execute(
                text("SELECT key FROM (VALUES ('a1'), ('A2')) v(key) ORDER BY key")
            )
            assert ordered.scalars().all() == ["a1", "A2"]
        expected = sorted(KEYS, key=str.encode)
        assert [k for _, k, *_ in store.iter_records("dossier")] == expected
        assert [k for _, k, *_ in store.iter_records("dossier", page=2)] == expected
        assert [(e, k) for e, k, *_ in store.iter_records(page=3)] == [
            ("citizen", "B1"),
            ("citizen", "a1"),
            *(("dossier", k) for k in expected),
        ]
    finally:
        store.close()


def test_a_page_is_read_along_the_primary_key_and_no_snapshot_is_held_between_pages(
    locale_store_url: str,
) -> None:
    store = Store(locale_store_url)
    try:
        store.create_schema()
        put_records(store, [f"{n:06d}" for n in range(5_000)] + KEYS)
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE records"))
        with record_page_statements(store) as statements:
            read = store.iter_records("dossier", page=100)
            next(read)
            next(read)  # the second page's statement: keyset from the first's last key
            for _ in range(100):
                next(read)
        with store.engine.connect() as conn:
            # A snapshot held while the reader pauses keeps vacuum from every row the
            # workers replace meanwhile, for as long as an export of the country runs.
            open_elsewhere = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND (backend_xmin IS NOT NULL"
                    " OR state LIKE 'idle in transaction%')"
                )
            ).scalar_one()
            assert open_elsewhere == 0
        assert len(statements) == 2
        with store.engine.connect() as conn:
            for statement, parameters in statements:
                plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars())
                assert "Index Scan using records_pkey" in plan, plan
                assert "Sort" not in plan, plan
        assert len(list(read)) == 5_007 - 102
    finally:
        store.close()
