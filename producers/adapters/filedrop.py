"""Built-in `filedrop`: CSV or JSON Lines export files dropped into a directory.

`FileDropAdapter` reads a file's lines as records. Its base, `DirectoryAdapter` (in
`producers.adapters.directory`, whose docstring says when a file is complete and what
becomes of it), finds the files, has each read once and moves it to done/ or error/.

A line that cannot be read or mapped (not JSON, nested too deep, a value no rule foresees,
any exception while mapping it) is one dead letter; the rest of the file goes on. A file
that cannot be read as a whole goes to error/ (not UTF-8, a CSV header that lacks a column
it needs, a quote never closed, a JSON Lines file of which no line is JSON).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, field_validator

from producers.adapters.directory import DirectoryAdapter, DirectoryConfig, small_int, unmappable
from producers.adapters.file_reading import (
    MAX_LINE_CHARS,
    OVER_LONG,
    Content,
    UnreadableFile,
    bounded_lines,
    json_lines,
    read_json,
    stream_of,
    text_of,
)
from producers.mapping import FieldMapping, four_digit_year, map_fields, parse_local, soft_deleted
from producers.sdk import Record, SkippableRecord
from schemas.dead_letter import Reason
from schemas.events import Entity, nfc_text

log = logging.getLogger(__name__)
_CSV_LIMIT = threading.Lock()  # `csv.field_size_limit` is the process's, sources are threads
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FRACTION = re.compile(r":[0-9]{2}[.,][0-9]")  # seconds with a fraction: `09:00:00.5`
Row = dict[str, Any] | SkippableRecord  # a line read, or why it could not be


class FileDropConfig(DirectoryConfig, FieldMapping):
    entity: Entity
    key_field: str
    occurred_at_field: str
    occurred_at_format: str | None = None  # e.g. yyyyMMddHHmmss; default ISO 8601
    version_field: str | None = None  # default: occurred_at in microseconds

    @field_validator("occurred_at_format")
    @classmethod
    def _four_digit_year(cls, pattern: str | None) -> str | None:
        return None if pattern is None else four_digit_year("occurred_at_format", pattern)

    # a deletion flag, read as the SQL adapter reads one (`producers.mapping.soft_deleted`)
    deleted_field: str | None = None
    csv_delimiter: str = ","
    format: Literal["auto", "csv", "jsonl"] = "auto"
    # A CSV cell left empty: an explicit null ("asserted empty", as a NULL column), or a
    # field not provided (an export that leaves what it does not know blank): then it
    # never erases another source's value.
    empty_cells: Literal["null", "absent"] = "null"


class FileDropAdapter(DirectoryAdapter):
    """CSV / JSON Lines files in a directory, each once (by checksum), then done/ or error/."""

    key = "key_field"
    Config = FileDropConfig
    options: FileDropConfig

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, FileDropConfig)
        self.entity = config.entity
        self.emits_deletes = config.deleted_field is not None

    def parse(self, path: Path, content: Content) -> Iterator[Record | SkippableRecord]:
        kind = self.options.format
        if kind == "auto":
            kind = "csv" if path.suffix == ".csv" else "jsonl"
        if kind == "csv":
            return self._records(path, self._csv(content), self.options.empty_cells == "absent")
        # A line without one of the mapped keys does not provide that field: read as null,
        # it would erase what other sources gave (a writer that leaves out its nulls).
        return self._records(path, self._jsonl_rows(json_lines(content)), missing_absent=True)

    def _records(
        self,
        path: Path,
        rows: Iterator[tuple[int, Row]],
        blank_absent: bool = False,
        missing_absent: bool = False,
    ) -> Iterator[Record | SkippableRecord]:
        for line, row in rows:
            origin = f"{path.name}:{line}"
            if isinstance(row, SkippableRecord):
                yield SkippableRecord(row.code, row.message, origin, self.entity, raw=row.raw)
                continue
            try:
                record = self._record(row, origin, line)
                provided = blank_absent or missing_absent
                if provided and isinstance(record, Record) and record.data is not None:
                    record = replace(record, data=self._provided(record.data, row, missing_absent))
            except MemoryError:  # not the line's: the run is retried from its checkpoint
                raise
            except Exception as error:  # any surprise of one line stays that line's
                record = unmappable(error, origin, self.entity)
            if isinstance(record, SkippableRecord):
                record = SkippableRecord(
                    record.code, record.message, origin, self.entity, raw=_raw(row)
                )
            yield record

    def _csv(self, content: Content) -> Iterator[tuple[int, Row]]:
        # The module's limit (131,072 characters by default) raised to MAX_LINE_CHARS: at
        # its limit the reader stopped inside a quoted field and took the rest of that
        # field, lines and all, for rows. A field up to it is one record too large to
        # publish (`too_large`), never rows read out of a value; one beyond it refuses the
        # file (`_quotes_closed`), never held whole.
        text = text_of(content)
        with _CSV_LIMIT:  # the module's one limit, only ever raised: sources read side by side
            wanted = min(len(content), MAX_LINE_CHARS) + 1
            if wanted > csv.field_size_limit():
                csv.field_size_limit(wanted)
        delimiter = self.options.csv_delimiter
        _quotes_closed(content, delimiter)
        # strict: a quote followed by more text in a field (`"x"y`) is a bad line, not the
        # value `xy`; a row of more or fewer cells than the header carries `_EXTRA` or
        # `_MISSING`, a bad line too (a cell would otherwise be read as another column's
        # value, or as null: an explicit null erases what other sources gave).
        reader = csv.DictReader(
            _csv_lines(text), delimiter=delimiter, strict=True, restkey=_EXTRA, restval=_MISSING
        )
        try:
            names = reader.fieldnames
        except csv.Error:
            names = None
        if names is None or self.options.key_field not in names:
            raise UnreadableFile("not_csv", "no header row naming the key field")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # the last such column's cell would be read for all of them
            raise UnreadableFile(
                "not_csv", f"the header names a column twice: {self._known(twice)}"
            )
        missing = [column for column in self._required() if column not in names]
        if missing:  # every row would carry null for it, erasing the value others gave
            raise UnreadableFile("not_csv", f"the header lacks mapped columns: {_named(missing)}")
        deleted = self.options.deleted_field
        if deleted is not None and deleted not in names:  # an export of upserts only
            log.warning("%s: no column %s in this file: its rows are live", self.source,
                        deleted[:64])  # fmt: skip
        return self._csv_rows(reader, len(names))

    def _known(self, columns: list[str]) -> str:
        """`_named` of the columns the mapping names; the others (a header whose first line
        is a record's: its values) only counted."""
        opts = self.options
        mapped = {opts.key_field, opts.occurred_at_field, opts.version_field,
                  opts.deleted_field, *opts.fields.values()}  # fmt: skip
        known = [column for column in columns if column in mapped]
        others = len(columns) - len(known)
        if not others:
            return _named(known)
        counted = f"{others} column{'s' if others > 1 else ''} the mapping does not name"
        return f"{_named(known)} and {counted}" if known else counted

    def _required(self) -> list[str]:
        """The columns a CSV header must name: the key, the time and the version; with
        `empty_cells = "null"` every mapped field's too (missing, each row would assert
        null). Under "absent" a column missing is a field not provided, as an empty cell
        is; a missing `deleted_field`, rows that are live."""
        opts = self.options
        named = [opts.key_field, opts.occurred_at_field, opts.version_field]
        columns = [c for c in named if c is not None]
        if opts.empty_cells == "null":
            columns += opts.fields.values()
        return list(dict.fromkeys(columns))

    @staticmethod
    def _csv_rows(reader: csv.DictReader[str], width: int) -> Iterator[tuple[int, Row]]:
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:  # a carriage return in an unquoted field, `"x"y`
                yield line, SkippableRecord(Reason.UNMAPPABLE_RECORD, "line is not valid CSV", "")
                continue
            extra = row.pop(_EXTRA, None)
            if extra is not None and not any(extra):
                extra = None  # empty cells after the last column (a trailing delimiter)
            cells = [k for k, v in row.items() if v is not _MISSING]
            if extra is not None or len(cells) < width:
                count = len(cells) + len(extra or ())
                message = f"line has {count} cells, the header {width}"
                raw = _raw({k: v for k, v in row.items() if v is not _MISSING})
                yield (
                    reader.line_num,
                    SkippableRecord(Reason.UNMAPPABLE_RECORD, message, "", raw=raw),
                )
                continue
            yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}

    @staticmethod
    def _jsonl_rows(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Row]]:
        for number, line in lines:
            try:
                value = read_json(line)
            except ValueError as error:
                raw = line.encode()
                yield number, SkippableRecord("invalid_json", f"line is {error}", "", raw=raw)
                continue
            if not isinstance(value, dict):
                raw = line.encode()
                yield number, SkippableRecord("invalid_json", "line is not an object", "", raw=raw)
                continue
            yield number, value

    def _record(self, row: dict[str, Any], origin: str, line: int = 0) -> Record | SkippableRecord:
        opts = self.options
        key = row.get(opts.key_field)
        written = row.get(opts.occurred_at_field)
        when = self._moment(written)
        if not key or written is None:
            missing = opts.key_field if not key else opts.occurred_at_field
            return SkippableRecord("missing_field", f"{missing}: required", origin, self.entity)
        if when is None:
            expected = opts.occurred_at_format or "ISO 8601"
            message = f"{opts.occurred_at_field}: not a time as {expected}"
            return SkippableRecord("invalid_field", message, origin, self.entity)
        version = _micros(when)
        whole = (
            bool(opts.occurred_at_format)  # its tokens stop at seconds (`dd.MM.yyyy HH:mm:ss`)
            or (isinstance(written, str) and not _FRACTION.search(written))
            or (isinstance(written, int) and not isinstance(written, bool))  # 20240115090000
        )
        if whole and 0 < line < 1_000_000:
            # Written in whole seconds: two changes of one key in the same second would get
            # the same version, which the reconciler orders by event id, not by line; the
            # later line wins instead. (A time written with a fraction, even .000, is taken
            # as it is, docs/adapters.md; past the millionth line the line would reach the
            # next second: not added.)
            version += line
        if opts.version_field:
            given = small_int(row.get(opts.version_field))
            if given is None:
                return SkippableRecord(
                    "invalid_field", f"{opts.version_field}: not an integer", origin, self.entity
                )
            version = given
        try:  # the SQL adapter's reading of a flag: one nobody can read never deletes
            deleted = opts.deleted_field is not None and _file_flag(row.get(opts.deleted_field))
        except ValueError as error:
            rule = str(error).partition(": ")[2]
            message = f"{opts.deleted_field}: {rule}"
            return SkippableRecord("invalid_field", message, origin, self.entity, str(key))
        data = None if deleted else map_fields(row, opts, self.zone)
        return Record(str(key), version, when, data, origin)

    def _provided(
        self, data: dict[str, Any], row: dict[str, Any], missing_only: bool = False
    ) -> dict[str, Any]:
        """`data` without the fields whose cell is empty (`empty_cells = "absent"`), or
        with `missing_only` whose key the row lacks (a JSON line's null stays a null), and
        without a nested object left empty by that."""
        for path, column in self.options.fields.items():
            if (column in row) if missing_only else (row.get(column) is not None):
                continue
            *parents, leaf = path.split(".")
            chain = [data]
            for parent in parents:
                chain.append(chain[-1][parent])
            del chain[-1][leaf]
            for holder, name in zip(reversed(chain[:-1]), reversed(parents), strict=True):
                if holder[name]:
                    break
                del holder[name]
        return data

    def _moment(self, value: Any) -> datetime | None:
        if value is None:
            return None
        pattern = self.options.occurred_at_format
        if pattern:
            parsed = parse_local(str(value), pattern, self.zone)
            return parsed if isinstance(parsed, datetime) else None
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=self.zone)


