"""What the store forgets (the worker's retention job, with the clock moved) and the access
log's append-only guard on PostgreSQL; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from consumers.metrics import RETENTION_PURGED
from consumers.retention import Retention, purge
from schemas.identifiers import ReferenceKey, key_reference
from store import queries, utcnow
from store.core import Store
from store.tables import (
    access_log,
    apply_journal,
    record_deletions,
    record_history,
    source_views,
)
from tests.support.store_helpers import CITIZEN, CITIZEN_2, CITIZEN_MISSING, Feed, event

DAY = timedelta(days=1)
SECRET = ReferenceKey(b"r" * 32)
RETENTION = Retention(
    history_days=730, deleted_days=180, access_log_days=730, journal_days=730, reference_key=SECRET
)


@pytest.fixture
def store(store_url: str) -> Store:
    store = Store(store_url)
    store.create_schema()
    yield store  # type: ignore[misc]
    store.close()


def history(store: Store, key: str) -> list[tuple[object, ...]]:
    """The record's entries, those forgotten past the retention too (under its reference)."""
    query = (
        select(record_history.c.changes, record_history.c.purged_at)
        .where(record_history.c.key.in_([key, key_reference(key, SECRET)]))
        .order_by(record_history.c.id)
    )
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def views(store: Store) -> list[tuple[str, str, bool]]:
    query = select(source_views.c.key, source_views.c.source, source_views.c.deleted)
    with store.engine.connect() as conn:
        return sorted((k, s, bool(d)) for k, s, d in conn.execute(query))


def counted(kind: str) -> float:
    return RETENTION_PURGED.labels(kind)._value.get()


def test_deleted_records_lose_their_history_values_and_tombstones_after_the_retention(
    store: Store,
) -> None:
    feed = Feed(store)
    feed.apply(
        # deleted by its only source
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An", "phone": "0912345678"}),
        # deleted by one source, still held by another
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Bình"}),
        event("citizen", CITIZEN_2, "province-79", 1, {"phone": "0987654321"}),
        # never deleted
        event("citizen", CITIZEN_MISSING, "province-01", 1, {"full_name": "Cúc"}),
    )
    feed.apply(event("citizen", CITIZEN, "province-01", 2, {"full_name": "An", "phone": None}))
    feed.apply(
        event("citizen", CITIZEN, "province-01", 3, None),
        event("citizen", CITIZEN_2, "province-79", 2, None),
    )
    kept_2, kept_3 = history(store, CITIZEN_2), history(store, CITIZEN_MISSING)
    now = utcnow()
    before = {k: counted(k) for k in ("deleted_history_values", "tombstones")}

    # within the retention nothing changes
    assert purge(store, RETENTION, now + 179 * DAY) == {
        "history": 0, "deleted_history_values": 0, "tombstones": 0, "access_log": 0,
        "apply_journal": 0,
    }  # fmt: skip
    assert [c for c, _ in history(store, CITIZEN)] == [
        {"full_name": [None, "An"], "phone": [None, "0912345678"]},
        {"phone": ["0912345678", None]},
        {"full_name": ["An", None], "phone": [None, None]},  # null: asserted empty
    ]

    # past it, the deleted record's values go, its tombstone too; the others stay
    counts = purge(store, RETENTION, now + 181 * DAY)
    assert counts == {
        "history": 0, "deleted_history_values": 3, "tombstones": 1, "access_log": 0,
        "apply_journal": 0,
    }  # fmt: skip
    purged = history(store, CITIZEN)
    assert [c for c, _ in purged] == [
        {"full_name": [None, None], "phone": [None, None]},
        {"phone": [None, None]},
        {"full_name": [None, None], "phone": [None, None]},
    ]
    assert all(isinstance(at, datetime) for _, at in purged)
    # The personal id goes with the values: the entries stay under the key's reference (as
    # `history` and the access log name it), without the event ids derived from the key.
    with store.engine.connect() as conn:
        kept = conn.execute(
            select(record_history.c.key, record_history.c.event_id).where(
                record_history.c.purged_at.is_not(None)
            )
        ).all()
    assert kept == [(key_reference(CITIZEN, SECRET), None)] * 3
    rows, total = queries.history(store, "citizen", CITIZEN, None, key_reference(CITIZEN, SECRET))
    assert total == 3 and all(row["purged_at"] for row in rows)
    assert history(store, CITIZEN_2) == kept_2 and history(store, CITIZEN_MISSING) == kept_3
    assert views(store) == [
        (CITIZEN_MISSING, "province-01", False),
        (CITIZEN_2, "province-01", False),
        (CITIZEN_2, "province-79", True),
    ]
    assert counted("deleted_history_values") == before["deleted_history_values"] + 3
    assert counted("tombstones") == before["tombstones"] + 1
    # a second run has nothing left to do
    assert sum(purge(store, RETENTION, now + 182 * DAY).values()) == 0

    # the record can come back with a new version; its new history keeps its values
    feed.apply(event("citizen", CITIZEN, "province-01", 4, {"full_name": "An"}))
    assert history(store, CITIZEN)[-1] == ({"full_name": [None, "An"]}, None)


