"""The access log (append-only) and the retention purge's mark on history entries.

On PostgreSQL a trigger refuses every UPDATE, DELETE and TRUNCATE of `access_log`, except
the DELETE of the retention purge, which sets `portal_sync.access_log_purge` for its own
transaction (`Store.purge_access_log`). SQLite has no session settings to tell the purge
apart; there the store's code is the guard (it offers no update or delete of the log).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION portal_sync_access_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('portal_sync.access_log_purge', true), '') = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'access_log is append-only: % refused (only the retention purge deletes)',
        TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "access_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("accessed_at", UTCDateTime(), nullable=False),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(16)),
        sa.Column("reference", sa.String(255)),
        sa.Column("reason", sa.String(1000), nullable=False),
    )
    op.create_index("ix_access_log_accessed_at", "access_log", ["accessed_at"])
    op.add_column("record_history", sa.Column("purged_at", UTCDateTime()))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute(
            "CREATE TRIGGER access_log_append_only BEFORE UPDATE OR DELETE ON access_log"
            " FOR EACH ROW EXECUTE FUNCTION portal_sync_access_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER access_log_no_truncate BEFORE TRUNCATE ON access_log"
            " FOR EACH STATEMENT EXECUTE FUNCTION portal_sync_access_log_append_only()"
        )


def downgrade() -> None:
    op.drop_column("record_history", "purged_at")
    op.drop_index("ix_access_log_accessed_at", "access_log")
    op.drop_table("access_log")  # its triggers go with it
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS portal_sync_access_log_append_only()")
