"""The audit of `portal-sync source purge`: one row per command.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "source_purges",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(16)),
        sa.Column("reference", sa.String(255)),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("views", sa.BigInteger(), nullable=False),
        sa.Column("tombstones", sa.BigInteger(), nullable=False),
        sa.Column("records_remerged", sa.BigInteger(), nullable=False),
        sa.Column("records_changed", sa.BigInteger(), nullable=False),
        sa.Column("records_removed", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_source_purges_started_at", "source_purges", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_source_purges_started_at", "source_purges")
    op.drop_table("source_purges")
