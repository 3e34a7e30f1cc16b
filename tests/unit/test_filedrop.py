"""File drops: an export replaced under the same name while the last one is published,
and two changes of one key in the same second."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producers.adapters import directory, file_reading, filedrop
from producers.adapters.directory import TRANSIENT_READ_TRIES
from producers.adapters.file_reading import read_json
from producers.adapters.filedrop import FileDropAdapter
from producers.sdk import Checkpoint, Record, RetriableError, SkippableRecord

CONFIG = {
    "directory": "inbox",
    "settle_seconds": 0,
    "entity": "citizen",
    "key_field": "pid",
    "occurred_at_field": "at",
    "fields": {"full_name": "name"},
}


def _drop(inbox: Path, text: str) -> None:
    """As the docs ask: written aside, then renamed into place."""
    aside = inbox / ".export.csv"
    aside.write_text(text, encoding="utf-8")
    os.utime(aside, (time.time() - 600,) * 2)
    aside.rename(inbox / "export.csv")


def test_an_export_renamed_over_the_one_being_published_is_read_next(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n")
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    sent: list[str] = []
    state: dict[str, object] = {}
    for item in adapter.read(state):
        if isinstance(item, Record):
            sent.append(item.key)
        elif isinstance(item, Checkpoint):  # the next export arrives during the flush
            _drop(inbox, "pid,name,at\n001190000002,Trần Thị Bình,2025-08-01T09:00:00+07:00\n")
            state = item.value()
            assert item.commit is not None
            item.commit()
    assert sent == ["001190000001"]
    assert (inbox / "export.csv").exists()
    for _ in range(2):  # seen changed since the last poll: read at the one after
        sent += [i.key for i in adapter.read(state) if isinstance(i, Record)]
    assert sent == ["001190000001", "001190000002"]


def test_two_changes_of_one_key_in_the_same_second_get_rising_versions(tmp_path: Path) -> None:
    """Whole-second times: the later line must win at the reconciler, not tie with the
    first (equal versions: the first applied stays)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n"
          "001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n"
          "001190000001,Nguyễn Văn Ân,2025-08-01T08:00:00+07:00\n"
          "001190000001,Nguyễn Văn Anh,2025-08-01T08:00:01+07:00\n")  # fmt: skip
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    versions = [i.version for i in adapter.read({}) if isinstance(i, Record)]
    assert len(versions) == 3 and versions == sorted(set(versions))


def test_a_time_written_as_a_json_number_of_whole_seconds_gets_rising_versions(
    tmp_path: Path,
) -> None:
    """A JSONL export writing `"at": 20250801080000` (with occurred_at_format): the same
    rule as for text, or the later change in the same second is lost as a duplicate."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    aside = inbox / ".export.jsonl"
    aside.write_text(
        '{"pid": "001190000001", "name": "Nguyễn Văn An", "at": 20250801080000}\n'
        '{"pid": "001190000001", "name": "Nguyễn Văn Ân", "at": 20250801080000}\n',
        encoding="utf-8",
    )
    os.utime(aside, (time.time() - 600,) * 2)
    aside.rename(inbox / "export.jsonl")
    config = CONFIG | {"occurred_at_format": "yyyyMMddHHmmss"}
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    records = [i for i in adapter.read({}) if isinstance(i, Record)]
    assert [r.data["full_name"] for r in records if r.data] == ["Nguyễn Văn An", "Nguyễn Văn Ân"]
    assert records[0].version < records[1].version


def test_a_date_format_with_dots_is_still_whole_seconds(tmp_path: Path) -> None:
    """`dd.MM.yyyy HH:mm:ss` has dots and no fraction: the line number still orders two
    changes of one key in one second (it was taken for a fraction, and the first won)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n"
          "001190000001,Nguyễn Văn An,01.08.2025 08:00:00\n"
          "001190000001,Nguyễn Văn Ân,01.08.2025 08:00:00\n")  # fmt: skip
    config = CONFIG | {"occurred_at_format": "dd.MM.yyyy HH:mm:ss"}
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    records = [i for i in adapter.read({}) if isinstance(i, Record)]
    assert [r.data["full_name"] for r in records if r.data] == ["Nguyễn Văn An", "Nguyễn Văn Ân"]
    assert records[0].version < records[1].version


