"""The records' `entity` and `key` compare byte by byte on PostgreSQL (the `C` collation).

`export` and `rebuild --compare` read the records in the key's byte order, as on SQLite,
so that a dump is the same on either backend. On a database created with a locale (a
Debian cluster's default), no index served that order: each read sorted the whole table
and held one snapshot until its end, at national scale hours during which vacuum reclaimed
nothing in the database. With the columns in `C`, the primary key is in that order and the
reads go page by page, a short transaction each.

PostgreSQL changes a column's collation without rewriting the table, but rebuilds the
primary key under an exclusive lock: at national scale (about 100 million records) plan
minutes in which the workers wait (they retry). The lock is waited for at most
`LOCK_WAIT`: while the migration waits, every read and write of the records queues behind
it, and an `export` or `rebuild --compare` of the release before holds the table for as
long as it reads (then `store upgrade` fails, "the store is locked by another session":
run it again once they are done). The column's statistics go with its type: the table is
analysed again (a sample, seconds). SQLite compares bytes already: nothing to do there. The
downgrade gives the columns the database's default collation back.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


LOCK_WAIT = "30s"


def _collate(collation: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    before = bind.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar_one()
    bind.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)", (LOCK_WAIT,))
    op.execute(
        f"ALTER TABLE records ALTER COLUMN entity TYPE varchar(16) COLLATE {collation},"
        f" ALTER COLUMN key TYPE varchar(64) COLLATE {collation}"
    )
    bind.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)", (before,))
    op.execute("ANALYZE records")


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('pg_catalog."default"')
