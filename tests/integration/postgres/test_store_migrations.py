"""The store's schema under Alembic, on SQLite and PostgreSQL: a new store reaches the
models' schema; a first-schema store (stamped 0001, or made before migrations) is upgraded by
`portal-sync store upgrade` with its data kept and provenance filled; an old store is
refused until upgraded."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    inspect,
    null,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from consumers.config import RULES_FINGERPRINT, rules_fingerprint
from consumers.merge import Authority
from consumers.reconciler import Reconciler
from store import queries, schema
from store.core import Store
from store.schema import SchemaOutdated, current_revision, ensure_current, head_revision
from store.tables import (
    UTCDateTime,
    applied_offsets,
    apply_journal,
    metadata,
    record_deletions,
    record_history,
    records,
    source_views,
)
from tests.support.store_helpers import (
    CITIZEN,
    ORG,
    TOPIC,
    checked_list,
    event,
    owner_rows,
    put_records,
)

ROOT = Path(__file__).resolve().parents[3]
DAY = timedelta(days=1)
T1 = datetime(2024, 1, 15, 3, 0, tzinfo=UTC)
T2 = datetime(2024, 1, 15, 4, 0, tzinfo=UTC)


def _json() -> Any:
    return JSON().with_variant(postgresql.JSONB(), "postgresql")


# The first schema's own models, as its `metadata.create_all` made stores before
# migrations existed (no alembic_version table).
first_schema = MetaData()
Table(
    "source_views",
    first_schema,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("data", _json()),
    Column("applied_at", UTCDateTime, nullable=False),
)
Table(
    "records",
    first_schema,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("data", _json(), nullable=False),
    Column("sources", _json(), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
Table(
    "applied_offsets",
    first_schema,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
Table(
    "apply_journal",
    first_schema,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("first_offset", BigInteger, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("events", Integer, nullable=False),
    Column("committed_at", UTCDateTime, nullable=False),
)

VIEWS = [
    # citizen: two live sources, s-a the later one; organization: s-a deleted, s-b live
    ("citizen", CITIZEN, "s-a", 2, "e-1", T2, False, {"full_name": "An", "phone": "0912345678"}),
    ("citizen", CITIZEN, "s-b", 1, "e-2", T1, False, {"full_name": "Bình", "sex": "male"}),
    ("organization", ORG, "s-a", 3, "e-3", T2, True, None),
    ("organization", ORG, "s-b", 1, "e-4", T1, False, {"name": "Công ty"}),
]
SPINE_RECORDS = [
    (
        "citizen",
        CITIZEN,
        {"full_name": "An", "phone": "0912345678", "sex": "male"},
        {"s-a": 2, "s-b": 1},
    ),
    ("organization", ORG, {"name": "Công ty"}, {"s-b": 1}),
]


def schema_differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def make_first_schema_store(url: str, how: str) -> Store:
    """A first-schema store with data: at Alembic revision 0001, or made by create_all."""
    store = Store(url)
    if how == "alembic":
        config = schema._config()
        with store.engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0001")
    else:
        first_schema.create_all(store.engine)
    names = ("entity", "key", "source", "version", "event_id", "occurred_at", "deleted", "data")
    with store.engine.begin() as conn:
        conn.execute(
            insert(first_schema.tables["source_views"]),
            [{**dict(zip(names, v, strict=True)), "applied_at": T2} for v in VIEWS],
        )
        conn.execute(
            insert(first_schema.tables["records"]),
            [
                {"entity": e, "key": k, "data": d, "sources": s, "updated_at": T2}
                for e, k, d, s in SPINE_RECORDS
            ],
        )
        conn.execute(
            insert(first_schema.tables["applied_offsets"]),
            [{"topic": TOPIC, "partition": 0, "next_offset": 4, "updated_at": T2}],
        )
        conn.execute(
            insert(first_schema.tables["apply_journal"]),
            [
                {
                    "topic": TOPIC,
                    "partition": 0,
                    "first_offset": 0,
                    "next_offset": 4,
                    "events": 4,
                    "committed_at": T2,
                }
            ],
        )
    return store


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    base.update(COLUMNS="200", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=ROOT,
        timeout=120,
    )


def table_rows(store: Store, table: Table, *columns: str) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(*(table.c[c] for c in columns)))
        return sorted(tuple(r) for r in rows)


# -- a new store --------------------------------------------------------------------------


def test_upgrade_from_empty_reaches_the_models(store_url: str) -> None:
    store = Store(store_url)
    try:
        assert current_revision(store.engine) is None
        assert schema.upgrade(store.engine) == (None, head_revision())
        head = head_revision()
        assert head >= "0002"  # the national store's revision, or a later one
        assert current_revision(store.engine) == head
        assert schema_differences(store.engine) == []
        tables = set(inspect(store.engine).get_table_names())
        assert set(metadata.tables) | {"alembic_version"} == tables
        # a second upgrade is a no-op
        assert schema.upgrade(store.engine) == (head, head)
        ensure_current(store.engine)
    finally:
        store.close()


def test_create_schema_makes_a_current_store(store_url: str) -> None:
    store = Store(store_url)
    try:
        store.create_schema()
        assert current_revision(store.engine) == head_revision()
        assert schema_differences(store.engine) == []
        store.create_schema()  # idempotent on a current store
    finally:
        store.close()


def test_drop_everything_empties_the_store(store_url: str) -> None:
    store = Store(store_url)
    try:
        store.create_schema()
        schema.drop_project_tables(store.engine)
        assert inspect(store.engine).get_table_names() == []
        assert current_revision(store.engine) is None
    finally:
        store.close()


# -- upgrading a first-schema store --------------------------------------------------------------


@pytest.mark.parametrize("how", ["alembic", "create_all"])
def test_upgrade_from_the_first_schema_keeps_data_and_fills_provenance(
    store_url: str, how: str
) -> None:
    store = make_first_schema_store(store_url, how)
    try:
        assert current_revision(store.engine) == "0001"
        with pytest.raises(SchemaOutdated, match="portal-sync store upgrade"):
            ensure_current(store.engine)
        views_before = table_rows(store, source_views, *source_views.c.keys())
        offsets_before = table_rows(store, applied_offsets, *applied_offsets.c.keys())
        journal_before = table_rows(store, apply_journal, *apply_journal.c.keys())

        result = run_cli("store", "upgrade", "--store", store_url)
        assert result.returncode == 0, result.stderr
        assert f"schema: 0001 → {head_revision()}" in result.stdout
        assert "re-merged 2 records written before provenance (0 changed)" in result.stdout

        assert current_revision(store.engine) == head_revision()
        ensure_current(store.engine)
        assert schema_differences(store.engine) == []
        assert table_rows(store, source_views, *source_views.c.keys()) == views_before
        assert table_rows(store, applied_offsets, *applied_offsets.c.keys()) == offsets_before
        assert table_rows(store, apply_journal, *apply_journal.c.keys()) == journal_before
        assert list(store.iter_records()) == [
            (
                "citizen",
                CITIZEN,
                {"full_name": "An", "phone": "0912345678", "sex": "male"},
                {"s-a": 2, "s-b": 1},
                {
                    "full_name": {"source": "s-a", "version": 2},
                    "phone": {"source": "s-a", "version": 2},
                    "sex": {"source": "s-b", "version": 1},
                },
            ),
            (
                "organization",
                ORG,
                {"name": "Công ty"},
                {"s-b": 1},
                {"name": {"source": "s-b", "version": 1}},
            ),
        ]
        assert store.keys_without_provenance() == []
        assert table_rows(store, record_history, "key") == []

        # the upgraded store goes on from its offsets and its views
        later = event("citizen", CITIZEN, "s-b", 2, {"full_name": "Bình", "sex": "female"})
        batch = checked_list([later], start=4)
        report = Reconciler(store, Authority()).apply(batch, [c.message for c in batch])
        assert [o.outcome for o in report.outcomes] == ["applied"]
        record = next(store.iter_records("citizen"))
        # s-a's view (kept through the upgrade) is still the latest for full_name
        assert record[2] == {"full_name": "An", "phone": "0912345678", "sex": "female"}
        assert record[4]["sex"] == {"source": "s-b", "version": 2}
        assert store.all_offsets() == {(TOPIC, 0): 5}

        # upgrading again changes nothing, and no longer looks at every record (a scan of
        # the whole table at each upgrade's Job)
        assert store.meta("records.provenance_complete") == "yes"
        again = run_cli("store", "upgrade", "--store", store_url)
        assert again.returncode == 0, again.stderr
        assert f"schema: {head_revision()} → {head_revision()}" in again.stdout
        assert "re-merged" not in again.stdout
    finally:
        store.close()


def test_upgrade_remerges_only_under_the_workers_rules(tmp_path: Path) -> None:
    """An upgrade whose re-merge was cut short, run again once workers have recorded their
    rules, with other rules: refused, nothing re-merged; with the workers' rules it ends."""
    url = f"sqlite:///{tmp_path / 'first_schema.db'}"
    store = make_first_schema_store(url, "create_all")
    authority = tmp_path / "authority.toml"
    authority.write_text('[citizen]\nfull_name = ["s-b"]\n', encoding="utf-8")
    env = {"PORTAL_SYNC_AUTHORITY_FILE": str(authority)}
    try:
        store.upgrade()  # the schema upgraded, its re-merge not run
        store.set_meta(RULES_FINGERPRINT, rules_fingerprint(None, authority))
        refused = run_cli("store", "upgrade", "--store", url)  # the default authority
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "the worker of this store runs with" in " ".join(refused.stderr.split())
        assert len(store.keys_without_provenance()) == 2
        assert store.meta("records.provenance_complete") is None

        result = run_cli("store", "upgrade", "--store", url, env=env)
        assert result.returncode == 0, result.stderr
        assert "re-merged 2 records written before provenance (1 changed)" in result.stdout
        assert store.keys_without_provenance() == []
    finally:
        store.close()


