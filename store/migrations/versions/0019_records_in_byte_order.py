"""The records' `entity` and `key` compare byte by byte on PostgreSQL (the `C` collation).

`export` and `rebuild --compare` read the records in the key's byte order, as on SQLite,
so that a dump is the same on either backend. On a database created with a locale (a
Debian cluster's default), no index served that order: each read sorted the whole table
and held one snapshot until its end, at national scale hours during which vacuum reclaimed
nothing in the database. With the columns in `C`, the primary key is in that order and the
reads go page by page, a short transaction each.

PostgreSQL changes a column's collation without rewriting the table, but rebuilds the
primary key under an exclusive lock: at national scale (about 100 million records) plan
minutes in which the workers wait (they retry). SQLite compares bytes already: nothing to
do there. The downgrade gives the columns the database's default collation back.

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"ALTER TABLE records ALTER COLUMN entity TYPE varchar(16) COLLATE {collation},"
        f" ALTER COLUMN key TYPE varchar(64) COLLATE {collation}"
    )


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('pg_catalog."default"')