# A CSV row's cells beyond the header's (`restkey`), and the header's columns it lacks.
_EXTRA = "\x00extra"
_MISSING: Any = object()


def _named(columns: list[str]) -> str:
    """Column names for a message: at most five, each cut to 64 characters."""
    shown = [column[:64] for column in columns[:5]]
    return ", ".join(shown) + (f" and {len(columns) - 5} more" if len(columns) > 5 else "")


def _csv_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """A CSV file's lines for the reader, which cannot take up again after a line passed
    over: the file is refused."""
    for number, line in enumerate(bounded_lines(text), start=1):
        if line is OVER_LONG:
            raise UnreadableFile(
                "not_csv", f"line {number} is longer than {MAX_LINE_CHARS} characters"
            )
        yield line


def _quotes_closed(content: Content, delimiter: str) -> None:
    """`UnreadableFile` when the file ends inside a quoted field: a stray quote took every
    line after it for one value, and the reader returned them as one row, the rest of the
    file lost without a word. Read once, strictly, before any record is handed out (the
    bytes already found UTF-8 by `text_of`)."""
    reader = csv.reader(_csv_lines(stream_of(content)), delimiter=delimiter, strict=True)
    while True:
        try:
            next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if "field larger than field limit" in str(error):  # a stray quote's, most likely
                raise UnreadableFile(
                    "not_csv",
                    f"a field that ends at line {reader.line_num} or before is longer than "
                    f"{MAX_LINE_CHARS} characters (a quote not closed where it should be?)",
                ) from None
            if "unexpected end of data" in str(error):
                raise UnreadableFile(
                    "not_csv",
                    f"a quoted field opened at line {reader.line_num} or before is never "
                    "closed: the file ends inside it",
                ) from None


def _raw(row: dict[str, Any]) -> bytes:
    """The row as the dead letter's value (nothing if it cannot be written as JSON)."""
    try:
        return json.dumps(row, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError):
        return b""


# How exports write SQL's NULL as text, and Vietnamese yes and no: a file's flag only.
_FILE_LIVE = {"null", "\\n", "none", "không", "khong"}
_FILE_DELETED = {"có", "co"}


def _file_flag(value: Any) -> bool:
    """A deletion flag as a file writes it: `soft_deleted`, and NULL written as text
    (`NULL`, `\\N`, `None`) or `không` live, `có` deleted."""
    if isinstance(value, str):
        text = nfc_text(value).strip().lower()
        if text in _FILE_LIVE:
            return False
        if text in _FILE_DELETED:
            return True
    return soft_deleted(value)


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (float timestamps lose the last digits)."""
    return (moment - EPOCH) // timedelta(microseconds=1)
