"""The declarative SQL adapter on real SQLite and PostgreSQL, and through the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    text,
    update,
)

from producers.conformance import check_adapter, run_adapter
from producers.state import load_json_state
from schemas.identifiers import ReferenceKey, key_reference
from tests.support.adapter_helpers import (
    database_url,
    dead_letters,
    deployment,
    published_events,
    write_config,
)
from tests.support.kafka_helpers import ensure_topics
from tests.support.pipeline_helpers import cli

T0 = datetime(2024, 1, 15, 9, 0, 0)
metadata = MetaData()
ho_so = Table(
    "ho_so",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ma_ho_so", String(40), nullable=False),
    Column("ma_tthc", String(20)),
    Column("trang_thai", String(20)),  # the vendor's own status names
    Column("ngay_tiep_nhan", String(14)),  # yyyyMMddHHmmss, local time
    Column("cap_nhat_luc", DateTime, nullable=False),
    Column("da_xoa", Boolean, nullable=False),
)
cong_dan = Table(
    "cong_dan",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("so_dinh_danh", String(12), nullable=False),
    Column("ho_ten", String(100)),
    Column("gioi_tinh", String(5)),  # 'Nam' / 'Nữ'
    Column("ngay_sinh", String(10)),  # dd/MM/yyyy
    Column("cap_nhat_luc", DateTime, nullable=False),
    Column("da_xoa", Boolean, nullable=False),
)

DOSSIER_MAPPING = """
[[sources]]
id = "hcm-dossiers"
source = "province-79"
adapter = "sql"
interval_seconds = 5

[sources.connection]
url = "{url}"

[sources.mapping]
entity = "dossier"
table = "ho_so"
{query}
key_column = "ma_ho_so"
pk_column = "id"
updated_at_column = "cap_nhat_luc"
deleted_column = "da_xoa"
timezone = "Asia/Ho_Chi_Minh"
fields = {{ procedure_code = "ma_tthc", status = "trang_thai", received_at = "ngay_tiep_nhan" }}
formats = {{ received_at = "yyyyMMddHHmmss" }}

[sources.mapping.value_maps.status]
MOI = 1
DA_TIEP_NHAN = 2
DANG_XU_LY = 4
HOAN_THANH = 9
DA_TRA = 10
"""

CITIZEN_MAPPING = """
[[sources]]
id = "hcm-citizens"
source = "province-79"
adapter = "sql"

[sources.connection]
url = "{url}"

[sources.mapping]
entity = "citizen"
table = "cong_dan"
key_column = "so_dinh_danh"
pk_column = "id"
updated_at_column = "cap_nhat_luc"
deleted_column = "da_xoa"
fields = {{ full_name = "ho_ten", sex = "gioi_tinh", date_of_birth = "ngay_sinh" }}
formats = {{ date_of_birth = "dd/MM/yyyy" }}
value_maps = {{ sex = {{ "Nam" = "male", "Nữ" = "female" }} }}
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_url(request, tmp_path)
    metadata.create_all(create_engine(url))
    return url


def dossier(n: int, status: str, received: str, at: datetime, deleted: bool = False) -> Any:
    return {
        "id": n,
        "ma_ho_so": f"000.00.01.H29-240115-{n:04d}",
        "ma_tthc": "1.005129",
        "trang_thai": status,
        "ngay_tiep_nhan": received,
        "cap_nhat_luc": at,
        "da_xoa": deleted,
    }


