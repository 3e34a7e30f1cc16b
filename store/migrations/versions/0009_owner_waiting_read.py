"""Whether a document waits for its owner is read from the store, not kept in a column:
`document_owners.waiting` and the index on the owner go.

Each batch used to update `waiting` on the documents of every citizen and organisation it
wrote (an `UPDATE … FROM unnest` joined on the owner), whether or not the record had
documents: on the bench's mix that statement took a tenth of PostgreSQL's time for the
batch (6.0 of 59 µs per event, pg_stat_statements), and on a small table its plan hashed
the whole of `document_owners` once per part of a batch. The flag could also be wrong: two
workers writing a document and its new owner at the same time each missed the other's
uncommitted row, and the document stayed "waiting" until the owner changed again. Now a
document waits when no record of its owner exists (`store.queries`): always true to the
store, and nothing to write when an owner comes or goes.

Workers of a release before this one write the column: stop them for the upgrade (their
batches fail once it is gone, and are retried until they are replaced; docs/deploy.md).
The downgrade adds the column back, filled from the records, and the index.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_document_owners_owner", table_name="document_owners")
    with op.batch_alter_table("document_owners") as owners:
        owners.drop_column("waiting")


def downgrade() -> None:
    with op.batch_alter_table("document_owners") as owners:
        owners.add_column(sa.Column("waiting", sa.Boolean(), nullable=True))
    op.execute(
        "UPDATE document_owners SET waiting = NOT EXISTS (SELECT 1 FROM records r"
        " WHERE r.entity = document_owners.owner_entity AND r.key = document_owners.owner_key)"
    )
    with op.batch_alter_table("document_owners") as owners:
        owners.alter_column("waiting", existing_type=sa.Boolean(), nullable=False)
    op.create_index("ix_document_owners_owner", "document_owners", ["owner_entity", "owner_key"])
