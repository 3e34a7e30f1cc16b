"""An operator's reset of any consumer group is recorded, not only the reconciler's.

`offset_changes` gains `consumer_group`: NULL for a move of the store's own offsets (the
reconciler's group, every row before this revision), else the group whose offsets in Kafka
an `offsets reset` moved (the store's offsets untouched).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("offset_changes", sa.Column("consumer_group", sa.String(255)))


def downgrade() -> None:
    # Kept, not deleted (the table is a record of what operators did): a reset of another
    # group becomes kind `group-reset`, its group at the head of its reason, so that no
    # reader of the revision before takes it for a move of the store's own offsets.
    op.execute(
        "UPDATE offset_changes SET kind = 'group-reset', "
        "reason = substr('[group ' || consumer_group || '] ' || reason, 1, 1000) "
        "WHERE consumer_group IS NOT NULL"
    )
    with op.batch_alter_table("offset_changes") as batch:
        batch.drop_column("consumer_group")
