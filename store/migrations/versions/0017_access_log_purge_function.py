"""The access log's retention purge as a function that runs as the store's owner.

On PostgreSQL, `portal_sync_purge_access_log(before, max_rows)` deletes at most `max_rows`
access log rows written before `before` (naive UTC, as the table holds it), the oldest
first, and returns how many. It runs with its owner's rights (`SECURITY DEFINER`) and with
`portal_sync.access_log_purge` set for its own duration only, which the append-only trigger
(0005) lets through. So the role the worker and the commands use needs no right to delete
from `access_log` at all: `portal-sync store grant ROLE` gives it `SELECT` and `INSERT`
there and `EXECUTE` here, and sets the function's `portal_sync.access_log_floor_days`: the
function never deletes a row younger than that, whatever it is asked (0 here: a store
whose one role owns everything purges as before). Nobody but its owner may run it until a
grant says so. SQLite has no roles: nothing changes there.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

from store.roles import purge_function
from store.schema import PURGE_FUNCTION

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = bind.exec_driver_sql("SELECT quote_ident(current_schema())").scalar_one()
    op.execute(purge_function(schema, floor_days=0))
    op.execute(f"REVOKE ALL ON FUNCTION {PURGE_FUNCTION} FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {PURGE_FUNCTION}")