def test_a_forgotten_dossier_takes_its_unforeseen_status_changes_with_it(store: Store) -> None:
    """`dossier_anomalies` name the dossier and are kept while the record exists
    (privacy.md): the retention that forgets a deleted dossier removes them too."""
    from tests.support.store_helpers import anomaly_rows

    h26 = "000.00.01.H26"
    gone, kept = f"{h26}-240115-0001", f"{h26}-240115-0002"
    feed = Feed(store)
    for key in (gone, kept):
        feed.apply(event("dossier", key, "province-01", 1, {"agency_code": h26, "status": 2}))
        feed.apply(event("dossier", key, "province-01", 2, {"agency_code": h26, "status": 1}))
    assert sorted(row[0] for row in anomaly_rows(store)) == [gone, kept]
    feed.apply(event("dossier", gone, "province-01", 3, None))
    now = utcnow()
    assert purge(store, RETENTION, now + 179 * DAY)["tombstones"] == 0
    assert len(anomaly_rows(store)) == 2  # within the retention: kept
    assert purge(store, RETENTION, now + 181 * DAY)["tombstones"] == 1
    assert [row[0] for row in anomaly_rows(store)] == [kept]


def test_a_deletion_counts_from_the_last_source_that_deleted(store: Store) -> None:
    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN, "province-79", 1, {"phone": "0912345678"}),
    )
    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    long_ago = utcnow() - 400 * DAY
    with store.write_transaction() as conn:  # province-01 deleted long ago
        conn.execute(update(source_views).values(applied_at=long_ago))
    feed.apply(event("citizen", CITIZEN, "province-79", 2, None))  # the last source, now

    assert purge(store, RETENTION, utcnow())["tombstones"] == 0
    assert purge(store, RETENTION, utcnow() + 181 * DAY)["tombstones"] == 2


def test_access_log_rows_are_purged_after_their_retention(store: Store) -> None:
    now = utcnow()
    store.log_access("alice", "show", "ticket 1", [("citizen", "ref-1")], now=now - 10 * DAY)
    store.log_access("bob", "export", "ticket 2", [], now=now)
    before = counted("access_log")

    assert purge(store, RETENTION, now + 719 * DAY)["access_log"] == 0
    assert purge(store, RETENTION, now + 729 * DAY)["access_log"] == 1
    assert [(r["operator"], r["reason"]) for r in store.access_entries()] == [("bob", "ticket 2")]
    assert counted("access_log") == before + 1


def journal(store: Store) -> list[tuple[int, int]]:
    query = select(apply_journal.c.first_offset, apply_journal.c.next_offset)
    with store.engine.connect() as conn:
        return sorted((first, end) for first, end in conn.execute(query.order_by("id")))


def test_the_batches_journal_is_deleted_after_its_retention(store: Store) -> None:
    """A row a partition a batch, never deleted before: billions of rows a year at a
    national load. Kept `journal_days` (30 by default); on PostgreSQL the purge function
    keeps the last 7 days whatever it is asked (a worker's clock run ahead)."""
    feed = Feed(store)
    for version in range(1, 4):  # three batches: offsets [0, 1), [1, 2), [2, 3)
        feed.apply(event("citizen", CITIZEN, "province-01", version, {"full_name": "An"}))
    now = utcnow()
    with store.engine.begin() as conn:  # the first two committed 40 and 31 days ago
        for first, age in ((0, 40), (1, 31)):
            conn.execute(
                update(apply_journal)
                .where(apply_journal.c.first_offset == first)
                .values(committed_at=now - age * DAY)
            )
    before = counted("apply_journal")
    retention = Retention(journal_days=30)
    assert purge(store, retention, now)["apply_journal"] == 2
    assert journal(store) == [(2, 3)]
    assert counted("apply_journal") == before + 2
    # a clock 40 days ahead: the row of today is 40 days old by it
    ahead = purge(store, retention, now + 40 * DAY)["apply_journal"]
    assert ahead == (0 if store.backend == "postgresql" else 1)


