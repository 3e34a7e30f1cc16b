"""A batch written in parts on PostgreSQL (psycopg's pipeline held open while the next part
is merged) leaves the store exactly as the same batches written whole on SQLite."""

from __future__ import annotations

import random
from typing import Any

from consumers.reconciler import Reconciler
from store.core import Store
from tests.support.store_helpers import anomaly_rows, history_rows
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
