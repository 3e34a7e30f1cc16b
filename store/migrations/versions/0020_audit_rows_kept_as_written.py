"""The purges' and redrives' audit rows change only as their own commands change them.

The role `store grant` gives the worker and the commands may UPDATE a few columns of
`source_purges` (a purge's counts and its end) and of `dead_letter_redrives` (a redrive's
claim of an earlier topic's letter), and a column grant covers every row. With it, a leaked
credential or an operator covering their tracks could set a finished purge's counts to 0
and its end before its start, so that nothing warned of the purge any more (`replay`,
`rebuild`, `offsets reset`, `dlq redrive`'s hold of the purged source's letters), or write
another operator and time into any redrive. On PostgreSQL a trigger now refuses every
update but the commands' own:

- a purge's row: while it is unfinished, its counts grow and it finishes at or after its
  start; who, what, when and why never change; a finished row never changes again;
- a redrive's row: only one recorded without the topic's id ('' : an earlier topic's
  letter may be at the same place) is claimed again, at its place, at the time of the
  claim (the server's clock, give or take the clock skew the commands allow: a claim
  dated back or ahead would take or leave letters of a topic created again).

A purge's end is the server's time when it finishes, or later: an interrupted purge set
"finished" at its start would no longer be warned of.

SQLite has no roles: there the store's code is the guard, as for the access log.

Revision ID: 0020
Revises: 0019
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

PURGE_FUNCTION = """
CREATE FUNCTION portal_sync_source_purges_progress_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finished_at IS NOT NULL AND NEW IS DISTINCT FROM OLD THEN
        RAISE EXCEPTION 'source_purges: a finished purge''s row is kept as written'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.id, NEW.source, NEW.entity, NEW.reference, NEW.operator, NEW.reason,
        NEW.started_at)
       IS DISTINCT FROM
       (OLD.id, OLD.source, OLD.entity, OLD.reference, OLD.operator, OLD.reason,
        OLD.started_at)
       OR NEW.views < OLD.views OR NEW.tombstones < OLD.tombstones
       OR NEW.records_remerged < OLD.records_remerged
       OR NEW.records_changed < OLD.records_changed
       OR NEW.records_removed < OLD.records_removed
       OR NEW.finished_at < NEW.started_at THEN
        RAISE EXCEPTION 'source_purges: only a running purge''s counts grow, and it finishes'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL THEN
        -- it finishes now, never earlier: an interrupted purge "finished" at its start
        -- would hide it from every warning about what came after it
        NEW.finished_at := greatest(NEW.finished_at, now() AT TIME ZONE 'UTC');
    END IF;
    RETURN NEW;
END
$$
"""

# Seconds a redrive's claim may be dated from the server's clock (the commands' clocks are
# another host's): the contract's clock skew.
CLAIM_SKEW_SECONDS = 300

REDRIVE_FUNCTION = """
CREATE FUNCTION portal_sync_dead_letter_redrives_claims_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.topic_id <> ''
       OR (NEW.topic, NEW.topic_id, NEW.partition, NEW."offset")
          IS DISTINCT FROM (OLD.topic, OLD.topic_id, OLD.partition, OLD."offset")
       OR abs(extract(epoch FROM NEW.redriven_at - (now() AT TIME ZONE 'UTC')))
          > {skew} THEN
        RAISE EXCEPTION 'dead_letter_redrives: only an earlier topic''s letter is claimed again'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$
"""

TRIGGERS = {
    "source_purges": ("source_purges_progress_only", "portal_sync_source_purges_progress_only"),
    "dead_letter_redrives": (
        "dead_letter_redrives_claims_only",
        "portal_sync_dead_letter_redrives_claims_only",
    ),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(PURGE_FUNCTION)
    op.execute(REDRIVE_FUNCTION.replace("{skew}", str(CLAIM_SKEW_SECONDS)))
    for table, (trigger, function) in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {trigger} BEFORE UPDATE ON {table}"
            f" FOR EACH ROW EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (trigger, function) in TRIGGERS.items():
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