def test_upgrade_remerges_under_the_configured_authority(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'first_schema.db'}"
    store = make_first_schema_store(url, "create_all")
    authority = tmp_path / "authority.toml"
    authority.write_text('[citizen]\nfull_name = ["s-b"]\n', encoding="utf-8")
    try:
        result = run_cli(
            "store",
            "upgrade",
            "--store",
            url,
            env={"PORTAL_SYNC_AUTHORITY_FILE": str(authority)},
        )
        assert result.returncode == 0, result.stderr
        assert "re-merged 2 records written before provenance (1 changed)" in result.stdout
        citizen = next(store.iter_records("citizen"))
        assert citizen[2]["full_name"] == "Bình"
        assert citizen[4]["full_name"] == {"source": "s-b", "version": 1}
        assert table_rows(store, record_history, "key", "source", "changes") == [
            (CITIZEN, "remerge", {"full_name": ["An", "Bình"]})
        ]
    finally:
        store.close()


# -- an old store is refused --------------------------------------------------------------


@pytest.mark.parametrize("how", ["alembic", "create_all"])
def test_an_old_store_is_refused_until_upgraded(store_url: str, how: str) -> None:
    store = make_first_schema_store(store_url, how)
    try:
        with pytest.raises(SchemaOutdated, match="0001"):
            ensure_current(store.engine)
        with pytest.raises(SchemaOutdated):
            store.create_schema()
        # refusing changed nothing: still the first_schema's tables
        assert "record_history" not in inspect(store.engine).get_table_names()
        assert "provenance" not in {c["name"] for c in inspect(store.engine).get_columns("records")}
        schema.upgrade(store.engine)
        ensure_current(store.engine)
        assert {"record_history", "field_conflicts"} <= set(inspect(store.engine).get_table_names())
        # records written before 0002 have no provenance until they are re-merged
        assert store.keys_without_provenance() == [("citizen", CITIZEN), ("organization", ORG)]
        assert table_rows(store, records, "key") == [(CITIZEN,), (ORG,)]
    finally:
        store.close()


