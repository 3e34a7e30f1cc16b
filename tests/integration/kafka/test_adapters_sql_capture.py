"""Change capture of the `sql` adapter on real SQLite and PostgreSQL sources: transactions
held open across polls, several changes within one second, clocks running backwards, time
zones, text cursors, and what `adapters check` warns about."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    text,
    update,
)
from sqlalchemy.dialects import postgresql

from producers.conformance import check_adapter
from producers.cursor_lag import cursor_lag_of
from producers.sdk import Adapter, Checkpoint, Record, Reservation, State
from producers.sql_cursor import CursorState
from producers.sql_snapshot import is_plain_table
from tests.support.adapter_helpers import database_url, deployment, write_config
from tests.support.pipeline_helpers import cli

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
T0 = datetime(2024, 1, 15, 9, 0, 0)  # local wall-clock time of the source
metadata = MetaData()
# The usual provincial DATETIME: whole seconds (PostgreSQL: timestamp(0)).
SECONDS = DateTime().with_variant(postgresql.TIMESTAMP(precision=0), "postgresql")
cong_dan = Table(
    "cong_dan",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("so_dinh_danh", String(12), nullable=False),
    Column("ho_ten", String(100)),
    Column("cap_nhat_luc", SECONDS, nullable=False),
    Column("da_xoa", Boolean, nullable=False, default=False),
    Index("ix_cong_dan_cursor", "cap_nhat_luc", "id"),  # what docs/adapters.md asks for
)
ho_so_text = Table(
    "ho_so_text",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ma_ho_so", String(40), nullable=False),
    Column("trang_thai", Integer),
    Column("ngay_cap_nhat", String(14), nullable=False),  # yyyyMMddHHmmss, local time
)

CITIZENS = """
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
timezone = "{zone}"
lookback_seconds = {lookback}
fields = {{ full_name = "ho_ten" }}
"""

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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = database_url(request, tmp_path)
    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_store_url: str) -> str:
    """A fresh source database on the real PostgreSQL."""
    url = postgres_store_url
    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    opened: list[Engine] = []
    yield opened
    for engine in opened:
        engine.dispose()


class Source:
    """The source system's database, written to as its application would."""

    def __init__(self, url: str, engines: list[Engine]) -> None:
        self.url = url
        self.engine = create_engine(url)
        engines.append(self.engine)

    def insert(self, row_id: int, name: str, at: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(cong_dan).values(**row(row_id, name, at)))

    def update(self, row_id: int, at: datetime, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(cong_dan).where(cong_dan.c.id == row_id).values(cap_nhat_luc=at, **values)
            )


def row(row_id: int, name: str, at: datetime) -> dict[str, Any]:
    return {"id": row_id, "so_dinh_danh": pid(row_id), "ho_ten": name, "cap_nhat_luc": at,
            "da_xoa": False}  # fmt: skip


def pid(n: int) -> str:
    return f"0010900{n:05d}"


def micros(local: datetime, zone: ZoneInfo = ZONE) -> int:
    epoch = datetime(1970, 1, 1, tzinfo=ZoneInfo("UTC"))
    return (local.replace(tzinfo=zone) - epoch) // timedelta(microseconds=1)


def citizens(
    tmp_path: Path,
    url: str,
    zone: str = "Asia/Ho_Chi_Minh",
    lookback: float = 60,
    batch: int = 100,
    capture: str = "auto",
) -> Any:
    body = CITIZENS.format(url=url, zone=zone, lookback=lookback)
    body += f"batch_size = {batch}\n" + (f'capture = "{capture}"\n' if capture != "auto" else "")
    deploy = deployment(tmp_path, body)
    return deploy.adapter(deploy.sources[0])


