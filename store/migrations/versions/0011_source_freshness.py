"""The sources' freshness in a table of its own (`source_freshness`), kept by each batch.

A worker starts its freshness series (`portal_sync_source_last_change_timestamp_seconds`
and `…_last_applied_…`) from the store. It read them with one `GROUP BY source` over
`source_views`: a scan of every view at every start (3,000,000 views, 1.4 GB: 0.5-0.8 s
with the table in memory; at national scale hundreds of millions of views, read from disk,
by every worker of a rolling restart). Now each live batch advances one row per (source,
topic, partition) it applied events of, beside its offsets, and a start reads that table.

The upgrade fills it from the views, once, under topic "" and partition -1 (the views do
not say which partition their events came from). A worker of a release before goes on
applying without writing it: stop the workers first (docs/deploy.md, "Upgrades"); the
fill runs again a day later all the same (`store.fills`). The downgrade drops it.

Revision ID: 0011
Revises: 0010
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from store.fills import CATCH_UP_AFTER, catch_up_row, fill_freshness
from store.tables import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "source_freshness",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("last_change", UTCDateTime(), nullable=False),
        sa.Column("last_applied", UTCDateTime(), nullable=False),
    )
    op.execute(fill_freshness(op.get_bind().dialect.name))
    op.execute(catch_up_row(datetime.now(UTC)))


def downgrade() -> None:
    op.execute(f"DELETE FROM store_meta WHERE name = '{CATCH_UP_AFTER}'")
    op.drop_table("source_freshness")
