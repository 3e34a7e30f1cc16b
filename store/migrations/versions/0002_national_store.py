"""National store: field provenance, audit history, conflicts, dossier anomalies, owners.

Records written before this revision get provenance from `portal-sync store upgrade`,
which re-merges them from the stored source views after migrating.

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("records") as records:
        records.add_column(sa.Column("provenance", _json()))
    op.create_table(
        "record_history",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("entity", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(36)),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger()),
        sa.Column("changes", _json(), nullable=False),
        sa.Column("applied_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_record_history_record", "record_history", ["entity", "key", "id"])
    op.create_index("ix_record_history_applied_at", "record_history", ["applied_at"])
    op.create_table(
        "field_conflicts",
        sa.Column("entity", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("field", sa.String(64), primary_key=True),
        sa.Column("sources", _json(), nullable=False),
        sa.Column("detected_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "dossier_anomalies",
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("from_status", sa.Integer(), nullable=False),
        sa.Column("to_status", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("detected_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_dossier_anomalies_key", "dossier_anomalies", ["key"])
    op.create_table(
        "document_owners",
        sa.Column("entity", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("owner_entity", sa.String(16), nullable=False),
        sa.Column("owner_key", sa.String(64), nullable=False),
        sa.Column("waiting", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_document_owners_owner", "document_owners", ["owner_entity", "owner_key"])


def downgrade() -> None:
    for table in ("document_owners", "dossier_anomalies", "field_conflicts", "record_history"):
        op.drop_table(table)
    with op.batch_alter_table("records") as records:
        records.drop_column("provenance")
