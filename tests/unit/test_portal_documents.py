"""The portal adapter's JSON documents read an item at a time (producers.adapters.portal),
judged as `json.loads` judges the whole text, a key named twice in an object refused
(`schemas.json_text.loads_unique`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from producers.adapters import portal
from producers.adapters.file_reading import UnreadableFile
from producers.adapters.portal import PortalAdapter, _items
from producers.sdk import Record
from schemas.json_text import loads_unique

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
PIECES = st.sampled_from([1, 2, 3, 5, 64, 1 << 18])


def loaded(data: bytes) -> list[Any] | str:
    """What `json.loads` of the whole text made of a document's payloads, or its error (an
    object naming a key twice one too)."""
    try:
        value = loads_unique(data.decode("utf-8-sig"))
    except RecursionError:
        return "RecursionError"
    except ValueError:
        return "ValueError"
    return value if isinstance(value, list) else [value]


def streamed(data: bytes, piece: int) -> list[Any] | str:
    """What `_items` made of them, its text read `piece` characters at a time."""
    kept, portal.PIECE = portal.PIECE, piece
    try:
        return list(_items(data))
    except UnreadableFile as refused:  # before any value: the bytes are not UTF-8
        return refused.reason
    except RecursionError:
        return "RecursionError"
    except ValueError:
        return "ValueError"
    finally:
        portal.PIECE = kept


@settings(max_examples=300, deadline=None)
@given(value=JSON, piece=PIECES, indent=st.sampled_from([None, 0, 2, "\t", "\r\n"]))
def test_a_document_of_any_json_reads_as_json_loads_reads_it(
    value: Any, piece: int, indent: int | str | None
) -> None:
    data = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    assert streamed(data, piece) == loaded(data)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=24) | st.text("[]{},:\"a1e.-+ 0tnul\\", max_size=24).map(str.encode),
       piece=PIECES)  # fmt: skip
@example(b"[1e400]", 3)  # a number cut at a piece's end: `1e` is not 1
@example(b"[1, 2]", 1)
@example(b"[1] ,", 2)
@example(b'[{"a":"\\ud800", "b": 12345678901234567890123}, NaN]', 5)  # as json reads them
@example(b'[{"a": 1}, {"b": {"a": 1, "a": 2}}]', 3)  # a key named twice, deep in an item
@example(b"\xef\xbb\xbf[1]", 1)
@example(b"[" * 3000 + b"]" * 3000, 1 << 18)
def test_any_bytes_are_read_or_refused_as_json_loads_does(data: bytes, piece: int) -> None:
    expected = loaded(data) if _utf8(data) else "not_utf8"
    assert repr(streamed(data, piece)) == repr(expected)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


PAYLOAD = {
    "MaHoSo": "000.00.01.H29-250801-0001",
    "MaTTHC": "1.005129",
    "DonViXuLy": "000.00.01.H29",
    "ChuHoSo": {"HoTen": "Nguyễn Văn An", "SoDinhDanh": "079090000001"},
    "LoaiDoiTuong": "1",
    "NgayTiepNhan": "20250801083000",
    "TrangThaiHoSo": "4",
    "NgayCapNhat": "20250801090000",
}


def adapter(tmp_path: Path) -> PortalAdapter:
    settings = {"directory": str(tmp_path / "inbox"), "documents": False}
    made = PortalAdapter.from_settings("province-79", settings, tmp_path)
    assert isinstance(made, PortalAdapter)
    return made


def test_a_document_s_payloads_are_read_without_holding_it_parsed_whole(tmp_path: Path) -> None:
    """`json.loads` of the whole file held ten to twenty times the file: a province's
    export of a few hundred megabytes in one list killed the producer at the same file
    after every restart. Now the file's bytes and one payload at a time."""
    import tracemalloc

    payloads = [PAYLOAD | {"MaHoSo": f"000.00.01.H29-250801-{n:04d}"} for n in range(20_000)]
    data = json.dumps(payloads, ensure_ascii=False, indent=1).encode()
    del payloads
    reader = adapter(tmp_path)
    tracemalloc.start()
    try:
        count = 0
        for item in reader.parse(tmp_path / "hoso.json", data):
            assert isinstance(item, Record), item
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < len(data) / 2, (peak, len(data))


