"""A live worker's kept records (`consumers.cache`) against the real backends: every other
writer between two of its batches is seen, and so is a batch that failed. Each scenario
would apply an event against a stale view if the cache were trusted there."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from consumers.cache import RecordCache
from consumers.reconciler import Reconciler
from store.core import Store
from store.purge import SourcePurge
from tests.support.store_helpers import CITIZEN, TOPIC, checked_list, event
from tests.unit.test_national_store_properties import AUTHORITY_A, AUTHORITY_B

SOURCE = "province-01"


def named(version: int) -> bytes:
    return event("citizen", CITIZEN, SOURCE, version, {"full_name": f"Tên {version}"})


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Any:
    store = Store(request.getfixturevalue(f"{request.param}_store_url"))
    store.create_schema()
    yield store
    store.close()


def worker(store: Store) -> Reconciler:
    return Reconciler(store, AUTHORITY_A, cache=RecordCache())


def apply(reconciler: Reconciler, raw: bytes, offset: int, **options: Any) -> str:
    batch = checked_list([raw], offset)
    report = reconciler.apply(batch, [c.message for c in batch], **options)
    return report.outcomes[0].outcome


def name(store: Store) -> Any:
    return {(e, k): data for e, k, data, _s, _p in store.iter_records()}[("citizen", CITIZEN)][
        "full_name"
    ]


def test_kept_records_are_used(store: Store) -> None:
    live = worker(store)
    assert live.cache is not None
    apply(live, named(1), 0)
    assert len(live.cache) == 1
    assert apply(live, named(2), 1) == "applied"
    assert name(store) == "Tên 2"


def test_a_replay_between_two_batches_is_seen(store: Store) -> None:
    live = worker(store)
    apply(live, named(1), 0)
    assert apply(Reconciler(store, AUTHORITY_A), named(3), 0, replay=True) == "applied"
    # Kept, the worker's view is still version 1: version 2 would be applied over 3.
    assert apply(live, named(2), 1) == "stale"
    assert name(store) == "Tên 3"


def test_another_worker_between_two_batches_is_seen(store: Store) -> None:
    first, second = worker(store), worker(store)
    apply(first, named(1), 0)
    apply(second, named(3), 1)  # the partition moved, and came back
    assert apply(first, named(2), 2) == "stale"
    assert name(store) == "Tên 3"


def test_a_source_purge_between_two_batches_is_seen(store: Store) -> None:
    live = worker(store)
    apply(live, named(5), 0)
    audit = SourcePurge("p-1", SOURCE, None, None, "tester", "test", datetime.now(UTC))
    Reconciler(store, AUTHORITY_A).purge(SOURCE, [("citizen", CITIZEN)], audit)
    # Kept, the purged view (version 5) would make version 2 stale: it is the only one now.
    assert apply(live, named(2), 1) == "applied"
    assert name(store) == "Tên 2"


def test_a_failed_batch_leaves_nothing_kept(store: Store) -> None:
    live = worker(store)
    apply(live, named(1), 0)

    def broken() -> None:
        raise RuntimeError("the commit failed")

    with pytest.raises(RuntimeError):
        apply(live, named(2), 1, before_commit=broken)
    # The failed batch changed the kept view in place; kept, the retry would find version 2
    # applied and skip it: an event lost.
    assert apply(live, named(2), 1) == "applied"
    assert name(store) == "Tên 2"


def test_every_other_writer_is_counted_and_a_live_batch_is_not(store: Store) -> None:
    def count() -> int:
        return int(store.meta("record_writes") or 0)

    live = worker(store)
    apply(live, named(1), 0)
    assert count() == 0
    keys = [("citizen", CITIZEN)]
    steps = [
        lambda: apply(Reconciler(store, AUTHORITY_A), named(2), 1, replay=True),
        lambda: Reconciler(store, AUTHORITY_B).remerge(keys),
        lambda: store.skip_offset((TOPIC, 0), 1, 0, "tester", "test"),
        lambda: store.reset_offsets({(TOPIC, 0): 1}, "tester", "test"),
        lambda: Reconciler(store, AUTHORITY_A).purge(
            SOURCE, keys, SourcePurge("p-2", SOURCE, None, None, "t", "t", datetime.now(UTC))
        ),
    ]
    for done, step in enumerate(steps, start=1):
        step()
        assert count() == done
    apply(live, event("citizen", CITIZEN, SOURCE, 9, None), 1)  # a tombstone
    store.purge_deleted(datetime(2100, 1, 1, tzinfo=UTC))
    assert count() == len(steps) + 1
    Reconciler(store, AUTHORITY_B).remerge(keys, dry_run=True)  # rolled back: not counted
    assert count() == len(steps) + 1


def test_batches_read_committed_whatever_the_servers_default(postgres_store_url: str) -> None:
    """A batch locks its records, then reads them and the count of other writes: each read
    must see what committed before it, which REPEATABLE READ (a database's or role's
    default) would not."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    database = make_url(postgres_store_url).database
    admin = Store(postgres_store_url)
    with admin.engine.connect() as conn:
        conn.execute(
            text(f'ALTER DATABASE "{database}" SET default_transaction_isolation'
                 " = 'repeatable read'")
        )  # fmt: skip
        conn.commit()
    admin.close()
    store = Store(postgres_store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
    finally:
        store.close()


def test_kept_records_keep_their_conflicts_as_stored(store: Store) -> None:
    # A kept record comes with its conflicts as the store has them: a batch that resolves
    # one removes it, a batch that keeps one does not count it as new, a batch that brings
    # it back does.
    from store.queries import open_conflicts

    live = worker(store)

    def phone(source: str, version: int, number: str, offset: int) -> list[tuple[str, str]]:
        raw = event("citizen", CITIZEN, source, version, {"phone": number})
        batch = checked_list([raw], offset)
        return live.apply(batch, [c.message for c in batch]).new_conflicts

    assert phone("province-01", 1, "0912345678", 0) == []
    assert phone("province-79", 1, "0987654321", 1) == [("citizen", "phone")]
    assert open_conflicts(store) == 1
    assert phone("province-79", 2, "0987654322", 2) == []  # still in conflict: not new
    assert phone("province-79", 3, "0912345678", 3) == []  # agreed: resolved
    assert open_conflicts(store) == 0
    assert phone("province-01", 2, "0900000000", 4) == [("citizen", "phone")]
    assert open_conflicts(store) == 1
    assert live.cache is not None and len(live.cache) == 1
