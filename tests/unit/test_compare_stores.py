"""`rebuild --compare`: both stores read once each, in order, in bounded memory; with the
live workers running during the rebuild, what they applied after it began is counted apart
(before: reported as differences, exit 2, about a healthy store; and both stores were held
in memory whole, about 9 GB at 3 million records)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

import portal_sync.ops.replay
from portal_sync.ops.replay import compare_stores
from store import utcnow
from store.tables import records, source_views
from tests.support.store_helpers import Feed, event, fresh_store

SAME, OLD_CHANGE, NEW_IN_LIVE, ONLY_REBUILT = (
    "001090012345", "001090012346", "001090012347", "001090012348",
)  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 1000])
def test_changes_applied_after_the_rebuild_began_are_set_apart(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(portal_sync.ops.replay, "COMPARE_CHUNK", chunk)
    with fresh_store() as live, fresh_store() as rebuilt:
        both = [event("citizen", key, "province-01", 1, {"full_name": "Lê Thị Hoa"})
                for key in (SAME, OLD_CHANGE)]  # fmt: skip
        Feed(live).apply(*both, event("citizen", OLD_CHANGE, "province-01", 2, {"full_name": "B"}))
        Feed(rebuilt).apply(
            *both, event("citizen", ONLY_REBUILT, "province-01", 1, {"full_name": "Khác"})
        )
        long_ago = utcnow() - timedelta(days=1)
        with live.engine.begin() as conn:  # applied long before the rebuild
            conn.execute(update(records).values(updated_at=long_ago))
            conn.execute(update(source_views).values(applied_at=long_ago))
        began = utcnow()
        Feed(live).redeliver(
            [event("citizen", NEW_IN_LIVE, "province-01", 1, {"full_name": "Mới"})], 3
        )  # a live worker's batch while the rebuild ran
        found = compare_stores(live, rebuilt, changed_since=began)
        assert found.counts == {"only_live": 0, "only_rebuilt": 1, "different": 1}
        assert found.samples["different"] == [("citizen", OLD_CHANGE)]
        assert found.samples["only_rebuilt"] == [("citizen", ONLY_REBUILT)]
        assert found.meanwhile == 1 and found.any()
        # without a start: every difference counts
        every = compare_stores(live, rebuilt)
        assert every.counts == {"only_live": 1, "only_rebuilt": 1, "different": 1}
        assert every.meanwhile == 0


def test_counts_past_the_samples_and_equal_stores() -> None:
    with fresh_store() as live, fresh_store() as rebuilt:
        keys = [f"0010900{n:05d}" for n in range(12)]
        upserts = [event("citizen", k, "province-01", 1, {"full_name": "An"}) for k in keys]
        Feed(live).apply(*upserts)
        found = compare_stores(live, rebuilt, changed_since=utcnow())
        assert found.counts["only_live"] == 12
        assert found.samples["only_live"] == [("citizen", k) for k in keys[:5]]
        Feed(rebuilt).apply(*upserts)
        assert not compare_stores(live, rebuilt).any()


def test_a_record_the_live_store_holds_less_of_is_a_difference_however_recent() -> None:
    """A `source purge`, or offsets reset past events, just before a rebuild leaves the
    live store behind what the topics hold: the record changed after the rebuild began,
    but not by moving ahead. It was set apart as changed meanwhile, and the comparison the
    purge's runbook asks for said 0 differences and exited 0."""
    with fresh_store() as live, fresh_store() as rebuilt:
        began = utcnow() - timedelta(minutes=1)
        first = event("citizen", SAME, "province-01", 1, {"full_name": "Lê Văn Sáu"})
        later = event("citizen", SAME, "province-01", 2, {"full_name": "Lê Văn Sáu Mới"})
        Feed(live).apply(first)  # after `began`: the live store changed recently
        Feed(rebuilt).apply(first, later)
        behind = compare_stores(live, rebuilt, changed_since=began)
        assert (behind.counts["different"], behind.meanwhile) == (1, 0)
        Feed(live).apply(later, event("citizen", SAME, "province-01", 3, {"full_name": "X"}))
        ahead = compare_stores(live, rebuilt, changed_since=began)  # a worker ran on
        assert (ahead.counts["different"], ahead.meanwhile) == (0, 1)