def test_the_access_log_is_append_only_on_postgresql(postgres_store_url: str) -> None:
    store = Store(postgres_store_url)
    store.create_schema()
    try:
        store.log_access("alice", "show", "ticket 1", [("citizen", "ref-1")])
        store.log_access("bob", "history", "ticket 2", [("citizen", "ref-2")])
        attempts = [
            update(access_log).values(reason="nothing to see"),
            delete(access_log),
            delete(access_log).where(access_log.c.operator == "alice"),
        ]
        for statement in attempts:
            with pytest.raises(DBAPIError, match="append-only"), store.engine.begin() as conn:
                conn.execute(statement)
        with pytest.raises(DBAPIError, match="append-only"), store.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE access_log")
        assert [r["reason"] for r in store.access_entries()] == ["ticket 1", "ticket 2"]

        # only the retention purge deletes, and its permission ends with its transaction
        assert store.purge_access_log(utcnow() + DAY) == 2
        store.log_access("carol", "export", "ticket 3", [])
        with store.engine.connect() as conn:
            for _ in range(2):  # the same session as the purge's, if the pool hands it back
                with pytest.raises(DBAPIError, match="append-only"), conn.begin():
                    conn.execute(delete(access_log))
        assert [r["operator"] for r in store.access_entries()] == ["carol"]
    finally:
        store.close()


def notes(store: Store) -> dict[str, datetime]:
    """`record_deletions`: the records the retention's tombstone purge checks, by key."""
    with store.engine.connect() as conn:
        return {r.key: r.deleted_at for r in conn.execute(select(record_deletions))}


def deleted_long_ago(store: Store, count: int, when: datetime) -> list[str]:
    """`count` citizens whose only source deleted them at `when`: their tombstones alone,
    written as a worker of a release before the notes would have (no note). Their keys."""
    keys = [f"0010900{i:05d}" for i in range(count)]
    with store.write_transaction() as conn:
        conn.execute(
            source_views.insert(),
            [{"entity": "citizen", "key": key, "source": "province-01", "version": 2,
              "event_id": f"00000000-0000-0000-0000-{i:012d}", "occurred_at": when,
              "deleted": True, "data": None, "applied_at": when}
             for i, key in enumerate(keys)],
        )  # fmt: skip
    return keys


def test_the_purge_checks_the_noted_records_and_keeps_the_notes_true(store: Store) -> None:
    """A batch notes each record it leaves without a canonical record (a delete that came
    before any upsert too), never one another source still holds. The check purges what is
    due, drops the note of a record that came back, and moves one deleted again since to its
    newest tombstone's time."""
    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN_MISSING, "province-01", 1, {"full_name": "Cúc"}),
        event("citizen", CITIZEN_MISSING, "province-79", 1, {"phone": "0987654321"}),
    )
    before = utcnow()
    feed.apply(
        event("citizen", CITIZEN, "province-01", 2, None),  # its only source
        event("citizen", CITIZEN_2, "province-01", 1, None),  # a delete before any upsert
        event("citizen", CITIZEN_MISSING, "province-79", 2, None),  # province-01 holds it
    )
    after = utcnow()
    noted = notes(store)
    assert sorted(noted) == sorted([CITIZEN, CITIZEN_2])
    assert all(before <= at <= after for at in noted.values())

    feed.apply(event("citizen", CITIZEN_2, "province-01", 2, {"full_name": "Bình"}))  # back
    assert notes(store) == noted  # a batch never moves a note

    long_ago = utcnow() - 400 * DAY
    with store.write_transaction() as conn:  # CITIZEN's deletion, long ago
        conn.execute(update(record_deletions).values(deleted_at=long_ago))
        conn.execute(update(source_views).values(applied_at=long_ago))
    feed.apply(event("citizen", CITIZEN, "province-79", 1, None))  # ... and again, now
    with store.engine.connect() as conn:
        again = conn.execute(
            select(source_views.c.applied_at).where(
                source_views.c.key == CITIZEN, source_views.c.source == "province-79"
            )
        ).scalar_one()

    assert purge(store, RETENTION, utcnow())["tombstones"] == 0
    assert notes(store) == {CITIZEN: again}  # CITIZEN_2's note went: it is back
    assert purge(store, RETENTION, utcnow() + 181 * DAY)["tombstones"] == 2
    assert notes(store) == {}