def test_a_deletion_flag_is_read_as_the_sql_adapter_reads_it(tmp_path: Path) -> None:
    """`t`, `-1`, `1.0`, a deletion time or `có` delete; NULL written as text, `không`
    are live; a flag nobody can read is a dead letter, never a live upsert (a deleted
    record came back) nor a delete."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    flags = ["t", "-1", "1.0", "2025-08-01 09:00:00", "có", "0", "", "n", "NULL", "\\N",
             "không", "deleted"]  # fmt: skip
    _drop(inbox, "pid,name,at,gone\n" + "".join(
        f"0011900000{n:02d},Lê Thị Hoa,2025-08-01T08:00:00+07:00,{flag}\n"
        for n, flag in enumerate(flags)))  # fmt: skip
    adapter = FileDropAdapter.from_settings("province-79", CONFIG | {"deleted_field": "gone"},
                                            tmp_path)  # fmt: skip
    items = [i for i in adapter.read({}) if isinstance(i, Record | SkippableRecord)]
    kinds = [
        i.code if isinstance(i, SkippableRecord) else "delete" if i.data is None else "upsert"
        for i in items
    ]
    assert kinds == [
        *["delete"] * 5,
        *["upsert"] * 6,
        "invalid_field",
    ]
    assert isinstance(items[-1], SkippableRecord)
    assert items[-1].message.startswith("gone: not a flag") and "deleted" not in items[-1].message


def test_a_time_written_with_a_fraction_is_taken_as_it_is(tmp_path: Path) -> None:
    """Milliseconds that happen to be .000 are no whole-second time: a line number added
    there could pass a later change of the same key written at .020."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lines = "".join(f"00119000{n:04d},Lê Thị Hoa,2025-08-01T08:00:00.500+07:00\n"
                    for n in range(40))  # fmt: skip
    _drop(inbox, "pid,name,at\n" + lines
          + "001190000001,Lê Thị Hoà,2025-08-01T08:00:00.000+07:00\n"
          + "001190000001,Lê Thị Hòa,2025-08-01T08:00:00.020+07:00\n")  # fmt: skip
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    ours = [
        i.version for i in adapter.read({}) if isinstance(i, Record) and i.key == "001190000001"
    ]
    assert ours[-2:] == sorted(ours[-2:]) and ours[-1] - ours[-2] == 20_000


def test_a_file_server_clock_behind_ours_does_not_make_a_fresh_file_look_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The share stamps files by its own clock: judged by ours, 60 s ahead, a file being
    written in place looks a minute old and would be read half-written on first sight."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "export.csv").write_text(
        "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n", encoding="utf-8"
    )  # written in place just now, perhaps not finished
    real = time.time
    monkeypatch.setattr(directory.time, "time", lambda: real() + 60)
    adapter = FileDropAdapter.from_settings("province-79", CONFIG | {"settle_seconds": 10},
                                            tmp_path)  # fmt: skip
    assert [i for i in adapter.read({}) if isinstance(i, Record)] == []


def _runs_with_a_csv_unmovable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: int = 3
) -> tuple[list[str], int]:
    """Three runs of the adapter over inbox/ while every move of a.csv is refused (a
    share's lock, another file system refusing the unlink); a run the refusal ends is
    followed by the next. The keys sent and the dead letters yielded."""
    import shutil

    from producers.sdk import SkippableRecord

    real_move = shutil.move

    def refusing(source: str, target: object) -> object:
        if Path(source).name == "a.csv":
            raise PermissionError("locked")
        return real_move(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "move", refusing)
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    state: dict[str, object] = {}
    sent: list[str] = []
    letters = 0
    for _ in range(runs):
        try:
            for item in adapter.read(state):
                if isinstance(item, Record):
                    sent.append(item.key)
                elif isinstance(item, SkippableRecord):
                    letters += 1
                elif isinstance(item, Checkpoint):
                    state = item.value()
                    if item.commit is not None:
                        item.commit()
        except PermissionError:
            continue
    return sent, letters


def _settled(inbox: Path, *names: str) -> None:
    for name in names:
        os.utime(inbox / name, (time.time() - 600,) * 2)


def test_a_published_file_that_cannot_be_moved_does_not_block_the_files_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name, pid in (("a.csv", "001190000001"), ("b.csv", "001190000002")):
        (inbox / name).write_text(f"pid,name,at\n{pid},Nguyễn Văn An,2025-08-01T08:00:00Z\n")
    _settled(inbox, "a.csv", "b.csv")
    sent, _ = _runs_with_a_csv_unmovable(tmp_path, monkeypatch)
    assert sent == ["001190000001", "001190000002"]
    assert (inbox / "done" / "b.csv").exists() and (inbox / "a.csv").exists()


def test_an_unreadable_file_that_cannot_be_moved_to_error_is_dead_lettered_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_bytes(b"pid,name,at\n\xff\xfe not UTF-8\n")
    (inbox / "b.csv").write_text("pid,name,at\n001190000002,Trần Thị Bình,2025-08-01T08:00:00Z\n")
    _settled(inbox, "a.csv", "b.csv")
    sent, letters = _runs_with_a_csv_unmovable(tmp_path, monkeypatch)
    assert (sent, letters) == (["001190000002"], 1)
    assert (inbox / "a.csv").exists() and (inbox / "done" / "b.csv").exists()


def test_an_adapter_s_dead_letter_reason_is_one_of_the_contract_s() -> None:
    """Operators filter, count and re-drive by the documented codes: an adapter that
    invents one (the scaffold's template did: `unreadable_line`) fails at once."""
    from producers.sdk import SkippableRecord
    from schemas.dead_letter import DEAD_LETTER_REASONS

    with pytest.raises(ValueError, match="unreadable_line"):
        SkippableRecord("unreadable_line", "line is not a change record", "line 3")
    for code in DEAD_LETTER_REASONS:
        assert SkippableRecord(code, "a message", "line 3").code == code