def test_workers_starting_together_on_a_new_store_all_find_it_created(store_url: str) -> None:
    """Several processes creating the schema of one empty store at once: one creates it,
    the others wait and find it current (before: a unique violation on PostgreSQL's
    catalog, and one worker exited at its first start)."""
    script = "import sys; from store import Store; s = Store(sys.argv[1]); s.create_schema()"
    starters = [
        subprocess.Popen([sys.executable, "-c", script, store_url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in starters]
    assert [p.returncode for p in starters] == [0] * 4, errors
    store = Store(store_url)
    assert current_revision(store.engine) == head_revision()
    store.close()


# -- 0007: provenance kept per source -----------------------------------------------------------


def _migrate(store: Store, revision: str, down: bool = False) -> None:
    config = schema._config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, revision)


def test_0007_keeps_provenance_per_source_and_reads_it_back_per_field(store_url: str) -> None:
    """Rows of a 0006 store (more than one chunk of the migration) are rewritten source ->
    fields; readers see the same field -> {source, version}; the downgrade restores them."""
    store = Store(store_url)
    try:
        _migrate(store, "0006")
        sources = {"province-01": 7, "national-population": 3}
        rows = [
            {
                "entity": "citizen",
                "key": f"{i:012d}",
                "data": {"full_name": "Nguyễn Văn An", "phone": "0912345678", "sex": "male"},
                "sources": sources,
                "updated_at": T2,
                "provenance": {
                    "full_name": {"source": "national-population", "version": 3},
                    "phone": {"source": "province-01", "version": 7},
                    "sex": {"source": "national-population" if i % 2 else "province-01",
                            "version": 3 if i % 2 else 7},
                },
            }
            for i in range(6001)
        ]  # fmt: skip
        rows[0]["provenance"] = {}  # a record with no fields
        rows[1]["provenance"] = null()  # written before 0002: re-merged by `store upgrade`
        with store.engine.begin() as conn:
            conn.execute(insert(records), rows)
        _migrate(store, "head")
        stored = dict(
            ((e, k), p) for e, k, p in table_rows(store, records, "entity", "key", "provenance")
        )
        assert stored[("citizen", f"{0:012d}")] == {}
        assert stored[("citizen", f"{1:012d}")] is None
        assert stored[("citizen", f"{2:012d}")] == {
            "national-population": ["full_name"],
            "province-01": ["phone", "sex"],
        }
        assert stored[("citizen", f"{3:012d}")] == {
            "national-population": ["full_name", "sex"],
            "province-01": ["phone"],
        }
        rows[1]["provenance"] = None
        read = {(e, k): p for e, k, _, _, p in store.iter_records()}
        assert read == {(r["entity"], r["key"]): r["provenance"] for r in rows}
        _migrate(store, "0006", down=True)
        restored = table_rows(store, records, "entity", "key", "provenance")
        assert restored == [(r["entity"], r["key"], r["provenance"]) for r in rows]
    finally:
        store.close()


# -- 0008: JSON documents as text ------------------------------------------------------------


def _json_types(store: Store) -> dict[tuple[str, str], str]:
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND data_type IN ('json', 'jsonb')"
        )
        return {(table, column): kind for table, column, kind in rows}


