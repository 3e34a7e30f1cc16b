"""The count of record writes by anything but a live batch (`store_meta` row
`record_writes`): a worker that keeps the records it applied (`consumers.cache`) trusts
them only while this count stands still, and every replay, remerge, source purge, tombstone
purge, offset reset and skip of this version counts itself in it. Releases before it do not:
this revision makes them refuse the store (a store newer than they know), so that none of
them writes records behind a worker's back.

The row starts at 0; the downgrade removes it.

Revision ID: 0010
Revises: 0009
"""

from datetime import UTC, datetime

from alembic import op

from store.times import utc_text

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO store_meta (name, value, updated_at)"
        f" SELECT 'record_writes', '0', '{utc_text(datetime.now(UTC))}'"
        " WHERE NOT EXISTS (SELECT 1 FROM store_meta WHERE name = 'record_writes')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM store_meta WHERE name = 'record_writes'")
