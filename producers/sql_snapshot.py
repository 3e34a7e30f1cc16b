"""PostgreSQL snapshot capture for the `sql` adapter: which rows a poll must read again.

Every row version carries in its system column `xmin` the (32-bit) id of the transaction
that wrote it. A poll records `pg_snapshot_xmin(pg_current_snapshot())` before its first
query: every transaction below that id had ended by then, so a transaction the poll could
not see (still open, or begun later) has an id at or above it, whatever `updated_at` it
wrote. The next poll therefore reads, besides the rows after its cursor, the rows behind
the cursor whose `xmin` lies in [recorded xmin, `xmax` of the query's own snapshot): a row
committed by a transaction held open across any number of polls is read by the first poll
that can see it. The rows read again because their transaction was already visible are
recognised from the state (same version, same content) and not sent twice.

`xmin` has no epoch: it is placed on the 64-bit (`xid8`) scale modulo 2^32 relative to the
recorded xmin, as PostgreSQL compares transaction ids itself. Every unfrozen row version
lies within 2^31 transactions of the current one, so for them the test is exact; a
*frozen* row keeps its old id, and after 2^32 further transactions it may fall in the range
again: it is then read once more and, once forgotten by the state, sent again as a late row
(above every version sent, `sql_polling`): the same values applied once more. Nothing is
ever missed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Text, cast, func, literal_column, select, text
from sqlalchemy.engine import Connection, Engine

WRAP = 2**32
XID_LABEL = "portal_sync_row_xid"  # the extra result column: the row's xid8


def _as_int(expression: Any) -> Any:
    """An xid or xid8 expression as a bigint (through its text form)."""
    return cast(cast(expression, Text), BigInteger)


def _wrap() -> Any:
    return literal_column(str(WRAP), BigInteger)


def snapshot_xmax() -> Any:
    """The first transaction id the statement's snapshot cannot see (xid8 as bigint)."""
    return _as_int(func.pg_snapshot_xmax(func.pg_current_snapshot()))


def _row_xid() -> Any:
    return _as_int(literal_column("xmin"))


def row_xid8() -> Any:
    """The row version's writer as xid8: the id below the snapshot's xmax with its low bits."""
    xmax = snapshot_xmax()
    behind = ((xmax - _row_xid()) % _wrap() + _wrap()) % _wrap()
    return (xmax - behind).label(XID_LABEL)


def written_since(xmin8: int) -> Any:
    """Rows written by a transaction with an id in [xmin8, the statement snapshot's xmax)."""
    low = literal_column(str(xmin8 % WRAP), BigInteger)
    span = snapshot_xmax() - literal_column(str(xmin8), BigInteger)
    return (_row_xid() - low + _wrap()) % _wrap() < span


def current_xmin_xmax(conn: Connection) -> tuple[int, int]:
    """The xmin and xmax (xid8) of a snapshot taken now."""
    snapshot = func.pg_current_snapshot()
    query = select(
        _as_int(func.pg_snapshot_xmin(snapshot)), _as_int(func.pg_snapshot_xmax(snapshot))
    )
    xmin, xmax = conn.execute(query).one()
    return int(xmin), int(xmax)


def is_plain_table(engine: Engine, name: str) -> bool:
    """Whether `name` is a table (or partitioned table) whose rows carry their own `xmin`;
    views, materialised views and foreign tables do not."""
    with engine.connect() as conn:
        kind = conn.execute(
            # the name as one identifier, as the adapter reflects it
            text("SELECT relkind FROM pg_class WHERE oid = to_regclass(quote_ident(:name))"),
            {"name": name},
        ).scalar()
    return kind in ("r", "p")


def longest_transaction_seconds(engine: Engine) -> float | None:
    """How long the oldest open transaction that wrote (holds a transaction id) of another
    client session on this database has been running, as far as this role can see in
    `pg_stat_activity` (None: none seen). Read-only transactions commit no rows."""
    query = text(
        "SELECT max(extract(epoch FROM clock_timestamp() - xact_start)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' AND xact_start IS NOT NULL "
        "AND backend_xid IS NOT NULL"
    )
    with engine.connect() as conn:
        seconds = conn.execute(query).scalar()
    return None if seconds is None else float(seconds)