def test_the_migrations_write_utc_times_whatever_the_server_s_zone(
    postgres_store_url: str,
) -> None:
    """`CURRENT_TIMESTAMP` into a `timestamp` column is the server's local time: on a
    server in Vietnam's zone, `store_meta`'s times read 7 hours ahead."""
    from store.tables import store_meta

    store = Store(postgres_store_url)
    try:
        with store.engine.begin() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
            conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Ho_Chi_Minh'"))
        store.engine.dispose()  # new connections take the database's zone
        before = datetime.now(UTC)
        store.create_schema()
        with store.engine.connect() as conn:
            zone = conn.execute(text("SHOW timezone")).scalar_one()
            times = dict(conn.execute(select(store_meta.c.name, store_meta.c.updated_at)).all())
        assert zone == "Asia/Ho_Chi_Minh"
        assert times and all(
            before - timedelta(minutes=1) < at < datetime.now(UTC) + timedelta(minutes=1)
            for at in times.values()
        ), times
    finally:
        store.close()


def test_0008_keeps_every_document_as_text_and_back(postgres_store_url: str) -> None:
    """Documents written under `jsonb` read back the same once `json`, and after the
    downgrade: Vietnamese text, nesting, nulls, floats and an integer beyond 64 bits."""
    store = Store(postgres_store_url)
    try:
        _migrate(store, "0007")
        assert set(_json_types(store).values()) == {"jsonb"}
        data = {
            "full_name": "Nguyễn Thị Ánh",
            "permanent_address": {"province_code": "79", "ward_code": "26734", "line": None},
            "score": 2.5,
            "big": 184467440737095516160,
            "flags": [True, False, None],
        }
        row = {
            "entity": "citizen",
            "key": CITIZEN,
            "data": data,
            "sources": {"province-79": 3},
            "updated_at": T2,
            "provenance": {"province-79": sorted(data)},
        }
        with store.engine.begin() as conn:
            conn.execute(insert(records), [row])
        columns = ("entity", "key", "data", "sources", "provenance")
        expected = [tuple(row[c] for c in columns)]
        _migrate(store, "0008")
        assert _json_types(store) == {
            ("source_views", "data"): "json",
            ("records", "data"): "json",
            ("records", "sources"): "json",
            ("records", "provenance"): "json",
            ("record_history", "changes"): "json",
            ("field_conflicts", "sources"): "json",
        }
        assert table_rows(store, records, *columns) == expected
        _migrate(store, "0007", down=True)
        assert set(_json_types(store).values()) == {"jsonb"}
        assert table_rows(store, records, *columns) == expected
    finally:
        store.close()


