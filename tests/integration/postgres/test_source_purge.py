"""Recovery from a bad source (`portal-sync source purge`), on SQLite and PostgreSQL: a
source's views and tombstones go (all of them, of one entity, of one record), the touched
records are re-merged from the other sources (or removed, with their history entry),
conflicts and document owners follow as after a batch, one audit row records it; a dry
run changes nothing; a frozen view (version 2^62) can be cleared; large purges commit in
chunks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from consumers.merge import Authority
from consumers.reconciler import Reconciler
from portal_sync.ops import PURGE_CHUNK
from portal_sync.ops import purge as purging
from schemas.identifiers import ReferenceKey, key_reference
from store import utcnow
from store.base import upsert
from store.core import Store
from store.purge import PurgeCounts, PurgePlan, purges
from store.tables import metadata, source_purges, source_views
from tests.support.store_helpers import (
    CITIZEN,
    CITIZEN_2,
    DOSSIER,
    H26,
    ORG,
    REGISTRY,
    Feed,
    checked_list,
    conflict_rows,
    event,
    event_id,
    history_rows,
    owner_rows,
)

ROOT = Path(__file__).resolve().parents[3]
SECRET = ReferenceKey(b"k" * 32)
AUTHORITY = Authority.from_mapping({"dossier": {"*": ["owner:agency_code"]}}, REGISTRY)


@pytest.fixture
def store(store_url: str) -> Store:
    store = Store(store_url)
    store.create_schema()
    yield store  # type: ignore[misc]
    store.close()


def fill(store: Store) -> Feed:
    """province-01 sent wrong data: a citizen it shares with province-79 (and wins by
    recency), a citizen only it holds (the owner of province-79's document), a dossier only
    it holds, and a tombstone of an organisation province-79 still holds."""
    feed = Feed(store, AUTHORITY)
    feed.apply(
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "Đúng Tên", "email": "a@b.vn"}),
        event(
            "citizen", CITIZEN, "province-01", 5, {"full_name": "Sai Tên", "phone": "0912345678"}
        ),
        event("citizen", CITIZEN_2, "province-01", 2, {"full_name": "Không Có"}),
        event("dossier", DOSSIER, "province-01", 1, {"agency_code": H26, "status": 1}),
        event("organization", ORG, "province-01", 1, {"name": "Công ty sai"}),
        event("organization", ORG, "province-79", 1, {"name": "Công ty"}),
        event(
            "document",
            "GKS-1",
            "province-79",
            1,
            {"owner_kind": "citizen", "owner_id": CITIZEN_2, "title": "Giấy khai sinh"},
        ),
    )
    feed.apply(event("organization", ORG, "province-01", 2, None))
    return feed


def records(store: Store) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {(e, k): (d, s, p) for e, k, d, s, p in store.iter_records()}


def views(store: Store) -> list[tuple[str, str, str, bool]]:
    query = select(source_views.c.entity, source_views.c.key, source_views.c.source,
                   source_views.c.deleted)  # fmt: skip
    with store.engine.connect() as conn:
        return sorted((e, k, s, bool(d)) for e, k, s, d in conn.execute(query))


def snapshot(store: Store) -> dict[str, list[str]]:
    """Every table's rows (as text, sorted): to show that nothing changed."""
    with store.engine.connect() as conn:
        return {
            table.name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
            for table in metadata.sorted_tables
        }


def purge(
    store: Store,
    source: str = "province-01",
    entity: str | None = None,
    key: str | None = None,
    dry_run: bool = False,
    chunk: int = PURGE_CHUNK,
) -> purging.SourcePurge:
    audit = purging.new_purge(source, entity, key, "wrong data", "steward", SECRET)
    if not dry_run:  # as the command does, for a purge carried out
        audit = purging.carried_on(store, audit)
    return purging.run(store, AUTHORITY, audit, key, dry_run=dry_run, chunk=chunk)


def origin(source: str, version: int) -> dict[str, Any]:
    return {"source": source, "version": version}


def test_purge_of_every_view_of_a_source(store: Store) -> None:
    fill(store)
    assert conflict_rows(store) == [
        ("citizen", CITIZEN, "full_name", (("province-01",), ("province-79",)))
    ]
    assert owner_rows(store) == [("document", "GKS-1", "citizen", CITIZEN_2, False)]
    entries = len(history_rows(store))
    assert purging.plan(store, purging.new_purge("province-01", None, None, "x", "y", None),
                        None) == PurgePlan(3, 1, 2, 2)  # fmt: skip

    done = purge(store)

    assert done.counts == PurgeCounts(views=3, tombstones=1, records_remerged=2,
                                      records_changed=1, records_removed=2)  # fmt: skip
    assert [v for v in views(store) if v[2] == "province-01"] == []
    # the shared citizen now comes from province-79 alone; the others only province-01 held
    assert records(store) == {
        ("citizen", CITIZEN): (
            {"email": "a@b.vn", "full_name": "Đúng Tên"},
            {"province-79": 1},
            {"email": origin("province-79", 1), "full_name": origin("province-79", 1)},
        ),
        ("document", "GKS-1"): (
            {"owner_id": CITIZEN_2, "owner_kind": "citizen", "title": "Giấy khai sinh"},
            {"province-79": 1},
            dict.fromkeys(("owner_id", "owner_kind", "title"), origin("province-79", 1)),
        ),
        ("organization", ORG): (
            {"name": "Công ty"},
            {"province-79": 1},
            {"name": origin("province-79", 1)},
        ),
    }
    # each changed or removed record has its history entry, named by the purge's id
    rows = history_rows(store)
    assert rows[entries:] == [
        ("citizen", CITIZEN, done.id, "purge", None,
         {"full_name": ["Sai Tên", "Đúng Tên"], "phone": ["0912345678", None]}),
        ("citizen", CITIZEN_2, done.id, "purge", None, {"full_name": ["Không Có", None]}),
        ("dossier", DOSSIER, done.id, "purge", None, {"agency_code": [H26, None],
                                                      "status": [1, None]}),
    ]  # fmt: skip
    # the conflict resolved; the document waits for its owner again
    assert conflict_rows(store) == []
    assert owner_rows(store) == [("document", "GKS-1", "citizen", CITIZEN_2, True)]
    # the audit row
    (row,) = purges(store)
    assert row["id"] == done.id
    assert (row["source"], row["entity"], row["reference"]) == ("province-01", None, None)
    assert (row["operator"], row["reason"]) == ("steward", "wrong data")
    assert row["started_at"] <= row["finished_at"] <= utcnow()
    counted = [row[c] for c in ("views", "tombstones", "records_remerged", "records_changed",
                                "records_removed")]  # fmt: skip
    assert counted == [3, 1, 2, 1, 2]
    # a second purge finds nothing and says so
    again = purge(store)
    assert again.counts == PurgeCounts()
    assert len(purges(store)) == 2


def test_purge_of_one_entity(store: Store) -> None:
    fill(store)
    done = purge(store, entity="citizen")
    assert done.counts == PurgeCounts(views=2, tombstones=0, records_remerged=1,
                                      records_changed=1, records_removed=1)  # fmt: skip
    assert [v[:2] for v in views(store) if v[2] == "province-01"] == [
        ("dossier", DOSSIER),
        ("organization", ORG),
    ]
    assert set(records(store)) == {
        ("citizen", CITIZEN), ("document", "GKS-1"), ("dossier", DOSSIER), ("organization", ORG),
    }  # fmt: skip
    (row,) = purges(store)
    assert (row["entity"], row["reference"]) == ("citizen", None)


def test_purge_of_one_record(store: Store) -> None:
    fill(store)
    done = purge(store, entity="citizen", key=CITIZEN)
    assert done.counts == PurgeCounts(views=1, tombstones=0, records_remerged=1,
                                      records_changed=1, records_removed=0)  # fmt: skip
    assert [v[:2] for v in views(store) if v[2] == "province-01"] == [
        ("citizen", CITIZEN_2),
        ("dossier", DOSSIER),
        ("organization", ORG),
    ]
    assert records(store)[("citizen", CITIZEN)][2]["full_name"] == origin("province-79", 1)
    (row,) = purges(store)
    # the record is named by its keyed reference, never by the key
    assert (row["entity"], row["reference"]) == ("citizen", key_reference(CITIZEN, SECRET))
    assert CITIZEN not in repr(row)
    # a tombstone alone: the organisation is re-merged, unchanged
    done = purge(store, entity="organization", key=ORG)
    assert done.counts == PurgeCounts(views=0, tombstones=1, records_remerged=1)
    assert records(store)[("organization", ORG)][0] == {"name": "Công ty"}


def test_a_dry_run_changes_nothing_and_reports_what_the_run_does(store: Store) -> None:
    fill(store)
    before = snapshot(store)
    dry = purge(store, dry_run=True, chunk=2)
    assert snapshot(store) == before  # no view, record, history or audit row
    assert purges(store) == []
    done = purge(store, chunk=2)
    assert dry.counts == done.counts == PurgeCounts(3, 1, 2, 1, 2)


def test_a_frozen_view_is_cleared_and_the_source_applies_again(store: Store) -> None:
    """A version of 2^62, written before versions were capped at 2^53, makes every real
    update of that (source, entity, key) stale, until the view is purged."""
    feed = Feed(store, AUTHORITY)
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}))
    with store.write_transaction() as conn:
        conn.execute(
            source_views.update()
            .where(source_views.c.key == CITIZEN)
            .values(version=2**62, event_id="frozen")
        )
    report = feed.apply(event("citizen", CITIZEN, "province-01", 5, {"full_name": "Ân"}))
    assert [o.outcome for o in report.outcomes] == ["stale"]

    done = purge(store, entity="citizen", key=CITIZEN)
    assert done.counts == PurgeCounts(views=1, records_removed=1)
    assert records(store) == {}

    report = feed.apply(event("citizen", CITIZEN, "province-01", 5, {"full_name": "Ân"}))
    assert [o.outcome for o in report.outcomes] == ["applied"]
    assert records(store)[("citizen", CITIZEN)][1] == {"province-01": 5}
    assert views(store) == [("citizen", CITIZEN, "province-01", False)]
    assert history_rows(store)[-1][2:5] == (
        event_id("province-01", "citizen", CITIZEN, 5), "province-01", 5,
    )  # fmt: skip


