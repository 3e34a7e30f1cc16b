"""The store's engine: its URL read and checked, SQLite's pragmas and locking, PostgreSQL's
isolation, timeouts and keepalives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from schemas.errors import ConfigurationError
from schemas.json_text import loads_exact
from store.pg_arrays import register_dumpers

# How long a statement waits for another connection's lock on a SQLite store before it
# fails as StoreUnavailable (PostgreSQL's default: no limit). A statement waits inside the
# driver's call, where nothing else can stop it: the worker gives both a short
# `lock_wait` and retries, so that a stop is seen whoever holds a lock.
SQLITE_LOCK_WAIT_SECONDS = 60.0
SQLITE_WAL_LIMIT_BYTES = 64 * 1024 * 1024


STORE_URL_FORMS = (
    "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE "
    "(PORTAL_SYNC_STORE_URL, PORTAL_SYNC_STORE_URL_FILE or --store)"
)


def store_url(url: str) -> URL:
    """The store's URL read, with the one driver each backend has here: `postgres://` and
    `postgresql://` (libpq's and most tools' spellings) are psycopg's. Anything else is a
    configuration error naming the forms; never the URL, which may hold a password."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL, a port that is not a number
        raise ConfigurationError(f"the store URL does not read as one: {STORE_URL_FORMS}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgres", "postgresql") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise ConfigurationError(
        f"the store URL names {parsed.drivername!r}, which the store does not use: "
        f"{STORE_URL_FORMS}"
    )


def same_database(one: str, other: str) -> bool:
    """Whether two store URLs name the same database: one SQLite file (however its path is
    spelt), or one PostgreSQL database on one server (whichever user connects)."""
    a, b = store_url(one), store_url(other)
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        files = [u.database for u in (a, b)]
        if not all(f and f != ":memory:" and not f.startswith("file:") for f in files):
            return False
        return len({Path(str(f)).expanduser().resolve() for f in files}) == 1
    where = [(u.host or "localhost", u.port or 5432, u.database) for u in (a, b)]
    return where[0] == where[1]


# A session that holds its transaction this long without a statement is ended by
# PostgreSQL, its locks with it: far above a batch's own pauses (the dead letters'
# acknowledgement waits 60 s at most), far below a stopped process's hours. Every session
# of the store's: a worker stopped in a batch (SIGSTOP, a VM paused), or an operator's
# `replay` or `dlq redrive` suspended with Ctrl-Z, held its records' locks, and every
# worker's batch touching them retried until it was resumed.
IDLE_IN_TRANSACTION_SECONDS = 300.0


def create_store_engine(
    url: str,
    lock_wait: float | None = None,
    idle_in_transaction: float | None = IDLE_IN_TRANSACTION_SECONDS,
) -> Engine:
    """An engine for the store; SQLite gets WAL and writer transactions that lock at BEGIN;
    `lock_wait`: seconds a statement waits for a lock (SQLite's `timeout`, PostgreSQL's
    `lock_timeout`). Statement parameters are personal data: never in errors or SQL
    logging (`hide_parameters`), whatever the backend."""
    parsed = store_url(url)
    if parsed.get_backend_name() == "sqlite":
        timeout = SQLITE_LOCK_WAIT_SECONDS if lock_wait is None else lock_wait
        engine = create_engine(parsed, connect_args={"timeout": timeout}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # A long read (an `export` into a slow pipe) holds the log from being reset:
            # it grew to 1.4 GB under a drain and stayed that size while the worker ran.
            # Past this, the next reset cuts the file back.
            cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA temp_store=MEMORY")  # the batch's key tables
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            # Writers take the lock at BEGIN, so a read-then-write batch cannot deadlock.
            writer = connection.get_execution_options().get("writer", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    # JSON as psycopg reads it (a batch's views and records): orjson, a third of the time
    # of the driver's default `json.loads` (3 % of the worker's CPU on updates:
    # docs/performance-log.md), wherever it reads the same values.
    # READ COMMITTED whatever the server's or role's default: a batch takes its records'
    # locks and then reads them (and the count of other writes) in later statements, each
    # of which must see what committed before it; under REPEATABLE READ the reads would
    # keep a snapshot from before the locks were granted.
    register_dumpers()  # the batch's arrays, sent in binary as built (`store.pg_arrays`)
    # A server that cannot be reached (packets dropped) held a connection attempt for the
    # kernel's two minutes or more, a worker's start or retry with it; a URL's own
    # `connect_timeout` wins, and so does libpq's PGCONNECT_TIMEOUT.
    query = parsed.query
    given = "connect_timeout" in query or os.environ.get("PGCONNECT_TIMEOUT")
    connect_args: dict[str, Any] = {} if given else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    # A server gone without a word (a failover's old primary, a network that drops packets)
    # held a batch waiting for a statement's result or its commit for hours, until the
    # liveness probe restarted the worker: TCP keepalives give such a connection up in
    # about 25 s, and the batch retries. No `tcp_user_timeout`: on Linux it also drops a
    # live server that reads slowly while the batch's pipelined writes wait to be sent.
    # A URL's own values win, and a libpq service file's.
    service = "service" in query or os.environ.get("PGSERVICE")
    if not service and not set(KEEPALIVES) & set(query):
        connect_args.update(KEEPALIVES)
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        hide_parameters=True,
        json_deserializer=loads_exact,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )
    # Session settings: the URL's, a service file's or PGOPTIONS' own `options` stay as
    # they are. `idle_in_transaction`: a session that holds its transaction open this long
    # without a statement is ended by the server, its locks with it (above).
    settings = []
    if lock_wait is not None:
        settings.append(f"SET lock_timeout = {round(lock_wait * 1000)}")
    if idle_in_transaction is not None:
        milliseconds = round(idle_in_transaction * 1000)
        settings.append(f"SET idle_in_transaction_session_timeout = {milliseconds}")
    if settings:

        @event.listens_for(engine, "connect")
        def _session_settings(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                for statement in settings:
                    cursor.execute(statement)
            dbapi_connection.commit()

    return engine


CONNECT_TIMEOUT_SECONDS = 10
# libpq's TCP keepalives of a store connection (seconds).
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def make_parent_dir(url: str) -> None:
    """A SQLite file's directory is created (private to the user) when missing: only by
    the commands that create a store (a reading command given a mistyped path left an
    empty directory behind)."""
    parsed = store_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
