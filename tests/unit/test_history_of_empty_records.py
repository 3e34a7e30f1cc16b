"""A record of no fields (an organization sent with `data: {}`, which the contract takes)
created, deleted or purged away changes no field, and still gets its history entry:
operations.md says every changed or removed record has one (none before)."""

from __future__ import annotations

from consumers.merge import Authority
from portal_sync.ops import purge as purging
from tests.support.store_helpers import ORG, Feed, event, fresh_store, history_rows


def test_created_and_deleted_each_get_an_entry() -> None:
    with fresh_store() as store:
        feed = Feed(store)
        feed.apply(event("organization", ORG, "province-01", 1, {}))
        feed.apply(event("organization", ORG, "province-01", 2, {}))  # nothing changes
        feed.apply(event("organization", ORG, "province-01", 3, None))
        assert [(r[4], r[5]) for r in history_rows(store)] == [(1, {}), (3, {})]


def test_purged_away_gets_an_entry() -> None:
    with fresh_store() as store:
        Feed(store).apply(event("organization", ORG, "province-01", 1, {}))
        audit = purging.new_purge("province-01", None, None, "wrong data", "steward", None)
        done = purging.run(store, Authority(), audit, None)
        assert done.counts.records_removed == 1
        entries = history_rows(store)
        assert [(r[3], r[5]) for r in entries] == [("province-01", {}), ("purge", {})]
