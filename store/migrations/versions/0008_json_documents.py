"""JSON documents as `json` (their text) instead of `jsonb` on PostgreSQL: the views' data,
the records' data, sources and provenance, the history's changes and the conflicts' groups.

The store writes and reads whole documents and never looks inside one in SQL. `jsonb`
parses every document into its binary form when it is written and prints it back when it
is read; `json` checks the text and keeps it. On the peer bench's 100,000 citizen events
(docs/performance-log.md, ninth round) the worker's statements took 22 % less of PostgreSQL's
time (5,995 → 4,643 ms, three alternating pairs), PostgreSQL's CPU 21 % less. Readers see
the same values; the field order of a document is now the order it was written in (the
records' fields are written sorted), which `export` sorts anyway.

Each `ALTER` rewrites its table (PostgreSQL holds an exclusive lock on it meanwhile):
upgrade with the workers stopped (docs/deploy.md lists the migrations that need it).
SQLite keeps JSON as text already: nothing to do there. The downgrade converts back to `jsonb`.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COLUMNS = {
    "source_views": ("data",),
    "records": ("data", "sources", "provenance"),
    "record_history": ("changes",),
    "field_conflicts": ("sources",),
}


def _convert(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(
            f"ALTER COLUMN {column} TYPE {to} USING {column}::{to}" for column in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")  # one rewrite per table


def upgrade() -> None:
    _convert("json")


def downgrade() -> None:
    _convert("jsonb")