def test_a_field_longer_than_the_csv_modules_limit_is_never_read_as_rows(
    tmp_path: Path,
) -> None:
    """The csv module stops at 131,072 characters inside a quoted field: the rest of that
    field, newlines and all, was read as rows, so a value could publish a record of its
    own (here 001190000009) or swallow the real rows after it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    forged = "001190000009,Kẻ Giả Mạo,2025-08-01T08:00:00+07:00"
    _drop(inbox, "pid,name,at\n"
          f'001190000001,"{"x" * 140_000}\n{forged}\n",2025-08-01T08:00:00+07:00\n'
          "001190000002,Trần Thị Bình,2025-08-01T09:00:00+07:00\n")  # fmt: skip
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    items = list(adapter.read({}))
    sent = [i.key for i in items if isinstance(i, Record)]
    assert "001190000009" not in sent and "001190000002" in sent
    assert len([i for i in items if isinstance(i, (Record, SkippableRecord))]) == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_files_records_are_read_without_holding_its_text_whole(
    tmp_path: Path, suffix: str
) -> None:
    """The whole text, then a second copy for the CSV reader (or a list of every line),
    held about six times the file: a province's export of a million rows (63 MB) took
    400 MB, and the producer's 512 Mi limit killed it at the same file after every
    restart. Now the file's bytes and one line at a time."""
    import json
    import tracemalloc

    rows = [(f"0011900{n:05d}", f"Nguyễn Văn Ân {n}", "2025-08-01T08:00:00+07:00")
            for n in range(60_000)]  # fmt: skip
    if suffix == ".csv":
        content = "pid,name,at\n" + "".join(f"{p},{n},{a}\n" for p, n, a in rows)
    else:
        content = "".join(
            json.dumps({"pid": p, "name": n, "at": a}, ensure_ascii=False) + "\n"
            for p, n, a in rows
        )
    data = content.encode()
    del content
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    tracemalloc.start()
    try:
        count = 0
        for item in adapter.parse(tmp_path / f"export{suffix}", data):
            assert isinstance(item, Record), item
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(rows)
    assert peak < len(data) / 2, (peak, len(data))  # before: 5.6 to 5.7 times the file


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("content", [b"\xef", b"\xef\xbb", b"pid\n\xff\n"], ids=repr)
def test_a_file_that_is_not_utf8_is_refused_before_any_record(
    tmp_path: Path, suffix: str, content: bytes
) -> None:
    """Checked as it is read, by a decoder of BOMs that waited for the rest of one: a file
    of the bytes EF BB was an empty file, moved to done/ without a dead letter."""
    from producers.adapters.file_reading import UnreadableFile

    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    with pytest.raises(UnreadableFile) as refused:
        adapter.parse(tmp_path / f"export{suffix}", content)
    assert refused.value.reason == "not_utf8"


@pytest.mark.parametrize("empty_cells", ["null", "absent"])
def test_an_empty_csv_cell_is_null_or_not_provided_as_configured(
    tmp_path: Path, empty_cells: str
) -> None:
    """An empty cell was always an explicit null, which erased another source's email in
    the store when the export only left it blank. `empty_cells = "absent"` leaves the
    field out (a nested object emptied so goes too); JSON Lines keep their own nulls, and
    a key a line leaves out is not provided (it was a null, erasing as a blank cell did)."""
    config = CONFIG | {
        "empty_cells": empty_cells,
        "fields": {"full_name": "name", "email": "email",
                   "permanent_address.line": "line", "permanent_address.ward_code": "ward"},
    }  # fmt: skip
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    at = "2025-08-01T08:00:00+07:00"
    content = f"pid,name,email,line,ward,at\n001190000001,Nguyễn Văn An,,,,{at}\n"
    content += f"001190000002,Trần Thị Bình,,Số 1 Lê Lợi,,{at}\n"
    first, second = adapter.parse(tmp_path / "export.csv", content.encode())
    assert isinstance(first, Record) and isinstance(second, Record)
    if empty_cells == "null":
        assert first.data == {"full_name": "Nguyễn Văn An", "email": None,
                              "permanent_address": {"line": None, "ward_code": None}}  # fmt: skip
    else:
        assert first.data == {"full_name": "Nguyễn Văn An"}
        assert second.data == {"full_name": "Trần Thị Bình",
                               "permanent_address": {"line": "Số 1 Lê Lợi"}}  # fmt: skip
    line = json.dumps({"pid": "001190000003", "name": "Lê Văn Cường", "email": None, "at": at})
    (third,) = adapter.parse(tmp_path / "export.jsonl", line.encode() + b"\n")
    assert isinstance(third, Record)
    assert third.data == {"full_name": "Lê Văn Cường", "email": None}


