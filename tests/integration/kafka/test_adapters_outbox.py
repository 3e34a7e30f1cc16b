"""The transactional outbox adapter on real SQLite and PostgreSQL, and through the broker."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    select,
)
from sqlalchemy.exc import DBAPIError

from producers.conformance import check_adapter
from producers.engine import AdapterRunner
from tests.support.adapter_helpers import (
    database_url,
    deployment,
    published_events,
    read_topic,
    write_config,
)
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import cli

metadata = MetaData()
outbox = Table(
    "portal_sync_outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("entity", String(20), nullable=False),
    Column("record_key", String(64), nullable=False),
    Column("op", String(10), nullable=False),
    Column("occurred_at", DateTime, nullable=False),
    Column("payload", Text),
    Column("processed_at", DateTime),
)
PID = "001090000001"
ORG = "0101234567"

CONFIG = """
[[sources]]
id = "btp-outbox"
source = "ministry-btp"
adapter = "outbox"

[sources.connection]
url = "{url}"

[sources.mapping]
after = "{after}"
batch_size = 2
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_url(request, tmp_path)
    metadata.create_all(create_engine(url))
    return url


def change(entity: str, key: str, op: str, minute: int, data: Any = None) -> dict[str, Any]:
    return {
        "entity": entity,
        "record_key": key,
        "op": op,
        "occurred_at": datetime(2025, 8, 1, 8, minute),
        "payload": json.dumps(data, ensure_ascii=False) if data is not None else None,
    }


def write_changes(url: str) -> None:
    """What the source application writes in the transactions of its own changes."""
    engine = create_engine(url)
    rows = [
        change("citizen", PID, "upsert", 0, {"full_name": "Nguyễn Văn An"}),
        change("organization", ORG, "upsert", 1, {"name": "Công ty cổ phần Minh Phát"}),
        change("citizen", PID, "upsert", 2, {"full_name": "Nguyễn Văn Ân"}),
        change("citizen", PID, "delete", 3),
        change("organization", ORG, "upsert", 4, {"status": "dissolved"}),
    ]
    with engine.begin() as conn:
        for row in rows:  # one transaction per business change, ids rising
            conn.execute(insert(outbox), [row])
    engine.dispose()


def remaining(url: str) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = list(conn.execute(select(outbox.c.id, outbox.c.processed_at).order_by(outbox.c.id)))
    engine.dispose()
    return rows


def test_outbox_rows_become_events_in_order_and_pass_the_checks(
    db_url: str, tmp_path: Path
) -> None:
    write_changes(db_url)
    deploy = deployment(tmp_path, CONFIG.format(url=db_url, after="delete"))
    adapter = deploy.adapter(deploy.sources[0])
    report = check_adapter(adapter, "btp-outbox", "outbox")
    adapter.close()
    assert report.passed, [(r.name, r.detail, r.examples) for r in report.results]
    emitted = report.first.emitted
    assert [(e.entity, e.op) for e in emitted] == [
        ("citizen", "upsert"),
        ("organization", "upsert"),
        ("citizen", "upsert"),
        ("citizen", "delete"),
        ("organization", "upsert"),
    ]
    assert [e.version for e in emitted] == sorted(e.version for e in emitted)
    assert len(remaining(db_url)) == 5  # a check never touches the source


@pytest.mark.kafka
@pytest.mark.parametrize("after", ["delete", "mark"])
def test_published_rows_are_deleted_or_marked_after_the_acknowledgement(
    db_url: str, tmp_path: Path, settings_for: Any, sqlite_store_url: str, after: str
) -> None:
    settings = settings_for(sqlite_store_url)
    write_changes(db_url)
    config = write_config(tmp_path, CONFIG.format(url=db_url, after=after))
    result = cli(settings, "produce", "--config", str(config), "--once")
    assert result.returncode == 0, result.stderr
    assert "btp-outbox: published 5" in result.stderr

    citizens = published_events(settings, "citizen")  # one partition per key: in order
    assert [(e["op"], e.get("data")) for e in citizens] == [
        ("upsert", {"full_name": "Nguyễn Văn An"}),
        ("upsert", {"full_name": "Nguyễn Văn Ân"}),
        ("delete", None),
    ]
    assert len(published_events(settings, "organization")) == 2
    rows = remaining(db_url)
    if after == "delete":
        assert rows == []
    else:
        assert len(rows) == 5 and all(row.processed_at is not None for row in rows)

    again = cli(settings, "produce", "--config", str(config), "--once")
    assert "btp-outbox: published 0" in again.stderr


