"""The access log's retention purge as a function that runs as the store's owner.

On PostgreSQL, `portal_sync_purge_access_log(before, max_rows)` deletes at most `max_rows`
access log rows written before `before` (naive UTC, as the table holds it), the oldest
first, and returns how many. It runs with its owner's rights (`SECURITY DEFINER`) and sets
`portal_sync.access_log_purge` around its own DELETE only, which the append-only trigger
(0005) lets through. So the role the worker and the commands use needs no right to delete
from `access_log` at all: `portal-sync store grant ROLE` gives it `SELECT` and `INSERT`
there and `EXECUTE` here, and writes the function again with a floor: it never deletes a
row younger than that many days, whatever it is asked (0 here: a store whose one role owns
everything purges as before). Nobody but its owner may run it, except a role that may
delete from the log when this runs (a commands' role made by hand): its purge goes on
through the function. SQLite has no roles: nothing changes there. (The function's text is
store/roles.py's: a change to it needs a migration of its own.)

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


# The roles that may delete from the log now (a commands' role made by hand, as the docs
# once advised): they purged with the setting and a DELETE, and keep purging through the
# function. `store grant` then takes the DELETE away.
DELETERS = """
SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
WHERE c.oid = 'access_log'::regclass AND a.privilege_type = 'DELETE'
  AND a.grantee <> c.relowner
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = bind.exec_driver_sql(
        "SELECT pg_catalog.quote_ident(pg_catalog.current_schema()::text)"
    ).scalar_one()
    op.execute(purge_function(schema, floor_days=0))
    # The log's owner's, whoever runs this (a superuser's would run as the superuser and
    # be the log owner's to neither run nor replace)
    owner = bind.exec_driver_sql(
        "SELECT c.relowner::regrole::text FROM pg_catalog.pg_class c"
        " WHERE c.oid = 'access_log'::regclass"
    ).scalar_one()
    op.execute(f"ALTER FUNCTION {PURGE_FUNCTION} OWNER TO {owner}")
    op.execute(f"REVOKE ALL ON FUNCTION {PURGE_FUNCTION} FROM PUBLIC")
    for (grantee,) in bind.exec_driver_sql(DELETERS).all():
        op.execute(f"GRANT EXECUTE ON FUNCTION {PURGE_FUNCTION} TO {grantee}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {PURGE_FUNCTION}")