# -- 0009: a document waits for its owner while no record of the owner exists ---------------


def test_0009_reads_waiting_from_the_records_and_the_downgrade_fills_the_flag_back(
    store_url: str,
) -> None:
    """The stored flag goes (and the owner index); the same documents read as waiting
    before and after the upgrade; the downgrade fills the flag from the records."""
    store = Store(store_url)
    try:
        _migrate(store, "0008")
        owners = Table("document_owners", MetaData(), autoload_with=store.engine)
        assert "waiting" in owners.c
        rows = [
            ("document", "GKS-1", "citizen", CITIZEN, False),  # the owner is in the store
            ("document", "GKS-2", "citizen", "079300000002", True),  # it is not
        ]
        with store.engine.begin() as conn:
            conn.execute(
                insert(records),
                [{"entity": "citizen", "key": CITIZEN, "data": {}, "sources": {},
                  "updated_at": T1, "provenance": {}}],
            )  # fmt: skip
            conn.execute(
                insert(owners),
                [{"entity": e, "key": k, "owner_entity": oe, "owner_key": ok, "waiting": w,
                  "updated_at": T1} for e, k, oe, ok, w in rows],
            )  # fmt: skip
        _migrate(store, "0009")
        assert "waiting" not in {
            c["name"] for c in inspect(store.engine).get_columns("document_owners")
        }
        assert not inspect(store.engine).get_indexes("document_owners")
        assert owner_rows(store) == rows
        assert queries.waiting_documents(store) == 1
        with store.engine.begin() as conn:  # the owner goes: its document now waits
            conn.execute(records.delete())
        assert queries.waiting_documents(store) == 2
        _migrate(store, "0008", down=True)
        owners = Table("document_owners", MetaData(), autoload_with=store.engine)
        assert [i["name"] for i in inspect(store.engine).get_indexes("document_owners")] == [
            "ix_document_owners_owner"
        ]
        with store.engine.connect() as conn:
            flags = sorted((r.key, r.waiting) for r in conn.execute(select(owners)))
        assert flags == [("GKS-1", True), ("GKS-2", True)]
    finally:
        store.close()


# -- 0010: the count of record writes by anything but a live batch ---------------------------