@pytest.mark.parametrize(
    ("content", "reason", "message"),
    [
        (b"\xef\xbb", "not_utf8", "not UTF-8"),
        (b'[{"MaHoSo": "\xff"}]', "not_utf8", "not UTF-8"),
        (json.dumps([PAYLOAD]).encode()[:-1], "not_json", "not JSON"),  # cut short
        (json.dumps([PAYLOAD, PAYLOAD]).encode() + b" x", "not_json", "not JSON"),
        (b"[" + b"[" * 5000 + b"]" * 5000 + b"]", "not_json", "nested too deeply"),
        # `json` kept the last `MaHoSo`: the dossier sent could be another than the row's
        (
            b'[{"MaHoSo": "000.00.01.H29-250801-0001", "MaHoSo": "000.00.01.H29-250801-0002"}]',
            "not_json",
            "not JSON",
        ),
    ],
    ids=["bom-only", "bad-byte", "cut", "trailing", "deep", "key-twice"],
)
def test_a_file_that_is_no_json_document_is_refused_before_any_payload(
    tmp_path: Path, content: bytes, reason: str, message: str
) -> None:
    with pytest.raises(UnreadableFile) as refused:
        next(iter(adapter(tmp_path).parse(tmp_path / "hoso.json", content)))
    assert refused.value.reason == reason
    assert message in str(refused.value)