def test_a_time_that_does_not_parse_is_an_invalid_field_not_a_missing_one(
    tmp_path: Path,
) -> None:
    """`32/08/2025` was reported `missing_field: at: required`, though the column was
    there: the operator looked for a missing column."""
    config = CONFIG | {"occurred_at_format": "dd/MM/yyyy HH:mm:ss"}
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    content = "pid,name,at\n001190000001,Nguyễn Văn An,32/08/2025 10:00:03\n"
    content += "001190000002,Trần Thị Bình,\n"
    bad, empty = adapter.parse(tmp_path / "export.csv", content.encode())
    assert isinstance(bad, SkippableRecord) and isinstance(empty, SkippableRecord)
    assert (bad.code, bad.message) == ("invalid_field", "at: not a time as dd/MM/yyyy HH:mm:ss")
    assert (empty.code, empty.message) == ("missing_field", "at: required")


def _origins(adapter: FileDropAdapter) -> list[str]:
    return [item.origin for item in adapter.read({}) if isinstance(item, Record)]


ROW = "001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n"


def test_a_marker_older_than_its_file_is_a_leftover_not_a_complete_export(tmp_path: Path) -> None:
    """A run killed between a file's move to done/ and its marker's removal left the
    marker: the next export written over the same name was read half-written, and what
    its writer wrote after that went to done/ unread."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    adapter = FileDropAdapter.from_settings("province-79", CONFIG | {"complete_marker": ".done"},
                                            tmp_path)  # fmt: skip
    marker = inbox / "export.csv.done"
    marker.write_text("")
    os.utime(marker, (1_000, 1_000))  # the last export's, left behind
    (inbox / "export.csv").write_text("pid,name,at\n" + ROW)  # being written now
    assert _origins(adapter) == []
    os.utime(marker)  # the writer's marker, written after the file
    assert _origins(adapter) == ["export.csv:2"]


def test_a_file_written_to_while_it_is_read_is_read_once_it_is_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settled by its time (or marked), a file its writer went on writing as it was read
    was published cut short, and the rest of it never."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    export = inbox / "export.csv"
    export.write_text("pid,name,at\n" + ROW)
    os.utime(export, (time.time() - 600,) * 2)
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    read_at = file_reading._read_at

    def while_written(fd: int, size: int, offset: int) -> bytes:
        content = read_at(fd, size, offset)
        with export.open("a", encoding="utf-8") as handle:  # the writer goes on
            handle.write(ROW.replace("0001,", "0002,"))
        return content

    monkeypatch.setattr(file_reading, "_read_at", while_written)
    assert _origins(adapter) == []
    monkeypatch.undo()
    os.utime(export, (time.time() - 600,) * 2)
    assert _origins(adapter) == []  # changed since the poll before: settles first
    assert _origins(adapter) == ["export.csv:2", "export.csv:3"]


def test_a_files_checksum_at_its_move_reads_it_in_chunks(tmp_path: Path) -> None:
    """The move checks the file is still the one read: reading it whole again held a
    snapshot's export twice in memory (6 GB for 3 GB) while its records were still held."""
    import hashlib
    import tracemalloc

    from producers.adapters.directory import _checksum

    path = tmp_path / "snapshot.csv"
    path.write_bytes(b"SoDinhDanh,HoTen\n" + b"048090000001,Nguyen Van An\n" * 400_000)
    tracemalloc.start()
    try:
        digest = _checksum(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < path.stat().st_size // 4, peak


@pytest.mark.parametrize(
    ("header", "said"),
    [
        ("pid,ho_ten,phone,at", "the header lacks mapped columns: name"),  # a renamed column
        ("pid,name,phone,name,at", "the header names a column twice: name"),
        # A header that is a record's line: its values are not named (personal data).
        (
            "pid,name,at,Nguyễn Văn Rò Rỉ,079123456789,Nguyễn Văn Rò Rỉ,079123456789",
            "the header names a column twice: 2 columns the mapping does not name",
        ),
        (
            "pid,name,at,name,079123456789,079123456789",
            "the header names a column twice: name and 1 column the mapping does not name",
        ),
    ],
)
def test_a_csv_header_that_lacks_or_repeats_a_mapped_column_refuses_the_file(
    tmp_path: Path, header: str, said: str
) -> None:
    """A column renamed in the export read as null in every row, each a valid event that
    erased the value other sources gave; of a column named twice, the last cell was read
    for both. The file goes to error/ instead."""
    from producers.adapters.file_reading import UnreadableFile

    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    cells = ",".join(["001190000001"] + ["x"] * (header.count(",") - 1) + ["2025-08-01T08:00:00"])
    with pytest.raises(UnreadableFile) as refused:
        list(adapter.parse(tmp_path / "export.csv", f"{header}\n{cells}\n".encode()))
    assert refused.value.reason == "not_csv" and said in str(refused.value)
    assert "079123456789" not in str(refused.value) and "Rò" not in str(refused.value)


def test_a_quote_never_closed_refuses_the_file_instead_of_swallowing_its_rest(
    tmp_path: Path,
) -> None:
    """A stray quote made every line after it one value of an unmapped column: one record
    published, the rest of the file gone, no dead letter, the file in done/."""
    from producers.adapters.file_reading import UnreadableFile

    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    at = "2025-08-01T08:00:00"
    text = f'pid,name,at,ghi_chu\n001190000001,An,{at},"cán bộ\n'
    text += f"001190000002,Bình,{at},\n001190000003,Cường,{at},\n"
    with pytest.raises(UnreadableFile, match="never closed") as refused:
        list(adapter.parse(tmp_path / "export.csv", text.encode()))
    assert refused.value.reason == "not_csv"


def test_a_csv_row_of_more_or_fewer_cells_than_the_header_is_a_bad_line(tmp_path: Path) -> None:
    """A short row's missing cells were explicit nulls; a comma in an unquoted name
    shifted the cells after it into the next columns; `"x"y` read as `xy`. Each is now
    that line's dead letter, and the lines around it are read."""
    config = CONFIG | {"fields": {"full_name": "name", "phone": "phone"}}
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    at = "2025-08-01T08:00:00"
    text = "pid,name,phone,at\n"
    text += f"001190000001,Nguyễn Văn An,{at}\n"  # the phone left out: 3 cells
    text += f"001190000002,Lê, Văn Cường,0903000000,{at}\n"  # 5 cells
    text += f'001190000003,"Trần"Bình,0903000001,{at}\n'  # a quote, then text
    text += f"001190000004,Phạm Thu Hà,0903000002,{at}\n"
    text += f"001190000005,Võ Văn Em,0903000003,{at},,\n"  # a trailing delimiter: read
    records = list(adapter.parse(tmp_path / "export.csv", text.encode()))
    bad = [(r.origin, r.message) for r in records if isinstance(r, SkippableRecord)]
    assert bad == [
        ("export.csv:2", "line has 3 cells, the header 4"),
        ("export.csv:3", "line has 5 cells, the header 4"),
        ("export.csv:4", "line is not valid CSV"),
    ]
    good = [r for r in records if isinstance(r, Record)]
    assert [(r.key, r.data) for r in good] == [
        ("001190000004", {"full_name": "Phạm Thu Hà", "phone": "0903000002"}),
        ("001190000005", {"full_name": "Võ Văn Em", "phone": "0903000003"}),
    ]


def test_a_daily_export_of_one_name_never_replaces_the_one_before_in_done_or_error(
    tmp_path: Path,
) -> None:
    """A move onto a name already in error/ replaced the file there: day 1's unreadable
    export was then nowhere (its dead letter names it only). In done/, day 2 replaced day
    1 and sat beside day 1's rejection report, which then described lines it does not
    have. Each file now keeps its own name or a numbered one."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    state: dict[str, object] = {}

    def poll() -> None:
        nonlocal state
        for item in adapter.read(state):
            if isinstance(item, SkippableRecord):  # as the engine reports a dead letter
                adapter.rejected(item.origin, item.code, item.message)
            if isinstance(item, Checkpoint):
                state = item.value()
                if item.commit is not None:
                    item.commit()

    at = "2025-08-01T08:00:00+07:00"
    days = [b"pid,name,at\n\xff day 1\n", b"pid,name,at\n\xfe day 2\n"]  # not UTF-8
    days += [f"pid,name,at\n001190000001,An,{at}\n,Bình,{at}\n".encode()]  # one bad line
    days += [f"pid,name,at\n001190000003,Cường,{at}\n".encode()]
    for content in days:
        aside = inbox / ".export.csv"
        aside.write_bytes(content)
        os.utime(aside, (time.time() - 600,) * 2)
        aside.rename(inbox / "export.csv")
        for _ in range(2):  # a name seen with another size: read at the poll after
            poll()
    error, done = inbox / "error", inbox / "done"
    assert (error / "export.csv").read_bytes() == days[0]
    assert (error / "export.2.csv").read_bytes() == days[1]
    assert (done / "export.csv").read_bytes() == days[2]
    assert (done / "export.csv.rejected.jsonl").exists()
    assert (done / "export.2.csv").read_bytes() == days[3]
    assert not (done / "export.2.csv.rejected.jsonl").exists()


def test_under_absent_a_mapped_column_the_header_lacks_is_not_provided(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One mapping for several provinces' exports, one without an email column: with
    `empty_cells = "absent"` the field is not provided (as an empty cell is), not a
    refused file; a missing `deleted_field` column leaves the rows live, and says so."""
    config = CONFIG | {
        "empty_cells": "absent",
        "fields": {"full_name": "name", "email": "email"},
        "deleted_field": "da_xoa",
    }
    adapter = FileDropAdapter.from_settings("province-79", config, tmp_path)
    text = "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00\n"
    (record,) = adapter.parse(tmp_path / "export.csv", text.encode())
    assert isinstance(record, Record) and record.data == {"full_name": "Nguyễn Văn An"}
    assert "no column da_xoa in this file: its rows are live" in caplog.text


def test_a_json_line_naming_a_key_twice_is_a_rejected_line_not_the_last_value() -> None:
    # `json.loads` kept the last `so_dinh_danh`: the row sent named another citizen than
    # a reader keeping the first would see.
    line = '{"so_dinh_danh": "001190000101", "ho_ten": "A", "so_dinh_danh": "079190000202"}'
    with pytest.raises(ValueError, match="an object naming a key twice"):
        read_json(line)
    ((number, rejected),) = FileDropAdapter._jsonl_rows([(3, line)])
    assert number == 3 and isinstance(rejected, SkippableRecord)
    assert rejected.code == "invalid_json" and "key twice" in rejected.message


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EMFILE])
def test_a_read_that_fails_for_a_moment_is_retried_not_sent_to_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A share away a moment (NFS, SMB) or descriptors short: the file was dead-lettered
    as `read_failed`, moved to error/ and never read again."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n")
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)

    def failing(fd: int, size: int, offset: int) -> bytes:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(file_reading, "_read_at", failing)
    with pytest.raises(RetriableError, match=errno.errorcode[code]):
        list(adapter.read({}))
    assert (inbox / "export.csv").exists() and not (inbox / "error").exists()
    monkeypatch.undo()
    assert [i.key for i in adapter.read({}) if isinstance(i, Record)] == ["001190000001"]


