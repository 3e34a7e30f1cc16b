"""Filling the tables that live batches keep beside the views (`source_freshness`,
`record_deletions`) from the views themselves: by their migrations (0011, 0012), each one
statement, and once more a day later (`Store.catch_up`, in short reads and writes beside
the batches), when workers of a release before them, which apply without writing them,
are gone (docs/deploy.md, "Upgrades"). Both fills are idempotent, and each is one scan of
every view: never on a batch's path."""

from __future__ import annotations

from datetime import datetime, timedelta

from store.times import utc_text

# `store_meta`: when the fills run again (ISO 8601, UTC); removed once they have.
CATCH_UP_AFTER = "catch_up_after"
CATCH_UP_DELAY = timedelta(days=1)
# The worker that runs them moves the row this far on first: another takes it over then,
# should that worker stop before the end.
CATCH_UP_LEASE = timedelta(hours=1)


def fill_freshness(dialect: str) -> str:
    """Per source, its views' newest `occurred_at` and `applied_at`, under topic "" and
    partition -1 (a view does not say which partition its event came from); an existing
    row only moves forward."""
    greatest = "GREATEST" if dialect == "postgresql" else "max"
    return (
        "INSERT INTO source_freshness (source, topic, partition, last_change, last_applied)"
        " SELECT source, '', -1, max(occurred_at), max(applied_at) FROM source_views"
        " WHERE 1 = 1 GROUP BY source ON CONFLICT (source, topic, partition) DO UPDATE SET"
        f" last_change = {greatest}(source_freshness.last_change, excluded.last_change),"
        f" last_applied = {greatest}(source_freshness.last_applied, excluded.last_applied)"
    )


def fill_freshness_row(dialect: str) -> str:
    """`fill_freshness` for one source's values read before (`:source`, `:change`,
    `:applied`): nothing while the source has no views left."""
    greatest = "GREATEST" if dialect == "postgresql" else "max"
    return (
        "INSERT INTO source_freshness (source, topic, partition, last_change, last_applied)"
        " SELECT CAST(:source AS VARCHAR(64)), '', -1, :change, :applied"
        " WHERE EXISTS (SELECT 1 FROM source_views WHERE source = CAST(:source AS VARCHAR(64)))"
        " ON CONFLICT (source, topic, partition) DO UPDATE SET"
        f" last_change = {greatest}(source_freshness.last_change, excluded.last_change),"
        f" last_applied = {greatest}(source_freshness.last_applied, excluded.last_applied)"
    )


# Every record whose views are all tombstones, at its newest tombstone's time; a record
# already noted keeps its (earlier) note.
FILL_DELETIONS = (
    "INSERT INTO record_deletions (entity, key, deleted_at)"
    " SELECT entity, key, max(applied_at) FROM source_views WHERE 1 = 1 GROUP BY entity, key"
    " HAVING sum(CASE WHEN deleted THEN 0 ELSE 1 END) = 0"
    " ON CONFLICT (entity, key) DO NOTHING"
)


def catch_up_row(now: datetime) -> str:
    """The `store_meta` statement that schedules the fills again, a day after `now`."""
    when = (now + CATCH_UP_DELAY).isoformat()
    return (
        "INSERT INTO store_meta (name, value, updated_at)"
        f" VALUES ('{CATCH_UP_AFTER}', '{when}', '{utc_text(now)}')"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
    )