@pytest.mark.kafka
@pytest.mark.parametrize("after", ["delete", "mark"])
def test_a_row_committed_late_below_the_position_is_published_not_lost(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str, after: str
) -> None:
    """Ids are allocated at insert, not at commit: id 3 can commit after id 4 was read."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    settings = settings_for(sqlite_store_url)
    engine = create_engine(url)
    rows = [change("citizen", f"00109000000{n}", "upsert", n, {"full_name": "A"}) for n in range(5)]
    with engine.begin() as conn:
        for row_id in (1, 2, 4, 5):
            conn.execute(insert(outbox), [{"id": row_id, **rows[row_id - 1]}])
    config = write_config(tmp_path, CONFIG.format(url=url, after=after))
    first = cli(settings, "produce", "--config", str(config), "--once")
    assert "btp-outbox: published 4" in first.stderr, first.stderr
    with engine.begin() as conn:  # the long transaction that held id 3 commits now
        conn.execute(insert(outbox), [{"id": 3, **rows[2]}])

    second = cli(settings, "produce", "--config", str(config), "--once")
    third = cli(settings, "produce", "--config", str(config), "--once")

    assert "btp-outbox: published 1" in second.stderr, second.stderr
    assert "btp-outbox: published 0" in third.stderr, third.stderr
    keys = sorted(e["key"] for e in published_events(settings, "citizen"))
    assert keys == sorted(r["record_key"] for r in rows)
    left = remaining(url)
    assert left == [] if after == "delete" else all(r.processed_at for r in left)
    engine.dispose()


@pytest.mark.kafka
@pytest.mark.parametrize("after", ["delete", "mark"])
def test_an_outbox_that_reuses_ids_stops_the_source_instead_of_losing_rows(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str, after: str
) -> None:
    """SQLite's INTEGER PRIMARY KEY without AUTOINCREMENT gives a deleted row's id again
    (so do MySQL 5.7 after a restart and TRUNCATE … RESTART IDENTITY): the new row's id is
    one the state has seen, and it was skipped for ever, with no count and no alert."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    settings = settings_for(sqlite_store_url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(outbox), [change("citizen", f"00109000000{n}", "upsert", n,
                                             {"full_name": "A"}) for n in range(3)])  # fmt: skip
    config = write_config(tmp_path, CONFIG.format(url=url, after=after))
    first = cli(settings, "produce", "--config", str(config), "--once")
    assert "btp-outbox: published 3" in first.stderr, first.stderr
    with engine.begin() as conn:
        if after == "mark":  # what a TRUNCATE … RESTART IDENTITY leaves
            conn.execute(outbox.delete())
        conn.execute(insert(outbox), [change("citizen", "001090000009", "upsert", 9,
                                             {"full_name": "B"})])  # fmt: skip
        reused = conn.execute(select(outbox.c.id)).scalar_one()
    assert reused == 1

    second = cli(settings, "produce", "--config", str(config), "--once")
    said = " ".join(second.stderr.split())
    assert second.returncode != 0, said
    assert "outbox row id 1 was published and cleaned up before" in said, said
    assert "001090000009" not in said  # the id, never the record's key
    assert len(remaining(url)) == 1  # still there to publish once the table is fixed
    engine.dispose()