def test_a_read_that_keeps_failing_goes_to_error_at_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad block: retried for ever, it held every file after it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n")
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)

    def failing(fd: int, size: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(file_reading, "_read_at", failing)
    for _ in range(TRANSIENT_READ_TRIES - 1):
        with pytest.raises(RetriableError):
            list(adapter.read({}))
    items = list(adapter.read({}))
    assert [(i.code, i.origin) for i in items if isinstance(i, SkippableRecord)] == [
        ("unreadable_file", "export.csv")
    ]


def test_memory_short_while_reading_a_file_is_no_fault_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sent the rest of the file to one dead letter and the file to error/ (a line's
    mapping: that line to the dead letters); the run is retried from its checkpoint."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, "pid,name,at\n001190000001,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n")
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)

    def short(*_: object, **__: object) -> object:
        raise MemoryError

    monkeypatch.setattr(adapter, "_record", short)
    with pytest.raises(MemoryError):
        list(adapter.read({}))
    assert (inbox / "export.csv").exists() and not (inbox / "error").exists()


def _rows(count: int) -> str:
    return "pid,name,at\n" + "".join(
        f"0011900{n:05d},Nguyễn Văn Ân {n},2025-08-01T08:00:00+07:00\n" for n in range(count)
    )


def _dropped(tmp_path: Path, count: int) -> tuple[Path, FileDropAdapter]:
    """An inbox holding `export.csv` of `count` rows, settled, and the adapter reading it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _drop(inbox, _rows(count))
    return inbox, FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)


def _before_each_record(
    monkeypatch: pytest.MonkeyPatch, adapter: FileDropAdapter, effect: Callable[[], None]
) -> None:
    """`effect` runs as each record is mapped: while the file is being read."""
    record = adapter._record

    def mapped(*args: Any, **kwargs: Any) -> Any:
        effect()
        return record(*args, **kwargs)

    monkeypatch.setattr(adapter, "_record", mapped)


def test_a_file_is_published_without_its_bytes_held_whole(tmp_path: Path) -> None:
    """Read into memory, a province's first export (ten million rows, gigabytes) took as
    much of the producer's memory, and one larger than its limit killed the producer at
    that file after every restart. The file is now read from disk as its records go."""
    import tracemalloc

    inbox, adapter = _dropped(tmp_path, 200_000)
    size = (inbox / "export.csv").stat().st_size
    count = 0
    tracemalloc.start()
    try:
        for item in adapter.read({}):
            count += isinstance(item, Record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < size / 4, (peak, size)  # before: the file's size and more


def test_a_read_that_fails_for_a_moment_midway_is_retried_from_the_file_not_sent_to_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, adapter = _dropped(tmp_path, 20_000)  # more than one buffer of the records' read
    read_at, away = file_reading._read_at, [False]

    def share(fd: int, size: int, offset: int) -> bytes:
        if away[0]:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return read_at(fd, size, offset)

    def share_goes_away() -> None:  # once the records are being read
        away[0] = True

    monkeypatch.setattr(file_reading, "_read_at", share)
    _before_each_record(monkeypatch, adapter, share_goes_away)
    sent: list[str] = []
    with pytest.raises(RetriableError, match="ESTALE"):
        sent += [i.key for i in adapter.read({}) if isinstance(i, Record)]
    assert (inbox / "export.csv").exists() and not (inbox / "error").exists()
    monkeypatch.undo()
    keys = [i.key for i in adapter.read({}) if isinstance(i, Record)]
    assert len(keys) == 20_000 and len(set(keys)) == 20_000


def test_a_file_rewritten_in_place_while_its_records_are_read_is_read_again_not_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its bytes are read from disk as the records go: a file rewritten after its checksum
    would be recorded as done with records of other bytes."""
    inbox, adapter = _dropped(tmp_path, 3)
    export = inbox / "export.csv"

    def rewritten() -> None:
        if export.read_text().count("Ân") == 3:
            export.write_text(_rows(3).replace("Ân", "Ẩn"))  # the exporter writes it again

    _before_each_record(monkeypatch, adapter, rewritten)
    items = list(adapter.read({}))
    assert not any(isinstance(i, Checkpoint) and i.commit is not None for i in items)
    assert export.exists() and not (inbox / "done").exists()
    monkeypatch.undo()
    os.utime(export, (time.time() - 600,) * 2)
    for _ in range(2):  # changed since the poll before: settles first
        items = list(adapter.read({}))
    names = [i.data["full_name"] for i in items if isinstance(i, Record)]
    assert names == [f"Nguyễn Văn Ẩn {n}" for n in range(3)]
    for item in items:
        if isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()
    assert not export.exists() and (inbox / "done" / "export.csv").exists()


