"""The SQLite store's write-ahead log: a long read (an `export` into a slow pipe) keeps it
from being reset, and it grew without bound under a drain (1.4 GB) and stayed that size
while the worker ran. With `journal_size_limit` the next reset after the read cuts it
back, by the worker's own commits (SQLite's automatic checkpoints)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import store.engine
from store import Store


def test_the_log_is_cut_back_after_a_long_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 4 * 1024 * 1024
    monkeypatch.setattr(store.engine, "SQLITE_WAL_LIMIT_BYTES", limit)  # a test's smaller one
    path = tmp_path / "store.db"
    target = Store(f"sqlite:///{path}")
    target.create_schema()
    with target.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE filler (x BLOB)")
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM records").fetchone()  # holds a snapshot
    for _ in range(40):
        with target.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO filler VALUES (randomblob(250000))")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 2 * limit  # the read held it
    reader.rollback()
    reader.close()
    for _ in range(1200):  # small commits: the automatic checkpoints, as a worker's
        with target.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO filler VALUES (randomblob(100))")
    assert wal.stat().st_size <= limit
    target.close()
