"""Each dead letter's redrive is recorded with the dead-letter topic's id (KIP-516).

A redrive is recorded by the letter's place: (topic, partition, offset). A dead-letter
topic deleted and created again (to clear it, or a cluster rebuilt) numbers its letters
from 0 again, and a new letter at a recorded place was taken as re-driven already: its
event was never applied. The key now holds the topic's id too. Rows recorded before keep
an empty id, which `Store.redriven` matches whatever the topic's id (it is not known), for a
letter that had failed by the time the row was recorded (`portal_sync.ops.dlq`).

The table is copied into one with the new key, then renamed (no primary-key constraint is
altered in place: SQLite cannot). The downgrade copies back one row per place.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

COLUMNS = 'topic, partition, "offset", reason_code, target_topic, redriven_at'


def _table(name: str, with_id: bool) -> None:
    key = [sa.Column("topic_id", sa.String(64), primary_key=True)] if with_id else []
    op.create_table(
        name,
        sa.Column("topic", sa.String(255), primary_key=True),
        *key,
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("offset", sa.BigInteger(), primary_key=True),
        sa.Column("reason_code", sa.String(64), nullable=False),
        sa.Column("target_topic", sa.String(255), nullable=False),
        sa.Column("redriven_at", UTCDateTime(), nullable=False),
    )


def upgrade() -> None:
    _table("dead_letter_redrives_by_id", with_id=True)
    op.execute(
        f"INSERT INTO dead_letter_redrives_by_id (topic_id, {COLUMNS})"
        f" SELECT '', {COLUMNS} FROM dead_letter_redrives"
    )
    op.drop_table("dead_letter_redrives")
    op.rename_table("dead_letter_redrives_by_id", "dead_letter_redrives")


def downgrade() -> None:
    _table("dead_letter_redrives_by_place", with_id=False)
    # One row per place: the first redrive recorded there.
    op.execute(
        f"INSERT INTO dead_letter_redrives_by_place ({COLUMNS})"
        f" SELECT {COLUMNS} FROM dead_letter_redrives d WHERE NOT EXISTS ("
        " SELECT 1 FROM dead_letter_redrives e WHERE e.topic = d.topic"
        ' AND e.partition = d.partition AND e."offset" = d."offset"'
        " AND (e.redriven_at < d.redriven_at"
        " OR (e.redriven_at = d.redriven_at AND e.topic_id < d.topic_id)))"
    )
    op.drop_table("dead_letter_redrives")
    op.rename_table("dead_letter_redrives_by_place", "dead_letter_redrives")