def test_a_csv_rewritten_while_it_is_checked_is_read_again_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half written again when the quotes' check read it, the new export was refused
    (`not_csv`) and went to error/."""
    inbox, adapter = _dropped(tmp_path, 5)
    export = inbox / "export.csv"
    quotes_closed = filedrop._quotes_closed

    def half_written(content: object, delimiter: str) -> None:
        export.write_text('pid,name,at\n001190000000,"Nguyễn')  # the exporter starts again
        quotes_closed(content, delimiter)  # type: ignore[arg-type]

    monkeypatch.setattr(filedrop, "_quotes_closed", half_written)
    items = list(adapter.read({}))
    assert not [i for i in items if isinstance(i, SkippableRecord)]
    assert export.exists() and not (inbox / "error").exists()
    monkeypatch.undo()
    _drop(inbox, _rows(5))  # written whole
    for _ in range(2):  # changed since the poll before: settles first
        items = list(adapter.read({}))
    assert len([i for i in items if isinstance(i, Record)]) == 5


@pytest.mark.parametrize("code", [errno.ESTALE, errno.EREMOTEIO])
def test_a_read_failing_while_the_file_is_checked_is_retried_or_refused_never_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The checks read the file from disk too: their errors escaped the adapter's handling,
    so a file was retried without end and held every file after it."""
    _, adapter = _dropped(tmp_path, 5)
    read_at, calls = file_reading._read_at, [0]

    def away_after_the_checksum(fd: int, size: int, offset: int) -> bytes:
        calls[0] += 1
        if calls[0] > 1:  # the checksum's one read passed
            raise OSError(code, os.strerror(code))
        return read_at(fd, size, offset)

    monkeypatch.setattr(file_reading, "_read_at", away_after_the_checksum)
    runs = 0
    while True:
        calls[0] = 0
        runs += 1
        try:
            items = list(adapter.read({}))
        except RetriableError:
            assert code == errno.ESTALE and runs < TRANSIENT_READ_TRIES
            continue
        break
    assert runs == (TRANSIENT_READ_TRIES if code == errno.ESTALE else 1)
    assert [(i.code, i.origin) for i in items if isinstance(i, SkippableRecord)] == [
        ("unreadable_file", "export.csv")
    ]