def test_a_document_with_an_error_early_is_refused_without_reading_the_rest_whole(
    tmp_path: Path,
) -> None:
    """Every failure read on to the file's end, in case more text would mend it: an
    error in the second of 20,000 payloads held the rest of the file as one string,
    four times the file."""
    import tracemalloc

    payloads = [PAYLOAD | {"MaHoSo": f"000.00.01.H29-250801-{n:04d}"} for n in range(20_000)]
    text = json.dumps(payloads, ensure_ascii=False, indent=1)
    data = (text[:2] + "x," + text[2:]).encode()  # `[` then a bare word as the first item
    del payloads, text
    reader = adapter(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableFile, match="not JSON"):
            next(iter(reader.parse(tmp_path / "hoso.json", data)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data) / 4, (peak, len(data))


def test_a_document_checked_whole_never_fails_while_its_items_are_read(tmp_path: Path) -> None:
    """json's parser counts nesting against the Python stack, and the items are read
    a few frames deeper than the check had run: a payload nested just to the limit
    passed the check and failed after the payloads before it were sent. At every depth
    now, the file is refused before any payload, or read to its end."""
    import sys

    reader = adapter(tmp_path)

    def rest_deeper(frames: int, items: Iterator[Any]) -> list[Any]:
        if frames:
            return rest_deeper(frames - 1, items)
        return list(items)

    outcomes = set()
    for depth in range(sys.getrecursionlimit() - 300, sys.getrecursionlimit()):
        data = b"[" + json.dumps(PAYLOAD).encode() + b"," + b"[" * depth + b"]" * depth + b"]"
        try:  # the file checked whole here
            records = iter(reader.parse(tmp_path / "hoso.json", data))
            first = next(records)
        except UnreadableFile as refused:
            assert "nested too deeply" in str(refused)
            outcomes.add("refused")
        else:  # the rest read deeper, as the framework's calls after the first add
            rest = rest_deeper(10, records)
            assert isinstance(first, Record) and len(rest) == 1  # the deep one a letter
            outcomes.add("read")
    assert outcomes == {"refused", "read"}  # the range crosses the limit


def test_a_payload_s_position_orders_one_time_only_within_a_million(tmp_path: Path) -> None:
    """The position was added to the version (and the time) without bound: payload
    1,500,000 of a big file, at 08:00:00, outranked the next file's first payload of the
    same dossier at 08:00:01, which the reconciler dropped as stale."""
    reader = adapter(tmp_path)
    (early,) = reader._records(PAYLOAD, "a.json:2", 1)
    (late,) = reader._records(PAYLOAD, "a.json:1500001", 1_500_000)
    assert isinstance(early, Record) and isinstance(late, Record)
    assert early.version == late.version + 1  # past the millionth, the position is not added
    assert early.occurred_at == late.occurred_at  # the payload's own time, not shifted
    newer = PAYLOAD | {"NgayCapNhat": "20250801090001"}
    (next_file,) = reader._records(newer, "b.json:1", 0)
    assert isinstance(next_file, Record) and next_file.version > late.version


@pytest.mark.parametrize(
    ("applicant", "kind", "expected"),
    [
        # an organisation's payload that names its representative too: the tax code
        ({"SoDinhDanh": "079090000001", "MaSoThue": "0300588569"}, "2", "0300588569"),
        ({"SoDinhDanh": "079090000001", "MaSoThue": "0300588569"}, "1", "079090000001"),
        ({"MaSoThue": "0300588569001"}, "2", "0300588569-001"),  # a branch's, no hyphen
        ({"MaSoThue": "0300588569-001"}, "2", "0300588569-001"),
    ],
)
def test_the_applicant_is_the_one_its_kind_names(
    tmp_path: Path, applicant: dict[str, str], kind: str, expected: str
) -> None:
    """The personal id was taken first whatever the kind: an organisation's dossier was
    keyed by its representative, which the contract refuses for an organisation, and the
    dossier went to the dead letters with its documents."""
    payload = PAYLOAD | {"ChuHoSo": {"HoTen": "Công ty An Bình"} | applicant, "LoaiDoiTuong": kind}
    data = json.dumps([payload], ensure_ascii=False).encode()
    (record,) = adapter(tmp_path).parse(tmp_path / "hoso.json", data)
    assert isinstance(record, Record), record
    assert record.data is not None and record.data["applicant_id"] == expected


def test_an_item_longer_than_any_record_refuses_the_document_without_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One value of gigabytes (a document cut and joined wrongly, a field of attachments)
    was held whole, several times over, while it was parsed."""
    monkeypatch.setattr(portal, "MAX_LINE_CHARS", 100_000)
    data = json.dumps([PAYLOAD, PAYLOAD | {"GhiChu": "x" * 300_000}, PAYLOAD]).encode()
    with pytest.raises(UnreadableFile) as refused:
        list(adapter(tmp_path).parse(tmp_path / "hoso.json", data))
    assert refused.value.reason == "not_json"
    assert "an item is longer than 100000 characters" in str(refused.value)


def test_a_document_rewritten_while_its_payloads_are_read_is_read_again_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its bytes are read from disk at each pass: a document cut short by its exporter
    writing it again made the reading fail, and the new, good export went to error/."""
    import os
    import time

    from producers.sdk import Checkpoint

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    document = inbox / "hoso.json"
    payloads = [PAYLOAD | {"MaHoSo": f"000.00.01.H29-250801-{n:04d}"} for n in range(3_000)]
    document.write_text(json.dumps(payloads, ensure_ascii=False, indent=1))
    os.utime(document, (time.time() - 600,) * 2)
    reader = adapter(tmp_path)
    real = reader._all_records
    rewritten: list[bool] = []

    def cut_midway(path: Path, found: Any) -> Any:
        for n, item in enumerate(real(path, found)):
            if n == 10 and not rewritten:
                rewritten.append(True)
                document.write_text(json.dumps(payloads[:5], ensure_ascii=False))  # cut short
            yield item

    monkeypatch.setattr(reader, "_all_records", cut_midway)
    items = list(reader.read({}))
    assert rewritten and document.exists()
    assert not (inbox / "error").exists() and not (inbox / "done").exists()
    assert not [i for i in items if not isinstance(i, Record | Checkpoint)]
    monkeypatch.undo()
    os.utime(document, (time.time() - 600,) * 2)
    for _ in range(2):  # changed since the poll before: settles first
        items = list(reader.read({}))
    assert len([i for i in items if isinstance(i, Record)]) == 5