def write(url: str, table: Table, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    engine.dispose()


def seed_dossiers(url: str) -> None:
    write(
        url,
        ho_so,
        [
            dossier(1, "MOI", "20240115083000", T0),
            dossier(2, "DANG_XU_LY", "20240115091500", T0.replace(minute=1)),
            dossier(3, "DA_TRA", "20240115100000", T0.replace(minute=2), deleted=True),
        ],
    )


def events_of(tmp_path: Path, body: str) -> list[dict[str, Any]]:
    deploy = deployment(tmp_path, body)
    (entry,) = deploy.sources
    adapter = deploy.adapter(entry)
    try:
        items = adapter.read({})
        return [i.event(adapter.source, adapter.entity) for i in items if hasattr(i, "event")]
    finally:
        adapter.close()


def test_value_maps_and_local_date_formats_by_configuration_alone(
    db_url: str, tmp_path: Path
) -> None:
    seed_dossiers(db_url)
    events = events_of(tmp_path, DOSSIER_MAPPING.format(url=db_url, query=""))
    assert [e["op"] for e in events] == ["upsert", "upsert", "delete"]
    assert events[0]["data"] == {
        "procedure_code": "1.005129",
        "status": 1,
        "received_at": "2024-01-15T08:30:00+07:00",
    }
    assert events[1]["data"]["status"] == 4
    assert events[0]["occurred_at"] == "2024-01-15T09:00:00+07:00"
    assert {e["source"] for e in events} == {"province-79"}


def test_sex_values_and_day_first_dates_map_to_the_contract(db_url: str, tmp_path: Path) -> None:
    base = {"cap_nhat_luc": T0, "da_xoa": False, "ho_ten": "Nguyễn Thị Lan"}
    lan = {"id": 1, "so_dinh_danh": "079190000001", "gioi_tinh": "Nữ", "ngay_sinh": "05/03/1990"}
    nam = {"id": 2, "so_dinh_danh": "079090000002", "gioi_tinh": "Nam", "ngay_sinh": None}
    write(db_url, cong_dan, [base | lan, base | nam])
    events = events_of(tmp_path, CITIZEN_MAPPING.format(url=db_url))
    assert [e["data"]["sex"] for e in events] == ["female", "male"]
    assert events[0]["data"]["date_of_birth"] == "1990-03-05"
    assert events[1]["data"]["date_of_birth"] is None


def test_a_query_replaces_the_table(db_url: str, tmp_path: Path) -> None:
    seed_dossiers(db_url)
    query = "SELECT * FROM ho_so WHERE trang_thai <> 'MOI'"
    events = events_of(tmp_path, DOSSIER_MAPPING.format(url=db_url, query=f'query = "{query}"'))
    assert [e["key"][-4:] for e in events] == ["0002", "0003"]


def test_the_sql_adapter_passes_its_conformance_checks(db_url: str, tmp_path: Path) -> None:
    seed_dossiers(db_url)
    deploy = deployment(tmp_path, DOSSIER_MAPPING.format(url=db_url, query=""))
    adapter = deploy.adapter(deploy.sources[0])
    report = check_adapter(adapter, "hcm-dossiers", "sql")
    adapter.close()
    assert report.passed, [(r.name, r.detail, r.examples) for r in report.results]
    assert len(report.first.emitted) == 3


def test_an_unmapped_local_value_fails_validation_instead_of_being_altered(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    metadata.create_all(create_engine(url))
    write(url, ho_so, [dossier(1, "TAM_DUNG", "20240115083000", T0)])
    deploy = deployment(tmp_path, DOSSIER_MAPPING.format(url=url, query=""))
    adapter = deploy.adapter(deploy.sources[0])
    run = run_adapter(adapter, {})
    adapter.close()
    (problem,) = run.invalid
    assert "invalid_field" in problem and "data.status" in problem
    assert "TAM_DUNG" not in problem


@pytest.mark.kafka
def test_produce_once_publishes_checkpoints_and_resumes_through_the_broker(
    db_url: str, tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    seed_dossiers(db_url)
    write(db_url, ho_so, [dossier(4, "TAM_DUNG", "20240115083000", T0.replace(minute=3))])
    config = write_config(tmp_path, DOSSIER_MAPPING.format(url=db_url, query=""))

    first = cli(settings, "produce", "--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    assert "hcm-dossiers: published 3, dead-lettered 1" in first.stderr
    events = published_events(settings, "dossier")
    assert sorted(e["key"][-4:] for e in events) == ["0001", "0002", "0003"]
    (letter,) = dead_letters(settings)
    assert letter["ps.reason.code"] == "invalid_field"
    assert letter["ps.origin.topic"] == "source:province-79"
    assert letter["ps.origin.offset"] == "ho_so:4"
    state = load_json_state(tmp_path / "state" / "hcm-dossiers.state.json")
    assert state["pk"] == 4

    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            update(ho_so)
            .where(ho_so.c.id == 1)
            .values(trang_thai="HOAN_THANH", cap_nhat_luc=T0.replace(minute=10))
        )
    engine.dispose()
    second = cli(settings, "produce", "--config", str(config), "--once")
    assert second.returncode == 0, second.stderr
    assert "hcm-dossiers: published 1, dead-lettered 0" in second.stderr
    events = published_events(settings, "dossier")
    assert len(events) == 4
    changed = [e for e in events if e["key"].endswith("0001") and e["data"]["status"] == 9]
    assert len(changed) == 1
    assert "TAM_DUNG" not in json.dumps(events)


# A producer process that dies (os._exit: no clean-up, as SIGKILL) once its first page of
# events is acknowledged by the broker, before any checkpoint of it is saved.
KILLED_AFTER_ITS_FIRST_PAGE = """
import os, sys
from pathlib import Path
from portal_sync.settings import Settings
from producers.deployment import load_deployment
from producers.engine import AdapterRunner
from producers.sdk import Checkpoint
from tests.support.kafka_helpers import publisher_for

deploy = load_deployment(Path(sys.argv[1]))
(entry,) = deploy.sources
adapter = deploy.adapter(entry)
publisher = publisher_for(Settings())
pages = adapter.read

def read(state):
    for item in pages(state):
        if isinstance(item, Checkpoint):
            publisher.flush()
            os._exit(9)
        yield item

adapter.read = read
AdapterRunner(entry.id, adapter, publisher, deploy.state_dir, checkpoint_interval=0).run_once()
"""


@pytest.mark.kafka
def test_a_change_written_behind_a_version_sent_by_a_killed_producer_is_not_lost(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """The producer sends a row's change and is killed before its state is saved; the row
    changes again, written by a host whose clock is behind. The restarted producer sent
    the new change with its own version, below the one sent, and the reconciler dropped
    it as stale: the store kept the old name for good. The page's versions are journaled
    before it is sent, and the new change now goes out above them."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    url = f"sqlite:///{tmp_path / 'source.db'}"
    metadata.create_all(create_engine(url))
    base = {"gioi_tinh": "Nam", "ngay_sinh": None, "da_xoa": False}
    later = T0 + timedelta(seconds=10)
    write(url, cong_dan, [base | {"id": 1, "so_dinh_danh": "079090000001",
                                  "ho_ten": "Trần Văn An", "cap_nhat_luc": later}])  # fmt: skip
    config = write_config(tmp_path, CITIZEN_MAPPING.format(url=url))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ITS_FIRST_PAGE, str(config)],
        env=os.environ | settings.as_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    state_dir = tmp_path / "state"
    assert not (state_dir / "hcm-citizens.state.json").exists()
    (sent,) = published_events(settings, "citizen")

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            update(cong_dan)
            .where(cong_dan.c.id == 1)
            .values(ho_ten="Trần Văn Bình", cap_nhat_luc=later - timedelta(seconds=5))
        )
    engine.dispose()
    restarted = cli(settings, "produce", "--config", str(config), "--once")
    assert restarted.returncode == 0, restarted.stderr
    newest = max(published_events(settings, "citizen"), key=lambda event: event["version"])
    assert newest["data"]["full_name"] == "Trần Văn Bình"
    assert newest["version"] == sent["version"] + 1
    assert not (state_dir / "hcm-citizens.journal.jsonl").exists()  # the state holds it
    assert load_json_state(state_dir / "hcm-citizens.state.json")["top"] == newest["version"]


ho_so_text = Table(
    "ho_so_text",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("ma_ho_so", String(40), nullable=False),
    Column("trang_thai", Integer),
    Column("ngay_cap_nhat", String(14), nullable=False),  # yyyyMMddHHmmss, local time
)

TEXT_CURSOR = """
[[sources]]
id = "legacy-dossiers"
source = "province-79"
adapter = "sql"

[sources.connection]
url = "{url}"

[sources.mapping]
entity = "dossier"
table = "ho_so_text"
key_column = "ma_ho_so"
pk_column = "id"
updated_at_column = "ngay_cap_nhat"
updated_at_format = "yyyyMMddHHmmss"
batch_size = 2
lookback_seconds = 0
fields = {{ status = "trang_thai" }}
"""


def test_a_text_cursor_column_in_a_local_date_format(db_url: str, tmp_path: Path) -> None:
    ho_so_text.metadata.create_all(create_engine(db_url))
    rows = [
        {"id": n, "ma_ho_so": f"000.00.01.H29-240115-{n:04d}", "trang_thai": 4, "ngay_cap_nhat": at}
        for n, at in [(1, "20240115090000"), (2, "20240115090000"), (3, "20240115093000")]
    ]
    write(db_url, ho_so_text, rows)
    deploy = deployment(tmp_path, TEXT_CURSOR.format(url=db_url))
    adapter = deploy.adapter(deploy.sources[0])
    report = check_adapter(adapter, "legacy-dossiers", "sql")
    assert report.passed, [(r.name, r.detail, r.examples) for r in report.results]
    assert [e.origin for e in report.first.emitted] == [
        "ho_so_text:1",
        "ho_so_text:2",
        "ho_so_text:3",
    ]
    first = run_adapter(adapter, {})
    assert first.emitted[2].version == 1_705_285_800_000_000  # 09:30 at UTC+7, in µs
    write(db_url, ho_so_text, [rows[0] | {"id": 4, "ma_ho_so": "000.00.01.H29-240115-0004",
                                          "ngay_cap_nhat": "20240115100000"}])  # fmt: skip
    resumed = run_adapter(adapter, first.state or {})
    assert [e.origin for e in resumed.emitted] == ["ho_so_text:4"]
    adapter.close()


def test_origin_never_carries_a_natural_key_used_as_primary_key(tmp_path: Path) -> None:
    """With no pk_column the cursor's key is the personal id: origins (logs, dead-letter
    headers) then carry its keyed reference (HMAC-SHA-256 under the deployment's reference
    key), or the masked id without a key: never the id, never an unkeyed hash of it."""
    url = f"sqlite:///{tmp_path / 'src.db'}"
    metadata.create_all(create_engine(url))
    with create_engine(url).begin() as conn:
        conn.execute(insert(cong_dan), [{"id": 7, "so_dinh_danh": "079203001234",
                     "ho_ten": "Lê Văn Cường", "cap_nhat_luc": T0, "da_xoa": False}])  # fmt: skip
    config = f"""
[[sources]]
id = "hcm-citizens"
source = "province-79"
adapter = "sql"

[sources.connection]
url = "{url}"

[sources.mapping]
entity = "citizen"
table = "cong_dan"
key_column = "so_dinh_danh"
updated_at_column = "cap_nhat_luc"
fields = {{ full_name = "ho_ten" }}
"""
    deploy = deployment(tmp_path, config)
    records = run_adapter(deploy.adapter(deploy.sources[0]), {}).emitted
    assert [r.origin for r in records] == ["cong_dan:079*******34"]

    key = ReferenceKey(b"k" * 32)
    records = run_adapter(deploy.adapter(deploy.sources[0], key), {}).emitted
    assert [r.origin for r in records] == [f"cong_dan:{key_reference('079203001234', key)}"]
    assert records[0].origin.startswith("cong_dan:ref:")


UUID_CITIZENS = """
[[sources]]
id = "hcm-citizens"
source = "province-79"
adapter = "sql"

[sources.connection]
url = "{url}"

[sources.mapping]
entity = "citizen"
table = "nguoi"
key_column = "so_dinh_danh"
pk_column = "id"
updated_at_column = "cap_nhat_luc"
capture = "{capture}"
batch_size = 1
fields = {{ full_name = "ho_ten" }}
"""


@pytest.fixture(params=["postgresql"])
def pg_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path)


@pytest.mark.parametrize("capture", ["snapshot", "lookback"])
def test_a_uuid_primary_key_keeps_its_place_among_rows_of_one_time(
    pg_url: str, tmp_path: Path, capture: str
) -> None:
    """Bulk updates stamp many rows with one `now()`: the saved place (a UUID, text in the
    state file) was compared with the next row's UUID and raised TypeError at every poll."""
    engine = create_engine(pg_url)
    insert_row = (
        "INSERT INTO nguoi VALUES (gen_random_uuid(), %s, 'Lê Văn An',"
        " TIMESTAMP '2025-01-15 09:00:00')"
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE nguoi (id uuid PRIMARY KEY, so_dinh_danh text NOT NULL,"
            " ho_ten text, cap_nhat_luc timestamp NOT NULL)"
        )
        for n in range(3):
            conn.exec_driver_sql(insert_row, (f"00109000000{n}",))
    deploy = deployment(tmp_path, UUID_CITIZENS.format(url=pg_url, capture=capture))
    adapter = deploy.adapter(deploy.sources[0])
    first = run_adapter(adapter, {}, limit=1)
    assert first.error is None and len(first.emitted) == 1 and first.state
    with engine.begin() as conn:
        conn.exec_driver_sql(insert_row, ("001090000009",))
    second = run_adapter(adapter, first.state)
    adapter.close()
    engine.dispose()
    assert second.error is None, second.error
    keys = sorted(e.key for e in first.emitted + second.emitted)
    assert keys == ["001090000000", "001090000001", "001090000002", "001090000009"]


def _nguoi(
    tmp_path: Path, url: str, capture: str, rows: list[tuple[int, str, str, datetime]]
) -> tuple[Any, Any]:
    """A `nguoi` table holding `rows` (id, personal id, name, cap_nhat_luc), and the adapter
    of UUID_CITIZENS reading it whole pages at a time."""
    engine = create_engine(url)
    kind = "DATETIME" if url.startswith("sqlite") else "timestamp"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE nguoi (id integer PRIMARY KEY, so_dinh_danh text NOT NULL,"
            f" ho_ten text, cap_nhat_luc {kind} NOT NULL)"
        )
    _write(engine, rows)
    body = UUID_CITIZENS.format(url=url, capture=capture).replace("batch_size = 1\n", "")
    deploy = deployment(tmp_path, body)
    return engine, deploy.adapter(deploy.sources[0])


def _write(engine: Any, rows: list[tuple[int, str, str, datetime]]) -> None:
    with engine.begin() as conn:
        for row_id, key, name, at in rows:
            conn.execute(
                text("INSERT INTO nguoi VALUES (:i, :k, :n, :t)"),
                {"i": row_id, "k": key, "n": name, "t": at},
            )


def _touch(engine: Any, row_id: int, at: datetime, name: str | None = None) -> None:
    """The row's time set to `at` (and its name, when given), as the source writes it."""
    named = ", ho_ten = :n" if name is not None else ""
    with engine.begin() as conn:
        conn.execute(
            text(f"UPDATE nguoi SET cap_nhat_luc = :t{named} WHERE id = :i"),
            {"i": row_id, "t": at, "n": name},
        )


def test_a_row_ahead_of_the_clock_within_the_tolerance_keeps_later_changes_in_the_window(
    tmp_path: Path,
) -> None:
    """A row stamped 200 s ahead (a writer's clock fast, within the 300 s that are not
    held) took the lookback cursor with it: the window began 140 s ahead of the clock, and
    a change another writer then stamped at the right time was never read. The window now
    reaches back from this host's clock when the cursor is ahead of it."""
    # naive: the source's local time, in its zone (the mapping's default `timezone`)
    now = datetime.now(ZoneInfo("Asia/Ho_Chi_Minh")).replace(microsecond=0, tzinfo=None)
    ahead = [(1, "001090000001", "Lê Văn An", now + timedelta(seconds=200))]
    engine, adapter = _nguoi(tmp_path, f"sqlite:///{tmp_path / 'src.db'}", "lookback", ahead)
    first = run_adapter(adapter, {})
    assert first.error is None and [e.key for e in first.emitted] == ["001090000001"]
    # another writer, its clock right
    _write(engine, [(2, "001090000002", "Trần Thị Bình", now + timedelta(seconds=5))])
    second = run_adapter(adapter, first.state)
    third = run_adapter(adapter, second.state)
    adapter.close()
    engine.dispose()
    assert second.error is None and [e.key for e in second.emitted] == ["001090000002"]
    assert third.error is None and third.emitted == []  # remembered: not sent again


def test_a_row_ahead_of_the_clock_is_held_under_snapshot_capture_too(
    pg_url: str, tmp_path: Path
) -> None:
    """Under snapshot capture a row stamped a year ahead was sent and took the cursor to
    its time: every later change, at the right time, was then read as a late one and sent
    at the held row's version plus one (a version a year ahead), and the row's own repair
    could never pass it. It is held as under lookback capture: the later changes keep
    their own times' versions, and the row is sent once its time is right."""
    now = datetime.now().replace(microsecond=0)  # naive: local time of the source
    rows = [
        (1, "001090000001", "Lê Văn An", now - timedelta(hours=1)),
        (2, "001090000002", "Trần Thị Bình", now + timedelta(days=365)),
    ]
    engine, adapter = _nguoi(tmp_path, pg_url, "snapshot", rows)
    first = run_adapter(adapter, {})
    assert first.error is None and first.state
    assert [e.key for e in first.emitted] == ["001090000001"] and first.skipped == 0
    _touch(engine, 1, now, "Lê Văn Ân")  # changes written afterwards, at the right time
    _write(engine, [(3, "001090000003", "Phạm Văn Cường", now)])
    second = run_adapter(adapter, first.state)
    assert second.error is None
    assert sorted(e.key for e in second.emitted) == ["001090000001", "001090000003"]
    ceiling = int((datetime.now(UTC) + timedelta(days=1)).timestamp() * 1_000_000)
    assert all(e.version < ceiling for e in second.emitted)  # their own times' versions
    _touch(engine, 2, now)  # the row's time repaired at the source
    third = run_adapter(adapter, second.state)
    adapter.close()
    engine.dispose()
    assert third.error is None
    assert [e.key for e in third.emitted] == ["001090000002"]
    assert third.emitted[0].version < ceiling


def test_a_row_ahead_of_the_clock_does_not_move_the_lookback_cursor_past_later_changes(
    tmp_path: Path,
) -> None:
    """A row stamped a day ahead (a source clock wrong, a data-entry error) moved the
    cursor to its time: every change written after it, at the right time, fell behind the
    window for good. It is now held, neither sent nor dead-lettered: the cursor stays,
    and the row is sent once its time has come."""
    now = datetime.now().replace(microsecond=0)  # naive: local time of the source
    rows = [
        (1, "001090000001", "Lê Văn An", now - timedelta(hours=1)),
        (2, "001090000002", "Trần Thị Bình", now + timedelta(days=1)),
    ]
    engine, adapter = _nguoi(tmp_path, f"sqlite:///{tmp_path / 'src.db'}", "lookback", rows)
    first = run_adapter(adapter, {})
    assert first.error is None and first.state
    assert [e.key for e in first.emitted] == ["001090000001"] and first.skipped == 0
    _touch(engine, 1, now, "Lê Văn Ân")  # changes written afterwards, at the right time
    _write(engine, [(3, "001090000003", "Phạm Văn Cường", now)])
    second = run_adapter(adapter, first.state)
    assert second.error is None
    assert sorted(e.key for e in second.emitted) == ["001090000001", "001090000003"]
    assert second.skipped == 0  # held again, and still not sent
    adapter.close()
    engine.dispose()