def test_a_read_that_fails_now_and_then_but_goes_on_is_never_sent_to_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failures of a long file's read were counted until it was read whole: a share
    that blipped five times in hours sent it to error/ though each run got further."""
    inbox, adapter = _dropped(tmp_path, 12_000)
    monkeypatch.setattr(directory, "FILE_CHECKPOINT_RECORDS", 1_000)
    read_at = file_reading._read_at
    mapped, runs = [0], [0]

    def blipping(fd: int, size: int, offset: int) -> bytes:
        if mapped[0] >= 1_500 * runs[0]:  # each run 1,500 records further than the last
            mapped[0] = -(10**9)  # once a run
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return read_at(fd, size, offset)

    def count() -> None:
        mapped[0] += 1

    _before_each_record(monkeypatch, adapter, count)
    monkeypatch.setattr(file_reading, "_read_at", blipping)
    state: dict[str, object] = {}
    sent: set[str] = set()
    failures = 0
    while runs[0] < 3 * TRANSIENT_READ_TRIES:
        runs[0] += 1
        mapped[0] = 0
        try:
            for item in adapter.read(state):
                assert not isinstance(item, SkippableRecord), item
                if isinstance(item, Record):
                    sent.add(item.key)
                elif isinstance(item, Checkpoint):
                    state = item.value()
        except RetriableError:
            failures += 1
            continue
        break
    assert failures > TRANSIENT_READ_TRIES  # more than before, each after progress
    assert len(sent) == 12_000
    assert not (inbox / "error").exists()


def test_a_file_whose_status_cannot_be_read_leaves_no_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, adapter = _dropped(tmp_path, 2)
    fstat = os.fstat

    def stale(fd: int) -> os.stat_result:
        if os.path.realpath(f"/proc/self/fd/{fd}").endswith("export.csv"):
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return fstat(fd)

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(file_reading.os, "fstat", stale)
    for _ in range(3):
        with pytest.raises(RetriableError):
            list(adapter.read({}))
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_fifo_in_a_listed_files_place_is_passed_over_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed at the run's start and opened later: a FIFO put in its place blocked the
    source for ever, and a stop could not end the wait."""
    inbox, adapter = _dropped(tmp_path, 2)
    export = inbox / "export.csv"
    listed = adapter._ready_files()
    export.unlink()
    os.mkfifo(export)
    monkeypatch.setattr(adapter, "_ready_files", lambda: listed)
    assert [i for i in adapter.read({}) if isinstance(i, Record | SkippableRecord)] == []


