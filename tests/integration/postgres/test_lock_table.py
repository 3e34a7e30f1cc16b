"""PostgreSQL's shared lock table and the batches' advisory locks (one per record merged,
held until the commit). A table too small for a batch fails it as transient, with nothing
written and a message that names the setting to raise; the worker warns at start when the
table holds fewer than a few workers' full batches. On a server of its own with a small
table (max_locks_per_transaction 10 × 20 connections)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import Table, create_engine, func, select, text

from portal_sync.ops.worker import LOCK_TABLE_BATCHES, _check_lock_capacity
from store.core import Store
from store.failures import LOCK_TABLE_FULL, StoreUnavailable
from store.tables import applied_offsets, records
from tests.conftest import _unavailable
from tests.support.postgres_server import PostgresUnavailable, start_postgres
from tests.support.store_helpers import Feed, event


@pytest.fixture
def small_lock_table() -> Iterator[str]:
    try:
        server = start_postgres(
            settings={"max_locks_per_transaction": "10", "max_connections": "20"}
        )
    except PostgresUnavailable as error:
        _unavailable("PostgreSQL", error)
    try:
        engine = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text('CREATE DATABASE "locks"'))
        engine.dispose()
        yield server.url("locks")
    finally:
        server.stop()


def citizens(count: int, first: int = 0) -> list[bytes]:
    return [
        event("citizen", f"0791900{n:05d}", "province-79", 1, {"full_name": "Nguyễn Văn An"})
        for n in range(first, first + count)
    ]


def count(store: Store, table: Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_a_batch_beyond_the_lock_table_is_transient_and_writes_nothing(
    small_lock_table: str,
) -> None:
    store = Store(small_lock_table)
    try:
        store.create_schema()
        assert store.lock_capacity() == 10 * (20 + 0)
        feed = Feed(store)
        # Thousands of records in one batch: far more locks than the table holds (it has
        # some slack over its nominal size, never this much).
        with pytest.raises(StoreUnavailable) as failed:
            feed.apply(*citizens(5000))
        assert str(failed.value) == LOCK_TABLE_FULL
        assert count(store, records) == 0 and count(store, applied_offsets) == 0
        # The same events in batches the table holds: all applied (as the worker applies
        # a batch the table refuses three times in a row: in halves, test_worker_errors).
        feed.offset = 0
        for start in range(0, 5000, 100):
            feed.apply(*citizens(100, start))
        assert count(store, records) == 5000
    finally:
        store.close()


def test_the_worker_warns_when_few_batches_fit(
    small_lock_table: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(small_lock_table)
    try:
        with caplog.at_level(logging.WARNING, logger="portal_sync.ops.worker"):
            _check_lock_capacity(store, batch_max_events=200 // LOCK_TABLE_BATCHES)
            assert not caplog.records  # four batches of 50 fit in 200
            _check_lock_capacity(store, batch_max_events=2000)
        (warning,) = caplog.records
        assert "max_locks_per_transaction" in warning.getMessage()
        assert "sized for 200 locks" in warning.getMessage()
    finally:
        store.close()


def test_sqlite_has_no_lock_table(sqlite_store_url: str) -> None:
    store = Store(sqlite_store_url)
    try:
        assert store.lock_capacity() is None
    finally:
        store.close()