def test_a_purge_waits_for_the_workers_batch_on_its_records(store: Store) -> None:
    """The purge locks its records as the live worker's batches do (advisory locks on
    PostgreSQL, BEGIN IMMEDIATE on SQLite): it waits for a batch in flight and then
    removes what that batch wrote too."""
    feed = fill(store)
    holding, release = threading.Event(), threading.Event()
    batch = checked_list(
        [event("citizen", CITIZEN, "province-01", 9, {"full_name": "Sai Nữa"})], feed.offset
    )

    def worker() -> None:
        feed.reconciler.apply(
            batch,
            [c.message for c in batch],
            before_commit=lambda: (holding.set(), release.wait(30)),
        )

    done: list[purging.SourcePurge] = []
    in_flight = threading.Thread(target=worker)
    in_flight.start()
    assert holding.wait(30)
    purger = threading.Thread(target=lambda: done.append(purge(store, "province-01", "citizen")))
    purger.start()
    purger.join(1.5)
    assert done == []  # waiting for the worker's transaction
    release.set()
    in_flight.join(30)
    purger.join(60)
    assert done[0].counts == PurgeCounts(views=2, records_remerged=1, records_changed=1,
                                         records_removed=1)  # fmt: skip
    assert [v for v in views(store) if v[0] == "citizen"] == [
        ("citizen", CITIZEN, "province-79", False)
    ]
    assert records(store)[("citizen", CITIZEN)][0]["full_name"] == "Đúng Tên"