def test_a_source_purge_that_leaves_tombstones_only_makes_the_record_due(store: Store) -> None:
    """province-79 deleted the record long ago while province-01 held it; purging
    province-01's view leaves the old tombstone alone: due at the next check, from the
    tombstone's own time, not from the purge's."""
    from consumers.merge import Authority
    from portal_sync.ops import purge as purging

    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN, "province-79", 1, {"phone": "0912345678"}),
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Bình"}),  # its only source
    )
    feed.apply(event("citizen", CITIZEN, "province-79", 2, None))
    with store.write_transaction() as conn:
        conn.execute(update(source_views).values(applied_at=utcnow() - 400 * DAY))
    assert notes(store) == {}

    audit = purging.new_purge("province-01", None, None, "wrong data", "steward", None)
    purging.run(store, Authority(), audit, None)
    assert views(store) == [(CITIZEN, "province-79", True)]
    # CITIZEN_2 has no view left: its values go a retention after the purge removed it
    assert sorted(notes(store)) == [CITIZEN, CITIZEN_2]
    assert purge(store, RETENTION, utcnow())["tombstones"] == 1
    assert views(store) == [] and list(notes(store)) == [CITIZEN_2]
    assert history(store, CITIZEN_2)[0] == ({"full_name": [None, "Bình"]}, None)
    assert purge(store, RETENTION, utcnow() + 179 * DAY)["deleted_history_values"] == 0
    assert purge(store, RETENTION, utcnow() + 181 * DAY)["deleted_history_values"] == 2
    assert [c for c, _ in history(store, CITIZEN_2)] == [
        {"full_name": [None, None]},  # the event's entry
        {"full_name": [None, None]},  # the purge's entry
    ]
    assert notes(store) == {}


def test_a_dossier_a_source_purge_took_the_tombstones_of_is_still_forgotten(
    store: Store,
) -> None:
    """A dossier its only source deleted, whose tombstone a source purge then removed:
    no view is left, and still its history's values and its unforeseen status changes go
    a deleted record's retention after its last delete (privacy.md), not never."""
    from consumers.merge import Authority
    from portal_sync.ops import purge as purging
    from tests.support.store_helpers import anomaly_rows

    h26 = "000.00.01.H26"
    gone = f"{h26}-240115-0001"
    feed = Feed(store)
    feed.apply(event("dossier", gone, "province-01", 1, {"agency_code": h26, "status": 2}))
    feed.apply(event("dossier", gone, "province-01", 2, {"agency_code": h26, "status": 1}))
    feed.apply(event("dossier", gone, "province-01", 3, None))
    deleted_at = notes(store)[gone]
    audit = purging.new_purge("province-01", "dossier", None, "wrong data", "steward", None)
    purging.run(store, Authority(), audit, None)
    assert views(store) == [] and notes(store)[gone] == deleted_at  # its delete's time
    assert len(anomaly_rows(store)) == 1
    now = utcnow()
    assert purge(store, RETENTION, now + 179 * DAY)["deleted_history_values"] == 0
    assert purge(store, RETENTION, now + 181 * DAY)["deleted_history_values"] == 3
    assert anomaly_rows(store) == [] and notes(store) == {}
    assert all(purged is not None for _, purged in history(store, gone))


