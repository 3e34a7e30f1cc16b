"""Dead-letter redrives: each dead letter is re-driven once, and recorded.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letter_redrives",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("offset", sa.BigInteger(), primary_key=True),
        sa.Column("reason_code", sa.String(64), nullable=False),
        sa.Column("target_topic", sa.String(255), nullable=False),
        sa.Column("redriven_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dead_letter_redrives")