def many_citizens(store: Store, count: int) -> list[str]:
    keys = [f"0010900{n:05d}" for n in range(count)]
    Feed(store).apply(*(event("citizen", k, "province-01", 1, {"full_name": "X"}) for k in keys))
    return keys


def test_a_large_purge_commits_in_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk is a transaction of its own that writes the audit row with what it
    committed: a purge that fails in its third chunk keeps the first two (and says so);
    running it again finishes it, under its own record (a second row held the rest, and
    the first never finished)."""
    keys = many_citizens(store, 5)
    real = Reconciler.purge
    calls: list[list[tuple[str, str]]] = []

    def failing_third(self: Reconciler, *args: Any, **kwargs: Any) -> PurgeCounts:
        calls.append(list(args[1]))
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Reconciler, "purge", failing_third)
    with pytest.raises(RuntimeError):
        purge(store, chunk=2)
    assert [len(c) for c in calls] == [2, 2, 1]
    assert [k for _, k in calls[0] + calls[1] + calls[2]] == keys  # every key once, in order
    assert [k for _, k, _, _ in views(store)] == keys[4:]
    (row,) = purges(store)
    assert (row["views"], row["records_removed"], row["finished_at"]) == (4, 4, None)

    monkeypatch.setattr(Reconciler, "purge", real)
    other = purge(store, source="province-79", chunk=2)  # another source's: its own row
    done = purge(store, chunk=2)
    assert done.id == row["id"] and done.started_at == row["started_at"]
    assert done.counts == PurgeCounts(views=5, records_removed=5)
    assert views(store) == [] and records(store) == {}
    finished = {r["id"]: r["finished_at"] is not None for r in purges(store)}
    assert finished == {row["id"]: True, other.id: True}
    again = purge(store, chunk=2)  # a finished purge is not carried on
    assert again.id not in finished and again.counts == PurgeCounts()


def test_a_purge_of_a_record_named_by_its_mask_is_never_carried_on(store: Store) -> None:
    """Without a reference key two keys can have one mask: the purge of the second was
    recorded under the interrupted purge of the first (another operator's, its reason)."""
    one, other = "001090000101", "001090000201"
    first = purging.new_purge("province-01", "citizen", one, "k1 wrong", "alice", None)
    second = purging.new_purge("province-01", "citizen", other, "k2 wrong", "bob", None)
    assert first.reference == second.reference  # the same mask
    with store.write_transaction() as conn:  # the first, interrupted: no finished_at
        upsert(conn, source_purges, [first.row()], ["id"])
    assert purging.carried_on(store, second) is second


def test_a_chunk_exactly_full_ends_the_purge(store: Store) -> None:
    many_citizens(store, 4)
    done = purge(store, chunk=2)
    assert done.counts == PurgeCounts(views=4, records_removed=4)
    assert views(store) == []


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    base.update(COLUMNS="200", **env)
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=ROOT,
        timeout=120,
    )


