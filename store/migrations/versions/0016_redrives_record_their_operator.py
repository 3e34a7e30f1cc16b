"""A dead letter's redrive records who re-drove it.

`dead_letter_redrives` gains `operator` (`dlq redrive --operator`, else the OS user): NULL
for the redrives recorded before this revision.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letter_redrives", sa.Column("operator", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("dead_letter_redrives") as batch:
        batch.drop_column("operator")