def test_a_json_line_longer_than_any_record_is_a_rejected_line_never_held_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file without line ends was one line held whole, several times over."""
    import tracemalloc

    monkeypatch.setattr(file_reading, "MAX_LINE_CHARS", 100_000)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    line = '{"pid": "001190000001", "name": "Nguyễn Văn An", "at": "2025-08-01T08:00:00+07:00"}'
    (inbox / "export.jsonl").write_text(
        line + "\n" + '{"pid": "' + "9" * 3_000_000 + '"}\n' + line.replace("0001", "0002") + "\n"
    )
    os.utime(inbox / "export.jsonl", (time.time() - 600,) * 2)
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, tmp_path)
    tracemalloc.start()
    try:
        items = [i for i in adapter.read({}) if isinstance(i, Record | SkippableRecord)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [getattr(i, "key", None) for i in items if isinstance(i, Record)] == [
        "001190000001",
        "001190000002",
    ]
    (rejected,) = [i for i in items if isinstance(i, SkippableRecord)]
    assert rejected.origin == "export.jsonl:2" and "longer than 100000" in rejected.message
    assert peak < 1_500_000, peak  # the line is 3 MB


def test_a_csv_field_longer_than_any_record_refuses_the_file() -> None:
    """A stray quote took the rest of the file for one field, held whole: the field limit
    was raised to the file's size."""
    text = 'pid,name,at\n001190000001,"Nguyễn ' + "x" * (file_reading.MAX_LINE_CHARS + 10)
    text += '",2025-08-01T08:00:00+07:00\n'
    adapter = FileDropAdapter.from_settings("province-79", CONFIG, Path("/nonexistent"))
    with pytest.raises(file_reading.UnreadableFile) as refused:
        list(adapter.parse(Path("export.csv"), text.encode()))
    assert refused.value.reason == "not_csv"
    assert f"longer than {file_reading.MAX_LINE_CHARS} characters" in str(refused.value)


def test_a_files_failed_reads_are_not_counted_against_the_next_file_of_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daily export of one name: yesterday's, gone to error/ after five failed reads, left
    its count, and today's went to error/ at its first failure that would pass."""
    inbox, adapter = _dropped(tmp_path, 2)
    read_at, failing = file_reading._read_at, [True]

    def eio(fd: int, size: int, offset: int) -> bytes:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return read_at(fd, size, offset)

    monkeypatch.setattr(file_reading, "_read_at", eio)
    for _ in range(TRANSIENT_READ_TRIES - 1):
        with pytest.raises(RetriableError):
            list(adapter.read({}))
    for item in adapter.read({}):  # refused at last: to error/
        if isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()
    assert (inbox / "error" / "export.csv").exists()
    _drop(inbox, _rows(3))  # the next day's
    list(adapter.read({}))  # changed since the poll before: settles first
    with pytest.raises(RetriableError):  # its first failure: retried
        list(adapter.read({}))
    failing[0] = False
    assert len([i for i in adapter.read({}) if isinstance(i, Record)]) == 3


def test_a_files_status_changed_while_it_is_read_is_no_change_of_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chmod (a cron job's, an archive bit cleared) moves the file's status time: taken
    for a rewrite, the file was read again at every run it touched, and never done."""
    inbox, adapter = _dropped(tmp_path, 3)
    export = inbox / "export.csv"
    _before_each_record(monkeypatch, adapter, lambda: export.chmod(0o640))
    items = list(adapter.read({}))
    assert len([i for i in items if isinstance(i, Record)]) == 3
    for item in items:
        if isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()
    assert (inbox / "done" / "export.csv").exists()


def test_a_file_rewritten_keeping_its_size_and_time_while_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cp -p` or `rsync --inplace -t` over it: only its status time tells, and its bytes."""
    inbox, adapter = _dropped(tmp_path, 3)
    export = inbox / "export.csv"
    rewritten: list[bool] = []

    def copied_over() -> None:
        if not rewritten:
            rewritten.append(True)
            before = export.stat()
            export.write_text(_rows(3).replace("Ân", "Ôn"))  # as many bytes
            os.utime(export, ns=(before.st_atime_ns, before.st_mtime_ns))

    _before_each_record(monkeypatch, adapter, copied_over)
    items = list(adapter.read({}))
    assert rewritten and export.stat().st_size == len(_rows(3).encode())
    assert not any(isinstance(i, Checkpoint) and i.commit is not None for i in items)


@pytest.mark.parametrize(("length", "kept"), [(100, True), (101, False)])
def test_a_line_of_the_longest_length_is_kept(
    monkeypatch: pytest.MonkeyPatch, length: int, kept: bool
) -> None:
    import io

    monkeypatch.setattr(file_reading, "MAX_LINE_CHARS", 100)
    text = "x" * length + "\nshort\n" + "y" * length
    lines = list(file_reading.bounded_lines(io.TextIOWrapper(io.BytesIO(text.encode()))))
    assert [line is file_reading.OVER_LONG for line in lines] == [not kept, False, not kept]
    assert lines[1] == "short\n"
