"""A batch written in parts on PostgreSQL (psycopg's pipeline held open while the next part
is merged) leaves the store exactly as the same batches written whole on SQLite."""

from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import insert, select

from consumers.reconciler import Reconciler
from store.core import Store
from store.tables import field_conflicts, source_views
from tests.support.store_helpers import CITIZEN, Feed, anomaly_rows, event, history_rows
from tests.unit.test_national_store_properties import (
    AUTHORITY_A,
    FIELDS,
    OWNERS,
    RECORDS,
    SOURCES,
    Spec,
    split,
    state,
    stream,
)


def random_specs(rng: random.Random, count: int) -> list[Spec]:
    """Many versions of few records from every source: conflicts, deletes, owners."""
    specs: dict[tuple[int, str, int], Spec] = {}
    while len(specs) < count:
        record = rng.randrange(len(RECORDS))
        entity = RECORDS[record][0]
        data: dict[str, Any] | None = None
        if rng.random() < 0.8:
            data = {n: rng.choice(v) for n, v in FIELDS[entity].items() if rng.random() < 0.7}
            if entity == "document" and rng.random() < 0.5:
                owner_kind, owner_id = rng.choice(OWNERS)
                data.update(owner_kind=owner_kind, owner_id=owner_id)
        spec = Spec(record, rng.choice(SOURCES), rng.randint(1, 40), rng.randint(0, 59), data)
        specs[(spec.record, spec.source, spec.version)] = spec
    chosen = list(specs.values())
    return chosen + rng.sample(chosen, count // 10)  # and some duplicates


def test_parts_on_postgresql_equal_whole_batches_on_sqlite(
    postgres_store_url: str, sqlite_store_url: str
) -> None:
    rng = random.Random(11)
    messages = stream(random_specs(rng, 600), partitions=2)
    batches = split(messages, [150, 400, 520])
    results = []
    for url, part_events in ((sqlite_store_url, None), (postgres_store_url, 7)):
        store = Store(url)
        store.create_schema()
        reconciler = Reconciler(store, AUTHORITY_A, part_events=part_events)
        outcomes = [
            [o.outcome for o in reconciler.apply(batch, [c.message for c in batch]).outcomes]
            for batch in batches
        ]
        results.append((state(store), history_rows(store), anomaly_rows(store), outcomes))
        store.close()
    assert results[0][0] == results[1][0]  # records, conflicts, document owners
    assert results[0][1] == results[1][1]  # history, entry by entry
    assert results[0][2] == results[1][2]
    assert results[0][3] == results[1][3]
    assert len(results[0][1]) > 30 and results[0][0][1]  # a test that sees real merging


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_conflict_that_stays_is_not_rewritten(backend: str, request: Any) -> None:
    """A batch rewrites a record's conflicts only when they change: one that stays keeps
    the moment it was detected, one that changes is written anew, one that ends goes."""
    store = Store(request.getfixturevalue(f"{backend}_store_url"))
    store.create_schema()
    try:
        feed = Feed(store, AUTHORITY_A)
        feed.apply(
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "A", "sex": "male"}),
            event("citizen", CITIZEN, "province-79", 1, {"full_name": "B", "sex": "male"}),
        )
        first = detected(store)
        assert list(first) == [("full_name", (("province-01",), ("province-79",)))]
        report = feed.apply(
            event("citizen", CITIZEN, "province-01", 2, {"full_name": "A", "phone": "0912345678"})
        )
        assert report.new_conflicts == []
        assert detected(store) == first  # the same row, not deleted and inserted again
        report = feed.apply(
            event("citizen", CITIZEN, "ministry-btp", 1, {"full_name": "B", "sex": "female"})
        )
        assert report.new_conflicts == [("citizen", "sex")]
        now = detected(store)
        assert list(now) == [
            ("full_name", (("ministry-btp", "province-79"), ("province-01",))),
            ("sex", (("ministry-btp",), ("province-79",))),
        ]
        assert all(moment >= first[next(iter(first))] for moment in now.values())
        feed.apply(event("citizen", CITIZEN, "ministry-btp", 2, None))
        feed.apply(event("citizen", CITIZEN, "province-01", 3, {"full_name": "B"}))
        assert detected(store) == {}
    finally:
        store.close()


def detected(store: Store) -> dict[tuple[str, tuple[tuple[str, ...], ...]], Any]:
    """(field, source groups) -> detected_at of the open conflicts, by field."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(field_conflicts).order_by(field_conflicts.c.field))
        return {(r.field, tuple(tuple(group) for group in r.sources)): r.detected_at for r in rows}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_stored_conflict_the_views_do_not_explain_is_replaced(backend: str, request: Any) -> None:
    """A record with no views is taken to have no conflicts stored; a row left by an older
    rule is replaced by the conflict found, not a failed batch."""
    store = Store(request.getfixturevalue(f"{backend}_store_url"))
    store.create_schema()
    try:
        with store.engine.begin() as conn:
            conn.execute(
                insert(field_conflicts).values(
                    entity="citizen",
                    key=CITIZEN,
                    field="full_name",
                    sources=[["x"], ["y"]],
                    detected_at=datetime(2025, 1, 1),
                )
            )
        report = Feed(store, AUTHORITY_A).apply(
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "A"}),
            event("citizen", CITIZEN, "province-79", 1, {"full_name": "B"}),
        )
        assert report.new_conflicts == [("citizen", "full_name")]
        assert list(detected(store)) == [("full_name", (("province-01",), ("province-79",)))]
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_changes_of_one_version_give_one_store_in_either_order(
    backend: str, request: Any
) -> None:
    """A source that sent two changes with one version (and one event id): whichever comes
    first, in one batch or two, the store keeps the one that orders after
    (`merge.same_version`), on each backend (PostgreSQL's upsert guard lets the equal
    version through)."""
    record = next(i for i, (entity, _) in enumerate(RECORDS) if entity == "citizen")
    name = "sex"
    first, second = FIELDS["citizen"][name]
    one = Spec(record, SOURCES[0], 3, 1, {name: first})
    other = Spec(record, SOURCES[0], 3, 2, {name: second})
    besides = Spec(record, SOURCES[1], 1, 0, {name: first})
    states = []
    for order in ([besides, one, other], [besides, other, one]):
        for cuts in ([], [2]):
            url = request.getfixturevalue(f"{backend}_store_url")
            store = Store(url)
            store.create_schema()
            try:
                reconciler = Reconciler(store, AUTHORITY_A)
                for batch in split(stream(order), cuts):
                    reconciler.apply(batch, [c.message for c in batch])
                with store.engine.connect() as conn:
                    views = conn.execute(
                        select(
                            source_views.c.source, source_views.c.version, source_views.c.data
                        ).order_by(source_views.c.source)
                    ).all()
                states.append((state(store), [tuple(view) for view in views]))
            finally:
                store.drop_schema()
                store.close()
    assert all(found == states[0] for found in states), states
    (record_row,) = states[0][0][0]
    winner = max(first, second, key=lambda v: json.dumps({name: v}))
    assert record_row[2][name] == winner
    assert (SOURCES[0], 3, {name: winner}) in states[0][1]  # the view the store reads next
