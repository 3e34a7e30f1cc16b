"""Built-in `portal`: the JSON one-stop systems send to the National Public Service Portal.

Each file (`*.json`: one payload or a list; `*.jsonl`: one per line) holds dossiers as the
portal integrations send them: MaHoSo, MaTTHC, DonViXuLy, ChuHoSo, LoaiDoiTuong (1 citizen,
2 organisation), NgayTiepNhan, NgayHenTra, NgayTra (yyyyMMddHHmmss, Asia/Ho_Chi_Minh),
TrangThaiHoSo (1-10) and DanhSachGiayToKetQua (result documents). A dossier becomes a
`dossier` event; each result document (MaGiayTo, TenGiayTo, MaLoaiGiayTo, optional
FileSha256) a `document` event owned by the applicant. ChuHoSo is the applicant's
identifier (12-digit personal id or tax code), or an object carrying it as SoDinhDanh or
MaSoThue; a bare name is not carried (the contract has no applicant name).

Version and occurred_at come from the payload, never from the file: NgayCapNhat when the
payload has it, else the latest status time of its history (ThoiDiemXuLy of each step of
QuaTrinhXuLy, or of the payload itself as progress updates send it), plus the payload's
position in the file (in microseconds), so a later payload about the same dossier has the
higher version and an old file sent again is `stale` at the reconciler, never a rollback.
A payload with neither is dead-lettered (`missing_field`), one whose time is not
yyyyMMddHHmmss too (`invalid_field`): a version is never guessed. These times have whole
seconds: two payloads of one dossier with the same time in different files get the same
version (the reconciler keeps the first it applies), so such updates must be a second
apart or in one file, where the later position wins.

A payload that cannot be read or mapped is one dead letter; the rest of the file goes on
(see `directory` for what makes a file unreadable and when a file is complete).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from producers.adapters.directory import DirectoryAdapter, DirectoryConfig, small_int, unmappable
from producers.adapters.file_reading import (
    MAX_LINE_CHARS,
    Content,
    UnreadableFile,
    json_lines,
    read_json,
    stream_of,
    text_of,
)
from producers.mapping import CONTRACT_FORMS, parse_local
from producers.sdk import Record, SkippableRecord
from schemas.identifiers import ISSUER_KEY, PERSONAL_ID, TAX_CODE
from schemas.json_text import UNIQUE_KEYS
from schemas.validation import MAX_DEPTH, too_deep

DATE_FORMAT = "yyyyMMddHHmmss"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
APPLICANT_KIND = {"1": "citizen", "2": "organization"}
DATES = {"received_at": "NgayTiepNhan", "due_at": "NgayHenTra", "finished_at": "NgayTra"}
STAMP = re.compile(r"[0-9]{14}")
UNDATED = "NgayCapNhat: required (or QuaTrinhXuLy[].ThoiDiemXuLy)"


# Payload positions of a file that order payloads of one time (`_records`).
POSITIONS = 1_000_000


class PortalConfig(DirectoryConfig):
    suffixes: list[str] = Field(default_factory=lambda: [".json", ".jsonl"])
    documents: bool = True  # emit the result documents of DanhSachGiayToKetQua
    default_doc_type: str = "KQ_TTHC"


class PortalAdapter(DirectoryAdapter):
    """Portal-integration JSON (MaHoSo, TrangThaiHoSo, …) -> dossier and document events."""

    key = "MaHoSo / MaGiayTo"
    entity = None
    Config = PortalConfig
    options: PortalConfig

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, PortalConfig)

    def parse(self, path: Path, content: Content) -> Iterator[Record | SkippableRecord]:
        return self._all_records(path, self._payloads(path, content))

    def _all_records(
        self, path: Path, payloads: Iterator[tuple[int, Any]]
    ) -> Iterator[Record | SkippableRecord]:
        for index, (line, payload) in enumerate(payloads):
            origin = f"{path.name}:{line}"
            if isinstance(payload, SkippableRecord):
                yield SkippableRecord(payload.code, payload.message, origin, raw=payload.raw)
                continue
            if not isinstance(payload, dict):
                yield SkippableRecord("invalid_json", "line is not a JSON object", origin)
                continue
            try:  # all of a payload's records, or one dead letter for it
                records = list(self._records(payload, origin, index))
            except MemoryError:  # not the payload's: the run is retried from its checkpoint
                raise
            except Exception as error:
                records = [unmappable(error, origin, "dossier")]
            yield from records

    def _payloads(self, path: Path, content: Content) -> Iterator[tuple[int, Any]]:
        """(line or item number, payload or why it cannot be read): checks the file as a
        whole first (UnreadableFile), then reads lazily; in JSON Lines a bad line is one
        rejected line, the rest of the file goes on. A JSON document's list is read an
        item at a time (`_items`), twice: once to check the whole file, then to hand the
        items out. Parsed whole, a list held ten to twenty times the file."""
        if path.suffix == ".jsonl":
            return self._lines(json_lines(content))
        try:
            _read_through(content)
        except RecursionError:
            raise UnreadableFile("not_json", "the file is nested too deeply") from None
        except ItemTooLong as error:
            raise UnreadableFile("not_json", str(error)) from None
        except ValueError:
            raise UnreadableFile("not_json", "the file is not JSON") from None
        items = _items(content, checked=True)
        return ((n, _checked(item)) for n, item in enumerate(items, start=1))

    @staticmethod
    def _lines(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Any]]:
        for number, line in lines:
            try:
                yield number, read_json(line)
            except ValueError as error:
                yield (
                    number,
                    SkippableRecord("invalid_json", f"line is {error}", "", raw=line.encode()),
                )

    def _records(
        self, payload: dict[str, Any], origin: str, index: int
    ) -> Iterator[Record | SkippableRecord]:
        key = str(payload.get("MaHoSo") or "")
        if not key:
            yield SkippableRecord("missing_field", "MaHoSo: required", origin, "dossier")
            return
        updated = self._updated(payload)
        if isinstance(updated, str):
            code = "missing_field" if updated == UNDATED else "invalid_field"
            yield SkippableRecord(code, updated, origin, "dossier")
            return
        # A later payload about the same dossier in the same time wins: its position is
        # added to the version, within the file's first million payloads (past them the
        # position would reach the next second, and rank an older payload above a newer
        # one of the next file). `occurred_at` stays the payload's own time.
        version = (updated - EPOCH) // timedelta(microseconds=1)
        if index < POSITIONS:
            version += index
        moment = updated
        dossier = self._dossier(payload)
        yield Record(key, version, moment, dossier, origin, entity="dossier")
        if not self.options.documents:
            return
        documents = payload.get("DanhSachGiayToKetQua") or []
        if not isinstance(documents, list):
            yield SkippableRecord("invalid_field", "DanhSachGiayToKetQua: not a list", origin)
            return
        for number, doc in enumerate(documents, start=1):
            if not isinstance(doc, dict):
                yield SkippableRecord("invalid_field", "DanhSachGiayToKetQua: not objects", origin)
                continue
            data = self._document(doc, dossier, payload)
            doc_key = _issuer_key(data, str(doc.get("MaGiayTo") or f"{key}:{number}"))
            yield Record(doc_key, version, moment, data, f"{origin}#{number}", entity="document")

    def _updated(self, payload: dict[str, Any]) -> datetime | str:
        """When the dossier last changed according to the payload: NgayCapNhat, else the
        latest status time of its history; else why not (a dead letter's message)."""
        stamp = payload.get("NgayCapNhat")
        if stamp not in (None, ""):
            return self._stamp(stamp) or "NgayCapNhat: not a yyyyMMddHHmmss time"
        steps = payload.get("QuaTrinhXuLy") or []
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            return "QuaTrinhXuLy: not a list of objects"
        times = [step.get("ThoiDiemXuLy") for step in [*steps, payload]]
        times = [t for t in times if t not in (None, "")]
        if not times:
            return UNDATED
        moments = [self._stamp(t) for t in times]
        if None in moments:
            return "QuaTrinhXuLy[].ThoiDiemXuLy: not a yyyyMMddHHmmss time"
        return max(m for m in moments if m is not None)

    def _stamp(self, value: Any) -> datetime | None:
        text = str(value)
        if not STAMP.fullmatch(text):  # ASCII digits only
            return None
        parsed = parse_local(text, DATE_FORMAT, self.zone)
        return parsed if isinstance(parsed, datetime) else None

    def _dossier(self, payload: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if "MaTTHC" in payload:
            data["procedure_code"] = payload["MaTTHC"]
        if "DonViXuLy" in payload:
            data["agency_code"] = payload["DonViXuLy"]
        kind = APPLICANT_KIND.get(str(payload.get("LoaiDoiTuong", "")))
        if kind is not None:
            data["applicant_kind"] = kind
        applicant = _applicant_id(payload.get("ChuHoSo"), kind)
        if applicant is not None:
            data["applicant_id"] = applicant
        if "TrangThaiHoSo" in payload:
            status = payload["TrangThaiHoSo"]  # not ASCII digits: passed on, validation rejects
            number = small_int(status) if isinstance(status, str | int) else None
            data["status"] = status if number is None else number
        for field, name in DATES.items():
            if name in payload:
                data[field] = self._moment(payload[name])
        return data

    def _moment(self, value: Any) -> Any:
        if value in (None, ""):
            return None
        parsed = parse_local(str(value), DATE_FORMAT, self.zone)
        return parsed.isoformat() if isinstance(parsed, datetime) else value

    def _document(
        self, doc: dict[str, Any], dossier: dict[str, Any], payload: dict[str, Any]
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "doc_type": doc.get("MaLoaiGiayTo") or self.options.default_doc_type,
            "status": "valid",
        }
        if doc.get("TenGiayTo"):
            data["title"] = doc["TenGiayTo"]
        if "applicant_id" in dossier and "applicant_kind" in dossier:
            data["owner_kind"] = dossier["applicant_kind"]
            data["owner_id"] = dossier["applicant_id"]
        if "agency_code" in dossier:
            data["issuer_code"] = dossier["agency_code"]
        finished = parse_local(str(payload.get("NgayTra") or ""), DATE_FORMAT, self.zone)
        if isinstance(finished, datetime):
            data["issued_on"] = finished.date().isoformat()
        if doc.get("FileSha256"):
            data["file_sha256"] = str(doc["FileSha256"]).lower()
        return data


DECODER = UNIQUE_KEYS  # a key named twice: ValueError, the file refused as not JSON
SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
NUMBER_GOES_ON = re.compile(r"[0-9eE.+-]*")
LONGEST_TOKEN = len("-Infinity")
CHECK_MARGIN = 50  # frames (`_read_through`)
PIECE = 1 << 18  # characters read at a time


class ItemTooLong(ValueError):
    """An item (or the one value) longer than MAX_LINE_CHARS: never held whole."""


class _Text:
    """A file's text read a piece at a time, for `_items`: `text[pos:]` is what is not
    read yet of what was decoded so far. `checked`: the file was found UTF-8 already."""

    def __init__(self, content: Content, checked: bool = False) -> None:
        # UnreadableFile when the file is not UTF-8
        self.stream = stream_of(content) if checked else text_of(content)
        self.text = ""
        self.pos = 0

    def more(self) -> bool:
        """Read on: at least as much again as is held, so that a value of any size is
        parsed again only a logarithmic number of times. False at the file's end."""
        if len(self.text) - self.pos >= MAX_LINE_CHARS:
            raise ItemTooLong(f"an item is longer than {MAX_LINE_CHARS} characters")
        piece = self.stream.read(max(PIECE, len(self.text) - self.pos))
        if not piece:
            return False
        self.text = self.text[self.pos :] + piece
        self.pos = 0
        return True

    def next_char(self) -> str:
        """The next character that is not whitespace, not consumed ('' at the end)."""
        while True:
            match = SPACE.match(self.text, self.pos)
            assert match is not None  # matches the empty string anywhere
            self.pos = match.end()
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]

    def value(self) -> Any:
        """The JSON value that begins at the next character that is not whitespace, as
        `json.loads` reads it (ValueError when it is none). One that fails, or is followed
        by nothing but what could still be part of a number (`1` of `1e400` at the end of
        what is held), may be cut short: read on and parse it again."""
        self.next_char()
        while True:
            try:
                value, end = DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                if _cut_short(error, len(self.text)) and self.more():
                    continue
                raise
            if NUMBER_GOES_ON.fullmatch(self.text, end) and self.more():
                continue
            self.pos = end
            return value


def _cut_short(error: json.JSONDecodeError, held: int) -> bool:
    """Whether a value failed only because the text held ends within it: at its last
    LONGEST_TOKEN characters (a literal, a number, an escape or the value's remaining
    structure cut short), or in a string that runs to the end. Any other error is one the
    rest of the file cannot mend: reading it all into one string first held four times
    the file."""
    return error.pos >= held - LONGEST_TOKEN or error.msg.startswith("Unterminated string")


def _read_through(content: Content, margin: int = CHECK_MARGIN) -> None:
    """Parse the whole document, `margin` frames deeper in the stack than its items are
    read afterwards: json's C parser counts a value's nesting against the Python stack,
    so a value that only just fitted when checked could fail when read, after the items
    before it had been sent."""
    if margin:
        return _read_through(content, margin - 1)
    for _ in _items(content):
        pass
    return None


def _items(content: Content, checked: bool = False) -> Iterator[Any]:
    """The payloads of a JSON document: the items of its list one at a time, or the one
    value it holds, with `json.loads`'s reading of each (`json.JSONDecoder.raw_decode`;
    ijson's C parser turns a lone surrogate into '?' and refuses integers beyond 64 bits,
    its Python one is fourteen times slower). ValueError when the text is not one JSON
    value, as `json.loads` says (ItemTooLong for one beyond MAX_LINE_CHARS); RecursionError
    when a value nests too deeply for it. `checked`: the file was found UTF-8 already."""
    text = _Text(content, checked)
    if text.next_char() != "[":
        yield text.value()
    else:
        text.pos += 1
        if text.next_char() == "]":
            text.pos += 1
        else:
            while True:
                yield text.value()
                after = text.next_char()
                text.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise ValueError("expected ',' or ']' after an item")
    if text.next_char():
        raise ValueError("extra data after the document")


def _issuer_key(data: dict[str, Any], local: str) -> str:
    """A document's id names its issuer (`000.00.01.H26:…`, as the national registry
    requires): the result's own id, or the dossier code and its number, after the issuing
    agency unless it already begins with it."""
    issuer = data.get("issuer_code")
    if issuer is None or ISSUER_KEY.fullmatch(local):
        return local
    return f"{issuer}:{local}"


def _applicant_id(value: Any, kind: str | None) -> str | None:
    """The applicant's id: of an organisation its tax code (`MaSoThue`), of a citizen the
    personal id (`SoDinhDanh`), whichever the other one is. An organisation's payload
    that names its representative's personal id too was keyed by that person's, which the
    contract refuses for an organisation: the dossier and its documents were dead letters.
    A branch's tax code written without its hyphen is given it (`CONTRACT_FORMS`)."""
    if isinstance(value, dict):
        first, second = (
            ("MaSoThue", "SoDinhDanh") if kind == "organization" else ("SoDinhDanh", "MaSoThue")
        )
        value = value.get(first) or value.get(second)
    if isinstance(value, str):
        text = CONTRACT_FORMS["applicant_id"](value)
        if isinstance(text, str) and (PERSONAL_ID.fullmatch(text) or TAX_CODE.fullmatch(text)):
            return text
    return None


def _checked(item: Any) -> Any:
    """An item of a JSON file, or why it cannot be read."""
    if too_deep(item):
        return SkippableRecord("invalid_json", f"payload is nested deeper than {MAX_DEPTH}", "")
    return item
