"""What the store forgets (the worker's retention job, with the clock moved) and the access
log's append-only guard on PostgreSQL; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from consumers.metrics import RETENTION_PURGED
from consumers.retention import Retention, purge
from store import utcnow
from store.core import Store
from store.tables import access_log, record_history, source_views
from tests.support.store_helpers import CITIZEN, CITIZEN_2, CITIZEN_MISSING, Feed, event

DAY = timedelta(days=1)
RETENTION = Retention(history_days=730, deleted_days=180, access_log_days=730)


@pytest.fixture
def store(store_url: str) -> Store:
    store = Store(store_url)
    store.create_schema()
    yield store  # type: ignore[misc]
    store.close()


def history(store: Store, key: str) -> list[tuple[object, ...]]:
    query = (
        select(record_history.c.changes, record_history.c.purged_at)
        .where(record_history.c.key == key)
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
    }  # fmt: skip
    purged = history(store, CITIZEN)
    assert [c for c, _ in purged] == [
        {"full_name": [None, None], "phone": [None, None]},
        {"phone": [None, None]},
        {"full_name": [None, None], "phone": [None, None]},
    ]
    assert all(isinstance(at, datetime) for _, at in purged)
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