class Poller:
    """Runs an adapter poll after poll as `produce` does: the state of each checkpoint goes
    through JSON, as the state file does."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.state: State = {}

    def poll(self) -> list[Record]:
        records = []
        for item in self.adapter.read(json.loads(json.dumps(self.state))):
            if isinstance(item, Checkpoint):
                self.state = json.loads(json.dumps(item.value()))
            elif isinstance(item, Record):
                records.append(item)
        return records


@pytest.fixture
def pollers() -> Iterator[list[Poller]]:
    opened: list[Poller] = []
    yield opened
    for poller in opened:
        poller.adapter.close()


def poller_of(pollers: list[Poller], adapter: Adapter) -> Poller:
    pollers.append(Poller(adapter))
    return pollers[-1]


def names(records: list[Record]) -> list[tuple[str, str | None]]:
    return [(r.key, (r.data or {}).get("full_name")) for r in records]


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- PostgreSQL: transactions held open across polls ---------------------------------------


def test_a_row_committed_by_a_transaction_held_open_across_polls_is_captured_once(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """No lookback window on PostgreSQL: the rows of a transaction that stayed open across
    many polls are read by the first poll after its commit, however old their
    updated_at, and only by that one."""
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    source.insert(2, "Bình", T0 + timedelta(seconds=1))
    poller = poller_of(pollers, citizens(tmp_path, postgres_url, lookback=1))
    assert names(poller.poll()) == [(pid(1), "An"), (pid(2), "Bình")]

    held = source.engine.connect()
    transaction = held.begin()
    # stamped when the transaction began (now()), committed much later
    held.execute(insert(cong_dan).values(**row(3, "Cường", T0 + timedelta(seconds=2))))
    held.execute(
        update(cong_dan)
        .where(cong_dan.c.id == 1)
        .values(ho_ten="An (sửa)", cap_nhat_luc=T0 + timedelta(seconds=2))
    )
    for minute in range(1, 6):  # other work commits meanwhile, polls go on
        source.insert(10 + minute, f"Người {minute}", T0 + timedelta(minutes=minute))
        assert names(poller.poll()) == [(pid(10 + minute), f"Người {minute}")]
        assert poller.poll() == []
    transaction.commit()
    held.close()

    late = poller.poll()
    assert names(late) == [(pid(1), "An (sửa)"), (pid(3), "Cường")]
    # Behind the window and not remembered: above every version sent so far (the newest,
    # row 15's), whatever updated_at says; occurred_at stays the row's updated_at.
    assert [r.version for r in late] == [micros(T0 + timedelta(minutes=5)) + 1] * 2
    assert late[0].occurred_at == (T0 + timedelta(seconds=2)).replace(tzinfo=ZONE)
    for _ in range(3):
        assert poller.poll() == []  # exactly once
    state = CursorState.from_dict(poller.state)
    assert state.xmin is not None
    # rows neither in the window nor written since the snapshot are forgotten, but those
    # sent above their own version (1 and 3), while that version is above the window's
    # start: their next change must go above it
    assert set(state.seen) == {"1", "3", "15"}


def test_a_late_commit_to_a_forgotten_row_is_sent_above_the_change_that_overtook_it(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """A transaction stamps a row when it begins (A) and commits after another change to the
    same row (B > A) was sent and the state forgot the row: what it committed is the row as
    it is now, so it must be sent above B, or the reconciler keeps B's older values for good
    (`stale`). No version column: the version derives from updated_at."""
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    poller = poller_of(pollers, citizens(tmp_path, postgres_url, lookback=1))
    assert len(poller.poll()) == 1
    began = T0 + timedelta(seconds=10)  # the late transaction's updated_at
    held = source.engine.connect()
    transaction = held.begin()
    held.execute(text("SELECT 1"))  # begun, no row written yet
    source.update(1, T0 + timedelta(seconds=20), ho_ten="An (B)")  # overtakes it
    overtaking = poller.poll()
    assert names(overtaking) == [(pid(1), "An (B)")]
    for minute in range(1, 4):  # the cursor moves on: row 1 falls out of the state
        source.insert(10 + minute, f"Người {minute}", T0 + timedelta(minutes=minute))
        assert len(poller.poll()) == 1
    assert "1" not in CursorState.from_dict(poller.state).seen
    raised = counted("portal_sync_source_versions_raised_total", source="province-79",
                     reason="lower")  # fmt: skip
    held.execute(
        update(cong_dan).where(cong_dan.c.id == 1).values(ho_ten="An (A)", cap_nhat_luc=began)
    )
    transaction.commit()
    held.close()

    late = poller.poll()
    assert names(late) == [(pid(1), "An (A)")]
    assert late[0].version > overtaking[0].version  # not stale: the row as it is now wins
    assert late[0].version == micros(T0 + timedelta(minutes=3)) + 1  # the highest sent + 1
    assert late[0].occurred_at == began.replace(tzinfo=ZONE)
    assert counted("portal_sync_source_versions_raised_total", source="province-79",
                   reason="lower") == raised + 1  # fmt: skip
    assert poller.poll() == []  # and once
    # The row's next change, stamped within the window but below the version sent: its
    # row is remembered (its version is above the window's), so it goes above that one.
    assert "1" in CursorState.from_dict(poller.state).seen
    source.update(1, T0 + timedelta(minutes=3) - timedelta(seconds=1), ho_ten="An (C)")
    after = poller.poll()
    assert names(after) == [(pid(1), "An (C)")]
    assert after[0].version == late[0].version + 1


def test_a_rolled_back_transaction_sends_nothing_and_later_changes_still_come(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    poller = poller_of(pollers, citizens(tmp_path, postgres_url))
    assert len(poller.poll()) == 1
    held = source.engine.connect()
    transaction = held.begin()
    held.execute(insert(cong_dan).values(**row(2, "Bình", T0 + timedelta(seconds=1))))
    assert poller.poll() == []
    transaction.rollback()
    held.close()
    assert poller.poll() == []
    source.update(1, T0 - timedelta(hours=1), ho_ten="An (sửa)")  # far behind the cursor
    assert names(poller.poll()) == [(pid(1), "An (sửa)")]


def test_a_poll_stopped_between_pages_still_captures_a_late_row_once(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    source = Source(postgres_url, engines)
    for n in range(1, 5):
        source.insert(n, f"Người {n}", T0 + timedelta(minutes=n))
    poller = poller_of(pollers, citizens(tmp_path, postgres_url, batch=2))
    assert len(poller.poll()) == 4
    held = source.engine.connect()
    transaction = held.begin()
    held.execute(insert(cong_dan).values(**row(5, "Late", T0)))
    for n in range(6, 9):
        source.insert(n, f"Người {n}", T0 + timedelta(minutes=n))
    # the process dies after the first page of a poll was acknowledged and saved
    items = poller.adapter.read(json.loads(json.dumps(poller.state)))
    first_page = []
    for item in items:
        if isinstance(item, Checkpoint):
            poller.state = json.loads(json.dumps(item.value()))
            break
        if isinstance(item, Record):
            first_page.append(item)
    items.close()
    assert [r.key for r in first_page] == [pid(6), pid(7)]
    transaction.commit()
    held.close()
    assert names(poller.poll()) == [(pid(5), "Late"), (pid(8), "Người 8")]
    assert poller.poll() == []


def stopped_after_its_first_page(poller: Poller) -> list[Record]:
    """A poll whose process dies once its first page of records was acknowledged and saved:
    the records of that page (the state: that page's checkpoint)."""
    items = poller.adapter.read(json.loads(json.dumps(poller.state)))
    records: list[Record] = []
    for item in items:
        if isinstance(item, Checkpoint):
            poller.state = json.loads(json.dumps(item.value()))
            if records:
                break
        elif isinstance(item, Record):
            records.append(item)
    items.close()
    return records


def late_row_captured_after_a_stop(source: Source, poller: Poller, late_at: datetime) -> None:
    """A transaction holds row 5 (at `late_at`) open while rows 6-8 are committed; the
    poll stops after its first page (6, 7). Once the transaction commits, the next poll
    sends the late row and row 8, and the one after nothing."""
    held = source.engine.connect()
    transaction = held.begin()
    held.execute(insert(cong_dan).values(**row(5, "Late", late_at)))
    for n in range(6, 9):
        source.insert(n, f"Người {n}", T0 + timedelta(minutes=n))
    assert [r.key for r in stopped_after_its_first_page(poller)] == [pid(6), pid(7)]
    transaction.commit()
    held.close()
    assert names(poller.poll()) == [(pid(5), "Late"), (pid(8), "Người 8")]
    assert poller.poll() == []


def test_a_first_poll_stopped_between_pages_still_captures_a_late_row_once(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """The first poll of a source, no state yet, recorded its snapshot's xmin after its
    last page: stopped after one, it left a cursor without it, and the next poll took that
    for a state of lookback capture. A row a transaction open meanwhile wrote further back
    than the window was never read."""
    source = Source(postgres_url, engines)
    poller = poller_of(pollers, citizens(tmp_path, postgres_url, batch=2))
    late_row_captured_after_a_stop(source, poller, T0)


def test_a_lookback_state_s_first_snapshot_poll_stopped_past_its_window_captures_a_late_row(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """As above, for a state saved by lookback capture: its first snapshot poll reads the
    window, then what is new; stopped in the new part, it left no xmin either."""
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    before = poller_of(pollers, citizens(tmp_path, postgres_url, capture="lookback"))
    assert len(before.poll()) == 1
    after = poller_of(pollers, citizens(tmp_path, postgres_url, batch=2))
    after.state = before.state
    late_row_captured_after_a_stop(source, after, T0 - timedelta(minutes=10))


def test_a_raised_version_is_never_given_to_other_content_after_a_failed_run(
    db_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """A row changed twice within its cursor's precision: the second change is raised to
    the last version sent + 1. A run that sent it and failed before its checkpoint was
    saved gave the row's next change, on the retry, that same version and event id for
    other content: the reconciler kept whichever sorted first, maybe the older. The
    page's versions are journaled (a `Reservation`) before it is sent, and the next run
    takes them in."""
    source = Source(db_url, engines)
    source.insert(1, "An", T0)
    poller = poller_of(pollers, citizens(tmp_path, db_url, lookback=0))
    assert [r.version for r in poller.poll()] == [micros(T0)]
    source.update(1, T0, ho_ten="Bình")  # the same second
    journal = []
    items = poller.adapter.read(json.loads(json.dumps(poller.state)))
    for item in items:  # as the framework: reservations journaled before what follows
        if isinstance(item, Reservation):
            journal.append(json.loads(json.dumps(item.entry)))
        elif isinstance(item, Record):  # sent, acknowledged; then the run fails
            sent = item
            break
    items.close()
    assert (sent.data, sent.version) == ({"full_name": "Bình"}, micros(T0) + 1)
    poller.state = poller.adapter.recover(poller.state, journal)
    source.update(1, T0, ho_ten="Châu")  # the same second again
    (retried,) = poller.poll()
    assert retried.data == {"full_name": "Châu"}
    assert retried.version == sent.version + 1
    source.update(1, T0, ho_ten="Dung")
    assert [r.version for r in poller.poll()] == [retried.version + 1]


def test_a_state_saved_by_lookback_capture_goes_on_by_snapshot_without_repeats(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """A PostgreSQL source polled with a lookback window (an earlier release, or
    `capture = "lookback"`): its first snapshot poll re-reads the window once, sends
    nothing twice, and records a snapshot; from then on late rows are captured."""
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    source.insert(2, "Bình", T0 + timedelta(seconds=30))
    before = poller_of(pollers, citizens(tmp_path, postgres_url, capture="lookback"))
    assert len(before.poll()) == 2
    assert before.state["xmin"] is None
    after = poller_of(pollers, citizens(tmp_path, postgres_url))
    after.state = before.state
    assert after.poll() == []
    assert after.state["xmin"] is not None
    source.update(1, T0 - timedelta(days=1), ho_ten="An (sửa)")
    assert names(after.poll()) == [(pid(1), "An (sửa)")]


def test_a_view_is_read_with_the_lookback_window(
    postgres_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """A view's rows have no xmin of their own: `auto` capture reads it by lookback."""
    source = Source(postgres_url, engines)
    with source.engine.begin() as conn:
        conn.execute(text('CREATE VIEW "CongDan" AS SELECT * FROM cong_dan'))
    source.insert(1, "An", T0)
    body = CITIZENS.format(url=postgres_url, zone="Asia/Ho_Chi_Minh", lookback=60)
    deploy = deployment(tmp_path, body.replace('table = "cong_dan"', 'table = "CongDan"'))
    poller = poller_of(pollers, deploy.adapter(deploy.sources[0]))
    assert names(poller.poll()) == [(pid(1), "An")]
    source.insert(2, "Bình", T0 - timedelta(seconds=30))  # late, within the window
    assert names(poller.poll()) == [(pid(2), "Bình")]
    assert poller.state["xmin"] is None
    assert poller.poll() == []
    with source.engine.begin() as conn:
        conn.execute(text('CREATE TABLE "HoSo" (id integer PRIMARY KEY)'))
    assert is_plain_table(source.engine, "HoSo") and is_plain_table(source.engine, "cong_dan")
    assert not is_plain_table(source.engine, "CongDan")


# -- any source: every change, versions rising per row -------------------------------------


def test_every_change_within_one_second_of_the_cursor_precision_is_emitted(
    db_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    source = Source(db_url, engines)
    source.insert(1, "An", T0)
    source.insert(2, "Bình", T0)
    poller = poller_of(pollers, citizens(tmp_path, db_url, lookback=0))
    first = poller.poll()
    assert [r.version for r in first] == [micros(T0)] * 2

    raised = counted("portal_sync_source_versions_raised_total", source="province-79",
                     reason="same_instant")  # fmt: skip
    source.update(1, T0, ho_ten="An 2")  # the same second: same updated_at
    (second,) = poller.poll()
    assert (second.key, second.data, second.version) == (pid(1), {"full_name": "An 2"},
                                                         micros(T0) + 1)  # fmt: skip
    source.update(1, T0, ho_ten="An 3")
    source.update(2, T0, ho_ten="Bình 2")
    third = poller.poll()
    assert [(r.key, r.version) for r in third] == [(pid(1), micros(T0) + 2),
                                                   (pid(2), micros(T0) + 1)]  # fmt: skip
    assert counted("portal_sync_source_versions_raised_total", source="province-79",
                   reason="same_instant") == raised + 3  # fmt: skip
    source.update(2, T0)  # touched within the same second, content unchanged: no change
    assert poller.poll() == []
    source.update(2, T0 + timedelta(seconds=1))  # touched later: asserts its values again
    (touched,) = poller.poll()
    assert (touched.key, touched.version) == (pid(2), micros(T0 + timedelta(seconds=1)))
    source.update(2, T0 + timedelta(seconds=1), ho_ten="Bình 3")
    (fourth,) = poller.poll()
    assert fourth.version == micros(T0 + timedelta(seconds=1)) + 1
    assert [r.occurred_at for r in third] == [T0.replace(tzinfo=ZONE)] * 2


def test_two_changes_within_one_second_of_a_text_cursor(
    db_url: str, tmp_path: Path, pollers: list[Poller]
) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(ho_so_text), [dossier_text(1, 4, "20240115090000")])
    deploy = deployment(tmp_path, TEXT_CURSOR.format(url=db_url))
    poller = poller_of(pollers, deploy.adapter(deploy.sources[0]))
    (first,) = poller.poll()
    with engine.begin() as conn:
        conn.execute(update(ho_so_text).values(trang_thai=9))
    engine.dispose()
    (second,) = poller.poll()
    assert second.data == {"status": 9}
    assert second.version == first.version + 1


def test_versions_rise_per_row_when_the_source_clock_runs_backwards(
    db_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    source = Source(db_url, engines)
    source.insert(1, "An", T0 + timedelta(seconds=30))
    poller = poller_of(pollers, citizens(tmp_path, db_url))
    (first,) = poller.poll()
    backwards = counted("portal_sync_source_clock_backwards_total", source="province-79")
    lower = counted("portal_sync_source_versions_raised_total", source="province-79",
                    reason="lower")  # fmt: skip
    # another application server, its clock 20 s behind, updates the row
    source.update(1, T0 + timedelta(seconds=10), ho_ten="An (sửa)")
    (second,) = poller.poll()
    assert second.version == first.version + 1
    assert second.occurred_at == (T0 + timedelta(seconds=10)).replace(tzinfo=ZONE)
    assert second.data == {"full_name": "An (sửa)"}
    assert counted("portal_sync_source_clock_backwards_total", source="province-79") == (
        backwards + 1
    )
    assert counted("portal_sync_source_versions_raised_total", source="province-79",
                   reason="lower") == lower + 1  # fmt: skip
    assert poller.poll() == []


# -- zones ---------------------------------------------------------------------------------


def test_timestamps_with_a_zone_are_converted_never_relabelled(
    db_url: str, tmp_path: Path, engines: list[Engine], pollers: list[Poller]
) -> None:
    """PostgreSQL: a timestamptz column (read back in the session's zone, UTC here);
    SQLite: timestamps written as text with their offset."""
    source = Source(db_url, engines)
    with source.engine.begin() as conn:
        conn.execute(text("DROP TABLE cong_dan"))
        kind = "timestamptz" if db_url.startswith("postgresql") else "DATETIME"
        conn.execute(text(f"CREATE TABLE cong_dan (id integer PRIMARY KEY, so_dinh_danh "
                          f"varchar(12), ho_ten varchar(100), cap_nhat_luc {kind}, "
                          "da_xoa boolean NOT NULL DEFAULT false)"))  # fmt: skip
        for n, stamp in [(1, "2024-01-15 09:00:00+07:00"), (2, "2024-01-15 02:30:00+00:00")]:
            conn.execute(text("INSERT INTO cong_dan (id, so_dinh_danh, ho_ten, cap_nhat_luc) "
                              f"VALUES ({n}, '{pid(n)}', 'X', '{stamp}')"))  # fmt: skip
    poller = poller_of(pollers, citizens(tmp_path, db_url, zone="Asia/Ho_Chi_Minh"))
    first = poller.poll()
    assert [r.occurred_at.isoformat() for r in first] == [
        "2024-01-15T09:00:00+07:00",
        "2024-01-15T09:30:00+07:00",
    ]
    assert [r.version for r in first] == [micros(T0), micros(T0 + timedelta(minutes=30))]
    event = first[0].event("province-79", "citizen")
    assert event["occurred_at"] == "2024-01-15T09:00:00+07:00"
    assert poller.poll() == []  # the cursor compares instants: nothing read twice
    with source.engine.begin() as conn:
        conn.execute(text("INSERT INTO cong_dan (id, so_dinh_danh, ho_ten, cap_nhat_luc) "
                          f"VALUES (3, '{pid(3)}', 'Y', '2024-01-15 03:00:00+00:00')"))  # fmt: skip
    (third,) = poller.poll()
    assert third.occurred_at.isoformat() == "2024-01-15T10:00:00+07:00"

    in_utc = poller_of(pollers, citizens(tmp_path, db_url, zone="UTC"))
    assert [r.occurred_at.isoformat() for r in in_utc.poll()] == [
        "2024-01-15T02:00:00+00:00",
        "2024-01-15T02:30:00+00:00",
        "2024-01-15T03:00:00+00:00",
    ]
    adapter = in_utc.adapter
    assert cursor_lag_of(adapter.poller, CursorState.from_dict(in_utc.state)) == 0.0


# -- text cursors --------------------------------------------------------------------------


def dossier_text(n: int, status: int, at: str) -> dict[str, Any]:
    return {"id": n, "ma_ho_so": f"000.00.01.H29-240115-{n:04d}", "trang_thai": status,
            "ngay_cap_nhat": at}  # fmt: skip


def test_the_cursor_lag_of_a_text_cursor_column(db_url: str, tmp_path: Path) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(ho_so_text), [dossier_text(1, 4, "20250115090000"),
                                          dossier_text(2, 4, "20250115093000")])  # fmt: skip
    engine.dispose()
    deploy = deployment(tmp_path, TEXT_CURSOR.format(url=db_url))
    adapter = deploy.adapter(deploy.sources[0])
    try:
        assert adapter.cursor_lag_seconds({}) == 1800.0
        state = CursorState("2025-01-15T09:00:00.000000", 1).as_dict()
        assert adapter.cursor_lag_seconds(state) == 1800.0
    finally:
        adapter.close()


@pytest.mark.kafka
def test_a_poll_of_a_text_cursor_column_exits_0(
    db_url: str, tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """The documented text-cursor configuration: `produce --once` publishes, saves its
    position and exits 0, every poll."""
    settings = settings_for(sqlite_store_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(insert(ho_so_text), [dossier_text(n, 4, "20250115090000") for n in (1, 2, 3)])
    config = write_config(tmp_path, TEXT_CURSOR.format(url=db_url))
    first = cli(settings, "produce", "--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    assert "legacy-dossiers: published 3, dead-lettered 0" in first.stderr
    assert "run failed" not in first.stderr
    with engine.begin() as conn:
        conn.execute(
            update(ho_so_text)
            .where(ho_so_text.c.id == 2)
            .values(trang_thai=9, ngay_cap_nhat="20250115100000")
        )
    engine.dispose()
    second = cli(settings, "produce", "--config", str(config), "--once")
    assert second.returncode == 0, second.stderr
    assert "legacy-dossiers: published 1, dead-lettered 0" in second.stderr
    assert "run failed" not in second.stderr


# -- adapters check ------------------------------------------------------------------------


def test_check_warns_of_whole_seconds_and_no_version_column(
    db_url: str, tmp_path: Path, engines: list[Engine]
) -> None:
    source = Source(db_url, engines)
    for n in range(1, 4):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    source.update(3, T0 + timedelta(seconds=4), da_xoa=True)
    adapter = citizens(tmp_path, db_url)
    try:
        report = check_adapter(adapter, "hcm-citizens", "sql")
    finally:
        adapter.close()
    assert report.passed, [(r.name, r.detail) for r in report.results]
    (precision, version) = report.warnings
    assert precision.startswith("cursor column cap_nhat_luc has whole seconds only")
    assert "content hash" in precision
    assert version.startswith("no version_column")

    result = subprocess.run(
        [sys.executable, "-m", "portal_sync", "adapters", "check", "--config",
         str(tmp_path / "sources.toml")],
        capture_output=True, text=True, timeout=120, env=os.environ | {"COLUMNS": "250"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warn" in result.stdout and "whole seconds" in result.stdout


def test_check_warns_of_a_cursor_column_no_index_begins_with(
    db_url: str, tmp_path: Path, engines: list[Engine]
) -> None:
    """Without an index on the cursor, every page and every idle poll reads the whole table
    at the province's expense; nothing said so."""
    Source(db_url, engines)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_cong_dan_cursor"))
    engine.dispose()
    adapter = citizens(tmp_path, db_url)
    try:
        report = check_adapter(adapter, "hcm-citizens", "sql")
    finally:
        adapter.close()
    assert any(
        note.startswith("no index of cong_dan begins with cap_nhat_luc") for note in report.warnings
    ), report.warnings


def test_check_warns_of_a_lookback_shorter_than_the_longest_transaction(
    postgres_url: str, tmp_path: Path, engines: list[Engine]
) -> None:
    source = Source(postgres_url, engines)
    source.insert(1, "An", T0)
    held = source.engine.connect()
    transaction = held.begin()
    held.execute(insert(cong_dan).values(**row(2, "Bình", T0)))  # it wrote: it holds an xid
    held.execute(text("SELECT pg_sleep(1.2)"))  # and stays open for over a second
    try:
        adapter = citizens(tmp_path, postgres_url, lookback=1)
        try:
            report = check_adapter(adapter, "hcm-citizens", "sql")
        finally:
            adapter.close()
    finally:
        transaction.rollback()
        held.close()
    (warning,) = [w for w in report.warnings if w.startswith("lookback_seconds")]
    assert "longest open writing transaction seen in pg_stat_activity" in warning
    assert "snapshot capture still reads its rows" in warning