def test_the_command_plans_dry_runs_and_purges(store: Store, store_url: str) -> None:
    fill(store)
    before = snapshot(store)
    common = ("--store", store_url, "--reason", "wrong data")
    plan = run_cli("source", "purge", "province-01", *common)
    assert plan.returncode == 0, plan.stderr
    assert ("purge of province-01 (every entity): 3 views, 1 tombstones; 2 records to "
            "re-merge from other sources, 2 to remove") in plan.stdout  # fmt: skip
    assert "plan only: pass --yes" in plan.stdout
    dry = run_cli("source", "purge", "province-01", "--dry-run", "--chunk-size", "2", *common)
    assert dry.returncode == 0, dry.stderr
    assert (
        "dry run, nothing written: would remove 3 views and 1 tombstones; 2 records "
        "re-merged from other sources (1 of them changed), 2 removed"
    ) in dry.stdout
    assert snapshot(store) == before

    done = run_cli("source", "purge", "province-01", "--yes", "--operator", "an", *common)
    assert done.returncode == 0, done.stderr
    (row,) = purges(store)
    assert (f"purged province-01: removed 3 views and 1 tombstones; 2 records re-merged from "
            f"other sources (1 of them changed), 2 removed; recorded as purge {row['id']}"
            ) in done.stdout  # fmt: skip
    assert (row["operator"], row["reason"], row["views"]) == ("an", "wrong data", 3)
    assert [v for v in views(store) if v[2] == "province-01"] == []


def test_the_plan_asks_once_per_view_whether_other_sources_hold_its_record(
    postgres_store_url: str,
) -> None:
    """`source purge`'s plan (run before every purge and dry run) evaluated its EXISTS
    twice per view, as two sums' conditions: 2.6 million index probes for a province's
    331,000 views in a review at national scale. PostgreSQL's own plan shows one now."""
    from sqlalchemy import event as engine_event

    from store.purge import purge_plan

    store = Store(postgres_store_url)
    try:
        store.create_schema()
        fill(store)
        seen: list[tuple[str, Any]] = []

        def statement(conn: Any, cursor: Any, sql: str, parameters: Any, *_: Any) -> None:
            if "EXISTS" in sql:
                seen.append((sql, parameters))

        engine_event.listen(store.engine, "before_cursor_execute", statement)
        try:
            assert purge_plan(store, "province-01", None, None) == PurgePlan(3, 1, 2, 2)
        finally:
            engine_event.remove(store.engine, "before_cursor_execute", statement)
        assert len(seen) == 1
        sql, parameters = seen[0]
        with store.engine.connect() as conn:
            explained = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, parameters)
            plan = explained.scalar_one()[0]["Plan"]

        def subplans(node: dict[str, Any]) -> list[dict[str, Any]]:
            found = [node] if node.get("Parent Relationship") == "SubPlan" else []
            for child in node.get("Plans", ()):
                found += subplans(child)
            return found

        probes = subplans(plan)
        assert len(probes) == 1, probes
        assert probes[0]["Actual Loops"] == 4  # once per view of province-01
    finally:
        store.close()
