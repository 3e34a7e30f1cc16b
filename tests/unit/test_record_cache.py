"""The records a live worker keeps as it applied them (`consumers.cache`): bounded, dropped
whenever anything else may have written them, and never changing what the store ends up
holding (a property over interleavings of two workers, replays, remerges, purges and
failed batches, against the same operations with every batch reading the store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.cache import RecordCache
from consumers.checks import Checked
from consumers.reconciler import Reconciler
from schemas.views import SourceView
from store.core import Store
from tests.support.store_helpers import (
    CITIZEN,
    CITIZEN_2,
    T0,
    anomaly_rows,
    checked_list,
    event,
    fresh_store,
    history_rows,
)
from tests.unit.test_national_store_properties import (
    AUTHORITY_A,
    AUTHORITY_B,
    SETTINGS,
    Spec,
    specs,
    split,
    state,
    stream,
)

TP = ("portal.changes.citizen", 0)


def view(version: int) -> SourceView:
    return SourceView("province-01", version, f"e{version}", T0, False, {"full_name": "An"})


def filled(size: int = 10) -> RecordCache:
    cache = RecordCache(size)
    assert not cache.usable(0, [TP], {})  # the first batch: nothing held, the count noted
    keys = [("citizen", f"{n:012d}") for n in range(3)]
    views = {key: {"province-01": view(1)} for key in keys}
    conflicts = {keys[0]: {}, keys[1]: {"phone": [["province-01"], ["province-79"]]}}
    cache.put(keys, views, {key: {"full_name": "An"} for key in keys}, {TP: 3}, conflicts)
    return cache


def test_held_records_are_used_while_the_store_confirms_them() -> None:
    cache = filled()
    keys = {("citizen", "000000000001"), ("citizen", "999999999999")}
    assert cache.held(keys) == {("citizen", "000000000001")}
    assert cache.usable(0, [TP], {TP: 3})
    views: dict[Any, Any] = {}
    canonical: dict[Any, Any] = {}
    conflicts: dict[Any, Any] = {}
    taken = [("citizen", "000000000001"), ("citizen", "000000000002")]
    cache.take(taken, views, canonical, conflicts)
    assert views == {key: {"province-01": view(1)} for key in taken}
    assert canonical == {key: {"full_name": "An"} for key in taken}
    # Conflicts come along where the batch that kept the record gave them (not the third).
    phone = {"phone": [["province-01"], ["province-79"]]}
    assert conflicts == {("citizen", "000000000001"): phone}


@pytest.mark.parametrize(
    ("writes", "stored", "why"),
    [
        (1, {TP: 3}, "something else wrote records"),
        (0, {TP: 5}, "another worker applied the partition"),
        (0, {}, "the partition's offsets are gone"),
    ],
)
def test_everything_is_dropped_when_the_store_does_not_confirm(
    writes: int, stored: dict[Any, int], why: str
) -> None:
    cache = filled()
    assert not cache.usable(writes, [TP], stored), why
    assert len(cache) == 0
    assert cache.held([("citizen", "000000000001")]) == set()


def test_a_partition_this_worker_never_applied_does_not_matter() -> None:
    cache = filled()
    assert cache.usable(0, [TP, ("portal.changes.citizen", 1)], {TP: 3})
    assert len(cache) == 3


def test_a_revoked_partition_empties_it_before_the_next_batch() -> None:
    cache = filled()
    cache.invalidate()
    assert cache.held([("citizen", "000000000001")]) == set()
    assert len(cache) == 0


def test_bounded_the_least_recently_applied_first() -> None:
    cache = filled(size=3)
    newer = ("citizen", "000000000000")  # applied again: now the most recent
    extra = ("citizen", "000000000009")
    cache.put([newer, extra], {}, {}, {TP: 5})
    assert len(cache) == 3
    assert cache.held([("citizen", f"{n:012d}") for n in range(10)]) == {
        newer,
        extra,
        ("citizen", "000000000002"),
    }


# -- the store the cache leaves is the store without it -------------------------------------


class Run:
    """Two workers (each with its cache, or none) and the other writers of one store."""

    def __init__(self, store: Store, cached: bool) -> None:
        self.store = store
        self.workers = [
            Reconciler(store, AUTHORITY_A, cache=RecordCache(4) if cached else None)
            for _ in range(2)
        ]
        self.caches = [w.cache for w in self.workers]
        self.new_conflicts: list[list[tuple[str, str]]] = []  # each batch's, as reported

    def batch(self, worker: int, batch: Sequence[Checked], fail: bool) -> None:
        messages = [c.message for c in batch]
        if fail:

            def broken() -> None:
                raise RuntimeError("the commit failed")

            with pytest.raises(RuntimeError):
                self.workers[worker].apply(batch, messages, before_commit=broken)
        report = self.workers[worker].apply(batch, messages)
        self.new_conflicts.append(sorted(report.new_conflicts))

    def other(self, kind: str, batch: Sequence[Checked]) -> None:
        keys = sorted({(c.event.entity, c.event.key) for c in batch})
        if kind == "replay":
            Reconciler(self.store, AUTHORITY_A).apply(
                batch, [c.message for c in batch], replay=True
            )
        elif kind == "remerge":  # by other rules: canonical data the workers held changes
            Reconciler(self.store, AUTHORITY_B).remerge(keys)
        elif kind == "tombstones":
            self.store.purge_deleted(T0.replace(year=2100))


# Most events on the two citizens: the same records in batch after batch, where a record
# kept from a batch before another writer's would show.
event_lists = st.lists(
    st.one_of(specs().filter(lambda spec: spec.record < 2), specs()),
    min_size=1,
    max_size=16,
    unique_by=lambda s: (s.record, s.source, s.version),
)
operations = st.lists(
    st.tuples(
        st.integers(0, 1),  # the worker that applies the next batch
        st.sampled_from([False, False, False, True]),  # whose first try fails
        # then, another writer: a replay of the next batch (which the worker then finds
        # applied) or of other events, a remerge by other rules, the tombstones' purge
        st.sampled_from(["", "", "", "ahead", "replay", "remerge", "tombstones"]),
        st.lists(specs(), max_size=4),  # what "replay" applies
    ),
    min_size=1,
    max_size=8,
)


@settings(parent=SETTINGS, max_examples=80)
@given(event_set=event_lists, plan=operations, data=st.data())
def test_the_cache_never_changes_what_the_store_holds(
    event_set: list[Spec], plan: list[Any], data: Any
) -> None:
    messages = stream(event_set, partitions=2)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=6))
    batches = split(messages, cuts)
    results = []
    for cached in (False, True):
        with fresh_store() as store:
            run = Run(store, cached)
            for index, batch in enumerate(batches):
                worker, fail, other, replayed = plan[index % len(plan)]
                run.batch(worker, batch, fail)
                if other == "ahead":
                    run.other("replay", batches[(index + 1) % len(batches)])
                elif other:
                    run.other(other, stream(replayed, start=10_000) or batch)
            results.append(
                (state(store), history_rows(store), anomaly_rows(store), run.new_conflicts)
            )
    assert results[1] == results[0]


RESTORE_COUNTS = {
    # docs/operations.md's statement, in SQLite's words: the count and its time
    "documented": "INSERT INTO store_meta (name, value, updated_at)"
    " VALUES ('record_writes', '1', strftime('%Y-%m-%d %H:%M:%f', 'now'))"
    " ON CONFLICT (name) DO UPDATE SET value = CAST(CAST(store_meta.value AS INTEGER) + 1"
    " AS TEXT), updated_at = excluded.updated_at",
    # a hand-written count that forgets the time
    "value only": "UPDATE store_meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
    " WHERE name = 'record_writes'",
    "a replay": "",  # a counted write of the store's own, of another record
}


@pytest.mark.parametrize("count", sorted(RESTORE_COUNTS))
def test_a_store_restored_under_the_worker_and_counted_again_is_read_again(
    tmp_path: Any, count: str
) -> None:
    """A backup restored under a running worker brings the count of other writes back to
    an earlier value; counted once more, it can be the value the worker last saw, with the
    partition's offset the one it left. The count's time tells them apart: the worker
    reads the record again, and the store ends as without the cache (the cache held a
    view a replay added after the backup)."""
    first = event("citizen", CITIZEN, "province-01", 1, {"sex": "male"})
    second = event("citizen", CITIZEN, "province-01", 2, {"sex": "female"})
    replayed = event("citizen", CITIZEN, "province-79", 1, {"phone": "0912345678"})
    other = event("citizen", CITIZEN_2, "province-79", 1, {"phone": "0912345678"})

    def run(cache: RecordCache | None, folder: Any) -> Any:
        path, backup = folder / "store.db", folder / "backup.db"
        store = Store(f"sqlite:///{path}")
        store.create_schema()
        worker = Reconciler(store, AUTHORITY_A, cache=cache)

        def live(raw: bytes, offset: int) -> None:
            batch = checked_list([raw], offset)
            worker.apply(batch, [c.message for c in batch])

        def replay(raw: bytes) -> None:
            batch = checked_list([raw], 10_000)
            Reconciler(store, AUTHORITY_A).apply(batch, [c.message for c in batch], replay=True)

        def copy(source: Any, target: Any) -> None:
            with sqlite3.connect(source) as a, sqlite3.connect(target) as b:
                a.backup(b)
            a.close()
            b.close()

        live(first, 0)
        copy(path, backup)
        replay(replayed)  # counted: the worker's next batch sees the count move
        live(first, 0)  # a batch already applied (a retry): the record read again, held
        copy(backup, path)  # restored under the worker: the count and the offset of before
        if RESTORE_COUNTS[count]:
            with store.engine.begin() as conn:
                conn.exec_driver_sql(RESTORE_COUNTS[count])
        else:
            replay(other)
        live(second, 1)
        held = state(store)
        store.close()
        return held

    (tmp_path / "kept").mkdir()
    (tmp_path / "read").mkdir()
    assert run(RecordCache(), tmp_path / "kept") == run(None, tmp_path / "read")