def test_a_purge_of_a_deleted_records_last_tombstone_counts_from_its_delete(
    store: Store,
) -> None:
    """Its only source deleted it 170 days ago; a source purge then removes the tombstone:
    its values go 180 days after that delete (privacy.md), not 180 days after the purge
    (up to 350 days after the delete before)."""
    from consumers.merge import Authority
    from portal_sync.ops import purge as purging

    feed = Feed(store)
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "Nguyễn Văn A"}))
    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    long_ago = utcnow() - 170 * DAY
    with store.write_transaction() as conn:
        conn.execute(update(source_views).values(applied_at=long_ago))
        conn.execute(update(record_deletions).values(deleted_at=long_ago))
    audit = purging.new_purge("province-01", "citizen", None, "wrong data", "steward", None)
    purging.run(store, Authority(), audit, None)
    assert views(store) == [] and notes(store) == {CITIZEN: long_ago}
    assert purge(store, RETENTION, utcnow() + 9 * DAY)["deleted_history_values"] == 0
    assert purge(store, RETENTION, utcnow() + 11 * DAY)["deleted_history_values"] == 2
    assert notes(store) == {}


def test_a_purge_that_removes_the_last_view_counts_from_itself_never_from_an_older_note(
    store: Store,
) -> None:
    """The note of a record a purge leaves with no view is the purge's time, whatever the
    note said: `DUE_AT_ONCE` from an earlier purge that left a tombstone, or the time of a
    delete the record has come back from since (the values written since would go at the
    next run, not a retention later)."""
    from consumers.merge import Authority
    from portal_sync.ops import purge as purging

    feed = Feed(store)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN, "province-79", 1, {"phone": "0912345678"}),
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Bình"}),
    )
    feed.apply(event("citizen", CITIZEN, "province-79", 2, None))  # a tombstone, today
    feed.apply(event("citizen", CITIZEN_2, "province-01", 2, None))  # deleted ...
    with store.write_transaction() as conn:  # ... 170 days ago
        conn.execute(update(record_deletions).values(deleted_at=utcnow() - 170 * DAY))
    feed.apply(event("citizen", CITIZEN_2, "province-01", 3, {"full_name": "Bình"}))  # back
    for source in ("province-01", "province-79"):  # before any retention run
        audit = purging.new_purge(source, "citizen", None, "wrong data", "steward", None)
        purging.run(store, Authority(), audit, None)
    assert views(store) == []
    purged_at = utcnow()
    assert all(at > purged_at - DAY for at in notes(store).values()), notes(store)
    assert purge(store, RETENTION, utcnow() + 10 * DAY)["deleted_history_values"] == 0
    assert all(purged is None for _, purged in history(store, CITIZEN_2))
    assert purge(store, RETENTION, utcnow() + 181 * DAY)["deleted_history_values"] > 0
    assert notes(store) == {}


def test_the_worker_works_off_a_backlog_of_due_records_chunk_by_chunk_within_its_time(
    store: Store,
) -> None:
    """1,200 records every source deleted long ago and 300 notes of records with no views
    (more than two chunks): a run with no time left does one chunk and says more is due
    (each step of a run gets one, whatever the steps before it took); the next works the
    rest off, chunk by chunk, each chunk leaving the due notes."""
    long_ago = utcnow() - 400 * DAY
    gone = deleted_long_ago(store, 1200, long_ago)
    with store.write_transaction() as conn:
        conn.execute(
            record_deletions.insert(),
            [{"entity": "citizen", "key": key, "deleted_at": long_ago}
             for key in gone + [f"0480900{i:05d}" for i in range(300)]],
        )  # fmt: skip
    older_than = utcnow() - 180 * DAY
    _, first, done = store.purge_deleted_within(older_than, 0.0)
    assert not done and len(notes(store)) == 1000  # one chunk of notes (500) checked
    _, rest, done = store.purge_deleted_within(older_than, 600.0)
    assert done and first + rest == 1200
    assert notes(store) == {} and views(store) == []


