"""When a disagreement was detected (`field_conflicts.detected_at`) and which are new
(`portal_sync_field_conflicts_total`), across batches, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import select

from store.core import Store
from store.tables import field_conflicts
from tests.support.store_helpers import CITIZEN, Feed, event


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    store.create_schema()
    yield store
    store.close()


def detected(store: Store) -> dict[str, datetime]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(field_conflicts.c.field, field_conflicts.c.detected_at))
        return {name: at for name, at in rows}


def test_a_disagreement_keeps_its_time_while_its_groups_stay(store: Store) -> None:
    """A second disagreement on the record reset the first one's time: each batch
    replaced the record's rows as a set, every one detected "now"."""
    feed = Feed(store)
    first = feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An", "phone": "0911111111"}),
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "Ân", "phone": "0911111111"}),
    )
    assert sorted(first.new_conflicts) == [("citizen", "full_name")]
    name_since = detected(store)["full_name"]
    time.sleep(0.05)

    second = feed.apply(
        event("citizen", CITIZEN, "province-79", 2, {"full_name": "Ân", "phone": "0922222222"})
    )
    assert sorted(second.new_conflicts) == [("citizen", "phone")]  # the name's is not new
    times = detected(store)
    assert times["full_name"] == name_since and times["phone"] > name_since
    time.sleep(0.05)

    # The name's groups change (a third source agrees with neither): detected again, and
    # not new; the phone's time stays.
    third = feed.apply(
        event("citizen", CITIZEN, "province-48", 1, {"full_name": "Anh"}),
    )
    assert third.new_conflicts == []
    again = detected(store)
    assert again["full_name"] > times["phone"] and again["phone"] == times["phone"]

    # The phones agree again: that row goes, the name's stays as it was.
    fourth = feed.apply(
        event("citizen", CITIZEN, "province-79", 3, {"full_name": "Ân", "phone": "0911111111"})
    )
    assert fourth.new_conflicts == []
    assert detected(store) == {"full_name": again["full_name"]}


def test_a_row_written_with_other_spacing_keeps_its_time_while_its_groups_stay(
    store: Store,
) -> None:
    """Migration 0008 cast PostgreSQL's jsonb rows to json with jsonb's spacing
    (`[["a"], ["b"]]`; older releases on SQLite wrote the same), new ones are compact: a
    comparison of the texts stamped every unchanged disagreement "detected now" at the
    first remerge or source purge after the upgrade."""
    from consumers.merge import Authority
    from consumers.reconciler import Reconciler

    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "Bình"}),
    )
    then = datetime(2024, 1, 1)
    with store.engine.begin() as conn:
        conn.execute(
            field_conflicts.update().values(detected_at=then),
        )
        conn.exec_driver_sql(
            'UPDATE field_conflicts SET sources = \'[["province-01"], ["province-79"]]\''
        )
    Reconciler(store, Authority()).remerge([("citizen", CITIZEN)])
    assert detected(store)["full_name"].replace(tzinfo=None) == then


def test_remerge_counts_the_records_whose_conflicts_change(store: Store) -> None:
    """A conflict the rules no longer see (merge rules revision 1's "Hòa" against "Hoà")
    is counted by a remerge, dry or not, and cleared; one that stays is not counted."""
    from consumers.merge import Authority
    from consumers.reconciler import Reconciler
    from store import utcnow
    from tests.support.store_helpers import CITIZEN_2

    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "Lê Thị Hòa"}),
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "Lê Thị Hoà"}),
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN_2, "province-79", 1, {"full_name": "Bình"}),
    )
    with store.engine.begin() as conn:
        conn.execute(
            field_conflicts.insert().values(
                entity="citizen", key=CITIZEN, field="full_name",
                sources=[["province-01"], ["province-79"]], detected_at=utcnow(),
            )
        )  # fmt: skip
    keys = [("citizen", CITIZEN), ("citizen", CITIZEN_2)]
    reconciler = Reconciler(store, Authority())
    assert reconciler.remerge(keys, dry_run=True).conflicts == 1
    assert set(detected(store)) == {"full_name"} and len(_rows(store)) == 2
    assert reconciler.remerge(keys).conflicts == 1
    assert [key for key, _ in _rows(store)] == [CITIZEN_2]
    assert reconciler.remerge(keys).conflicts == 0


def _rows(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(field_conflicts.c.key, field_conflicts.c.field))
        return sorted((key, name) for key, name in rows)
