"""The batches' journal (`apply_journal`) gets a retention: on PostgreSQL its purge as a
function that runs as the store's owner. No index: the purge takes the oldest rows by id
(an index of the time, built in this migration's transaction, held every batch's insert
into the journal for as long as the build of a large table took).

The journal gained a row per partition per committed batch and was never deleted from:
at a national load (24 partitions, batches back to back) billions of rows a year. The
worker's retention job now deletes rows older than `PORTAL_SYNC_JOURNAL_RETENTION_DAYS`
(30). On PostgreSQL the role the worker runs as only appends to the journal (`store
grant`), so the job calls `portal_sync_purge_apply_journal(before, max_rows)`, which runs
with its owner's rights (`SECURITY DEFINER`) and never deletes a row younger than
`store.roles.JOURNAL_FLOOR_DAYS` (7), whatever it is asked; `store grant` lets the role run
it. SQLite has no roles: the job deletes the rows itself. (The function's text is
store/roles.py's: a change to it needs a migration of its own.)

Revision ID: 0018
Revises: 0017
"""

from alembic import op

from store.roles import journal_purge_function
from store.schema import JOURNAL_PURGE_FUNCTION

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = bind.exec_driver_sql(
        "SELECT pg_catalog.quote_ident(pg_catalog.current_schema()::text)"
    ).scalar_one()
    op.execute(journal_purge_function(schema))
    owner = bind.exec_driver_sql(
        "SELECT c.relowner::regrole::text FROM pg_catalog.pg_class c"
        " WHERE c.oid = 'apply_journal'::regclass"
    ).scalar_one()
    op.execute(f"ALTER FUNCTION {JOURNAL_PURGE_FUNCTION} OWNER TO {owner}")
    op.execute(f"REVOKE ALL ON FUNCTION {JOURNAL_PURGE_FUNCTION} FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {JOURNAL_PURGE_FUNCTION}")
