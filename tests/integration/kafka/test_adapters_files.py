"""File drop (CSV, JSON Lines) and portal-integration payloads, checked and through the broker."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from producers.conformance import check_adapter
from producers.engine import AdapterRunner
from producers.sdk import Checkpoint, Record
from schemas.dead_letter import read_headers
from schemas.identifiers import PHONE
from tests.support.adapter_helpers import (
    dead_letters,
    deployment,
    published_events,
    read_topic,
    write_config,
)
from tests.support.kafka_helpers import dead_letter_topic, ensure_topics, publisher_for
from tests.support.pipeline_helpers import cli, exported

FILEDROP = """
[[sources]]
id = "dn-exports"
source = "province-48"
adapter = "filedrop"

[sources.connection]
directory = "inbox"

[sources.mapping]
entity = "citizen"
key_field = "SoDinhDanh"
occurred_at_field = "NgayCapNhat"
occurred_at_format = "yyyyMMddHHmmss"
deleted_field = "DaXoa"
fields = { full_name = "HoTen", sex = "GioiTinh", phone = "DienThoai" }
value_maps = { sex = { "Nam" = "male", "Nữ" = "female" } }
"""

CSV = """SoDinhDanh,HoTen,GioiTinh,DienThoai,NgayCapNhat,DaXoa
048090000001,Nguyễn Văn An,Nam,0912345678,20250801080000,0
048190000002,Trần Thị Bình,Nữ,không có,20250801080100,0
,Lê Văn Cường,Nam,,20250801080200,0
048090000001,,,,20250802090000,1
"""

JSONL = (
    json.dumps(
        {"SoDinhDanh": "048190000003", "HoTen": "Phạm Thu Hà", "NgayCapNhat": "20250803100000"},
        ensure_ascii=False,
    )
    + "\n{not json\n"
)

PORTAL = """
[[sources]]
id = "dn-portal"
source = "province-48"
adapter = "portal"

