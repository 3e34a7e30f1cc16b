"""The sources' freshness a worker starts from (`Store.freshness`), on both backends: each
live batch keeps, per (source, topic, partition), the newest `occurred_at` it applied and
when, beside its offsets; an event not applied (older version, redelivery) and a replay
change nothing; purged views leave it known."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from consumers.merge import Authority
from consumers.reconciler import Reconciler
from store import utcnow
from store.core import Store
from store.tables import source_freshness
from tests.support.store_helpers import CITIZEN, CITIZEN_2, T0, TOPIC, checked_list, event

NAME = {"full_name": "Nguyễn Văn An"}


def _apply(reconciler: Reconciler, raws: list[bytes], start: int, partition: int,
           replay: bool = False) -> tuple[datetime, datetime]:  # fmt: skip
    batch = checked_list(raws, start, partition)
    before = utcnow()
    reconciler.apply(batch, [c.message for c in batch], replay=replay)
    return before, utcnow()


def _rows(store: Store) -> dict[tuple[str, str, int], tuple[datetime, datetime]]:
    with store.engine.connect() as conn:
        return {
            (r.source, r.topic, r.partition): (r.last_change, r.last_applied)
            for r in conn.execute(select(source_freshness))
        }


def test_each_batch_keeps_the_newest_applied_change_per_source_and_partition(
    store_url: str,
) -> None:
    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    try:
        first = _apply(
            reconciler,
            [event("citizen", CITIZEN, "province-01", 5, NAME),
             event("citizen", CITIZEN, "national-population", 3, NAME)],
            0, 0,
        )  # fmt: skip
        second = _apply(reconciler, [event("citizen", CITIZEN_2, "province-01", 9, NAME)], 0, 1)
        rows = _rows(store)
        assert set(rows) == {
            ("province-01", TOPIC, 0), ("province-01", TOPIC, 1),
            ("national-population", TOPIC, 0),
        }  # fmt: skip
        assert rows[("province-01", TOPIC, 0)][0] == T0 + timedelta(minutes=5)
        assert rows[("province-01", TOPIC, 1)][0] == T0 + timedelta(minutes=9)
        assert first[0] <= rows[("province-01", TOPIC, 0)][1] <= first[1]
        assert second[0] <= rows[("province-01", TOPIC, 1)][1] <= second[1]

        # Not applied: an older version sent later, and a redelivered change.
        _apply(
            reconciler,
            [event("citizen", CITIZEN, "province-01", 4, NAME, minute=60),
             event("citizen", CITIZEN, "national-population", 3, NAME)],
            2, 0,
        )  # fmt: skip
        assert _rows(store) == rows

        # Applied, but made before the newest change known: the time applied moves, the
        # newest change does not go back.
        third = _apply(
            reconciler, [event("citizen", CITIZEN, "province-01", 6, NAME, minute=1)], 4, 0
        )
        rows = _rows(store)
        assert rows[("province-01", TOPIC, 0)][0] == T0 + timedelta(minutes=5)
        assert third[0] <= rows[("province-01", TOPIC, 0)][1] <= third[1]

        by_source = {f.source: f for f in store.freshness()}
        assert set(by_source) == {"province-01", "national-population"}
        assert by_source["province-01"].last_change == T0 + timedelta(minutes=9)
        assert third[0] <= by_source["province-01"].last_applied <= third[1]
        assert by_source["national-population"].last_change == T0 + timedelta(minutes=3)
        assert first[0] <= by_source["national-population"].last_applied <= first[1]
    finally:
        store.close()


def test_a_replay_leaves_the_freshness_alone(store_url: str) -> None:
    """A replay re-applies events the live worker owns the offsets of: it is not a source
    delivering, and it writes nothing the worker's batches keep beside their offsets."""
    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    try:
        _apply(reconciler, [event("citizen", CITIZEN, "province-01", 5, NAME)], 0, 0)
        rows = _rows(store)
        _apply(
            reconciler,
            [event("citizen", CITIZEN, "province-01", 7, NAME),
             event("citizen", CITIZEN_2, "province-79", 2, NAME)],
            0, 0, replay=True,
        )  # fmt: skip
        assert _rows(store) == rows
    finally:
        store.close()


def test_the_freshness_outlives_the_views_it_came_from(store_url: str) -> None:
    """Purged tombstones take the source's last views with them; when the source last
    delivered stays known, so its freshness series does not vanish at a worker's start."""
    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    try:
        _apply(reconciler, [event("citizen", CITIZEN, "province-01", 5, NAME)], 0, 0)
        _apply(reconciler, [event("citizen", CITIZEN, "province-01", 6)], 1, 0)  # a delete
        assert store.purge_deleted(utcnow() + timedelta(days=1)) == (2, 1)
        assert store.view_version("citizen", CITIZEN, "province-01") is None
        [fresh] = store.freshness()
        assert (fresh.source, fresh.last_change) == ("province-01", T0 + timedelta(minutes=6))
    finally:
        store.close()


def test_a_purge_of_all_of_a_sources_views_forgets_its_freshness(store_url: str) -> None:
    """As the views it came from: a purge of one entity keeps it, one of all goes."""
    from portal_sync.ops import purge as purging

    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    try:
        _apply(
            reconciler,
            [event("citizen", CITIZEN, "province-01", 5, NAME),
             event("citizen", CITIZEN_2, "province-79", 2, NAME)],
            0, 0,
        )  # fmt: skip
        for entity in ("dossier", None):
            audit = purging.new_purge("province-01", entity, None, "wrong data", "steward", None)
            purging.run(store, Authority(), audit, None)
            left = sorted(f.source for f in store.freshness())
            assert left == (["province-01", "province-79"] if entity else ["province-79"])
    finally:
        store.close()


def test_a_batch_applied_while_the_source_is_purged_keeps_its_freshness(store_url: str) -> None:
    """The source delivered after the purge began: its new row is not forgotten with the
    old ones when the purge finishes."""
    from portal_sync.ops import purge as purging

    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    try:
        _apply(reconciler, [event("citizen", CITIZEN, "province-01", 5, NAME)], 0, 0)
        audit = purging.new_purge("province-01", None, None, "wrong data", "steward", None)
        _apply(reconciler, [event("citizen", CITIZEN_2, "province-01", 7, NAME)], 0, 1)
        purging.finish_purge(store, audit)
        assert list(_rows(store)) == [("province-01", TOPIC, 1)]
        [fresh] = store.freshness()
        assert fresh.last_change == T0 + timedelta(minutes=7)
    finally:
        store.close()