@pytest.mark.kafka
def test_a_json_payload_column_is_taken_as_the_driver_decodes_it(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """PostgreSQL's json/jsonb (and a JSON column SQLAlchemy reflects) come decoded: every
    row was dead-lettered `invalid_json`, then deleted."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE portal_sync_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, entity TEXT,"
            " record_key TEXT, op TEXT, occurred_at TEXT, payload JSON, processed_at TEXT)"
        )
        conn.exec_driver_sql(
            "INSERT INTO portal_sync_outbox (entity, record_key, op, occurred_at, payload)"
            " VALUES ('citizen', ?, 'upsert', '2025-08-01 08:00:00', ?)",
            (PID, json.dumps({"full_name": "Nguyễn Văn An"}, ensure_ascii=False)),
        )
    settings = settings_for(sqlite_store_url)
    config = write_config(tmp_path, CONFIG.format(url=url, after="delete"))
    result = cli(settings, "produce", "--config", str(config), "--once")
    assert "btp-outbox: published 1" in result.stderr, result.stderr
    (event,) = published_events(settings, "citizen")
    assert event["data"] == {"full_name": "Nguyễn Văn An"}
    engine.dispose()


@pytest.mark.kafka
def test_a_malformed_outbox_row_is_dead_lettered_and_the_rest_published(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    settings = settings_for(sqlite_store_url)
    engine = create_engine(url)
    good = change("citizen", PID, "upsert", 0, {"full_name": "Nguyễn Văn An"})
    with engine.begin() as conn:
        conn.execute(insert(outbox), [good])
        conn.exec_driver_sql(  # a row whose occurred_at the application wrote as garbage
            "INSERT INTO portal_sync_outbox (entity, record_key, op, occurred_at, payload) "
            "VALUES ('citizen', '001090000002', 'upsert', 'not a time', '{}')"
        )
        conn.execute(insert(outbox), [change("citizen", "001090000003", "upsert", 2, {})])
        # JSON, but no object; nested beyond any parser's depth; a key named twice (`json`
        # kept the last: which name did the application mean?)
        twice = '{"full_name": "Nguyễn Văn Bốn", "full_name": "Nguyễn Văn Năm"}'
        for payload in ("[1, 2]", '"Nguyễn Văn Bốn"', "[" * 100_000 + "]" * 100_000, twice):
            conn.exec_driver_sql(
                "INSERT INTO portal_sync_outbox (entity, record_key, op, occurred_at, "
                "payload) VALUES ('citizen', '001090000004', 'upsert', '2025-08-01 08:03', ?)",
                (payload,),
            )
        conn.execute(insert(outbox), [change("citizen", "001090000005", "upsert", 4, {})])
        # An op in capitals is a delete; any other word is refused, never taken as an upsert
        # (a "d" with its payload would bring a deleted record back).
        conn.execute(insert(outbox), [change("citizen", "001090000005", "DELETE", 5)])
        conn.execute(
            insert(outbox), [change("citizen", "001090000006", "d", 6, {"full_name": "Lê Văn Sáu"})]
        )
    config = write_config(tmp_path, CONFIG.format(url=url, after="delete"))

    result = cli(settings, "produce", "--config", str(config), "--once")

    assert result.returncode == 0, result.stderr
    assert "btp-outbox: published 4, dead-lettered 6" in result.stderr
    assert remaining(url) == []  # the rows are gone: their dead letters keep them
    letters = read_topic(settings, dead_letter_topic(settings))
    kept = [json.loads(letter.value) for letter in letters]
    payloads = [row["payload"][:6] for row in kept]
    assert payloads == ["{}", "[1, 2]", '"Nguyễ', "[[[[[[", '{"full', '{"full']
    assert [row["record_key"] for row in kept] == (
        ["001090000002"] + ["001090000004"] * 4 + ["001090000006"]
    )
    events = [json.loads(m.value) for m in read_topic(settings, change_topic(settings, "citizen"))]
    assert [e["op"] for e in events if e["key"] == "001090000005"] == ["upsert", "delete"]
    engine.dispose()


# -- clean-ups that fail, rows beyond the lookback ---------------------------------------------

# While refuse_cleanup has a row, the source refuses to delete or update outbox rows (as a
# revoked permission or a lock timeout would): the clean-up after a checkpoint fails.
REFUSE = {
    "sqlite": [
        "CREATE TABLE refuse_cleanup (x INTEGER)",
        "CREATE TRIGGER refuse_delete BEFORE DELETE ON portal_sync_outbox "
        "WHEN EXISTS (SELECT 1 FROM refuse_cleanup) BEGIN SELECT RAISE(ABORT, 'refused'); END",
        "CREATE TRIGGER refuse_update BEFORE UPDATE ON portal_sync_outbox "
        "WHEN EXISTS (SELECT 1 FROM refuse_cleanup) BEGIN SELECT RAISE(ABORT, 'refused'); END",
    ],
    "postgresql": [
        "CREATE TABLE refuse_cleanup (x integer)",
        "CREATE FUNCTION refuse_cleanup() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF EXISTS (SELECT 1 FROM refuse_cleanup) THEN RAISE EXCEPTION 'refused'; END IF; "
        "RETURN NULL; END $$",
        "CREATE TRIGGER refuse_cleanup BEFORE DELETE OR UPDATE ON portal_sync_outbox "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_cleanup()",
    ],
}


@pytest.fixture
def runner_for(settings_for: Any, sqlite_store_url: str, tmp_path: Path) -> Any:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    publishers = []

    def make(config: str) -> AdapterRunner:
        deploy = deployment(tmp_path, config)
        publishers.append(publisher_for(settings))
        adapter = deploy.adapter(deploy.sources[0])
        return AdapterRunner("btp-outbox", adapter, publishers[-1], tmp_path / "state")

    make.settings = settings  # type: ignore[attr-defined]
    yield make
    for publisher in publishers:
        publisher.close()


def cleaned_up(url: str, after: str) -> bool:
    rows = remaining(url)
    return rows == [] if after == "delete" else all(row.processed_at for row in rows)


@pytest.mark.kafka
@pytest.mark.parametrize("after", ["delete", "mark"])
def test_rows_whose_delete_or_mark_failed_are_cleaned_up_on_the_next_poll(
    db_url: str, runner_for: Any, after: str
) -> None:
    write_changes(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for statement in REFUSE[engine.dialect.name]:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO refuse_cleanup VALUES (1)")
    runner = runner_for(CONFIG.format(url=db_url, after=after))

    with pytest.raises(DBAPIError):  # the first batch is published, its clean-up refused
        runner.run_once()
    with engine.begin() as conn:  # the permission is back
        conn.exec_driver_sql("DELETE FROM refuse_cleanup")
    runner.run_once()
    runner.run_once()

    assert cleaned_up(db_url, after), remaining(db_url)
    settings = runner_for.settings
    citizens, organizations = (published_events(settings, e) for e in ("citizen", "organization"))
    assert (len(citizens), len(organizations)) == (3, 2)  # every row once
    engine.dispose()


def beyond_lookback() -> float | None:
    labels = {"source": "ministry-btp"}
    return REGISTRY.get_sample_value("portal_sync_outbox_rows_beyond_lookback", labels)


@pytest.mark.kafka
@pytest.mark.parametrize("after", ["delete", "mark"])
def test_rows_beyond_the_lookback_are_counted_until_a_wider_lookback_publishes_them(
    db_url: str, runner_for: Any, after: str
) -> None:
    engine = create_engine(db_url)
    rows = {n: change("citizen", f"0010900000{n:02d}", "upsert", n, {"full_name": "A"})
            for n in range(1, 11)}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(outbox), [{"id": n, **rows[n]} for n in rows if n != 3])
    narrow = CONFIG.format(url=db_url, after=after) + "lookback_ids = 3\n"
    runner = runner_for(narrow)
    assert runner.run_once().published == 9
    assert beyond_lookback() == 0
    with engine.begin() as conn:  # id 3 commits now, 7 ids below the position: beyond 3
        conn.execute(insert(outbox), [{"id": 3, **rows[3]}])

    assert runner.run_once().published == 0
    assert beyond_lookback() == 1
    assert runner.run_once().published == 0
    assert beyond_lookback() == 1  # still there, still counted: never silently dropped

    wider = runner_for(CONFIG.format(url=db_url, after=after) + "lookback_ids = 10\n")
    assert wider.run_once().published == 1  # the operator widened the lookback
    assert beyond_lookback() == 0
    assert cleaned_up(db_url, after)
    keys = sorted(e["key"] for e in published_events(runner_for.settings, "citizen"))
    assert keys == sorted(row["record_key"] for row in rows.values())
    engine.dispose()


def _drive(adapter: Any, state: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """One poll as the engine runs it once the broker acknowledged each page: every
    checkpoint's clean-up run, its state kept; and the rows read."""
    from producers.sdk import Checkpoint, Record

    read = 0
    for item in adapter.read(state):
        if isinstance(item, Checkpoint):
            state = json.loads(json.dumps(item.value()))
            if item.commit is not None:
                item.commit()
        elif isinstance(item, Record):
            read += 1
    return state, read


def _outbox_of(tmp_path: Path, after: str, rows: int) -> tuple[str, Any, Any]:
    """A SQLite outbox holding `rows` citizen upserts (ids 1 to `rows`), its engine, and the
    adapter of CONFIG reading it."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(outbox), [change("citizen", f"00109000000{n}", "upsert", n,
                                             {"full_name": "A"}) for n in range(rows)])  # fmt: skip
    deploy = deployment(tmp_path, CONFIG.format(url=url, after=after))
    return url, engine, deploy.adapter(deploy.sources[0])


@pytest.mark.parametrize("after", ["delete", "mark"])
def test_a_state_of_an_older_release_is_not_taken_for_reused_ids(
    tmp_path: Path, after: str
) -> None:
    """A state saved before `pending` existed names seen rows whose clean-up may have
    failed: still in the table, they are no reused ids (the check stopped the source at
    the second poll after the upgrade)."""
    _, engine, adapter = _outbox_of(tmp_path, after, 3)
    state: dict[str, Any] = {"last_id": 3, "seen": [1, 2, 3]}  # their clean-up failed
    for _ in range(3):
        state, read = _drive(adapter, state)
        assert read == 0
    assert state["tracked_from"] == 3
    with engine.begin() as conn:
        conn.execute(insert(outbox), [change("citizen", "001090000009", "upsert", 9,
                                             {"full_name": "B"})])  # fmt: skip
    state, read = _drive(adapter, state)
    assert read == 1
    adapter.close()
    engine.dispose()


def test_a_poll_keeps_only_the_last_pages_clean_ups_in_memory(tmp_path: Path) -> None:
    """The ids whose clean-up ran were kept for the whole poll: 57 bytes a row, about
    570 MB for a snapshot of ten million rows. Each page needs only its own."""
    from producers.sdk import Checkpoint

    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(outbox), [change("citizen", f"0010900{n:05d}", "upsert", n % 60,
                                             {"full_name": "A"}) for n in range(2500)])  # fmt: skip
    deploy = deployment(tmp_path, CONFIG.format(url=url, after="delete"))
    adapter = deploy.adapter(deploy.sources[0])
    most = 0
    for item in adapter.read({}):
        if isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()
        most = max(most, len(adapter._cleaned))
    assert 0 < most <= 1000, most  # a page's rows at most
    assert remaining(url) == []
    adapter.close()
    engine.dispose()


@pytest.mark.parametrize("after", ["delete", "mark"])
def test_a_page_s_clean_up_names_its_ids_a_few_hundred_at_a_time(
    tmp_path: Path, after: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One IN list of a whole page: Oracle takes 1,000 at most, SQL Server about 2,100
    parameters, and with a larger `batch_size` every clean-up failed after its page was
    published, the source retrying it for ever."""
    from sqlalchemy import event as sa_event

    import producers.adapters.outbox as outbox_adapter
    from producers.sdk import Checkpoint

    monkeypatch.setattr(outbox_adapter, "IDS_PER_STATEMENT", 3)
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    metadata.create_all(create_engine(url))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(outbox), [change("citizen", f"0010900{n:05d}", "upsert", n,
                                             {"full_name": "A"}) for n in range(10)])  # fmt: skip
    deploy = deployment(tmp_path, CONFIG.format(url=url, after=after))
    adapter = deploy.adapter(deploy.sources[0])
    largest: list[int] = []
    for item in adapter.read({}):
        if isinstance(item, Checkpoint) and item.commit is not None:
            source = adapter._engine
            assert source is not None

            def counted(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
                if statement.lstrip().upper().startswith(("DELETE", "UPDATE")):
                    largest.append(len(params))

            sa_event.listen(source, "before_cursor_execute", counted)
            item.commit()
            sa_event.remove(source, "before_cursor_execute", counted)
    assert largest and max(largest) <= 3 + 1, largest  # its ids, and a mark's time
    rows = remaining(url)
    assert rows == [] if after == "delete" else all(r.processed_at for r in rows)
    adapter.close()
    engine.dispose()


@pytest.mark.parametrize("after", ["delete", "mark"])
def test_a_pending_clean_up_never_touches_rows_that_took_its_ids_since(
    tmp_path: Path, after: str
) -> None:
    """A state saved with its page's rows pending, their clean-up run, and the run ended
    before a state without them was saved (the next query failed): the table then gave
    the ids again (MySQL 5.7 after a restart, SQLite without AUTOINCREMENT), and the next
    run's first clean-up deleted or marked the new rows, never published. It now stops the
    source, the new rows left in place."""
    from producers.sdk import Checkpoint, FatalError

    url, engine, adapter = _outbox_of(tmp_path, after, 2)
    saved: dict[str, Any] = {}
    for item in adapter.read({}):
        if isinstance(item, Checkpoint):  # the first page's: saved, then its clean-up
            saved = json.loads(json.dumps(item.value()))
            assert item.commit is not None
            item.commit()
            break  # the run ends here: nothing saved after the clean-up
    assert saved["pending"] == [1, 2]
    with engine.begin() as conn:
        conn.execute(outbox.delete())  # `mark`: what a TRUNCATE … RESTART IDENTITY leaves
        conn.execute(insert(outbox), [change("citizen", f"00109000001{n}", "upsert", 10 + n,
                                             {"full_name": "B"}) for n in range(2)])  # fmt: skip
        assert [r.id for r in conn.execute(select(outbox.c.id))] == [1, 2]
    with pytest.raises(FatalError, match="outbox row id 1 was published and cleaned up"):
        _drive(adapter, saved)
    assert [(r.id, r.processed_at) for r in remaining(url)] == [(1, None), (2, None)]
    adapter.close()
    engine.dispose()