def test_a_day_after_the_upgrade_the_views_fill_the_notes_and_the_freshness_again(
    store: Store,
) -> None:
    """A worker of the release before 0011 and 0012 went on after the upgrade: it deleted
    a record and applied a source's change without noting either. A day later the
    retention run fills both tables from the views again, beside the batches; the record
    is then purged in its time."""
    import threading

    from consumers.retention import catch_up_if_due
    from store.fills import CATCH_UP_AFTER

    store.set_meta(CATCH_UP_AFTER, (utcnow() + DAY).isoformat())  # as the migrations do
    long_ago = utcnow() - 400 * DAY
    with store.write_transaction() as conn:  # what the old worker wrote: views alone
        conn.execute(
            source_views.insert(),
            [{"entity": "citizen", "key": CITIZEN, "source": source, "version": 2,
              "event_id": f"00000000-0000-0000-0000-00000000000{i}", "occurred_at": long_ago,
              "deleted": True, "data": None, "applied_at": long_ago}
             for i, source in enumerate(["province-01", "province-79"])],
        )  # fmt: skip
    assert notes(store) == {} and store.freshness() == []

    assert catch_up_if_due(store, utcnow()) is None  # not before its day
    stopping = threading.Event()
    stopping.set()
    assert catch_up_if_due(store, utcnow() + 2 * DAY, stopping) is None  # a worker stopping
    thread = catch_up_if_due(store, utcnow() + 2 * DAY)
    assert thread is not None
    thread.join(timeout=60)
    assert notes(store) == {CITIZEN: long_ago}
    assert sorted(f.source for f in store.freshness()) == ["province-01", "province-79"]
    assert store.meta(CATCH_UP_AFTER) is None  # once: the worker that took the row
    assert store.catch_up(utcnow() + 3 * DAY) is False
    # a worker that took it (its lease: an hour) and stopped: another takes it over later
    taken = (utcnow() + timedelta(hours=1)).isoformat()
    store.set_meta(CATCH_UP_AFTER, taken)
    assert store.catch_up(utcnow()) is False  # still its
    assert store.catch_up(utcnow() + timedelta(hours=2)) is True
    assert store.meta(CATCH_UP_AFTER) is None
    assert catch_up_if_due(store, utcnow() + 3 * DAY) is None
    assert purge(store, RETENTION, utcnow())["tombstones"] == 2


def test_the_catch_up_of_a_store_without_views_completes(store: Store) -> None:
    """Workers started before any source sent (or every view purged since): nothing to
    fill. The freshness's write of no rows failed, the row stayed due an hour later, and
    the retention failed every hour (`PortalSyncRetentionFailing`)."""
    from consumers.retention import catch_up_if_due
    from store.fills import CATCH_UP_AFTER

    store.set_meta(CATCH_UP_AFTER, (utcnow() + DAY).isoformat())  # as the migrations do
    thread = catch_up_if_due(store, utcnow() + 2 * DAY)
    assert thread is not None
    thread.join(timeout=60)
    assert store.meta(CATCH_UP_AFTER) is None
    assert store.catch_up(utcnow() + 3 * DAY) is False
    assert notes(store) == {} and store.freshness() == []