def test_0010_starts_the_count_of_other_writes_and_a_release_before_it_refuses_the_store(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row starts at 0 (and is kept if a tool of this version counted already); the
    downgrade removes it; a release whose newest revision is 0009 refuses the upgraded
    store instead of writing records behind a worker that keeps them."""
    store = Store(store_url)
    try:
        _migrate(store, "0009")
        assert store.meta("record_writes") is None
        _migrate(store, "0010")
        assert store.meta("record_writes") == "0"
        _migrate(store, "0009", down=True)
        assert store.meta("record_writes") is None
        store.set_meta("record_writes", "3")  # counted by a tool before the upgrade
        _migrate(store, "0010")
        assert store.meta("record_writes") == "3"
        monkeypatch.setattr(schema, "head_revision", lambda: "0009")
        with pytest.raises(SchemaOutdated, match="at schema revision 0010"):
            schema.ensure_current(store.engine)
    finally:
        store.close()


# -- 0011: the sources' freshness in a table kept by each batch ------------------------------


def test_0011_fills_the_freshness_from_the_views_once_and_the_downgrade_drops_it(
    store_url: str,
) -> None:
    """A worker of the upgraded store starts from the same freshness the views gave."""
    store = Store(store_url)
    try:
        _migrate(store, "0010")
        views = [
            ("province-01", CITIZEN, T1, T2),
            ("province-01", "079300000002", T2, T2),
            ("national-population", CITIZEN, T1, T1),
        ]
        with store.engine.begin() as conn:
            conn.execute(
                insert(source_views),
                [{"entity": "citizen", "key": key, "source": source, "version": 1,
                  "event_id": f"e-{i}", "occurred_at": occurred, "deleted": False,
                  "data": {}, "applied_at": applied}
                 for i, (source, key, occurred, applied) in enumerate(views)],
            )  # fmt: skip
        _migrate(store, "0011")
        assert sorted((f.source, f.last_change, f.last_applied) for f in store.freshness()) == [
            ("national-population", T1, T1),
            ("province-01", T2, T2),
        ]
        when = store.meta("catch_up_after")  # the fill runs again a day later (store.fills)
        assert when is not None
        assert timedelta(hours=23) < datetime.fromisoformat(when) - datetime.now(UTC) <= DAY
        _migrate(store, "0010", down=True)
        assert "source_freshness" not in inspect(store.engine).get_table_names()
        assert store.meta("catch_up_after") is None
    finally:
        store.close()


# -- 0012: the records the retention's tombstone purge checks --------------------------------


def test_0012_notes_every_record_deleted_by_all_its_sources_and_the_downgrade_drops_it(
    store_url: str,
) -> None:
    store = Store(store_url)
    try:
        _migrate(store, "0011")
        views = [  # (key, source, deleted, applied_at)
            (CITIZEN, "province-01", True, T1),  # deleted by both: noted at the newest
            (CITIZEN, "province-79", True, T2),
            ("079300000002", "province-01", True, T1),  # still held by province-79
            ("079300000002", "province-79", False, T1),
            ("079300000003", "province-01", False, T2),  # never deleted
        ]
        with store.engine.begin() as conn:
            conn.execute(
                insert(source_views),
                [{"entity": "citizen", "key": key, "source": source, "version": 1,
                  "event_id": f"e-{i}", "occurred_at": T1, "deleted": deleted,
                  "data": None if deleted else {}, "applied_at": applied}
                 for i, (key, source, deleted, applied) in enumerate(views)],
            )  # fmt: skip
        _migrate(store, "0012")
        with store.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select(record_deletions))]
        assert rows == [("citizen", CITIZEN, T2)]
        _migrate(store, "0011", down=True)
        assert "record_deletions" not in inspect(store.engine).get_table_names()
    finally:
        store.close()


# -- 0013: the change topics' ids -------------------------------------------------------------


def test_0013_keeps_the_id_of_each_topic_applied_until_a_reset_and_the_downgrade_drops_it(
    store_url: str,
) -> None:
    citizen, dossier = "portal.changes.citizen", "portal.changes.dossier"
    store = Store(store_url)
    try:
        _migrate(store, "0012")
        _migrate(store, "0013")
        store.record_topic_ids({citizen: "id-1", dossier: "d"})
        store.reset_offsets({(citizen, 0): 5}, "op", "events applied")
        # the id of a topic with events applied stays; one without any, created again
        # before any was applied, takes the new one
        store.record_topic_ids({citizen: "id-2", dossier: "e"})
        assert store.topic_ids() == {citizen: "id-1", dossier: "e"}
        store.reset_offsets({(citizen, 0): 0}, "op", "created again", {citizen: "id-2"})
        assert store.topic_ids()[citizen] == "id-2"
        _migrate(store, "0012", down=True)
        assert "topic_ids" not in inspect(store.engine).get_table_names()
    finally:
        store.close()


# -- 0014: redrives by the dead-letter topic's id ---------------------------------------------


def test_0014_tells_the_letters_of_a_dead_letter_topic_created_again_apart(
    store_url: str,
) -> None:
    letters = "portal.dead-letters"
    store = Store(store_url)
    try:
        _migrate(store, "0013")
        with store.engine.begin() as conn:  # recorded before: by place only
            conn.execute(
                text(
                    'INSERT INTO dead_letter_redrives (topic, partition, "offset", reason_code,'
                    " target_topic, redriven_at) VALUES (:t, 0, 3, 'invalid_field',"
                    " 'portal.changes.citizen', :at)"
                ),
                {"t": letters, "at": T1},
            )
        _migrate(store, head_revision())  # through 0014 (the code records by the head's table)
        # Recorded without an id: it stands for its place whatever the topic's id, for a
        # letter that failed by the time it was recorded (`portal_sync.ops.dlq`).
        assert store.redriven(letters, "id-1") == {(0, 3): T1}
        _redrive(store, letters, "id-1")
        assert store.redriven(letters, "id-1") == {(0, 3): T1, (0, 5): None}
        # The topic created again: its letter at 0:5 is not the earlier one, re-driven once.
        assert store.redriven(letters, "id-2") == {(0, 3): T1}
        _redrive(store, letters, "id-2")
        assert store.redriven(letters, "id-2") == {(0, 3): T1, (0, 5): None}
        _migrate(store, "0013", down=True)
        with store.engine.connect() as conn:
            rows = conn.execute(
                text('SELECT partition, "offset" FROM dead_letter_redrives ORDER BY 2')
            ).all()
        assert [tuple(r) for r in rows] == [(0, 3), (0, 5)]  # one row a place
    finally:
        store.close()


def _redrive(store: Store, letters: str, topic_id: str, operator: str | None = None) -> None:
    """A redrive of the letter at 0:5, recorded as `dlq redrive` records it."""
    with store.claim_redrive(
        letters, 0, 5, "invalid_field", "portal.changes.citizen", topic_id, operator
    ) as claimed:
        assert claimed


# -- 0015: an operator's reset of any group -----------------------------------------------


def test_0015_down_keeps_the_resets_of_other_groups_as_group_resets(store_url: str) -> None:
    """The table is a record of what operators did: a downgrade deleted every reset of
    another group (who rewound it, and why)."""
    store = Store(store_url)
    try:
        _migrate(store, "0015")
        row = (
            "INSERT INTO offset_changes (kind, topic, partition, from_offset, to_offset,"
            " operator, reason, changed_at, consumer_group) VALUES (:kind, 'portal.changes."
            "citizen', 0, 10, 4, 'Lê Thị Hoa', :reason, :at, :group)"
        )
        with store.engine.begin() as conn:
            conn.execute(text(row), {"kind": "skip", "reason": "poison", "at": T1, "group": None})
            conn.execute(text(row), {"kind": "reset", "reason": "x" * 1000, "at": T1,
                                     "group": "analytics"})  # fmt: skip
        _migrate(store, "0014", down=True)
        query = text("SELECT kind, reason FROM offset_changes ORDER BY id")
        with store.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(query)]
        assert rows == [
            ("skip", "poison"),
            ("group-reset", ("[group analytics] " + "x" * 1000)[:1000]),
        ]
    finally:
        store.close()


# -- 0016: who re-drove a dead letter ------------------------------------------------------


def test_0016_records_who_redrives_and_keeps_the_earlier_redrives(store_url: str) -> None:
    letters = "portal.dead-letters"
    store = Store(store_url)
    try:
        _migrate(store, "0015")
        store_row = (
            'INSERT INTO dead_letter_redrives (topic, topic_id, partition, "offset", reason_code,'
            " target_topic, redriven_at) VALUES (:t, 'id-1', 0, 3, 'invalid_field',"
            " 'portal.changes.citizen', :at)"
        )
        with store.engine.begin() as conn:
            conn.execute(text(store_row), {"t": letters, "at": T1})
        _migrate(store, "0016")
        _redrive(store, letters, "id-1", "Trần Văn Đức")
        query = text('SELECT "offset", operator FROM dead_letter_redrives ORDER BY 1')
        with store.engine.connect() as conn:
            assert [tuple(r) for r in conn.execute(query)] == [(3, None), (5, "Trần Văn Đức")]
        assert store.redriven(letters, "id-1") == {(0, 3): None, (0, 5): None}
        _migrate(store, "0015", down=True)
        with store.engine.connect() as conn:
            rows = conn.execute(text('SELECT "offset" FROM dead_letter_redrives ORDER BY 1'))
            assert [r[0] for r in rows] == [3, 5]
    finally:
        store.close()


# -- 0019: the records' keys in byte order --------------------------------------------------


def test_0019_puts_the_records_keys_in_byte_order_and_keeps_every_record(
    postgres_store_url: str,
) -> None:
    """The columns' collation (which Alembic's comparison of the models does not see) is
    `C` after the upgrade, the database's default after the downgrade; no record changes."""
    store = Store(postgres_store_url)
    query = text(
        "SELECT a.attname, coalesce(c.collname, 'default') FROM pg_attribute a"
        " LEFT JOIN pg_collation c ON c.oid = a.attcollation AND a.attcollation <> 100"
        " WHERE a.attrelid = 'records'::regclass AND a.attname IN ('entity', 'key')"
        " ORDER BY 1"
    )

    def collations() -> list[tuple[str, str]]:
        with store.engine.connect() as conn:
            return [(name, collation) for name, collation in conn.execute(query)]

    try:
        _migrate(store, "0018")
        keys = ["b0", "A2", "a1", "000.00.01.H29-240115-0001"]
        put_records(store, keys)
        assert collations() == [("entity", "default"), ("key", "default")]
        stats = text(
            "SELECT attname FROM pg_stats WHERE tablename = 'records'"
            " AND attname IN ('entity', 'key') ORDER BY 1"
        )
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE records"))
        _migrate(store, "0019")
        assert collations() == [("entity", "C"), ("key", "C")]
        with store.engine.connect() as conn:  # the type's change dropped them: analysed again
            assert conn.execute(stats).scalars().all() == ["entity", "key"]
        assert [k for _, k, *_ in store.iter_records()] == sorted(keys, key=str.encode)
        _migrate(store, "0018", down=True)
        assert collations() == [("entity", "default"), ("key", "default")]
        assert sorted(table_rows(store, records, "key")) == sorted((k,) for k in keys)
    finally:
        store.close()


# -- 0020: the purges' and redrives' audit rows kept as written --------------------------------


def test_0020_keeps_a_finished_purge_as_written_and_its_downgrade_lets_it_go(
    postgres_store_url: str,
) -> None:
    store = Store(postgres_store_url)
    purge = (
        "INSERT INTO source_purges (id, source, operator, reason, started_at, finished_at,"
        " views, tombstones, records_remerged, records_changed, records_removed) VALUES"
        " ('p1', 'province-01', 'dung', 'ticket 4', :at, :at, 5000, 0, 0, 0, 0)"
    )
    rewrite = text("UPDATE source_purges SET views = 0 WHERE id = 'p1'")
    try:
        _migrate(store, "0019")
        with store.engine.begin() as conn:
            conn.execute(text(purge), {"at": T1})
        _migrate(store, "0020")
        with pytest.raises(DBAPIError, match="kept as written"), store.engine.begin() as conn:
            conn.execute(rewrite)  # the owner too: the trigger guards the rows, not a role
        _migrate(store, "0019", down=True)
        with store.engine.begin() as conn:
            assert conn.execute(rewrite).rowcount == 1
    finally:
        store.close()
