"""The store's failures, and the drivers' errors translated into the project's families
(`schemas.errors`): a value the database refuses is a record error, an unreachable or
failing database transient. Messages name a type or a fixed text, never a value."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    SQLAlchemyError,
    StatementError,
)

from schemas.dead_letter import Reason
from schemas.errors import RecordError, Refused, TransientError
from schemas.redaction import redacted_text


class StoreUnavailable(TransientError):
    """The database cannot be reached or failed: retry the same work."""


class StoreMisconfigured(StoreUnavailable):
    """The database refuses this session's statements for its setup, not for a value: a
    grant missing (a table a store upgrade added, `store grant` not run yet), a table,
    column or function missing (a schema older or newer than this release). Retried as
    an outage is (a rollout's upgrade and grant may be a moment apart), but named: it was
    "the store failed: ProgrammingError", the cause in no log, metric or alert."""


class LockTableFull(StoreUnavailable):
    """PostgreSQL's shared lock table is full (SQLSTATE 53200, out of shared memory): each
    batch holds an advisory lock per record until it commits. Retried as an outage; the
    worker applies a batch that keeps failing so in halves, which need half the locks."""


# SQLSTATEs of a session's setup, by their condition's name.
MISCONFIGURED = {
    "42501": "insufficient privilege (a grant missing: `portal-sync store grant`)",
    "42P01": "undefined table (a schema not this release's: `portal-sync store upgrade`)",
    "42703": "undefined column (a schema not this release's: `portal-sync store upgrade`)",
    "42883": "undefined function (a schema not this release's: `portal-sync store upgrade`)",
}


class OffsetGap(Refused):
    """A batch does not start at a partition's next offset: committing it would skip
    events. Never committed; the worker must resume from the store's offsets."""


class StoreRefused(RecordError):
    """The database refused a value of this batch (found by narrowing the batch down)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(Reason.APPLY_FAILED, f"the store refused it: {type(error).__name__}")


@contextmanager
def translated() -> Iterator[None]:
    """Driver errors as the project's families (the message names the type, never values):
    a value the database refuses is a record error; an unreachable or failing database is
    transient. Works for SQLAlchemy's wrappers and for the DBAPI's own errors (PEP 249),
    which the batch path raises directly."""
    try:
        yield
    except (DataError, IntegrityError) as error:
        raise StoreRefused(error) from None
    except DBAPIError as error:
        _raise_if_misconfigured(error)
        _raise_if_lock_table_full(error)
        raise StoreUnavailable(_failure(error)) from None
    except StatementError as error:  # a parameter could not be converted: the value's fault
        raise StoreRefused(error) from None
    except SQLAlchemyError as error:
        raise StoreUnavailable(f"the store failed: {type(error).__name__}") from None
    except Exception as error:
        family = _dbapi_family(error)
        if family == "refused":
            raise StoreRefused(error) from None
        if family == "unavailable":
            _raise_if_misconfigured(error)
            _raise_if_lock_table_full(error)
            raise StoreUnavailable(_statement_failure(error)) from None
        raise


def _raise_if_misconfigured(error: BaseException) -> None:
    """StoreMisconfigured for an error of a setup's SQLSTATE, named by its condition,
    never by the server's message."""
    driver = error if (orig := getattr(error, "orig", None)) is None else orig
    state = getattr(driver, "sqlstate", None)
    if isinstance(state, str) and state in MISCONFIGURED:
        raise StoreMisconfigured(
            f"the store refused this session's statement: {MISCONFIGURED[state]} (SQLSTATE {state})"
        ) from None


# SQLSTATE 53200, out of shared memory: on the batch path, PostgreSQL's lock table is full
# (each batch holds an advisory lock per record it merges until it commits).
OUT_OF_SHARED_MEMORY = "53200"
LOCK_TABLE_FULL = (
    "the store failed: out of shared memory (PostgreSQL's lock table is full: raise "
    'max_locks_per_transaction, docs/operations.md "Sizing PostgreSQL")'
)


def _raise_if_lock_table_full(error: BaseException) -> None:
    driver = error if (orig := getattr(error, "orig", None)) is None else orig
    if getattr(driver, "sqlstate", None) == OUT_OF_SHARED_MEMORY:
        raise LockTableFull(LOCK_TABLE_FULL) from None


def _failure(error: DBAPIError) -> str:
    """What failed: connecting says why (the driver names the server and the cause, e.g. a
    certificate it could not verify; secret-looking parts masked); a statement that
    failed is named by its type only (its message may quote values)."""
    if error.statement is None and error.orig is not None and not _sqlite_full(error.orig):
        lines = [line.strip() for line in str(error.orig).splitlines() if line.strip()]
        return "cannot connect to the store: " + redacted_text("; ".join(lines))
    return _statement_failure(error)


def _statement_failure(error: BaseException) -> str:
    """A failed statement by its type, or by a fixed text for a condition an operator can
    fix (never the server's message, which may quote values). SQLAlchemy's wrappers carry
    the driver's error as `orig`."""
    driver = error if (orig := getattr(error, "orig", None)) is None else orig
    state = getattr(driver, "sqlstate", None)
    if state == OUT_OF_SHARED_MEMORY:
        return LOCK_TABLE_FULL
    # PostgreSQL's lock_timeout, SQLite's busy timeout: fixed texts, never data
    if state == LOCK_NOT_AVAILABLE or str(driver) in SQLITE_LOCKED:
        return STORE_LOCKED
    if _sqlite_full(driver):
        return SQLITE_FULL
    return f"the store failed: {type(error).__name__}"


# SQLite's disk (or its max_page_count) full: a commit that fails so has no statement, and
# read as a failure to connect before (a fault review).
SQLITE_FULL = "the store failed: its disk is full (SQLITE_FULL)"


def _sqlite_full(driver: BaseException) -> bool:
    return getattr(driver, "sqlite_errorname", None) == "SQLITE_FULL"


LOCK_NOT_AVAILABLE = "55P03"
SQLITE_LOCKED = ("database is locked", "database table is locked")
STORE_LOCKED = (
    "the store is locked by another session longer than this one waits (an operator's "
    "write, a schema upgrade, another worker's start)"
)


# What libpq says of a connection the server refused for a setting, not for being away:
# waited for, the worker retried for ever with /readyz false and nothing else to go on.
# (The server's messages in English, its default `lc_messages`.)
REFUSED_SETTINGS = (
    "password authentication failed",
    'database "',  # database "x" does not exist
    'role "',  # role "x" does not exist
    "no pg_hba.conf entry",
    "authentication failed",
    "certificate verify failed",
)


def refused_setting(error: StoreUnavailable) -> bool:
    """Whether a failure to connect names a setting to fix (a password, a database, a
    role, a certificate) rather than a server away."""
    text = str(error)
    return text.startswith("cannot connect to the store:") and any(
        sign in text for sign in REFUSED_SETTINGS
    )


def _dbapi_family(error: Exception) -> str | None:
    """PEP 249 exception classes by name (psycopg, sqlite3): which family they are."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "Error" not in names or type(error).__module__.split(".")[0] not in ("psycopg", "sqlite3"):
        return None
    if names & {"DataError", "IntegrityError"}:
        return "refused"
    return "unavailable"
