"""The conformance checks catch a deliberately broken adapter for each failure class."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from portal_sync.cli.adapters import report_table
from portal_sync.settings import Settings
from producers.conformance import CHECKS, check_adapter
from producers.sdk import Adapter, Checkpoint, Item, Record, State
from schemas.identifiers import PHONE
from tests.support.pipeline_helpers import cli

T0 = datetime(2025, 8, 1, 8, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh"))


class Nothing(BaseModel):
    pass


class ListAdapter(Adapter):
    """A well-behaved adapter over a fixed list of (key, version, data) changes."""

    entity = "citizen"
    key = "pid"
    cursor = "position"
    emits_deletes = True
    Config = Nothing
    changes: tuple[tuple[str, int, dict[str, Any] | None], ...] = (
        ("001090000001", 1, {"full_name": "Nguyễn Văn An"}),
        ("001190000002", 1, {"full_name": "Trần Thị Bình"}),
        ("001090000001", 2, {"full_name": "Nguyễn Văn Ân"}),
        ("001190000002", 2, None),
    )

    def __init__(self) -> None:
        super().__init__("province-01", Nothing(), Path("."))

    def read(self, state: State) -> Iterator[Item]:
        start = int(state.get("position", 0))
        for position in range(start, len(self.changes)):
            yield self.record(position)
            yield Checkpoint(self.next_state(position))

    def record(self, position: int) -> Record:
        key, version, data = self.changes[position]
        when = T0 + timedelta(minutes=position)
        return Record(key, version, when, data, origin=f"#{position}")

    def next_state(self, position: int) -> State:
        return {"position": position + 1}


class InvalidEvent(ListAdapter):
    changes = (*ListAdapter.changes, ("001090000003", 1, {"full_name": "X", "phone": "không"}))


class MissingKey(ListAdapter):
    changes = (*ListAdapter.changes, ("", 1, {"full_name": "Không có mã"}))


class VersionsFall(ListAdapter):
    changes = (*ListAdapter.changes, ("001090000001", 1, {"full_name": "Cũ hơn"}))


class ForgetsCursor(ListAdapter):
    def next_state(self, position: int) -> State:
        return {}  # saves no position: every run starts over


class ClaimsDeletesButHasNone(ListAdapter):
    changes = ListAdapter.changes[:3]


class NeverCheckpoints(ListAdapter):
    def read(self, state: State) -> Iterator[Item]:
        yield from (self.record(p) for p in range(len(self.changes)))


class Raises(ListAdapter):
    raising_line = 0

    def read(self, state: State) -> Iterator[Item]:
        yield self.record(0)
        Raises.raising_line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
        raise ConnectionError("source went away")


def failing(adapter: Adapter) -> dict[str, list[str]]:
    report = check_adapter(adapter, "test")
    return {r.name: r.examples or [r.detail] for r in report.results if not r.passed}


def test_a_conforming_adapter_passes_every_check() -> None:
    report = check_adapter(ListAdapter(), "test")
    assert report.passed, report.results
    assert [r.name for r in report.results] == list(CHECKS)


def test_invalid_event_is_caught_with_its_reason_and_masked_key() -> None:
    assert failing(InvalidEvent()) == {
        "events validate": [
            "#4 001*******03: invalid_field: data.phone: String should match pattern "
            f"'{PHONE.pattern}'"
        ]
    }


def test_missing_key_is_caught() -> None:
    failed = failing(MissingKey())
    assert failed["keys present"] == ["#4: citizen without key"]
    assert "invalid_key" in failed["events validate"][0]


def test_versions_that_do_not_rise_are_caught() -> None:
    assert failing(VersionsFall()) == {
        "versions rise per key": ["#4 001*******01: version 1 after 2 (#2)"]
    }


def test_unsorted_adapter_may_reorder_but_not_reuse_a_version() -> None:
    class Unsorted(VersionsFall):
        sorted_output = False

    assert failing(Unsorted()) == {"versions rise per key": ["#4 001*******01: version 1 reused"]}


def test_a_cursor_that_does_not_resume_is_caught() -> None:
    failed = failing(ForgetsCursor())
    assert list(failed) == ["cursor resumes"]
    assert failed["cursor resumes"][0] == "#0 001*******01 v1 emitted again"


def test_an_adapter_that_never_checkpoints_is_caught() -> None:
    assert failing(NeverCheckpoints()) == {
        "cursor resumes": ["no checkpoint: no position is ever saved"]
    }


def test_deletes_claimed_but_not_seen_are_caught() -> None:
    failed = failing(ClaimsDeletesButHasNone())
    assert list(failed) == ["deletes seen"]
    assert ClaimsDeletesButHasNone.emits_deletes


def test_an_adapter_that_raises_fails_with_the_error_type_and_where_only() -> None:
    failed = failing(Raises())
    (raised,) = failed["events validate"]
    assert raised.startswith("the adapter raised ConnectionError at ")
    assert raised.endswith(f"{Path(__file__).name}:{Raises.raising_line}")  # its own frame
    assert list(failed) == ["events validate"]  # deletes are not judged on a broken run


class CheckpointsFirst(ListAdapter):
    """Saves the position past its records before it yields them: a run that fails after
    the checkpoint was saved never sends them."""

    def read(self, state: State) -> Iterator[Item]:
        start = int(state.get("position", 0))
        yield Checkpoint({"position": len(self.changes)})
        yield from (self.record(p) for p in range(start, len(self.changes)))


class LiveState(ListAdapter):
    """Its checkpoint's value reads the adapter's live position, which moves on."""

    def read(self, state: State) -> Iterator[Item]:
        self.position = int(state.get("position", 0))
        while self.position < len(self.changes):
            yield Checkpoint(lambda: {"position": self.position})
            self.position += 1
            yield self.record(self.position - 1)


class VersionsPerRun(ListAdapter):
    """Numbers versions from 1 in each run: a later run's changes rank below the store's."""

    def read(self, state: State) -> Iterator[Item]:
        start = int(state.get("position", 0))
        for n, position in enumerate(range(start, len(self.changes)), start=1):
            key, _, data = self.changes[position]
            yield Record(key, n, T0, data, origin=f"#{position}")
            yield Checkpoint(self.next_state(position))


class KeyInOrigin(ListAdapter):
    def record(self, position: int) -> Record:
        record = super().record(position)
        return Record(record.key, record.version, record.occurred_at, record.data,
                      origin=f"cong_dan {record.key}")  # fmt: skip


def test_checkpoints_that_do_not_cover_what_follows_them_are_caught() -> None:
    failed = failing(CheckpointsFirst())
    assert list(failed) == ["checkpoints cover"]
    assert failed["checkpoints cover"][0] == "#0 001*******01 v1: not emitted"
    live = failing(LiveState())  # (its last record also follows its last checkpoint)
    assert list(live) == ["cursor resumes", "checkpoints cover"]
    assert "had changed when it was read again" in live["checkpoints cover"][0]
    per_run = failing(VersionsPerRun())
    assert list(per_run) == ["checkpoints cover"]
    assert per_run["checkpoints cover"][0] == "#2 001*******01 v3: emitted at v2"


def test_a_cursor_that_does_not_resume_is_caught_whatever_versions_it_gives() -> None:
    """New versions at each run (a counter, the time of reading) gave new event ids: the
    records sent again were taken for rows written during the check."""

    class Counting(ListAdapter):
        count = 0

        def read(self, state: State) -> Iterator[Item]:
            for position in range(len(self.changes)):
                key, _, data = self.changes[position]
                Counting.count += 1
                yield Record(key, Counting.count, T0, data, origin=f"#{position}")
            yield Checkpoint({})

    failed = failing(Counting())
    assert "cursor resumes" in failed
    assert failed["cursor resumes"][0] == "#0 001*******01 v5 emitted again"


def test_an_origin_that_holds_the_key_is_caught_and_shown_masked() -> None:
    failed = failing(KeyInOrigin())
    assert list(failed) == ["origins hide keys"]
    assert (
        failed["origins hide keys"][0] == "cong_dan 001*******01: the origin holds the record's key"
    )


def test_rows_written_while_the_check_runs_are_not_taken_for_repeats() -> None:
    """A busy source: the second run finds rows the first never saw."""

    class Growing(ListAdapter):
        runs = 0

        def read(self, state: State) -> Iterator[Item]:
            Growing.runs += 1
            if Growing.runs > 1:
                self.changes = (*ListAdapter.changes, ("001090000009", 1, {"full_name": "Mới"}))
            yield from super().read(state)

    report = check_adapter(Growing(), "test")
    assert report.passed, report.results
    assert "1 new since the first run" in report.result("cursor resumes").detail


def test_limit_stops_at_a_checkpoint_and_resume_is_judged_on_what_was_checkpointed() -> None:
    report = check_adapter(ListAdapter(), "test", limit=2)
    assert report.passed
    assert len(report.first.emitted) == 2
    assert "stopped at the limit" in report.result("cursor resumes").detail
    assert not check_adapter(ForgetsCursor(), "test", limit=2).passed


def test_report_table_names_each_check() -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(report_table(check_adapter(VersionsFall(), "test")))
    text = console.export_text()
    assert "FAIL" in text and "versions rise per key" in text and "#4 001*******01" in text


CHECK_CONFIG = """[producer]
metrics_port = 0