def test_the_catch_up_reads_page_by_page_and_gives_way(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,200 records deleted by every source (more than two pages) are all noted; a worker
    whose compare-and-set loses does nothing; a stopped one gives the row back, due."""
    import threading

    from store.fills import CATCH_UP_AFTER

    deleted_long_ago(store, 1200, utcnow() - 400 * DAY)
    due = (utcnow() - DAY).isoformat()

    store.set_meta(CATCH_UP_AFTER, due)
    stop = threading.Event()
    stop.set()
    assert store.catch_up(utcnow(), stop) is False
    assert store.meta(CATCH_UP_AFTER) == due and notes(store) == {}  # given back, due

    real_meta = store.meta
    monkeypatch.setattr(store, "meta", lambda name: due if name == CATCH_UP_AFTER else None)
    store.set_meta(CATCH_UP_AFTER, "2099-01-01T00:00:00+00:00")  # another worker's lease
    assert store.catch_up(utcnow()) is False  # it read `due`, the row said otherwise
    assert notes(store) == {}
    monkeypatch.setattr(store, "meta", real_meta)

    store.set_meta(CATCH_UP_AFTER, due)
    assert store.catch_up(utcnow()) is True
    assert len(notes(store)) == 1200 and store.meta(CATCH_UP_AFTER) is None
    assert [f.source for f in store.freshness()] == ["province-01"]


def test_the_catch_up_moves_freshness_forward_only_and_not_for_a_purged_source(
    store: Store,
) -> None:
    """The freshness the catch-up read is written as the migration's fill writes it: an
    existing row keeps a newer time, and a source whose views were purged between the
    read and the write gets no row back. Stopped after the read: nothing written, the row
    given back."""
    import threading

    from store.fills import CATCH_UP_AFTER
    from store.tables import source_freshness

    long_ago = utcnow() - 400 * DAY
    with store.write_transaction() as conn:
        conn.execute(
            source_views.insert(),
            [{"entity": "citizen", "key": CITIZEN, "source": source, "version": 2,
              "event_id": f"00000000-0000-0000-0000-00000000000{i}", "occurred_at": long_ago,
              "deleted": False, "data": {}, "applied_at": long_ago}
             for i, source in enumerate(["province-01", "province-79"])],
        )  # fmt: skip
        newer = utcnow() - DAY
        conn.execute(source_freshness.insert().values(
            source="province-01", topic="", partition=-1, last_change=newer, last_applied=newer
        ))  # fmt: skip
    due = (utcnow() - DAY).isoformat()

    class AfterTheRead(threading.Event):
        """`is_set` is asked before the row is taken, then after the freshness's read."""

        def __init__(self, purge: bool) -> None:
            super().__init__()
            self.asked, self.purge = 0, purge

        def is_set(self) -> bool:
            self.asked += 1
            if self.asked == 2 and self.purge:  # a `source purge` of province-79 meanwhile
                with store.write_transaction() as conn:
                    conn.execute(delete(source_views).where(source_views.c.source == "province-79"))
            return self.asked == 2 and not self.purge

    store.set_meta(CATCH_UP_AFTER, due)
    assert store.catch_up(utcnow(), AfterTheRead(purge=False)) is False
    assert store.meta(CATCH_UP_AFTER) == due
    assert [f.last_change for f in store.freshness()] == [newer]

    assert store.catch_up(utcnow(), AfterTheRead(purge=True)) is True
    [fresh] = store.freshness()
    assert (fresh.source, fresh.last_change, fresh.last_applied) == ("province-01", newer, newer)


def test_history_and_access_log_are_deleted_a_chunk_at_a_time_within_a_run_s_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lowered retention, or days of failed runs, leave many rows due: a run deletes a
    chunk of each at least and stops at its time, and says more is due; runs a minute
    apart finish them. Nothing due after its retention is kept."""
    import store.retention as retention

    monkeypatch.setattr(retention, "RETENTION_CHUNK", 3)
    feed = Feed(store)
    for version in range(1, 8):  # seven history entries
        feed.apply(
            event("citizen", CITIZEN, "province-01", version, {"full_name": f"An {version}"})
        )
    store.log_access("alice", "show", "ticket 1", [("citizen", f"ref-{n}") for n in range(5)])
    later = utcnow() + 400 * DAY
    assert store.prune_history_within(later, 0.0) == (3, False)
    assert store.purge_access_log_within(later, 0.0) == (3, False)
    assert len(history(store, CITIZEN)) == 4
    assert store.prune_history_within(later, 0.0) == (3, False)
    assert store.prune_history_within(later, 0.0) == (1, True)
    assert store.purge_access_log_within(later, None) == (2, True)
    assert history(store, CITIZEN) == [] and store.access_entries() == []


def test_a_host_clock_run_ahead_does_not_date_the_retention_on_postgresql(
    postgres_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's clock 100 days ahead (a bad time server) counted the retention from its
    own time: history and access log rows deleted early, for good. The run counts from the
    earlier of its clock and the database server's."""
    import consumers.retention

    store = Store(postgres_store_url)
    store.create_schema()
    try:
        real = utcnow()
        monkeypatch.setattr(consumers.retention, "utcnow", lambda: real + 100 * DAY)
        assert abs(consumers.retention.retention_now(store) - real) < timedelta(minutes=1)
        monkeypatch.setattr(consumers.retention, "utcnow", lambda: real - DAY)  # behind
        assert consumers.retention.retention_now(store) == real - DAY
    finally:
        store.close()


def test_the_journal_is_dated_by_the_server_on_postgresql(
    postgres_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its retention deletes the oldest rows by id: rows a worker's clock dated 100 days
    ahead, at the head of that order, held every older row behind them (the purge found
    none due there, and was done)."""
    import consumers.reconciler

    store = Store(postgres_store_url)
    store.create_schema()
    try:
        real = utcnow()
        monkeypatch.setattr(consumers.reconciler, "utcnow", lambda: real + 100 * DAY)
        Feed(store).apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}))
        with store.engine.connect() as conn:
            (at,) = conn.execute(select(apply_journal.c.committed_at)).scalars().all()
        assert abs(at - real) < timedelta(minutes=1)
    finally:
        store.close()
