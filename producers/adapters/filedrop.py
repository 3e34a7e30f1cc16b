"""Built-in `filedrop`: CSV or JSON Lines export files dropped into a directory.

Each file is processed once, identified by its SHA-256 (a file copied in twice is skipped),
oldest first. Once the broker acknowledged its records the file moves to `done/`, or to
`error/` when it could not be read at all; rejected lines are listed (line number, reason
code, message; never the values) in `<file>.rejected.jsonl` next to it, and sent to the
dead-letter topic.

Files stay in `done/` for `done_retention_days` after they were processed (the deployment's
default: `PORTAL_SYNC_DONE_FILES_RETENTION_DAYS`); a run that finds older ones removes them
(with their rejection reports) after its last checkpoint. `error/` is never emptied: those
files wait for someone to look at them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from producers.mapping import FieldMapping, map_fields, parse_local
from producers.metrics import DONE_FILES_REMOVED
from producers.sdk import Adapter, Checkpoint, Item, Record, SkippableRecord, State
from schemas.errors import RecordError
from schemas.events import Entity

log = logging.getLogger(__name__)
KEEP_CHECKSUMS = 50_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DirectoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Path
    done_dir: Path | None = None  # default <directory>/done
    error_dir: Path | None = None  # default <directory>/error
    suffixes: list[str] = Field(default_factory=lambda: [".csv", ".jsonl", ".ndjson"])
    timezone: str = "Asia/Ho_Chi_Minh"
    # Days a processed file stays in done/ (None: for ever).
    done_retention_days: float | None = Field(default=None, ge=0)


class FileDropConfig(DirectoryConfig, FieldMapping):
    entity: Entity
    key_field: str
    occurred_at_field: str
    occurred_at_format: str | None = None  # e.g. yyyyMMddHHmmss; default ISO 8601
    version_field: str | None = None  # default: occurred_at in microseconds
    deleted_field: str | None = None  # a true value (1, true, x, yes) makes a delete
    csv_delimiter: str = ","
    format: Literal["auto", "csv", "jsonl"] = "auto"


class UnreadableFile(RecordError):
    """The file as a whole cannot be read (encoding, header): it goes to error/."""

    def __init__(self, message: str) -> None:
        super().__init__("unreadable_file", message)


class DirectoryAdapter(Adapter):
    """Shared file mechanics: checksums in the state, done/ and error/, rejection reports."""

    cursor = "file SHA-256"
    sorted_output = False
    options: DirectoryConfig

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, DirectoryConfig)
        self.options = config
        self.zone = ZoneInfo(config.timezone)
        self.directory = base_dir / config.directory
        self.done_dir = base_dir / (config.done_dir or config.directory / "done")
        self.error_dir = base_dir / (config.error_dir or config.directory / "error")
        self._rejections: dict[str, list[dict[str, Any]]] = {}
        DONE_FILES_REMOVED.labels(source)  # exported at 0, so increase() sees the first

    def parse(self, path: Path, content: bytes) -> Iterator[Record | SkippableRecord]:
        raise NotImplementedError

    def read(self, state: State) -> Iterator[Item]:
        done: list[str] = list(state.get("files", []))
        for path in self._files():
            content = path.read_bytes()
            checksum = hashlib.sha256(content).hexdigest()
            if checksum in done:
                yield Checkpoint({"files": done}, self._mover(path, self.done_dir))
                continue
            self._rejections[path.name] = []
            target = self.done_dir
            try:
                yield from self.parse(path, content)
            except UnreadableFile as error:
                self.rejected(f"{path.name}:0", "unreadable_file", error.message)
                target = self.error_dir
            done = [*done, checksum][-KEEP_CHECKSUMS:]
            yield Checkpoint({"files": done}, self._mover(path, target))
        expired = self.expired_done_files()
        if expired:  # removed as a checkpoint's clean-up: a check run removes nothing
            yield Checkpoint({"files": done}, lambda: self._remove(expired))

    def expired_done_files(self, now: float | None = None) -> list[Path]:
        """Files of done/ (and their rejection reports) processed more than
        `done_retention_days` before `now`."""
        days = self.options.done_retention_days
        if days is None or not self.done_dir.is_dir():
            return []
        if self.done_dir.resolve() == self.directory.resolve():
            return []  # never the drop directory itself
        horizon = (time.time() if now is None else now) - days * 86_400
        suffixes = tuple(self.options.suffixes)
        return sorted(
            p
            for p in self.done_dir.iterdir()
            if p.is_file()
            and (p.name.endswith(".rejected.jsonl") or p.suffix in suffixes)
            and p.stat().st_mtime < horizon
        )

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        DONE_FILES_REMOVED.labels(self.source).inc(len(paths))
        log.info("%s: removed %d files from done/ past their retention", self.source, len(paths))

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        files = [
            p
            for p in self.directory.iterdir()
            if p.is_file() and p.suffix in self.options.suffixes and ".rejected." not in p.name
        ]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def rejected(self, origin: str, code: str, message: str) -> None:
        name, _, line = origin.rpartition(":")
        entry = {"line": int(line) if line.isdigit() else line, "code": code, "message": message}
        self._rejections.setdefault(name, []).append(entry)

    def _mover(self, path: Path, target: Path) -> Callable[[], None]:
        def move() -> None:
            target.mkdir(parents=True, exist_ok=True)
            rejections = self._rejections.pop(path.name, [])
            if rejections:
                report = target / f"{path.name}.rejected.jsonl"
                report.write_text("".join(json.dumps(r) + "\n" for r in rejections))
            shutil.move(str(path), target / path.name)
            os.utime(target / path.name)  # its retention counts from now, when it was done

        return move


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

    def parse(self, path: Path, content: bytes) -> Iterator[Record | SkippableRecord]:
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UnreadableFile("file is not UTF-8") from None
        kind = self.options.format
        if kind == "auto":
            kind = "csv" if path.suffix == ".csv" else "jsonl"
        rows = self._csv(text) if kind == "csv" else self._jsonl(text)
        for line, row in rows:
            origin = f"{path.name}:{line}"
            if isinstance(row, SkippableRecord):
                yield SkippableRecord(row.code, row.message, origin, self.entity, raw=row.raw)
                continue
            record = self._record(row, origin)
            if isinstance(record, SkippableRecord):
                raw = json.dumps(row, ensure_ascii=False).encode()
                record = SkippableRecord(record.code, record.message, origin, self.entity, raw=raw)
            yield record

    def _csv(self, text: str) -> Iterator[tuple[int, dict[str, Any] | SkippableRecord]]:
        reader = csv.DictReader(io.StringIO(text), delimiter=self.options.csv_delimiter)
        if reader.fieldnames is None or self.options.key_field not in reader.fieldnames:
            raise UnreadableFile("header row missing or without the key field")
        for row in reader:
            yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}

    def _jsonl(self, text: str) -> Iterator[tuple[int, dict[str, Any] | SkippableRecord]]:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                yield (
                    number,
                    SkippableRecord("invalid_json", "line is not JSON", "", raw=line.encode()),
                )
                continue
            if not isinstance(value, dict):
                raw = line.encode()
                yield number, SkippableRecord("invalid_json", "line is not an object", "", raw=raw)
                continue
            yield number, value

    def _record(self, row: dict[str, Any], origin: str) -> Record | SkippableRecord:
        opts = self.options
        key = row.get(opts.key_field)
        when = self._moment(row.get(opts.occurred_at_field))
        if not key or when is None:
            missing = opts.key_field if not key else opts.occurred_at_field
            return SkippableRecord("missing_field", f"{missing}: required", origin, self.entity)
        version = _micros(when)
        if opts.version_field:
            raw_version = str(row.get(opts.version_field) or "")
            if not raw_version.isdigit():
                return SkippableRecord(
                    "invalid_field", f"{opts.version_field}: not an integer", origin, self.entity
                )
            version = int(raw_version)
        deleted = opts.deleted_field is not None and _truthy(row.get(opts.deleted_field))
        data = None if deleted else map_fields(row, opts, self.zone)
        return Record(str(key), version, when, data, origin)

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


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "x", "yes", "y"}


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (float timestamps lose the last digits)."""
    return (moment - EPOCH) // timedelta(microseconds=1)
