"""The cluster's id of each change topic the store applied events of (`topic_ids`).

The store's offsets are positions in one log. A change topic deleted and created again
(or a cluster rebuilt) starts a new log at offset 0; once the new log is longer than the
store's offsets, the log-end check at assignment cannot see it, and the worker would go on
from the store's offset, taking every new event below it as applied. Kafka gives each topic
an id (KIP-516) that a topic created again does not keep: a worker records it at its first
assignment of the topic and refuses a topic whose id changed; `offsets reset` records the
new one.

Nothing to fill: the workers record the ids at their next assignment. The downgrade drops
the table.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "topic_ids",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("topic_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("topic_ids")
