"""The records that may have been deleted by every source (`record_deletions`), so that
the retention's tombstone purge reads an index range instead of grouping every view.

The worker runs the retention job at most once an hour, between two of its batches. Its
tombstone purge looked for records whose every view is a tombstone with one `GROUP BY`
over all of `source_views`: with 3,000,000 views and nothing to purge, 3.5-4.8 s on the
development machine (batches wait meanwhile); at national scale, hundreds of millions of
views grouped by record, by every worker, every hour. Now a batch notes each record it
leaves with no canonical record (a `source purge` too), and the job checks the notes that
are due.

The upgrade notes, once, every record whose views are all tombstones, at its newest
tombstone's time. A worker of a release before goes on deleting records without noting
them: stop the workers first (docs/deploy.md, "Upgrades"); the fill runs again a day later
all the same (`store.fills`). The downgrade drops the table.

Revision ID: 0012
Revises: 0011
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from store.fills import CATCH_UP_AFTER, FILL_DELETIONS, catch_up_row
from store.tables import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "record_deletions",
        sa.Column("entity", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("deleted_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_record_deletions_deleted_at", "record_deletions", ["deleted_at"])
    op.execute(FILL_DELETIONS)
    op.execute(catch_up_row(datetime.now(UTC)))


def downgrade() -> None:
    op.execute(f"DELETE FROM store_meta WHERE name = '{CATCH_UP_AFTER}'")
    op.drop_index("ix_record_deletions_deleted_at", table_name="record_deletions")
    op.drop_table("record_deletions")
