"""The SQL polling adapter (query-based CDC) against a real SQLite source database."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    update,
)

from producers import sql_polling, sql_rows
from producers.mapping import sorts_in_time_order
from producers.sdk import FatalError
from producers.sql_config import SqlSourceConfig
from producers.sql_cursor import CursorState
from producers.sql_polling import SqlPollingAdapter
from producers.sql_rows import SourceChange
from schemas import derive_event_id, parse_event

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
T0 = datetime(2024, 1, 15, 9, 0, 0)  # local wall-clock time of the source
metadata = MetaData()
cong_dan = Table(
    "cong_dan",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("so_dinh_danh", String(12), nullable=False),
    Column("ho_ten", String(100)),
    Column("updated_at", DateTime, nullable=False),
    Column("da_xoa", Boolean, nullable=False, default=False),
    Column("phien_ban", Integer),
)


def pid(n: int) -> str:
    return f"0010900{n:05d}"


def micros(local: datetime) -> int:
    """Exact microseconds since the epoch of a local wall-clock time."""
    epoch = datetime(1970, 1, 1, tzinfo=ZoneInfo("UTC"))
    return (local.replace(tzinfo=ZONE) - epoch) // timedelta(microseconds=1)


class Source:
    """A source system's database, written to as the source application would."""

    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        self.engine: Engine = create_engine(self.url)
        metadata.create_all(self.engine)

    def insert(self, row_id: int, name: str, at: datetime, version: int | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(cong_dan).values(
                    id=row_id, so_dinh_danh=pid(row_id), ho_ten=name, updated_at=at,
                    da_xoa=False, phien_ban=version,
                )
            )  # fmt: skip

    def update(self, row_id: int, at: datetime, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(cong_dan).where(cong_dan.c.id == row_id).values(updated_at=at, **values)
            )

    def hard_delete(self, row_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(cong_dan).where(cong_dan.c.id == row_id))

    def config(self, **overrides: Any) -> SqlSourceConfig:
        return self.config_of(self.url, **overrides)

    @staticmethod
    def config_of(url: str, **overrides: Any) -> SqlSourceConfig:
        settings: dict[str, Any] = {
            "source": "province-01",
            "url": url,
            "entity": "citizen",
            "table": "cong_dan",
            "key_column": "so_dinh_danh",
            "pk_column": "id",
            "deleted_column": "da_xoa",
            "fields": {"full_name": "ho_ten"},
            "lookback_seconds": 60.0,
            "batch_size": 100,
        }
        return SqlSourceConfig(**(settings | overrides))


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Source]:
    db = Source(tmp_path / "source.db")
    yield db
    db.engine.dispose()


@pytest.fixture
def adapters() -> Iterator[list[SqlPollingAdapter]]:
    opened: list[SqlPollingAdapter] = []
    yield opened
    for adapter in opened:
        adapter.close()


def open_adapter(
    adapters: list[SqlPollingAdapter], source: Source, **overrides: Any
) -> SqlPollingAdapter:
    adapter = SqlPollingAdapter(source.config(**overrides))
    adapters.append(adapter)
    return adapter


def poll(
    adapter: SqlPollingAdapter, state: CursorState, save_to: Path | None = None
) -> list[list[SourceChange]]:
    """One poll: every page is 'published', then remembered (and saved, like the runner)."""
    pages = []
    for page in adapter.pages(state):
        pages.append(page)
        adapter.remember(state, page)
        if save_to is not None:
            state.save(save_to)
    return pages


def flat(pages: list[list[SourceChange]]) -> list[SourceChange]:
    return [change for page in pages for change in page]


def pks(pages: list[list[SourceChange]]) -> list[int]:
    return [change.pk for change in flat(pages)]


# -- first run, restarts, no repeats ------------------------------------------------------


def test_first_run_emits_every_row_as_valid_events(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "Nguyễn Văn An", T0)
    source.insert(2, "Trần Thị Bình", T0 + timedelta(seconds=1, microseconds=250))
    source.insert(3, None, T0 + timedelta(seconds=2))  # type: ignore[arg-type]
    adapter = open_adapter(adapters, source)
    state = CursorState()
    changes = flat(poll(adapter, state))
    assert [c.pk for c in changes] == [1, 2, 3]

    second = changes[1]
    at = T0 + timedelta(seconds=1, microseconds=250)
    assert second.updated_at == at
    assert second.version == micros(at)
    assert second.event == {
        "schema_version": 1,
        "event_id": str(derive_event_id("province-01", "citizen", pid(2), micros(at))),
        "source": "province-01",
        "entity": "citizen",
        "key": pid(2),
        "op": "upsert",
        "version": micros(at),
        "occurred_at": "2024-01-15T09:00:01.000250+07:00",
        "data": {"full_name": "Trần Thị Bình"},
    }
    for change in changes:
        parsed = parse_event(adapter_json(change))
        assert parsed.event.key == pid(change.pk)
        assert parsed.event.version == change.version
    # a NULL column is an explicit null in the payload
    assert parse_event(adapter_json(changes[2])).event.data_dict() == {"full_name": None}
    # the high-water mark is the last row read
    assert (state.updated_at, state.pk) == ("2024-01-15T09:00:02.000000", 3)
    assert set(state.seen) == {"1", "2", "3"}