[[sources]]
id = "dn-exports"
source = "province-48"
adapter = "filedrop"

[sources.connection]
directory = "inbox"

[sources.mapping]
entity = "citizen"
key_field = "pid"
occurred_at_field = "at"
fields = {{ full_name = "name" }}
{extra}
"""


@pytest.mark.parametrize(("extra", "code"), [("", 0), ('deleted_field = "gone"', 1)])
def test_check_command_prints_the_table_and_exits_by_the_verdict(
    tmp_path: Path, extra: str, code: int
) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.csv").write_text(
        "pid,name,at\n001090000001,Nguyễn Văn An,2025-08-01T08:00:00\n", encoding="utf-8"
    )
    os.utime(tmp_path / "inbox" / "a.csv", (1_000, 1_000))  # complete: past the settle time
    config = tmp_path / "sources.toml"
    config.write_text(CHECK_CONFIG.format(extra=extra), encoding="utf-8")
    # No broker at this address: a check never publishes.
    settings = Settings(kafka_bootstrap="127.0.0.1:9", store_url="sqlite://")
    result = cli(settings, "adapters", "check", "--config", str(config), COLUMNS="200")
    assert result.returncode == code, result.stdout + result.stderr
    assert "dn-exports (filedrop)" in result.stdout
    for name in CHECKS:
        assert name in result.stdout
    assert ("0 of 1 sources pass" if code else "1 of 1 sources pass") in result.stdout
    assert (tmp_path / "inbox" / "a.csv").exists()  # checking never moves the file
