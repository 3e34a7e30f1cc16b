"""A store's start: its revision read without Alembic, what the worker's process loads,
and a connection that fails in time."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

import store.engine
from schemas.errors import ConfigurationError
from store import schema
from store.core import Store

ROOT = Path(__file__).resolve().parents[2]


def test_the_head_constant_is_the_migration_scripts_head() -> None:
    # A new migration must move HEAD_REVISION: else every worker would refuse its own store.
    assert schema.head_revision() == schema.script_head()


def test_the_revisions_are_numbered_in_order() -> None:
    """A store newer than the code is told by its revision's number (`schema._newer`)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(schema._config())
    ids = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    assert ids == [f"{n:04d}" for n in range(1, len(ids) + 1)]


def test_a_store_newer_than_the_code_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A later release upgraded the store (a rolling upgrade): this one said "run
    `portal-sync store upgrade`", which then failed in Alembic with a traceback."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    new = Store(url)
    new.create_schema()
    new.close()
    engine = create_engine(url)
    later = f"{int(schema.head_revision()) + 1:04d}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{later}'")
    for check in (schema.require_current, schema.ensure_current, schema.upgrade):
        with pytest.raises(schema.SchemaNewer, match=f"{later}, newer than this version"):
            check(engine)
    assert schema.current_revision(engine) == later
    engine.dispose()


def test_revision_of_a_new_a_current_and_a_first_schema_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine(url)
    assert schema.current_revision(engine) is None  # an empty database
    new = Store(url)  # a new store: created at the head
    new.create_schema()
    new.engine.dispose()
    assert schema.current_revision(engine) == schema.head_revision()
    with engine.begin() as conn:  # a store made before migrations had no version table
        conn.exec_driver_sql("DROP TABLE alembic_version")
    assert schema.current_revision(engine) == schema.FIRST_REVISION
    with engine.begin() as conn:  # nor a row in it (Alembic's reading: no revision)
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    assert schema.current_revision(engine) == schema.FIRST_REVISION
    engine.dispose()


def test_a_version_table_naming_two_revisions_is_refused(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('0003'), ('a1b2c3')")
    with pytest.raises(ConfigurationError, match="2 revisions"):
        schema.current_revision(engine)
    engine.dispose()


def test_the_worker_process_loads_neither_alembic_nor_the_orm(tmp_path: Path) -> None:
    """Each worker (and `portal-sync` command) checks its store at start; Alembic, with Mako
    and Pygments, and SQLAlchemy's ORM took 15 MB of a worker's memory for nothing."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    new = Store(url)
    new.create_schema()
    new.engine.dispose()
    probe = (
        "import json, sys\n"
        "import portal_sync.cli, portal_sync.ops.worker, store.purge\n"
        "from store.core import Store\n"
        f"Store({url!r}).require_schema()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('alembic', 'mako', 'pygments') or m.startswith('sqlalchemy.orm'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_a_postgresql_server_that_never_answers_fails_the_connection_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a connect timeout a server that accepts and never answers (or drops the
    packets) held a worker's start, a retry or the lag exporter's read for minutes."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    url = f"postgresql+psycopg://u:p@127.0.0.1:{silent.getsockname()[1]}/db"
    monkeypatch.setattr(store.engine, "CONNECT_TIMEOUT_SECONDS", 1)
    try:
        for target, limit in ((url, 1), (url + "?connect_timeout=2", 2)):  # the URL's wins
            engine = store.engine.create_store_engine(target)
            began = time.monotonic()
            with pytest.raises(OperationalError):
                engine.connect()
            assert limit - 0.5 < time.monotonic() - began < limit + 3
            engine.dispose()
    finally:
        silent.close()