def test_rows_remembered_with_an_older_fingerprint_are_not_sent_again(
    source: Source, adapters: list[SqlPollingAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """States saved by releases before orjson's fingerprint hold `json`'s: a row of their
    lookback window read again unchanged is not sent again (with a raised version), and is
    remembered with the new fingerprint from then on."""
    source.insert(1, "Nguyễn Văn An", T0)
    source.insert(2, "Trần Thị Bình", T0 + timedelta(seconds=1))
    adapter = open_adapter(adapters, source)
    state = CursorState()
    with monkeypatch.context() as older_release:
        older_release.setattr(sql_polling, "fingerprint", sql_rows.json_fingerprint)
        assert pks(poll(adapter, state)) == [1, 2]
    assert {len(entry[2]) for entry in state.seen.values()} == {16}
    state = CursorState.from_dict(json.loads(json.dumps(state.as_dict())))
    assert poll(adapter, state) == []
    assert {entry[2][0] for entry in state.seen.values()} == {"o"}
    source.update(2, T0 + timedelta(seconds=2), ho_ten="Trần Thị Bình Minh")  # still goes out
    assert pks(poll(adapter, state)) == [2]


JSON_DATA = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(first=JSON_DATA, second=JSON_DATA, same=st.booleans())
@example(first=float("nan"), second=None, same=False)
@example(first=[float("-inf")], second=[None], same=False)
@example(first=1, second=1.0, same=False)
@example(first=1, second=True, same=False)
@example(first=-0.0, second=0.0, same=False)
@example(first=2**64, second=2**64, same=False)
@example(first="\ud800", second="\ud800", same=False)
def test_the_fingerprint_tells_apart_what_the_older_one_did(
    first: Any, second: Any, same: bool
) -> None:
    """orjson's fingerprint finds two rows' contents equal exactly when `json`'s did:
    NaN and the infinities (which orjson writes as null), integers beyond 64 bits, lone
    surrogates, 1 against 1.0 against true, -0.0 against 0.0."""
    if same:
        second = json.loads(json.dumps(first))
    data = {"a": first}, {"a": second}
    older = sql_rows.json_fingerprint(data[0]) == sql_rows.json_fingerprint(data[1])
    assert (sql_rows.fingerprint(data[0]) == sql_rows.fingerprint(data[1])) == older


def adapter_json(change: SourceChange) -> bytes:
    import json

    return json.dumps(change.event, ensure_ascii=False).encode("utf-8")


def test_second_poll_emits_nothing_new(source: Source, adapters: list[SqlPollingAdapter]) -> None:
    for n in range(1, 6):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    adapter = open_adapter(adapters, source)
    state = CursorState()
    assert pks(poll(adapter, state)) == [1, 2, 3, 4, 5]
    assert poll(adapter, state) == []
    assert poll(adapter, state) == []


def test_cursor_state_round_trip(tmp_path: Path) -> None:
    seen = {"7": [123, "2024-01-15T09:00:02.000000", "9f86d081884c7d65", 801]}
    state = CursorState("2024-01-15T09:00:02.000000", 7, seen, 790, 124)
    path = tmp_path / "state" / "province-01.citizen.json"
    state.save(path)
    assert CursorState.load(path) == state
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert CursorState.load(tmp_path / "missing.json") == CursorState()


def test_a_state_of_an_older_release_resumes_without_repeats(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """States saved before content hashes and snapshots: `seen` holds [version, updated_at]
    and there is no `xmin`; rows in the window are not sent again, changes are."""
    source.insert(1, "A", T0)
    source.insert(2, "B", T0 + timedelta(seconds=1))
    old = {
        "updated_at": "2024-01-15T09:00:01.000000",
        "pk": 2,
        "seen": {
            "1": [micros(T0), "2024-01-15T09:00:00.000000"],
            "2": [micros(T0 + timedelta(seconds=1)), "2024-01-15T09:00:01.000000"],
        },
    }
    adapter = open_adapter(adapters, source)
    state = CursorState.from_dict(old)
    assert poll(adapter, state) == []
    source.update(1, T0 + timedelta(seconds=2), ho_ten="A2")
    (change,) = flat(poll(adapter, state))
    assert (change.pk, change.version) == (1, micros(T0 + timedelta(seconds=2)))
    assert len(state.seen["1"]) == 4 and state.xmin is None
    assert state.top == micros(T0 + timedelta(seconds=2))  # saved from now on


def test_the_highest_version_sent_of_a_state_of_an_older_release(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """A state saved before the highest version sent was kept: the highest it remembers
    (a raised one included), else the cursor's own version."""
    adapter = open_adapter(adapters, source)
    cursor = "2024-01-15T09:00:01.000000"
    remembered = {"1": [micros(T0 + timedelta(seconds=5)), "2024-01-15T09:00:00.000000"]}
    with_rows = CursorState.from_dict({"updated_at": cursor, "pk": 2, "seen": remembered})
    assert adapter.top_sent(with_rows) == micros(T0 + timedelta(seconds=5))
    without = CursorState.from_dict({"updated_at": cursor, "pk": 2, "seen": {}})
    assert adapter.top_sent(without) == micros(T0 + timedelta(seconds=1))
    assert adapter.top_sent(CursorState()) == 0


def test_restart_after_crash_resumes_without_repeats(
    source: Source, adapters: list[SqlPollingAdapter], tmp_path: Path
) -> None:
    for n in range(1, 4):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    path = tmp_path / "cursor.json"
    state = CursorState()
    assert pks(poll(open_adapter(adapters, source), state, path)) == [1, 2, 3]

    # "crash": the process dies; a new adapter starts from the saved cursor
    restored = CursorState.load(path)
    assert restored == state
    adapter = open_adapter(adapters, source)
    assert poll(adapter, restored, path) == []

    source.insert(4, "Người 4", T0 + timedelta(seconds=4))
    source.update(2, T0 + timedelta(seconds=5), ho_ten="Người 2 (sửa)")
    assert pks(poll(adapter, restored, path)) == [4, 2]
    assert poll(open_adapter(adapters, source), CursorState.load(path)) == []


def test_crash_between_pages_loses_nothing_and_repeats_nothing(
    source: Source, adapters: list[SqlPollingAdapter], tmp_path: Path
) -> None:
    for n in range(1, 8):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    path = tmp_path / "cursor.json"
    state = CursorState()
    pages = open_adapter(adapters, source, batch_size=3).pages(state)
    first = next(pages)
    assert [c.pk for c in first] == [1, 2, 3]
    open_adapter(adapters, source).remember(state, first)
    state.save(path)
    second = next(pages)  # published, but the process dies before remembering it
    assert [c.pk for c in second] == [4, 5, 6]

    restarted = CursorState.load(path)
    resumed = flat(poll(open_adapter(adapters, source, batch_size=3), restarted, path))
    assert [c.pk for c in resumed] == [4, 5, 6, 7]
    # what is sent twice is the same change: same version, same event id (consumer dedups)
    assert [c.event for c in resumed[:3]] == [c.event for c in second]


def crashed_after_sending(
    adapter: SqlPollingAdapter, state: CursorState
) -> tuple[list[SourceChange], list[Any]]:
    """A run that journals its first page, sends it and dies before anything is saved:
    the page, and the journal the next run takes in."""
    page = [c for c in next(adapter.pages(state)) if isinstance(c, SourceChange)]
    journal = json.loads(json.dumps([adapter.reservation(page)]))  # as the file holds it
    return page, journal


@pytest.mark.parametrize("journaled", [True, False])
def test_a_change_behind_a_version_sent_before_a_crash_is_raised_above_it(
    source: Source, adapters: list[SqlPollingAdapter], journaled: bool
) -> None:
    """A row's change is sent, the run dies before its state is saved, and the row changes
    again with an earlier updated_at (its writer's clock is behind). Restarted from the
    state saved before, the change went out with its own, lower version, and the
    reconciler dropped it as stale: the source held B, the store A, for good. With the
    page's journal taken in, it goes out above the version sent."""
    source.insert(1, "An", T0 + timedelta(seconds=10))
    saved = CursorState().as_dict()
    (sent,), journal = crashed_after_sending(open_adapter(adapters, source), CursorState())
    assert sent.version == micros(T0 + timedelta(seconds=10))
    source.update(1, T0 + timedelta(seconds=5), ho_ten="Bình")

    restarted = CursorState.from_dict(saved)
    if journaled:
        restarted.fold(journal)
    (after,) = flat(poll(open_adapter(adapters, source), restarted))
    assert after.data == {"full_name": "Bình"}
    if journaled:
        assert (after.version, after.raised) == (sent.version + 1, "lower")
    else:  # what the reconciler counts stale: the change lost
        assert after.version < sent.version


def test_a_page_journaled_and_maybe_sent_goes_out_again_as_the_same_events(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """Unchanged since, the journaled rows are sent again with the versions (and event
    ids) of the page, sent or not: the reconciler drops what it has; nothing is raised.
    A row changed twice within the column's precision, its first change journaled, gets
    its second one above the journaled version, never that version for other content."""
    for n in range(1, 4):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    adapter = open_adapter(adapters, source)
    sent, journal = crashed_after_sending(adapter, CursorState())
    source.update(3, T0 + timedelta(seconds=3), ho_ten="Người 3 (sửa)")  # the same instant

    restarted = CursorState()
    restarted.fold(journal)
    again = flat(poll(adapter, restarted))
    assert [c.event for c in again[:2]] == [c.event for c in sent[:2]]
    assert [c.raised for c in again[:2]] == [None, None]
    assert again[2].data == {"full_name": "Người 3 (sửa)"}
    assert (again[2].version, again[2].raised) == (sent[2].version + 1, "same_instant")
    assert poll(adapter, restarted) == []


def test_a_journal_older_than_the_state_changes_nothing(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """A journal whose checkpoint was saved after all (its removal lost in a crash): the
    state knows every version in it, at or above the journaled ones."""
    source.insert(1, "An", T0)
    adapter = open_adapter(adapters, source)
    state = CursorState()
    _, journal = crashed_after_sending(adapter, CursorState())
    poll(adapter, state)
    source.update(1, T0 + timedelta(seconds=1), ho_ten="Bình")
    poll(adapter, state)
    before = state.as_dict()
    state.fold(journal)
    assert state.as_dict() == before
    assert poll(adapter, state) == []


def test_updated_row_is_emitted_with_a_higher_version(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "Nguyễn Văn An", T0)
    adapter = open_adapter(adapters, source)
    state = CursorState()
    (before,) = flat(poll(adapter, state))
    source.update(1, T0 + timedelta(minutes=5), ho_ten="Nguyễn Văn Ân")
    (after,) = flat(poll(adapter, state))
    assert after.pk == 1
    assert after.version > before.version
    assert after.version == micros(T0 + timedelta(minutes=5))
    assert after.event["data"] == {"full_name": "Nguyễn Văn Ân"}
    assert after.event["event_id"] != before.event["event_id"]
    assert state.seen["1"][0] == after.version


def test_soft_deleted_row_becomes_a_delete(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "Nguyễn Văn An", T0)
    adapter = open_adapter(adapters, source)
    state = CursorState()
    poll(adapter, state)
    source.update(1, T0 + timedelta(seconds=30), da_xoa=True)
    (change,) = flat(poll(adapter, state))
    assert change.event["op"] == "delete"
    assert "data" not in change.event
    event = parse_event(adapter_json(change)).event
    assert event.op == "delete"
    assert event.data_dict() is None


def test_hard_delete_is_invisible_to_polling(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "Nguyễn Văn An", T0)
    adapter = open_adapter(adapters, source)
    state = CursorState()
    poll(adapter, state)
    source.hard_delete(1)
    assert poll(adapter, state) == []  # documented limit: sources must soft-delete


# -- late commits and the lookback window -------------------------------------------------


def test_late_row_within_lookback_is_still_emitted(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "A", T0)
    source.insert(3, "C", T0 + timedelta(seconds=40))
    adapter = open_adapter(adapters, source, lookback_seconds=60)
    state = CursorState()
    assert pks(poll(adapter, state)) == [1, 3]
    high_water = (state.updated_at, state.pk)
    # A long transaction commits a row stamped before the high-water mark.
    source.insert(2, "B", T0 + timedelta(seconds=10))
    (late,) = flat(poll(adapter, state))
    assert late.pk == 2
    assert late.version == micros(T0 + timedelta(seconds=10))
    assert (state.updated_at, state.pk) == high_water  # the mark never moves back
    assert poll(adapter, state) == []


def test_seen_rows_are_forgotten_behind_the_window(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "A", T0)
    source.insert(2, "B", T0 + timedelta(seconds=30))
    adapter = open_adapter(adapters, source, lookback_seconds=60)
    state = CursorState()
    poll(adapter, state)
    assert set(state.seen) == {"1", "2"}
    source.insert(3, "C", T0 + timedelta(seconds=75))
    assert pks(poll(adapter, state)) == [3]
    assert set(state.seen) == {"2", "3"}  # row 1 (T0) is older than 75 s - 60 s
    assert poll(adapter, state) == []


# (row, seconds after T0 it was written, its xid8, whether the window is swept after it,
# and the snapshot xmin recorded from then on: None, or one that only rises)
NOTES = st.lists(
    st.tuples(
        st.integers(0, 15),
        st.integers(0, 240),
        st.integers(0, 9),
        st.booleans(),
        st.none() | st.integers(0, 3),
    ),
    max_size=80,
)


@pytest.fixture(scope="module")
def one_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlPollingAdapter]:
    """An adapter for tests that only use its rules (one for all of a property's examples)."""
    source = Source(tmp_path_factory.mktemp("source") / "source.db")
    adapter = SqlPollingAdapter(source.config(lookback_seconds=60))
    yield adapter
    adapter.close()
    source.engine.dispose()


@settings(max_examples=300, deadline=None)
@given(notes=NOTES, restored=st.booleans())
def test_forgetting_keeps_exactly_what_a_full_sweep_keeps(
    one_adapter: SqlPollingAdapter,
    notes: list[tuple[int, int, int, bool, int | None]],
    restored: bool,
) -> None:
    """`_forget` takes the rows behind the window from a heap instead of sweeping `seen`:
    after every sweep it keeps what filtering every row would keep, with rows written again
    at a later or an earlier time (a clock that went back), rows kept for their xid8 and
    then let go as the recorded xmin rises, and a state reloaded from its saved form."""
    state, expected = CursorState(), {}
    for row, seconds, xid, sweep, rise in notes:
        stamp = (T0 + timedelta(seconds=seconds)).isoformat(timespec="microseconds")
        state.note(str(row), [seconds, stamp, "m", xid])
        expected[str(row)] = [seconds, stamp, "m", xid]
        if state.updated_at is None or stamp > state.updated_at:
            state.updated_at, state.pk = stamp, row
        if rise is not None:
            state.xmin = (state.xmin or 0) + rise
        if restored:
            state = CursorState.from_dict(state.as_dict())
        if sweep:
            one_adapter._forget(state)
            high = datetime.fromisoformat(state.updated_at)
            horizon = (high - timedelta(seconds=60)).isoformat(timespec="microseconds")
            xmin = state.xmin
            expected = {
                pk: seen
                for pk, seen in expected.items()
                if seen[1] >= horizon or (xmin is not None and seen[3] >= xmin)
            }
            assert state.seen == expected


@settings(max_examples=300, deadline=None)
@given(notes=NOTES, takes=st.lists(st.booleans(), min_size=1, max_size=20))
def test_a_snapshot_is_the_state_as_it_was_when_taken(
    one_adapter: SqlPollingAdapter,
    notes: list[tuple[int, int, int, bool, int | None]],
    takes: list[bool],
) -> None:
    """A checkpoint's state is computed only when it is saved (`CursorState.snapshot`), from
    `seen` as it is then: it is `as_dict()` as it was when the snapshot was taken, whatever
    was noted, written again, forgotten (rows noted since too) or moved after it."""
    state = CursorState()
    snapshot, expected = state.snapshot(), state.as_dict()
    for step, (row, seconds, xid, sweep, rise) in enumerate(notes):
        stamp = (T0 + timedelta(seconds=seconds)).isoformat(timespec="microseconds")
        state.note(str(row), [seconds, stamp, "m", xid])
        if state.updated_at is None or stamp > state.updated_at:
            state.updated_at, state.pk = stamp, row
        if rise is not None:
            state.xmin = (state.xmin or 0) + rise
        if sweep:
            one_adapter._forget(state)
        assert state.moved()
        assert snapshot() == expected
        if takes[step % len(takes)]:
            snapshot, expected = state.snapshot(), state.as_dict()
            assert not state.moved()
    assert snapshot() == expected


def test_only_the_newest_snapshot_can_be_computed() -> None:
    state = CursorState()
    older = state.snapshot()
    state.note("1", [1, T0.isoformat(timespec="microseconds"), "m", None])
    newer = state.snapshot()
    with pytest.raises(RuntimeError, match="newer one"):
        older()
    assert newer()["seen"] == {"1": [1, T0.isoformat(timespec="microseconds"), "m", None]}


@pytest.mark.parametrize(
    ("url", "query"),
    [("sqlite:///source.db", None), ("postgresql+psycopg://h/db", "SELECT * FROM cong_dan")],
)
def test_snapshot_capture_needs_a_postgresql_table(url: str, query: str | None) -> None:
    with pytest.raises(ValidationError, match="capture = 'snapshot'"):
        Source.config_of(url, capture="snapshot", query=query)


# -- paging -------------------------------------------------------------------------------


@pytest.mark.parametrize("pages_per_query", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 13, 14, 100])
def test_pages_cover_every_row_once(
    source: Source,
    adapters: list[SqlPollingAdapter],
    batch_size: int,
    pages_per_query: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SQLite reads several pages per query: query boundaries fall inside pages' ties too
    monkeypatch.setattr(sql_polling, "SQLITE_PAGES_PER_QUERY", pages_per_query)
    # 13 rows, several sharing one updated_at (ties are broken by the primary key)
    times = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5]
    for n, second in zip(range(13, 0, -1), times, strict=True):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=second))
    adapter = open_adapter(adapters, source, batch_size=batch_size)
    state = CursorState()
    pages = poll(adapter, state)
    assert all(0 < len(page) <= batch_size for page in pages)
    emitted = pks(pages)
    assert sorted(emitted) == list(range(1, 14))
    assert len(emitted) == len(set(emitted))
    expected_order = [n for _, n in sorted(zip(times, range(13, 0, -1), strict=True))]
    assert emitted == expected_order
    assert poll(adapter, state) == []

    # after changes, a paged re-read of the lookback window emits only the changed rows
    source.update(5, T0 + timedelta(seconds=6), ho_ten="X")
    source.update(13, T0 + timedelta(seconds=6), ho_ten="Y")
    assert pks(poll(adapter, state)) == [5, 13]


def test_pages_skip_fully_seen_pages(source: Source, adapters: list[SqlPollingAdapter]) -> None:
    for n in range(1, 10):
        source.insert(n, f"Người {n}", T0 + timedelta(seconds=n))
    adapter = open_adapter(adapters, source, batch_size=2)
    state = CursorState()
    poll(adapter, state)
    source.update(1, T0 + timedelta(seconds=20), ho_ten="Z")
    pages = poll(adapter, state)
    assert [[c.pk for c in page] for page in pages] == [[1]]


# -- versions -----------------------------------------------------------------------------


def test_version_from_row_version_column(source: Source, adapters: list[SqlPollingAdapter]) -> None:
    source.insert(1, "A", T0, version=1)
    source.insert(2, "B", T0 + timedelta(seconds=1), version=41)
    adapter = open_adapter(adapters, source, version_column="phien_ban")
    state = CursorState()
    changes = flat(poll(adapter, state))
    assert [(c.pk, c.version) for c in changes] == [(1, 1), (2, 41)]
    assert changes[1].event["version"] == 41
    assert changes[1].event["event_id"] == str(
        derive_event_id("province-01", "citizen", pid(2), 41)
    )

    source.update(1, T0 + timedelta(seconds=5), ho_ten="A2", phien_ban=2)
    (change,) = flat(poll(adapter, state))
    assert (change.pk, change.version) == (1, 2)
    # a touch of updated_at without a new row version is the same change: not re-emitted
    source.update(2, T0 + timedelta(seconds=6))
    assert poll(adapter, state) == []


def test_version_from_updated_at_microseconds(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    moments = [T0 + timedelta(microseconds=1), T0 + timedelta(microseconds=2)]
    source.insert(1, "A", moments[0])
    source.insert(2, "B", moments[1])
    adapter = open_adapter(adapters, source)
    changes = flat(poll(adapter, CursorState()))
    assert [c.version for c in changes] == [micros(m) for m in moments]
    assert changes[1].version - changes[0].version == 1
    # 09:00 at UTC+7 is 02:00 UTC
    assert changes[0].version == 1_705_284_000_000_001


def test_timezone_of_the_source_sets_occurred_at_and_version(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    source.insert(1, "A", T0)
    hcm = flat(poll(open_adapter(adapters, source), CursorState()))[0]
    utc = flat(poll(open_adapter(adapters, source, timezone="UTC"), CursorState()))[0]
    assert hcm.event["occurred_at"] == "2024-01-15T09:00:00+07:00"
    assert utc.event["occurred_at"] == "2024-01-15T09:00:00+00:00"
    assert utc.version - hcm.version == 7 * 3600 * 10**6


def test_rows_written_as_plain_sqlite_text_are_not_lost_at_page_boundaries(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    # The source application writes timestamps itself, e.g. with datetime('now').
    with source.engine.begin() as conn:
        for n, stamp in [(1, "09:00:00"), (2, "09:00:00"), (3, "09:00:00"), (4, "12:00:00")]:
            conn.exec_driver_sql(
                "INSERT INTO cong_dan (id, so_dinh_danh, ho_ten, updated_at, da_xoa) "
                f"VALUES ({n}, '{pid(n)}', 'X', '2024-01-15 {stamp}', 0)"
            )
    adapter = open_adapter(adapters, source, batch_size=2)
    state = CursorState()
    emitted = pks(poll(adapter, state)) + pks(poll(adapter, state))
    assert sorted(emitted) == [1, 2, 3, 4]


def test_a_row_without_a_cursor_time_is_never_read_and_check_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An application that sets `updated_at` only on update: its new rows have none. They
    have no place in the cursor's order (the first run stopped at them; later runs passed
    over them unseen): never read, and the adapter's start and `adapters check` say how
    many there are."""
    from producers.sql_advice import check_warnings

    engine = create_engine(f"sqlite:///{tmp_path / 'nullable.db'}")
    table = Table(
        "cong_dan", MetaData(), Column("id", Integer, primary_key=True),
        Column("so_dinh_danh", String(12)), Column("ho_ten", String(100)),
        Column("updated_at", DateTime, nullable=True), Column("da_xoa", Boolean),
    )  # fmt: skip
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [
            {"id": 1, "so_dinh_danh": pid(1), "ho_ten": "Lê Văn Cường", "updated_at": T0,
             "da_xoa": False},
            {"id": 2, "so_dinh_danh": pid(2), "ho_ten": "Phạm Thị Dung", "updated_at": None,
             "da_xoa": False},
        ])  # fmt: skip
    adapter = SqlPollingAdapter(Source.config_of(f"sqlite:///{tmp_path / 'nullable.db'}"))
    try:
        state = CursorState()
        assert pks(poll(adapter, state)) == [1]
        assert (
            "1 rows have no updated_at (or an infinite one) or no id and are never read"
            in caplog.text
        )  # once
        assert pks(poll(adapter, state)) == []
        assert caplog.text.count("rows have no updated_at") == 1
        assert any("1 rows have no updated_at" in note for note in check_warnings(adapter))
    finally:
        adapter.close()
        engine.dispose()


def _one_row_indexed_by_key(
    source: Source, adapters: list[SqlPollingAdapter]
) -> tuple[SqlPollingAdapter, CursorState]:
    """Row 1 of pid(1) at T0, the key column indexed (the rows-per-key checks need it):
    an adapter on it and a new state."""
    with source.engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_cong_dan_so_dinh_danh ON cong_dan (so_dinh_danh)")
    source.insert(1, "Lê Văn An", T0)
    return open_adapter(adapters, source), CursorState()


@pytest.mark.parametrize("new_pk", [2, 0], ids=["new-row-after", "new-row-before"])
def test_a_soft_delete_whose_key_another_row_holds_live_is_not_sent(
    source: Source, adapters: list[SqlPollingAdapter], new_pk: int
) -> None:
    """A soft delete and the new row of its key (one person's record re-created), written
    in one transaction at one time: both went out with one version, and the reconciler
    kept the delete, whichever row came first. The delete is not sent while another row
    holds the key live; once none does, it is. (The key column needs an index: without
    one each page with a delete would scan the table, and a warning says the check is
    off.)"""
    key = pid(1)
    adapter, state = _one_row_indexed_by_key(source, adapters)
    assert [(c.key, c.event["op"]) for c in flat(poll(adapter, state))] == [(key, "upsert")]
    at = T0 + timedelta(seconds=5)
    with source.engine.begin() as conn:
        conn.execute(update(cong_dan).where(cong_dan.c.id == 1).values(da_xoa=True, updated_at=at))
        conn.execute(insert(cong_dan).values(
            id=new_pk, so_dinh_danh=key, ho_ten="Lê Văn Ân", updated_at=at, da_xoa=False
        ))  # fmt: skip
    read = flat(poll(adapter, state))
    sent = [c for c in read if not c.held]
    assert [(c.key, c.event["op"], c.pk) for c in sent] == [(key, "upsert", new_pk)]
    assert [(c.pk, c.held) for c in read if c.pk == 1] == [(1, True)]  # remembered, not sent
    assert state.updated_at is not None and state.updated_at >= at.isoformat()
    assert flat(poll(adapter, state)) == []  # read again: nothing, no lookup
    source.update(new_pk, T0 + timedelta(seconds=9), da_xoa=True)  # the last live row goes
    gone = flat(poll(adapter, state))
    assert [(c.key, c.event["op"], c.pk, c.held) for c in gone] == [(key, "delete", new_pk, False)]
    assert gone[0].version > sent[0].version


def test_a_record_re_created_under_a_new_row_stamped_earlier_goes_out_above_the_old_row(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """The old row's last change went out at T0+10 s; the record is re-created by a
    transaction that stamped its new row at T0+5 s and committed after it (and soft
    deleted the old row). Sent with its own version, the new row was below the old row's
    and the reconciler kept the old row's values as stale. It goes out above them now."""
    key = pid(1)
    adapter, state = _one_row_indexed_by_key(source, adapters)
    first = flat(poll(adapter, state))
    source.update(1, T0 + timedelta(seconds=10), ho_ten="Lê Văn Ánh")
    old = flat(poll(adapter, state))
    assert [c.pk for c in old] == [1]
    with source.engine.begin() as conn:
        conn.execute(
            update(cong_dan)
            .where(cong_dan.c.id == 1)
            .values(da_xoa=True, updated_at=T0 + timedelta(seconds=12))
        )
        conn.execute(insert(cong_dan).values(
            id=2, so_dinh_danh=key, ho_ten="Lê Văn Dũng", updated_at=T0 + timedelta(seconds=5),
            da_xoa=False,
        ))  # fmt: skip
    read = flat(poll(adapter, state))
    sent = [c for c in read if not c.held]
    assert [(c.pk, c.event["op"], c.data["full_name"]) for c in sent] == [  # type: ignore[index]
        (2, "upsert", "Lê Văn Dũng")
    ]
    assert sent[0].version > old[0].version > first[0].version
    assert flat(poll(adapter, state)) == []  # read again: nothing new
    source.update(2, T0 + timedelta(seconds=13), ho_ten="Lê Văn Dũng Em")
    (later,) = flat(poll(adapter, state))
    assert later.version > sent[0].version  # the row's own versions rise from there


def test_without_an_index_on_the_key_the_held_live_check_is_off_and_says_so(
    source: Source, adapters: list[SqlPollingAdapter], caplog: pytest.LogCaptureFixture
) -> None:
    adapter = open_adapter(adapters, source)
    assert not adapter._check_held_live
    assert "no index of cong_dan begins with so_dinh_danh" in caplog.text
    assert adapter._hold_live_keys([]) == []


def test_check_counts_the_keys_several_rows_hold(
    source: Source, adapters: list[SqlPollingAdapter]
) -> None:
    """Versions rise per row: two rows of one key live at once overwrite each other's
    values. `adapters check` counts the keys that more than one row holds (never naming
    them)."""
    from producers.sql_advice import check_warnings

    rows = [(1, pid(1), True), (2, pid(1), False), (3, pid(2), False)]
    with source.engine.begin() as conn:
        conn.execute(insert(cong_dan), [
            {"id": n, "so_dinh_danh": key, "ho_ten": "Lê Văn Cường", "updated_at": T0,
             "da_xoa": deleted} for n, key, deleted in rows
        ])  # fmt: skip
    notes = [n for n in check_warnings(open_adapter(adapters, source)) if "more than one" in n]
    assert len(notes) == 1 and notes[0].startswith("1 so_dinh_danh values are held")
    assert pid(1) not in notes[0]
    source.hard_delete(1)
    assert not [n for n in check_warnings(open_adapter(adapters, source)) if "more than one" in n]


# -- rows whose values cannot make an event -----------------------------------------------

LOOSE = """CREATE TABLE nguoi (id INTEGER PRIMARY KEY, so_dinh_danh TEXT, ho_ten TEXT,
    updated_at TEXT, da_xoa TEXT, phien_ban TEXT)"""


def _loose_source(tmp_path: Path, rows: list[tuple[Any, ...]]) -> SqlSourceConfig:
    """A source whose columns hold text of any shape (SQLite keeps what it is given)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'loose.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(LOOSE)
        conn.exec_driver_sql("INSERT INTO nguoi VALUES (?, ?, ?, ?, ?, ?)", rows)
    engine.dispose()
    return Source.config_of(f"sqlite:///{tmp_path / 'loose.db'}", table="nguoi",
                            version_column="phien_ban")  # fmt: skip


def _at(minute: int) -> str:
    return (T0 + timedelta(minutes=minute)).isoformat(sep=" ")


def test_flags_nobody_can_read_null_keys_and_versions_are_rejected_not_guessed(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    rows = [
        (1, pid(1), "Nguyễn Văn An", _at(1), "N", "1"),  # 'N' is not true: live
        (2, pid(2), "Trần Thị Bình", _at(2), "0", "1"),
        (3, pid(3), "Lê Văn Cường", _at(3), "Y", "1"),  # deleted
        (4, pid(4), "Phạm Thị Dung", _at(4), "có lẽ", "1"),  # no flag: rejected
        (5, None, "Hoàng Văn Em", _at(5), "0", "1"),  # no key: rejected
        (6, pid(6), "Vũ Thị Giang", _at(6), "0", None),  # no version: rejected
        (7, pid(7), "Đặng Văn Hải", _at(7), "0", "bảy"),  # no whole number: rejected
        (8, pid(8), "Bùi Thị Lan", _at(8), "false", "2"),
    ]
    config = _loose_source(tmp_path, rows)
    adapter = SqlPollingAdapter(config)
    adapters.append(adapter)
    state = CursorState()
    changes = [c for page in poll(adapter, state) for c in page]  # type: ignore[arg-type]
    sent = {c.pk: c.data is None for c in changes if isinstance(c, SourceChange)}
    assert sent == {1: False, 2: False, 3: True, 8: False}
    rejected = {c.pk: c.message for c in changes if isinstance(c, sql_rows.RejectedRow)}
    assert sorted(rejected) == [4, 5, 6, 7]
    assert "not a flag" in rejected[4] and "NULL" in rejected[5]
    assert all("phien_ban" in rejected[pk] for pk in (6, 7))
    assert not any(name in message for message in rejected.values()
                   for name in ("Phạm", "có lẽ", "bảy"))  # fmt: skip
    assert state.updated_at is not None and state.updated_at.startswith("2024-01-15T09:08")
    assert poll(adapter, state) == []  # read again within the window: not rejected twice

    engine = create_engine(config.url)
    with engine.begin() as conn:  # the source fixes row 4
        conn.exec_driver_sql("UPDATE nguoi SET da_xoa = '0', updated_at = ? WHERE id = 4",
                             (_at(9),))  # fmt: skip
    engine.dispose()
    fixed = [c for page in poll(adapter, state) for c in page]
    assert [(c.pk, isinstance(c, SourceChange)) for c in fixed] == [(4, True)]


@pytest.mark.parametrize("when", ["ngày mai", "9999-12-31T23:00:00-14:00"])  # no UTC form
def test_a_cursor_time_nobody_can_read_stops_the_source_loudly(
    tmp_path: Path, adapters: list[SqlPollingAdapter], when: str
) -> None:
    config = _loose_source(tmp_path, [(1, pid(1), "Nguyễn Văn An", when, "0", "1")])
    adapter = SqlPollingAdapter(config)
    adapters.append(adapter)
    with pytest.raises(FatalError, match="updated_at cannot be read as a time"):
        poll(adapter, CursorState())


def test_a_row_rejected_after_it_was_sent_and_then_fixed_is_sent_above_its_last_version(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    config = _loose_source(tmp_path, [(1, pid(1), "Nguyễn Văn An", _at(1), "0", "5")])
    adapter = SqlPollingAdapter(config)
    adapters.append(adapter)
    state = CursorState()
    assert [c.version for page in poll(adapter, state) for c in page] == [5]  # type: ignore[union-attr]
    engine = create_engine(config.url)

    def change(flag: str, minute: int) -> list[Any]:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE nguoi SET da_xoa = ?, updated_at = ? WHERE id = 1",
                                 (flag, _at(minute)))  # fmt: skip
        return [c for page in poll(adapter, state) for c in page]

    rejected = change("?", 2)
    assert [type(c).__name__ for c in rejected] == ["RejectedRow"]
    fixed = change("0", 3)  # fixed, its version column left at 5
    assert [(type(c).__name__, getattr(c, "version", None)) for c in fixed] == [("SourceChange", 6)]
    engine.dispose()


def test_a_misspelt_column_fails_the_poll_instead_of_rejecting_every_row(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    """A column the mapping names that the table lacks stops the source, naming the
    option. A wrong name in `fields` did not even fail: every row asserted null for that
    field, erasing what other sources said of it."""
    config = _loose_source(tmp_path, [(1, pid(1), "Nguyễn Văn An", _at(1), "0", "1")])
    misspelt = [
        ({"deleted_column": "da_xoaa"}, "deleted_column = 'da_xoaa'"),
        ({"fields": {"full_name": "ho_tenn"}}, "fields.full_name = 'ho_tenn'"),
        ({"table": "nguoii"}, "table = 'nguoii': no such table"),
    ]
    for changed, named in misspelt:
        with pytest.raises(FatalError) as failed:
            adapters.append(SqlPollingAdapter(config.model_copy(update=changed)))
        assert named in str(failed.value)


def test_whole_numbers_of_a_real_column_are_versions_and_null_keys_without_a_pk_are_skipped(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    rows = [(1, pid(1), "Nguyễn Văn An", _at(1), "0", 1705284000123.0),
            (2, None, "Trần Thị Bình", _at(2), "0", "2"),
            (3, None, "Lê Văn Cường", _at(2), "0", "3")]  # fmt: skip
    config = _loose_source(tmp_path, rows)
    adapter = SqlPollingAdapter(config.model_copy(update={"pk_column": None}))
    adapters.append(adapter)
    state = CursorState()
    changes = [c for page in poll(adapter, state) for c in page]
    assert [(type(c).__name__, c.key) for c in changes] == [("SourceChange", pid(1))]
    assert changes[0].version == 1705284000123  # type: ignore[union-attr]
    assert adapter.rows_without_cursor_time() == 2  # no place in the cursor's order


class Dates:
    """A SQLite source whose DATE column holds what it is given: text the driver cannot
    read as a date in some rows."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'dates.db'}"
        self.engine = create_engine(self.url)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE cd (id INTEGER PRIMARY KEY, so_dinh_danh TEXT, "
                                 "ngay_sinh DATE, updated_at DATETIME)")  # fmt: skip

    def insert(self, dates: dict[int, str]) -> None:
        """Row n with date text `dates[n]`, updated at minute n."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO cd VALUES (?, ?, ?, ?)",
                                 [(n, pid(n), d, _at(n)) for n, d in dates.items()])  # fmt: skip

    def adapter(self, adapters: list[SqlPollingAdapter], **overrides: Any) -> SqlPollingAdapter:
        config = Source.config_of(self.url, table="cd", deleted_column=None,
                                  fields={"date_of_birth": "ngay_sinh"}, **overrides)  # fmt: skip
        adapters.append(SqlPollingAdapter(config))
        return adapters[-1]


def _dates(numbers: range, bad: set[int]) -> dict[int, str]:
    return {n: "không rõ" if n in bad else "1990-03-05" for n in numbers}


@pytest.mark.parametrize(
    "bad",
    [
        "'không rõ'",  # text in a DATE column
        # text that is not UTF-8: SQLite's driver reports it as an error of the database
        # (quoting it), and the page failed at every poll: the source never got past it
        "CAST(x'ff41' AS TEXT)",
    ],
)
def test_a_value_the_driver_cannot_read_rejects_its_row_only(
    tmp_path: Path, adapters: list[SqlPollingAdapter], bad: str
) -> None:
    """The driver fails on the whole page; read row by row, only that row is rejected,
    without its value in the message."""
    source = Dates(tmp_path)
    source.insert({1: "1990-03-05", 2: "1990-03-05", 3: "1991-04-06"})
    with source.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE cd SET ngay_sinh = {bad} WHERE id = 2")
    adapter = source.adapter(adapters)
    state = CursorState()
    changes = [c for page in poll(adapter, state) for c in page]
    assert [(c.pk, type(c).__name__) for c in changes] == [
        (1, "SourceChange"), (2, "RejectedRow"), (3, "SourceChange")
    ]  # fmt: skip
    message = changes[1].message  # type: ignore[union-attr]
    assert "driver cannot read" in message
    assert "không" not in message and "\\xff" not in message and "ÿ" not in message
    assert poll(adapter, state) == []  # read again in the window: rejected once


def test_rows_written_when_the_clocks_go_back_are_read(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    """Local times without a zone, in a zone with daylight saving time: at 03:00 CEST the
    clocks go back to 02:00 CET. Rows written in the second 02:00-03:00 were behind the
    cursor (02:59:30, the first pass) by more than the lookback window: never read."""
    url = f"sqlite:///{tmp_path / 'rome.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE cong_dan (id INTEGER PRIMARY KEY, so_dinh_danh TEXT, "
                             "ho_ten TEXT, da_xoa TEXT, updated_at DATETIME)")  # fmt: skip
        conn.exec_driver_sql("INSERT INTO cong_dan VALUES (1, ?, 'Nguyễn Văn An', '0', "
                             "'2025-10-26 02:59:30')", (pid(1),))  # fmt: skip
    adapter = SqlPollingAdapter(Source.config_of(url, timezone="Europe/Rome"))
    adapters.append(adapter)
    state = CursorState()
    assert pks(poll(adapter, state)) == [1]
    with engine.begin() as conn:  # the second pass of 02:00-03:00 (CET)
        conn.exec_driver_sql("INSERT INTO cong_dan VALUES (2, ?, 'Trần Thị Bình', '0', "
                             "'2025-10-26 02:10:00')", (pid(2),))  # fmt: skip
        conn.exec_driver_sql("UPDATE cong_dan SET ho_ten = 'Nguyễn Văn Ân', "
                             "updated_at = '2025-10-26 02:20:00' WHERE id = 1")  # fmt: skip
    engine.dispose()
    assert sorted(pks(poll(adapter, state))) == [1, 2]


def test_a_binary_primary_key_stops_the_source_with_its_reason(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    """A BLOB (BINARY, RAW) key cannot be written to the state file: every checkpoint
    failed, and every run published the same rows again."""
    url = f"sqlite:///{tmp_path / 'blob.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE cong_dan (id BLOB PRIMARY KEY, so_dinh_danh TEXT, "
                             "ho_ten TEXT, da_xoa TEXT, updated_at DATETIME)")  # fmt: skip
        conn.exec_driver_sql("INSERT INTO cong_dan VALUES (x'0a0b', ?, 'Nguyễn Văn An', '0', ?)",
                             (pid(1), _at(1)))  # fmt: skip
    engine.dispose()
    adapter = SqlPollingAdapter(Source.config_of(url))
    adapters.append(adapter)
    with pytest.raises(FatalError, match="binary values"):
        poll(adapter, CursorState())


@pytest.mark.parametrize("cursor_format", [None, "yyyyMMddHHmmss"])
def test_rows_read_one_at_a_time_at_their_place_when_the_server_fails_a_whole_sort(
    tmp_path: Path,
    adapters: list[SqlPollingAdapter],
    monkeypatch: pytest.MonkeyPatch,
    cursor_format: str | None,
) -> None:
    """As a server computing every row of a sort before its LIMIT: any query of whole rows
    fails but one that names its row; row 4 fails alone too. Every other row is read once,
    row 4 is rejected, and the cursor ends at the last row."""
    stamp = (lambda m: (T0 + timedelta(minutes=m)).strftime("%Y%m%d%H%M%S")) if cursor_format \
        else _at  # fmt: skip
    rows = [(n, pid(n), "Nguyễn Văn An", stamp(n), "0", "1") for n in range(1, 8)]
    config = _loose_source(tmp_path, rows).model_copy(
        update={"batch_size": 3, "updated_at_format": cursor_format}
    )
    adapter = SqlPollingAdapter(config)
    adapters.append(adapter)
    real = adapter._fetch

    def server(query: Any) -> list[Any]:
        compiled = query.compile()
        whole = "nguoi.ho_ten" in str(compiled)
        equal = re.search(r"nguoi\.id = :(\w+)", str(compiled))  # a query of one row
        named = [] if equal is None else [compiled.params[equal[1]]]
        if whole and (not named or named == [4]):
            raise ValueError("the server computed a row it cannot")
        return real(query)

    monkeypatch.setattr(adapter, "_fetch", server)
    state = CursorState()
    changes = [c for page in poll(adapter, state) for c in page]
    assert [(c.pk, type(c).__name__) for c in changes] == [
        (n, "RejectedRow" if n == 4 else "SourceChange") for n in range(1, 8)
    ]
    assert state.pk == 7


def test_a_column_no_row_of_which_the_driver_reads_stops_the_source(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    """Text in a DATE column in every row: a column's type, not one bad row."""
    source = Dates(tmp_path)
    source.insert(dict.fromkeys(range(1, 40), "05/03/1990"))
    adapter = source.adapter(adapters)
    rejected: list[Any] = []
    with pytest.raises(FatalError, match="20 rows in a row cannot be read"):
        for page in adapter.pages(CursorState()):
            rejected += page
    assert rejected == []  # none dead-lettered, none passed: read again once it is fixed


@pytest.mark.parametrize(
    ("edge_us", "cursor_us"), [(100, 300), (600, 1300), (1499, 1999), (-800, 300)]
)
def test_a_row_in_the_window_starts_millisecond_is_not_read_again_at_every_poll(
    tmp_path: Path, adapters: list[SqlPollingAdapter], edge_us: int, cursor_us: int
) -> None:
    """SQLite compares cursor times in milliseconds, rounded: the state must forget by
    the same."""
    edge = (T0 + timedelta(microseconds=edge_us)).isoformat(sep=" ")
    cursor = (T0 + timedelta(seconds=60, microseconds=cursor_us)).isoformat(sep=" ")
    config = _loose_source(tmp_path, [(1, pid(1), "Nguyễn Văn An", edge, "?", "1"),
                                      (2, pid(2), "Trần Thị Bình", cursor, "0", "1")])  # fmt: skip
    adapter = SqlPollingAdapter(config)
    adapters.append(adapter)
    state = CursorState()
    first = [c for page in poll(adapter, state) for c in page]
    assert [(c.pk, type(c).__name__) for c in first] == [(1, "RejectedRow"), (2, "SourceChange")]
    for _ in range(3):
        assert poll(adapter, state) == []  # neither dead-lettered nor sent again


def test_a_row_committed_while_a_bad_page_is_bisected_is_read_not_skipped(
    tmp_path: Path, adapters: list[SqlPollingAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 8 cannot be read; row 100 commits between the read of the places and the
    bisection, between rows 6 and 7: every readable row is read, row 8 is rejected."""
    source = Dates(tmp_path)
    source.insert(_dates(range(1, 9), {8}))
    engine = source.engine
    adapter = source.adapter(adapters, lookback_seconds=10)
    real = adapter._fetch
    calls: list[str] = []

    def meanwhile(query: Any) -> list[Any]:
        found = real(query)
        if "ngay_sinh" not in str(query) and not calls:  # the places were just read
            calls.append("places")
            with engine.begin() as conn:
                late = (T0 + timedelta(minutes=6, seconds=30)).isoformat(sep=" ")
                conn.exec_driver_sql("INSERT INTO cd VALUES (100, ?, '1991-01-01', ?)",
                                     (pid(100), late))  # fmt: skip
        return found

    monkeypatch.setattr(adapter, "_fetch", meanwhile)
    state = CursorState()
    changes = [c for page in poll(adapter, state) for c in page]
    assert calls == ["places"]
    sent = sorted(c.pk for c in changes if isinstance(c, SourceChange))
    assert sent == [1, 2, 3, 4, 5, 6, 7, 100]
    assert [c.pk for c in changes if isinstance(c, sql_rows.RejectedRow)] == [8]
    engine.dispose()


def test_a_query_no_row_of_which_can_be_computed_stops_the_source_with_few_rows(
    tmp_path: Path, adapters: list[SqlPollingAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a server that computes a query source's failing CAST for every row: three rows
    waiting, none rejected (they are good rows), the source stops."""
    rows = [(n, pid(n), "Nguyễn Văn An", _at(n), "0", "1") for n in range(1, 4)]
    adapter = SqlPollingAdapter(_loose_source(tmp_path, rows))
    adapters.append(adapter)
    real = adapter._fetch

    def server(query: Any) -> list[Any]:
        if "nguoi.ho_ten" in str(query):
            raise ValueError("the server cannot compute the column")
        return real(query)

    monkeypatch.setattr(adapter, "_fetch", server)
    state = CursorState()
    sent: list[Any] = []
    with pytest.raises(FatalError, match="no row can be read"):
        for page in adapter.pages(state):
            sent += page
            adapter.remember(state, page)
    assert sent == [] and state.updated_at is None


def test_a_bad_row_alone_on_the_last_page_is_rejected_though_an_older_bad_row_exists(
    tmp_path: Path, adapters: list[SqlPollingAdapter]
) -> None:
    source = Dates(tmp_path)
    source.insert(_dates(range(1, 3), {1}))
    adapter = source.adapter(adapters, batch_size=1)
    state = CursorState()
    first = [c for page in poll(adapter, state) for c in page]
    assert [(c.pk, type(c).__name__) for c in first] == [(1, "RejectedRow"), (2, "SourceChange")]
    # rows 2-11 fill a query (batch 1: 10 a query), then the bad row 12 is alone on the last
    source.insert(_dates(range(3, 13), {12}))
    second = [c for page in poll(adapter, state) for c in page]
    assert [c.pk for c in second if isinstance(c, sql_rows.RejectedRow)] == [12]
    assert sorted(c.pk for c in second if isinstance(c, SourceChange)) == list(range(3, 12))
    source.engine.dispose()


@pytest.mark.parametrize(
    "pattern", ["yyyyMMddHHmmss", "yyyy-MM-dd HH:mm:ss", "yyyy-MM-dd'T'HH:mm", "yyyyMMdd"]
)
def test_a_cursor_text_format_that_sorts_in_time_order_is_accepted(pattern: str) -> None:
    assert Source.config_of("sqlite://", updated_at_format=pattern).updated_at_format == pattern


@pytest.mark.parametrize(
    "pattern", ["dd/MM/yyyy HH:mm:ss", "MMddyyyyHHmmss", "yyMMddHHmmss", "yyyyddMMHHmmss",
                "yyyyMMddmmss", "HHmmss", "text"],
)  # fmt: skip
def test_a_cursor_text_format_that_does_not_sort_in_time_order_is_refused(pattern: str) -> None:
    """As text, 01/03/2024 comes before 28/02/2024: a row written on 1 March behind a cursor
    at 28 February would never be read."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="from the year down"):
        Source.config_of("sqlite://", updated_at_format=pattern)
    assert not sorts_in_time_order(pattern)
    assert sorts_in_time_order("yyyyMMddHHmmss")


def test_a_numeric_key_is_kept_in_the_state_as_the_whole_number_it_is(tmp_path: Path) -> None:
    """An identity column of NUMERIC(18,0) (common on SQL Server and MySQL) comes back from
    the driver as a Decimal, which JSON cannot hold: the state could never be saved, and
    every run sent the first page again."""
    import sqlite3

    from producers.adapters.sql import SqlAdapter
    from producers.sdk import Checkpoint, Record
    from producers.state import load_json_state, write_json_atomic

    db = tmp_path / "tthc.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE ho_so (id NUMERIC(18,0) PRIMARY KEY, ma TEXT, "
                     "trang_thai TEXT, updated_at TIMESTAMP)")  # fmt: skip
        conn.executemany(
            "INSERT INTO ho_so VALUES (?, ?, '1', ?)",
            [(n, f"000.00.01.H29-240115-000{n}", f"2024-01-15 09:0{n}:00.000000") for n in (1, 2)],
        )
        conn.commit()
    settings = {"url": f"sqlite:///{db}", "entity": "dossier", "table": "ho_so",
                "key_column": "ma", "pk_column": "id",
                "fields": {"status": "trang_thai"}}  # fmt: skip
    adapter = SqlAdapter.from_settings("province-79", settings, tmp_path)
    saved = tmp_path / "state.json"
    checkpoints = [item.value() for item in adapter.read({}) if isinstance(item, Checkpoint)]
    assert checkpoints and checkpoints[-1]["pk"] == 2
    write_json_atomic(saved, checkpoints[-1])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO ho_so VALUES (3, '000.00.01.H29-240115-0003', '2', "
                     "'2024-01-15 09:03:00.000000')")  # fmt: skip
        conn.commit()
    again = SqlAdapter.from_settings("province-79", settings, tmp_path)
    sent = [item for item in again.read(load_json_state(saved)) if isinstance(item, Record)]
    assert [r.key for r in sent] == ["000.00.01.H29-240115-0003"]  # on from the saved place


def test_check_warns_of_many_rows_under_one_cursor_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration's `UPDATE … SET updated_at = now()` puts every row under one time: the
    state then remembers each and grows with their square (a first snapshot of ten
    million rows). `adapters check` says so before the first run, naming no value."""
    import producers.sql_advice as advice

    monkeypatch.setattr(advice, "CROWDED", 100)
    engine = create_engine(f"sqlite:///{tmp_path / 'bulk.db'}")
    table = Table(
        "cong_dan", MetaData(), Column("id", Integer, primary_key=True),
        Column("so_dinh_danh", String(12)), Column("ho_ten", String(100)),
        Column("updated_at", DateTime), Column("da_xoa", Boolean),
    )  # fmt: skip
    table.metadata.create_all(engine)
    rows = [{"id": n, "so_dinh_danh": pid(n), "ho_ten": "Lê Văn Cường", "updated_at": T0,
             "da_xoa": False} for n in range(1, 151)]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(table), rows)
    adapter = SqlPollingAdapter(Source.config_of(f"sqlite:///{tmp_path / 'bulk.db'}"))
    try:
        notes = [n for n in advice.check_warnings(adapter) if "share one updated_at" in n]
        assert notes == [notes[0]] and notes[0].startswith("150 rows share one updated_at")
        with engine.begin() as conn:  # each its own time: nothing to say
            for n in range(1, 151):
                stamp = T0 + timedelta(seconds=n)
                conn.execute(table.update().where(table.c.id == n).values(updated_at=stamp))
        assert not [n for n in advice.check_warnings(adapter) if "share one" in n]
        with engine.begin() as conn:  # one instant in two forms of text: one time to the cursor
            conn.exec_driver_sql(
                "UPDATE cong_dan SET updated_at = CASE WHEN id % 2 = 0 "
                "THEN '2025-08-01 09:00:00' ELSE '2025-08-01 09:00:00.000000' END"
            )
        notes = [n for n in advice.check_warnings(adapter) if "share one" in n]
        assert len(notes) == 1 and notes[0].startswith("150 rows"), notes
    finally:
        adapter.close()
        engine.dispose()


def test_a_soft_delete_is_held_while_another_row_of_its_key_has_a_flag_nobody_can_read(
    tmp_path: Path,
) -> None:
    """That row was taken as not live, and the delete erased the record nationally, while
    the row itself (a dead letter for its flag) might be the record's live one."""
    url = f"sqlite:///{tmp_path / 'flags.db'}"
    engine = create_engine(url)
    table = Table(
        "cong_dan", MetaData(), Column("id", Integer, primary_key=True),
        Column("so_dinh_danh", String(12), index=True), Column("ho_ten", String(100)),
        Column("updated_at", DateTime, nullable=False), Column("da_xoa", String(10)),
    )  # fmt: skip
    table.metadata.create_all(engine)
    key, at = pid(1), T0 + timedelta(seconds=5)
    with engine.begin() as conn:
        conn.execute(insert(table).values(
            id=1, so_dinh_danh=key, ho_ten="Lê Văn An", updated_at=T0, da_xoa="false"
        ))  # fmt: skip
    adapter = SqlPollingAdapter(Source.config_of(url))
    try:
        state = CursorState()
        assert [(c.key, c.event["op"]) for c in flat(poll(adapter, state))] == [(key, "upsert")]
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == 1).values(da_xoa="true", updated_at=at))
            conn.execute(insert(table).values(
                id=2, so_dinh_danh=key, ho_ten="Lê Văn Ân", updated_at=at, da_xoa="chưa rõ"
            ))  # fmt: skip
        read = poll(adapter, state)
        held = [c for c in flat(read) if c.pk == 1]
        assert [(c.event["op"], c.held) for c in held] == [("delete", True)]  # not sent
    finally:
        adapter.close()
        engine.dispose()
