"""A store whose disk is full says so: a SQLite commit that failed for it has no statement,
and was reported as a failure to connect (a fault review: the store's directory filled
during a drain). Retried as any failure of the store is; nothing is lost."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.exc import DBAPIError

from store.failures import SQLITE_FULL, StoreUnavailable, translated


def _full() -> sqlite3.OperationalError:
    """SQLite's own error for a full database (its page limit reached)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.execute("PRAGMA max_page_count = 4")
        with pytest.raises(sqlite3.OperationalError) as raised:
            for _ in range(100):
                conn.execute("INSERT INTO t VALUES (randomblob(4000))")
        return raised.value
    finally:
        conn.close()


def test_a_full_sqlite_store_is_named_so_in_a_statement_and_in_a_commit() -> None:
    error = _full()
    assert error.sqlite_errorname == "SQLITE_FULL"
    with pytest.raises(StoreUnavailable) as statement, translated():
        raise error
    with pytest.raises(StoreUnavailable) as commit, translated():
        raise DBAPIError(None, None, error)  # SQLAlchemy's wrapper of a failed commit
    assert str(statement.value) == str(commit.value) == SQLITE_FULL


def test_a_store_that_cannot_be_opened_is_still_a_failure_to_connect() -> None:
    try:
        sqlite3.connect("file:/nonexistent/dir/store.db?mode=rw", uri=True)
    except sqlite3.OperationalError as error:
        with pytest.raises(StoreUnavailable, match=r"^cannot connect to the store"), translated():
            raise DBAPIError(None, None, error) from None
    else:
        pytest.fail("opened")