[sources.connection]
directory = "portal-inbox"
"""

PAYLOAD = {
    "MaHoSo": "000.00.01.H17-250801-0001",
    "MaTTHC": "1.005129",
    "TenTTHC": "Cấp bản sao trích lục khai sinh",
    "DonViXuLy": "000.00.01.H17",
    "ChuHoSo": {"HoTen": "Nguyễn Văn An", "SoDinhDanh": "048090000001"},
    "LoaiDoiTuong": "1",
    "NgayTiepNhan": "20250801083000",
    "NgayHenTra": "20250804170000",
    "TrangThaiHoSo": "10",
    "NgayTra": "20250802100000",
    "NgayCapNhat": "20250802100500",
    "DanhSachGiayToKetQua": [
        {
            "MaGiayTo": "000.00.01.H17:KQ-0001",
            "TenGiayTo": "Bản sao trích lục khai sinh",
            "MaLoaiGiayTo": "GIAY_KHAI_SINH",
            "FileSha256": "AB" * 32,
        }
    ],
}


def drop(directory: Path, name: str, content: str | bytes, mtime: float | None = None) -> Path:
    """A file as its writer leaves it, by default a minute ago (complete: older than the
    adapters' settle time)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    mtime = time.time() - 60 if mtime is None else mtime
    os.utime(path, (mtime, mtime))
    return path


def test_file_drop_maps_lines_and_passes_the_checks(tmp_path: Path) -> None:
    drop(tmp_path / "inbox", "a.csv", CSV, mtime=1_000)
    drop(tmp_path / "inbox", "b.jsonl", JSONL, mtime=2_000)
    deploy = deployment(tmp_path, FILEDROP)
    report = check_adapter(deploy.adapter(deploy.sources[0]), "dn-exports", "filedrop")
    by_name = {r.name: r for r in report.results}
    # the CSV's invalid phone breaks the contract; everything else conforms
    assert not by_name["events validate"].passed
    assert by_name["events validate"].examples == [
        "a.csv:3 048*******02: invalid_field: data.phone: String should match pattern "
        f"'{PHONE.pattern}'"
    ]
    for name in ("keys present", "versions rise per key", "cursor resumes", "deletes seen"):
        assert by_name[name].passed, by_name[name]
    emitted = report.first.emitted
    assert [(e.origin, e.op) for e in emitted] == [
        ("a.csv:2", "upsert"),
        ("a.csv:3", "upsert"),
        ("a.csv:5", "delete"),
        ("b.jsonl:1", "upsert"),
    ]
    assert report.first.skipped == 2  # the line without a key, the line that is not JSON
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["a.csv", "b.jsonl"]


def test_portal_payloads_become_dossier_and_document_events(tmp_path: Path) -> None:
    drop(tmp_path / "portal-inbox", "hoso.json", json.dumps([PAYLOAD], ensure_ascii=False))
    deploy = deployment(tmp_path, PORTAL)
    adapter = deploy.adapter(deploy.sources[0])
    events = [i.event("province-48", None) for i in adapter.read({}) if isinstance(i, Record)]
    dossier, document = events
    assert dossier["entity"] == "dossier" and dossier["key"] == PAYLOAD["MaHoSo"]
    assert dossier["data"] == {
        "procedure_code": "1.005129",
        "agency_code": "000.00.01.H17",
        "applicant_kind": "citizen",
        "applicant_id": "048090000001",
        "status": 10,
        "received_at": "2025-08-01T08:30:00+07:00",
        "due_at": "2025-08-04T17:00:00+07:00",
        "finished_at": "2025-08-02T10:00:00+07:00",
    }
    assert dossier["occurred_at"] == "2025-08-02T10:05:00+07:00"
    assert document["entity"] == "document" and document["key"] == "000.00.01.H17:KQ-0001"
    assert document["data"] == {
        "doc_type": "GIAY_KHAI_SINH",
        "status": "valid",
        "title": "Bản sao trích lục khai sinh",
        "owner_kind": "citizen",
        "owner_id": "048090000001",
        "issuer_code": "000.00.01.H17",
        "issued_on": "2025-08-02",
        "file_sha256": "ab" * 32,
    }
    report = check_adapter(deploy.adapter(deploy.sources[0]), "dn-portal", "portal")
    assert report.passed, [(r.name, r.detail, r.examples) for r in report.results]


def test_a_portal_document_id_names_its_issuer(tmp_path: Path) -> None:
    """The national registry refuses bare document ids (`key_names_issuer`): an id that
    does not begin with an agency code gets the issuing agency's, and a result without
    one is the dossier code and its number after it."""
    bare = {**PAYLOAD["DanhSachGiayToKetQua"][0], "MaGiayTo": "KQ-0001"}  # type: ignore[index]
    unnamed = {k: v for k, v in bare.items() if k != "MaGiayTo"}
    payload = {**PAYLOAD, "DanhSachGiayToKetQua": [bare, unnamed]}
    drop(tmp_path / "portal-inbox", "hoso.json", json.dumps([payload], ensure_ascii=False))
    deploy = deployment(tmp_path, PORTAL)
    adapter = deploy.adapter(deploy.sources[0])
    records = [i for i in adapter.read({}) if isinstance(i, Record)]
    assert [r.key for r in records if r.entity == "document"] == [
        "000.00.01.H17:KQ-0001",
        "000.00.01.H17:000.00.01.H17-250801-0001:2",
    ]


ACCEPTED = [{"TrangThai": "2", "ThoiDiemXuLy": "20250801083000"}]
PROCESSING = [*ACCEPTED, {"TrangThai": "4", "ThoiDiemXuLy": "20250801090000"}]
RETURNED = [*PROCESSING, {"TrangThai": "10", "ThoiDiemXuLy": "20250802100000"}]


def test_without_ngaycapnhat_the_version_is_the_latest_status_time_never_the_mtime(
    tmp_path: Path,
) -> None:
    from producers.sdk import SkippableRecord

    accepted = {k: v for k, v in PAYLOAD.items() if k not in ("NgayCapNhat", "NgayTra")}
    accepted |= {"TrangThaiHoSo": "2", "DanhSachGiayToKetQua": [], "QuaTrinhXuLy": ACCEPTED}
    returned = PAYLOAD | {"NgayCapNhat": None, "QuaTrinhXuLy": RETURNED}
    progress = {"MaHoSo": "000.00.01.H17-250801-0003", "TrangThaiHoSo": "4",
                "ThoiDiemXuLy": "20250801090000"}  # fmt: skip  # a progress update, flat
    undated = {"MaHoSo": "000.00.01.H17-250801-0004", "TrangThaiHoSo": "4"}
    inbox = tmp_path / "portal-inbox"
    drop(inbox, "1.json", json.dumps(accepted), mtime=1_754_000_000)
    drop(inbox, "2.jsonl", json.dumps(returned) + "\n", mtime=1_700_000_000)  # older mtime
    drop(inbox, "3.json", json.dumps([progress, undated]), mtime=1_754_000_200)
    deploy = deployment(tmp_path, PORTAL)
    items = list(deploy.adapter(deploy.sources[0]).read({}))
    events = [i.event("province-48", None) for i in items if isinstance(i, Record)]
    dossiers = [e for e in events if e["entity"] == "dossier"]
    assert [(d["data"]["status"], d["occurred_at"]) for d in dossiers] == [
        (10, "2025-08-02T10:00:00+07:00"),
        (2, "2025-08-01T08:30:00+07:00"),
        (4, "2025-08-01T09:00:00+07:00"),
    ]
    returned_version, accepted_version, _ = (d["version"] for d in dossiers)
    assert returned_version - accepted_version == (25 * 3600 + 1800) * 10**6
    skipped = [(i.code, i.origin, i.message) for i in items if isinstance(i, SkippableRecord)]
    assert skipped == [
        ("missing_field", "3.json:2", "NgayCapNhat: required (or QuaTrinhXuLy[].ThoiDiemXuLy)")
    ]


@pytest.mark.kafka
def test_each_file_once_then_done_or_error_with_a_report(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "inbox"
    drop(inbox, "a.csv", CSV, mtime=1_000)
    drop(inbox, "broken.csv", b"SoDinhDanh,HoTen\n\xff\xfe\n", mtime=1_500)
    drop(inbox, "b.jsonl", JSONL, mtime=2_000)
    config = write_config(tmp_path, FILEDROP + PORTAL)
    drop(tmp_path / "portal-inbox", "hoso.json", json.dumps(PAYLOAD))

    result = cli(settings, "produce", "--config", str(config), "--once")
    assert result.returncode == 0, result.stderr
    assert "dn-exports: published 3, dead-lettered 4" in result.stderr  # broken.csv: one
    assert "dn-portal: published 2, dead-lettered 0" in result.stderr
    done, error = tmp_path / "inbox" / "done", tmp_path / "inbox" / "error"
    assert sorted(p.name for p in done.iterdir()) == [
        "a.csv",
        "a.csv.rejected.jsonl",
        "b.jsonl",
        "b.jsonl.rejected.jsonl",
    ]
    assert sorted(p.name for p in error.iterdir()) == ["broken.csv", "broken.csv.rejected.jsonl"]
    report = [json.loads(line) for line in (done / "a.csv.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in report] == [(3, "invalid_field"), (4, "missing_field")]
    assert "không có" not in (done / "a.csv.rejected.jsonl").read_text()
    assert list(inbox.glob("*.*")) == []
    assert len(published_events(settings, "citizen")) == 3
    assert len(published_events(settings, "dossier")) == 1
    assert len(published_events(settings, "document")) == 1
    assert sorted(d["ps.reason.code"] for d in dead_letters(settings)) == [
        "invalid_field",
        "invalid_json",
        "missing_field",
        "unreadable_file",
    ]

    # The same export dropped again is recognised by its checksum and not re-sent.
    drop(inbox, "a-copy.csv", CSV)
    again = cli(settings, "produce", "--config", str(config), "--once")
    assert "dn-exports: published 0, dead-lettered 0" in again.stderr
    assert (done / "a-copy.csv").exists()


def test_a_bad_line_of_a_portal_jsonl_file_is_rejected_alone(tmp_path: Path) -> None:
    from producers.sdk import SkippableRecord

    second = PAYLOAD | {"MaHoSo": "000.00.01.H17-250801-0002", "DanhSachGiayToKetQua": []}
    lines = [json.dumps(PAYLOAD), "{not json", json.dumps(second)]
    drop(tmp_path / "portal-inbox", "feed.jsonl", "\n".join(lines) + "\n")
    deploy = deployment(tmp_path, PORTAL)
    items = list(deploy.adapter(deploy.sources[0]).read({}))

    records = [i for i in items if isinstance(i, Record)]
    skipped = [i for i in items if isinstance(i, SkippableRecord)]
    assert [r.key for r in records if r.entity == "dossier"] == [
        PAYLOAD["MaHoSo"],
        second["MaHoSo"],
    ]
    assert [(s.code, s.origin) for s in skipped] == [("invalid_json", "feed.jsonl:2")]


@pytest.mark.kafka
def test_produce_removes_done_files_past_their_retention(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "inbox"
    drop(inbox, "a.csv", CSV)
    drop(inbox / "done", "old.csv", CSV, mtime=time.time() - 8 * 86_400)
    drop(inbox / "done", "last-week.csv", CSV, mtime=time.time() - 6 * 86_400)
    config = write_config(tmp_path, FILEDROP)

    result = cli(settings, "produce", "--config", str(config), "--once",
                 PORTAL_SYNC_DONE_FILES_RETENTION_DAYS="7")  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        "a.csv",
        "a.csv.rejected.jsonl",
        "last-week.csv",
    ]


# -- files that never block ---------------------------------------------------------------------

CITIZEN_LINE = '{{"SoDinhDanh": "{pid}", "HoTen": "{name}", "NgayCapNhat": "20250803100000"}}'
# JSON nested deeper than any parser's stack: json.loads raises RecursionError on it
DEEP = '{"SoDinhDanh": "048190000009", "HoTen": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _line(pid: str, name: str) -> str:
    return CITIZEN_LINE.format(pid=pid, name=name)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@pytest.mark.kafka
def test_a_line_that_cannot_be_mapped_is_one_dead_letter_and_the_files_go_on(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox, portal_inbox = tmp_path / "inbox", tmp_path / "portal-inbox"
    huge = '{"HoTen": "' + "x" * 3_000_000  # 3 MB, not JSON: bigger than a producer request
    long_key = _line("0" * 2_200_000, "Đỗ Văn Khoá")  # a key alone over a producer request
    lines = [_line("048190000003", "Phạm Thu Hà"), DEEP, _line("048190000004", "Lê Thị Dung"),
             huge, long_key]  # fmt: skip
    drop(inbox, "deep.jsonl", "\n".join(lines) + "\n", mtime=1_000)
    drop(inbox, "later.jsonl", _line("048190000005", "Võ Văn Em") + "\n", mtime=2_000)
    odd = PAYLOAD | {"MaHoSo": "000.00.01.H17-250801-0002", "TrangThaiHoSo": "²"}
    payloads = [json.dumps(odd | {"DanhSachGiayToKetQua": []}), json.dumps(PAYLOAD)]
    drop(portal_inbox, "feed.jsonl", "\n".join(payloads) + "\n", mtime=1_000)
    config = write_config(tmp_path, FILEDROP + PORTAL)

    result = cli(settings, "produce", "--config", str(config), "--once")

    assert result.returncode == 0, result.stderr
    assert "dn-exports: published 3, dead-lettered 3" in result.stderr
    assert "dn-portal: published 2, dead-lettered 1" in result.stderr
    assert _names(inbox / "done") == ["deep.jsonl", "deep.jsonl.rejected.jsonl", "later.jsonl"]
    assert _names(portal_inbox / "done") == ["feed.jsonl", "feed.jsonl.rejected.jsonl"]
    sent = dead_letters(settings)
    letters = {d["ps.origin.offset"]: d for d in sent}
    assert len(sent) == len(letters)  # each line once
    assert set(letters) == {"deep.jsonl:2", "deep.jsonl:4", "deep.jsonl:5", "feed.jsonl:1"}
    assert letters["deep.jsonl:2"]["ps.reason.code"] == "invalid_json"
    assert letters["deep.jsonl:2"]["ps.reason.message"] == "line is nested too deeply"
    assert letters["deep.jsonl:4"]["ps.reason.code"] == "invalid_json"  # 3 MB, not JSON
    assert letters["deep.jsonl:5"]["ps.reason.code"] == "too_large"  # a key of 2.2 MB
    records = {read_headers(r.headers)["ps.origin.offset"]: r
               for r in read_topic(settings, dead_letter_topic(settings))}  # fmt: skip
    values = {origin: r.value for origin, r in records.items()}
    assert records["deep.jsonl:5"].key is None  # no message key of megabytes
    # fitted as the worker's letters are: the key and the value named by digest and size
    assert int(letters["deep.jsonl:5"]["ps.key.size"]) > 2_200_000
    assert len(letters["deep.jsonl:5"]["ps.key.sha256"]) == 64
    assert json.loads(values["deep.jsonl:5"])["value_omitted"] == "too_large"
    assert json.loads(values["deep.jsonl:4"]) == {
        "origin": "deep.jsonl:4",
        "value_omitted": "too_large",
        "size": len(huge),
        "sha256": hashlib.sha256(huge.encode()).hexdigest(),
    }
    assert letters["deep.jsonl:4"]["ps.value.sha256"] == hashlib.sha256(huge.encode()).hexdigest()
    assert letters["feed.jsonl:1"]["ps.reason.code"] == "invalid_field"
    assert letters["feed.jsonl:1"]["ps.reason.message"].startswith("data.status")
    headers = json.dumps(list(letters.values()), ensure_ascii=False)
    assert "²" not in headers and "048190000009" not in headers
    report = (portal_inbox / "done" / "feed.jsonl.rejected.jsonl").read_text()
    assert "²" not in report


def test_any_exception_while_mapping_a_line_is_one_skipped_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers.sdk import SkippableRecord

    def mapping_bug(row: dict[str, Any], *_: Any) -> dict[str, Any]:
        if row.get("HoTen") == "Trần Thị Bình":
            raise KeyError(row["SoDinhDanh"])  # an exception whose text is a personal id
        return {"full_name": row["HoTen"]}

    monkeypatch.setattr("producers.adapters.filedrop.map_fields", mapping_bug)
    drop(tmp_path / "inbox", "a.csv", CSV, mtime=1_000)
    deploy = deployment(tmp_path, FILEDROP)
    items = list(deploy.adapter(deploy.sources[0]).read({}))

    assert [i.origin for i in items if isinstance(i, Record)] == ["a.csv:2", "a.csv:5"]
    skipped = [i for i in items if isinstance(i, SkippableRecord)]
    assert [(s.code, s.origin) for s in skipped] == [
        ("unmappable_record", "a.csv:3"),
        ("missing_field", "a.csv:4"),
    ]
    assert skipped[0].message == "the record could not be mapped (KeyError)"


@pytest.fixture
def file_publisher(settings_for: Any, sqlite_store_url: str) -> Iterator[Any]:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    publisher = publisher_for(settings)
    yield settings, publisher
    publisher.close()


def _source_errors(kind: str) -> float:
    labels = {"source": "province-48", "kind": kind}
    return REGISTRY.get_sample_value("portal_sync_source_errors_total", labels) or 0.0


@pytest.mark.kafka
def test_an_unreadable_file_is_counted_logged_dead_lettered_and_moved_to_error(
    tmp_path: Path,
    file_publisher: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, publisher = file_publisher
    inbox, portal_inbox = tmp_path / "inbox", tmp_path / "portal-inbox"
    drop(inbox, "utf16.csv", CSV.encode("utf-16"), mtime=1_000)  # not UTF-8
    drop(inbox, "no-header.csv", "048090000001;Nguyễn Văn An\n", mtime=1_100)
    drop(inbox, "notes.jsonl", "HoTen: Nguyễn Văn An\nSoDinhDanh: 048090000001\n", 1_200)
    locked = drop(inbox, "locked.csv", CSV, mtime=1_300)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: what the producer's own user would get
        from producers.adapters import directory

        real = directory._open

        def open_file(path: Path) -> int:
            if path.name == "locked.csv":
                raise PermissionError(13, "Permission denied")
            return real(path)

        monkeypatch.setattr(directory, "_open", open_file)
    drop(inbox, "zz-good.jsonl", _line("048190000003", "Phạm Thu Hà") + "\n", mtime=2_000)
    drop(portal_inbox, "hoso.json", json.dumps(PAYLOAD)[:80], mtime=1_000)  # cut short
    deploy = deployment(tmp_path, FILEDROP + PORTAL)
    before = _source_errors("unreadable_file")
    caplog.set_level(logging.INFO)

    for entry in deploy.sources:
        runner = AdapterRunner(entry.id, deploy.adapter(entry), publisher, tmp_path / "state")
        runner.run_once()

    assert _source_errors("unreadable_file") - before == 5
    assert _names(inbox / "done") == ["zz-good.jsonl"]
    assert _names(inbox / "error") == sorted(
        f"{name}{suffix}"
        for name in ("utf16.csv", "no-header.csv", "notes.jsonl", "locked.csv")
        for suffix in ("", ".rejected.jsonl")
    )
    assert _names(portal_inbox / "error") == ["hoso.json", "hoso.json.rejected.jsonl"]
    letters = read_topic(settings, dead_letter_topic(settings))
    found = {}
    for letter in letters:
        headers = read_headers(letter.headers)
        assert headers["ps.reason.code"] == "unreadable_file"
        assert headers["ps.origin.topic"] == "source:province-48"
        found[headers["ps.origin.offset"]] = (headers["ps.origin.partition"], headers)
        assert json.loads(letter.value)["file"] == headers["ps.origin.offset"]
    assert {name: partition for name, (partition, _) in found.items()} == {
        "utf16.csv": "dn-exports",
        "no-header.csv": "dn-exports",
        "notes.jsonl": "dn-exports",
        "locked.csv": "dn-exports",
        "hoso.json": "dn-portal",
    }
    reasons = {name: h["ps.reason.message"].split(":")[0] for name, (_, h) in found.items()}
    assert reasons == {
        "utf16.csv": "not_utf8",
        "no-header.csv": "not_csv",
        "notes.jsonl": "not_json",
        "locked.csv": "permission_denied",
        "hoso.json": "not_json",
    }
    logged = caplog.text + json.dumps([h for _, h in found.values()], ensure_ascii=False)
    for name, reason in reasons.items():
        assert f"{name} is unreadable ({reason})" in caplog.text
    assert "Nguyễn" not in logged and "048090000001" not in logged and "H17" not in logged


def _read(adapter: Any) -> list[str]:
    """One poll, its clean-ups run as after the broker's acknowledgement: origins read."""
    origins = []
    for item in adapter.read({}):
        if isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()
        elif isinstance(item, Record):
            origins.append(item.origin)
    return origins


def test_a_file_still_being_written_is_left_for_the_next_poll(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    header, *rows = CSV.splitlines(keepends=True)
    settle = FILEDROP.replace("[sources.mapping]", "settle_seconds = 5\n\n[sources.mapping]")
    deploy = deployment(tmp_path, settle)
    adapter = deploy.adapter(deploy.sources[0])
    now = time.time()
    drop(inbox, ".a.csv", CSV, mtime=now - 600)  # a temporary name, renamed when complete
    drop(inbox, "b.csv", header + rows[0], mtime=now - 1)  # written a second ago

    assert _read(adapter) == []  # b.csv is younger than the settle time

    with (inbox / "b.csv").open("a", encoding="utf-8") as handle:
        handle.write(rows[1])  # the writer goes on after a pause longer than the settle time
    os.utime(inbox / "b.csv", (now - 10, now - 10))
    assert _read(adapter) == []  # old enough, but it changed since the last poll

    assert _read(adapter) == ["b.csv:2", "b.csv:3"]  # unchanged since the last poll: complete
    (inbox / ".a.csv").rename(inbox / "a.csv")  # the atomic rename into the folder
    assert _read(adapter) == ["a.csv:2", "a.csv:3", "a.csv:5"]
    assert _names(inbox) == ["done"]


@pytest.mark.kafka
def test_with_a_complete_marker_a_file_is_read_once_its_marker_is_there(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "inbox"
    marked = FILEDROP.replace("[sources.mapping]", 'complete_marker = ".done"\n\n[sources.mapping]')
    config = write_config(tmp_path, marked)
    drop(inbox, "a.csv", CSV, mtime=1_000)  # old, but its writer has not said it is complete

    first = cli(settings, "produce", "--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    assert "dn-exports: published 0, dead-lettered 0" in first.stderr
    assert _names(inbox) == ["a.csv"]

    drop(inbox, "a.csv.done", "")  # the writer's marker: a.csv is complete
    second = cli(settings, "produce", "--config", str(config), "--once")
    assert second.returncode == 0, second.stderr
    assert "dn-exports: published 2, dead-lettered 2" in second.stderr
    assert _names(inbox) == ["done"]  # the marker is removed with the file
    assert _names(inbox / "done") == ["a.csv", "a.csv.rejected.jsonl"]


@pytest.mark.kafka
def test_an_old_portal_file_sent_again_is_stale_not_a_rollback(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "portal-inbox"
    config = write_config(tmp_path, PORTAL)
    base = {k: v for k, v in PAYLOAD.items() if k not in ("NgayCapNhat", "NgayTra")}
    base |= {"DanhSachGiayToKetQua": []}
    returned = base | {"TrangThaiHoSo": "10", "NgayTra": "20250802100000", "QuaTrinhXuLy": RETURNED}
    processing = base | {"TrangThaiHoSo": "4", "QuaTrinhXuLy": PROCESSING}
    other = "000.00.01.H17-250801-0009"  # the same story told with NgayCapNhat
    drop(inbox, "a.json", json.dumps([returned, base | {"MaHoSo": other, "TrangThaiHoSo": "9",
         "NgayCapNhat": "20250802090000"}]), mtime=time.time() - 7200)  # fmt: skip
    assert cli(settings, "produce", "--config", str(config), "--once").returncode == 0
    # file B: an old export sent again, written (copied) after A
    drop(inbox, "b.json", json.dumps([processing, base | {"MaHoSo": other, "TrangThaiHoSo": "4",
         "NgayCapNhat": "20250801090000"}]), mtime=time.time() - 60)  # fmt: skip
    again = cli(settings, "produce", "--config", str(config), "--once")
    assert again.returncode == 0 and "dn-portal: published 2" in again.stderr, again.stderr

    worker = cli(settings, "worker", "--until-caught-up")
    assert worker.returncode == 0, worker.stdout + worker.stderr

    statuses = {
        r["key"]: r["data"]["status"] for r in exported(settings) if r["entity"] == "dossier"
    }
    assert statuses == {PAYLOAD["MaHoSo"]: 10, other: 9}


def test_a_run_stopped_inside_a_file_goes_on_after_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A province's first snapshot is one export of ten million lines: a run stopped
    inside it (a rollout, a crash, the broker away) began the file again. The next run
    goes on after the last checkpoint reached, and the report says it resumed; a report
    lists its first rejections and counts the rest."""
    import producers.adapters.directory as module
    from producers.sdk import SkippableRecord

    monkeypatch.setattr(module, "FILE_CHECKPOINT_RECORDS", 1_000)
    monkeypatch.setattr(module, "REPORT_LIMIT", 100)
    header = "SoDinhDanh,HoTen,GioiTinh,DienThoai,NgayCapNhat,DaXoa\n"
    keyless = ",Lê Văn Cường,Nam,,20250801080000,0"  # a tenth of the lines: missing_field
    lines = [f"0480900{n:05d},Nguyễn Văn An,Nam,,20250801080000,0" for n in range(2_500)]
    lines = [line if n % 10 else keyless for n, line in enumerate(lines)]
    drop(tmp_path / "inbox", "snapshot.csv", header + "\n".join(lines) + "\n")
    deploy = deployment(tmp_path, FILEDROP)
    first = deploy.adapter(deploy.sources[0])
    sent, saved = 0, None
    checkpoints = 0
    for item in first.read({}):
        if isinstance(item, Checkpoint):
            checkpoints += 1
            if checkpoints == 2:
                saved = item.value()
                break  # stopped: the engine saved the last checkpoint reached
            continue
        if isinstance(item, SkippableRecord):
            first.rejected(item.origin, item.code, item.message)
        sent += 1
    assert sent == 2_000 and saved is not None
    assert saved["files"] == [] and list(saved["partial"].values()) == [2_001]  # its line

    # Another file, copied in with an older time, is read (and its checkpoint saved at
    # once) before the snapshot: the snapshot's place is kept in its state all the same.
    drop(tmp_path / "inbox", "older.csv", header + lines[-1] + "\n", mtime=1_000)
    second = deploy.adapter(deploy.sources[0])
    items = list(second.read(saved))
    older = next(i for i in items if isinstance(i, Checkpoint))
    assert older.value()["partial"] == saved["partial"] and older.commit is not None
    items = [i for i in items if not (isinstance(i, Record | SkippableRecord)
                                      and i.origin.startswith("older"))]  # fmt: skip
    records = [i for i in items if isinstance(i, Record)]
    skipped = [i for i in items if isinstance(i, SkippableRecord)]
    assert len(records) + len(skipped) == 500  # the rest, none again
    assert records[0].origin == "snapshot.csv:2003"
    for item in skipped:
        second.rejected(item.origin, item.code, item.message)
    final = [i for i in items if isinstance(i, Checkpoint)][-1]
    assert "partial" not in final.value() and len(final.value()["files"]) == 2
    assert final.commit is not None
    final.commit()  # moved to done/, with its report
    report = (tmp_path / "inbox" / "done" / "snapshot.csv.rejected.jsonl").read_text()
    entries = [json.loads(line) for line in report.splitlines()]
    assert entries[0]["code"] == "resumed" and "2001" in entries[0]["message"]
    assert [e["code"] for e in entries[1:]] == ["missing_field"] * 50

    # A report lists REPORT_LIMIT rejections, then counts the others.
    lines = [keyless] * 250
    drop(tmp_path / "inbox", "wrong.csv", header + "\n".join(lines) + "\n")
    third = deploy.adapter(deploy.sources[0])
    items = list(third.read(final.value()))
    for item in items:
        if isinstance(item, SkippableRecord):
            third.rejected(item.origin, item.code, item.message)
    moves = [i for i in items if isinstance(i, Checkpoint) and i.commit is not None]
    moves[-1].commit()
    report = (tmp_path / "inbox" / "done" / "wrong.csv.rejected.jsonl").read_text()
    entries = [json.loads(line) for line in report.splitlines()]
    assert len(entries) == 101 and entries[-1]["code"] == "more"
    assert entries[-1]["message"].startswith("150 more rejections")


@pytest.mark.parametrize("once", [False, True])
def test_a_sources_long_run_does_not_hold_up_another_of_its_province(
    tmp_path: Path,
    settings_for: Any,
    sqlite_store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    once: bool,
) -> None:
    """A province's first snapshot is one run of an hour; its other sources (the same
    contract source id) ran in the same thread, after it, and went stale meanwhile."""
    import threading

    from producers.adapters.filedrop import FileDropAdapter
    from producers.produce import ProduceResult, produce

    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    release = threading.Event()
    read = FileDropAdapter.read

    def snapshot_that_takes_its_time(self: FileDropAdapter, state: Any) -> Iterator[Any]:
        if self.directory.name == "snapshot":
            release.wait(60)  # an hour's snapshot, held until the test has seen enough
        yield from read(self, state)

    monkeypatch.setattr(FileDropAdapter, "read", snapshot_that_takes_its_time)
    second = FILEDROP.replace('id = "dn-exports"', 'id = "dn-snapshot"').replace(
        'directory = "inbox"', 'directory = "snapshot"'
    )
    deploy = deployment(tmp_path, second + FILEDROP)  # the snapshot first, as listed
    drop(tmp_path / "snapshot", "all.csv", CSV)
    drop(tmp_path / "inbox", "today.csv", CSV)
    stop, result = threading.Event(), ProduceResult()
    runner = threading.Thread(
        target=produce,
        args=(deploy, settings.connection(), settings.topics()),
        kwargs={"stop": stop, "result": result, "once": once},
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (tmp_path / "inbox/done/today.csv").exists():
            time.sleep(0.1)
        assert (tmp_path / "inbox/done/today.csv").exists()  # while the snapshot still runs
        assert not (tmp_path / "snapshot/done/all.csv").exists()
    finally:
        release.set()
        stop.set()
        runner.join(60)
    assert result.stats["dn-exports"].published == 2  # and two lines dead-lettered


def test_a_resumed_file_skips_whole_lines_whatever_records_a_line_gives_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A portal line gives a dossier and its documents. Counted in records, a resume
    after `documents = false` was set skipped lines never sent; by line, it skips none."""
    import producers.adapters.directory as module
    from producers.sdk import SkippableRecord

    monkeypatch.setattr(module, "FILE_CHECKPOINT_RECORDS", 3)
    payloads = [{**PAYLOAD, "MaHoSo": f"000.00.01.H17-250801-{n:04d}"} for n in range(1, 21)]
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in payloads)
    drop(tmp_path / "portal-inbox", "hoso.jsonl", text)
    first = deployment(tmp_path, PORTAL).adapter(deployment(tmp_path, PORTAL).sources[0])
    sent: list[str] = []
    saved = None
    for item in first.read({}):
        if isinstance(item, Checkpoint):
            saved = item.value()
            if len(sent) >= 10:
                break  # stopped after a checkpoint
            continue
        assert isinstance(item, Record | SkippableRecord)
        sent.append(item.origin)
    assert saved is not None

    def line_of(origin: str) -> int:
        return int(origin.rpartition(":")[2].partition("#")[0])  # `hoso.jsonl:6#1`: line 6

    (line,) = saved["partial"].values()
    assert [line_of(o) for o in sent].count(line) == 2  # a checkpoint never inside a line
    assert max(line_of(o) for o in sent) == line
    without = PORTAL + "\n[sources.mapping]\ndocuments = false\n"
    second = deployment(tmp_path, without).adapter(deployment(tmp_path, without).sources[0])
    again = [line_of(i.origin) for i in second.read(saved) if isinstance(i, Record)]
    assert again == list(range(line + 1, 21))  # every line not read whole, none again


def test_the_place_of_a_file_no_longer_there_is_forgotten(tmp_path: Path) -> None:
    """A file read in part, then taken away or exported again with other bytes: its place
    stayed in every later state, and the same bytes dropped months later lost their
    first lines."""
    drop(tmp_path / "inbox", "a.csv", CSV)
    deploy = deployment(tmp_path, FILEDROP)
    adapter = deploy.adapter(deploy.sources[0])
    state = {"files": [], "partial": {"0" * 64: 3}}
    checkpoints = [i for i in adapter.read(state) if isinstance(i, Checkpoint)]
    assert "partial" not in checkpoints[-1].value()
