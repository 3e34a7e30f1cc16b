"""Built-in `filedrop`: CSV or JSON Lines export files dropped into a directory.

Each file is processed once, identified by its SHA-256 (a file copied in twice is skipped),
oldest first, and only once it is complete: with `complete_marker` (e.g. ".done") once
`<name>.done` exists next to it; otherwise once it is `settle_seconds` old and has not
changed (size, modification time) since the previous poll. Names starting with a dot are
never read, so a writer can write `.name.csv` and rename it: a rename is atomic.

A file never blocks the ones after it. A line that cannot be read or mapped (not JSON,
nested too deep, a value no rule foresees, any exception while mapping it) is one dead
letter; the rest of the file goes on. A file that cannot be read at all (permissions, not
UTF-8, not CSV or JSON) is counted (`portal_sync_source_errors_total{kind="unreadable_file"}`),
dead-lettered once (`unreadable_file`, origin: the file's name), logged by name and reason,
and moved to `error/`. Once the broker acknowledged its records the file moves to `done/`;
rejected lines are listed (line number, reason code, message; never the values) in
`<file>.rejected.jsonl` next to it.

Files stay in `done/` for `done_retention_days` after they were processed (the deployment's
default: `PORTAL_SYNC_DONE_FILES_RETENTION_DAYS`); a run that finds older ones removes them
(with their rejection reports) after its last checkpoint. `error/` is never emptied: those
files wait for someone to look at them.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producers.mapping import FieldMapping, four_digit_year, map_fields, parse_local, soft_deleted
from producers.metrics import DONE_FILES_REMOVED, SOURCE_ERRORS
from producers.sdk import (
    Adapter,
    Checkpoint,
    Item,
    Record,
    RetriableError,
    SkippableRecord,
    State,
)
from schemas.dead_letter import Reason
from schemas.errors import RecordError
from schemas.events import Entity, nfc_text
from schemas.json_text import DuplicateKey, loads_unique
from schemas.validation import MAX_DEPTH, too_deep

log = logging.getLogger(__name__)
KEEP_CHECKSUMS = 50_000
_CSV_LIMIT = threading.Lock()  # `csv.field_size_limit` is the process's, sources are threads
# A file's records between two of its checkpoints (saved at most once a second by the
# engine): a run stopped inside a file goes on after the last one saved, where it began
# the file again (a province's first snapshot: ten million lines).
FILE_CHECKPOINT_RECORDS = 10_000
# Rejections of one file its report lists; the dead-letter topic holds every one.
REPORT_LIMIT = 10_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FRACTION = re.compile(r":[0-9]{2}[.,][0-9]")  # seconds with a fraction: `09:00:00.5`
Row = dict[str, Any] | SkippableRecord  # a line read, or why it could not be


class DirectoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Path
    done_dir: Path | None = None  # default <directory>/done
    error_dir: Path | None = None  # default <directory>/error
    suffixes: list[str] = Field(default_factory=lambda: [".csv", ".jsonl", ".ndjson"])
    timezone: str = "Asia/Ho_Chi_Minh"
    # Days a processed file stays in done/ (None: for ever).
    done_retention_days: float | None = Field(default=None, ge=0)
    # Without a marker, a file is read once this old and unchanged since the last poll.
    settle_seconds: float = Field(default=10.0, ge=0)
    # With a marker (".done"), a file is read once `<name>.done` exists next to it.
    complete_marker: str | None = Field(default=None, pattern=r"^\.[A-Za-z0-9_-]{1,16}$")

    @model_validator(mode="after")
    def _marker_is_no_data_suffix(self) -> DirectoryConfig:
        if self.complete_marker in self.suffixes:
            raise ValueError("complete_marker must differ from the data files' suffixes")
        return self


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


class UnreadableFile(RecordError):
    """The file as a whole cannot be read: it is dead-lettered once and goes to error/.
    `reason`: permission_denied, read_failed, not_utf8, not_csv or not_json."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(Reason.UNREADABLE_FILE, f"{reason}: {message}")
        self.reason = reason


def unmappable(error: Exception, origin: str, entity: Entity | None) -> SkippableRecord:
    """A record whose mapping raised: its error's type only (its text may quote values)."""
    message = f"the record could not be mapped ({type(error).__name__})"
    return SkippableRecord(Reason.UNMAPPABLE_RECORD, message, origin, entity)


READ_CHUNK = 1 << 18  # bytes read from a file at a time by a pass over its bytes
TEXT_CHUNK = 1 << 16  # by a pass over its text
# The longest line (JSON Lines), CSV field or JSON item read, in characters: far beyond any
# record's (a change event is at most a few hundred KiB, unmapped fields aside), and a
# bound on what one is held as (several times its size while parsed). A file without line
# ends, or a stray quote's field, held the file whole again.
MAX_LINE_CHARS = 16 << 20


class _OverLong(str):
    """A line longer than MAX_LINE_CHARS, passed over: a rejected line where lines are
    records (JSON Lines), the file refused where they are not (CSV)."""


OVER_LONG = _OverLong("")


def _open(path: Path) -> int:
    """A file's descriptor, for reading (every file the adapter reads is opened here).
    Without waiting: a FIFO put in a listed file's place would block the source for ever
    (`FileContent` refuses anything but a regular file)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


def _read_at(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes of an open file from `offset` (every read of a file's bytes)."""
    return os.pread(fd, size, offset)


class FileContent:
    """An open file's bytes, up to its size when it was opened, read from its descriptor
    each time they are wanted (the checksum, the checks, the records): never held whole.
    A province's first export (ten million rows, gigabytes) read into memory took as much
    of the producer's, and one larger than its limit killed it at that file after every
    restart. A file cut short meanwhile reads short: `read` then finds it changed."""

    def __init__(self, fd: int) -> None:
        try:
            self.opened = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(self.opened.st_mode):
            os.close(fd)  # replaced since it was listed: passed over, as a file taken away
            raise FileNotFoundError(errno.ENOENT, "not a regular file")
        self.fd = fd
        self.size = self.opened.st_size
        self.checksum: str | None = None  # of the bytes first read (`sha256`)
        self._status_seen = self.opened.st_ctime_ns  # its bytes hashed the same since

    def sha256(self) -> str:
        """The SHA-256 of the bytes up to the size at opening (kept as `checksum` the first
        time); what a file cut short since reads is hashed as it reads."""
        hashed = hashlib.sha256()
        for piece in self.chunks():
            hashed.update(piece)
        found = hashed.hexdigest()
        if self.checksum is None:
            self.checksum = found
        return found

    def changed(self) -> bool:
        """Whether the file's bytes changed since they were first read: its size or
        modification time moved, or only its status did (a chmod, a link, a rename; or a
        rewrite that kept both, `cp -p`) and its bytes hash otherwise. Its status unreadable
        (a share away): not known, False; the read's own errors and the move's checksum
        decide then."""
        try:
            now = os.fstat(self.fd)
            if (now.st_size, now.st_mtime_ns) != (self.size, self.opened.st_mtime_ns):
                return True
            if now.st_ctime_ns == self._status_seen or self.checksum is None:
                return False
            if self.sha256() != self.checksum:
                return True
            self._status_seen = now.st_ctime_ns  # the same bytes: not hashed again for it
            return False
        except OSError:
            return False

    def __len__(self) -> int:
        return self.size

    def chunks(self) -> Iterator[bytes]:
        offset = 0
        while offset < self.size:
            piece = _read_at(self.fd, min(READ_CHUNK, self.size - offset), offset)
            if not piece:
                return
            offset += len(piece)
            yield piece

    def reader(self) -> io.BufferedReader:
        return io.BufferedReader(_FileReader(self), TEXT_CHUNK)

    def close(self) -> None:
        os.close(self.fd)


class _FileReader(io.RawIOBase):
    """One reader's position in a `FileContent`; closing it leaves the file open."""

    def __init__(self, content: FileContent) -> None:
        self.content = content
        self.at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.content.size - self.at)
        if want <= 0:
            return 0
        piece = _read_at(self.content.fd, want, self.at)
        buffer[: len(piece)] = piece
        self.at += len(piece)
        return len(piece)


# A file's bytes: read from the file as they are wanted, or (tests, small documents) held.
Content = bytes | FileContent


def _chunks(content: Content) -> Iterator[bytes | memoryview]:
    if isinstance(content, FileContent):
        yield from content.chunks()
        return
    view = memoryview(content)
    for start in range(0, len(view), READ_CHUNK):
        yield view[start : start + READ_CHUNK]


def text_of(content: Content) -> io.TextIOWrapper:
    """The file as text read as it goes, a line at a time: the whole text at once, and a
    second copy for the reader, held six times a province's export (a file of a million
    rows, 63 MB, took 400 MB). Lines end at \\n only (a JSON string may hold U+2028, a CSV
    field a carriage return). `UnreadableFile` first when it is not UTF-8."""
    _check_utf8(content)
    return stream_of(content)


def _check_utf8(content: Content) -> None:
    """`UnreadableFile` when the file is not UTF-8, decoded 256 KiB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # a BOM is UTF-8 (utf-8-sig's waits
    # for the rest of one at a file's end and takes a file of EF BB for an empty one)
    try:
        for piece in _chunks(content):
            decoder.decode(piece)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UnreadableFile("not_utf8", "the file is not UTF-8 text") from None


def stream_of(content: Content) -> io.TextIOWrapper:
    """The file as text, read as it goes (the bytes found UTF-8 already: `text_of`)."""
    if not isinstance(content, FileContent):
        return io.TextIOWrapper(io.BytesIO(content), encoding="utf-8-sig", newline="\n")
    text = io.TextIOWrapper(content.reader(), encoding="utf-8-sig", newline="\n")
    # it asks for 8 KiB at a time, which the buffer passes on: a round trip each on a share
    text._CHUNK_SIZE = TEXT_CHUNK  # type: ignore[attr-defined]
    return text


def bounded_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """The text's lines, each of at most MAX_LINE_CHARS characters; one longer is passed
    over without being held whole, and stands as OVER_LONG."""
    with text:
        while line := text.readline(MAX_LINE_CHARS + 1):
            if len(line) <= MAX_LINE_CHARS or line.endswith("\n"):
                yield line
                continue
            while (rest := text.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            yield OVER_LONG


def _csv_lines(text: io.TextIOWrapper) -> Iterator[str]:
    """A CSV file's lines for the reader, which cannot take up again after a line passed
    over: the file is refused."""
    for number, line in enumerate(bounded_lines(text), start=1):
        if line is OVER_LONG:
            raise UnreadableFile(
                "not_csv", f"line {number} is longer than {MAX_LINE_CHARS} characters"
            )
        yield line


def json_lines(content: Content) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines, read as they go (`text_of`); a file
    with lines of which none is JSON is not JSON Lines at all (`UnreadableFile` before
    the first line is handed out)."""
    _check_utf8(content)
    lines = _nonblank(stream_of(content))
    if next(_nonblank(stream_of(content)), None) and not any(_is_json(x) for _, x in lines):
        raise UnreadableFile("not_json", "no line of the file is JSON")
    return _nonblank(stream_of(content))


def _nonblank(text: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
    """(number, line) of the lines that are not blank, each without its \\n (OVER_LONG for
    one too long: `read_json` refuses it)."""
    for number, line in enumerate(bounded_lines(text), start=1):
        if line is OVER_LONG or line.strip():
            yield number, line[:-1] if line.endswith("\n") else line


def read_json(text: str) -> Any:
    """One JSON text; ValueError (whose message quotes nothing) when it is not JSON or
    nests deeper than MAX_DEPTH (deep enough to exhaust a parser's or encoder's stack)."""
    if text is OVER_LONG:
        raise ValueError(f"longer than {MAX_LINE_CHARS} characters")
    try:
        value = loads_unique(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except DuplicateKey:  # `json` keeps the last silently: which record was meant?
        raise ValueError("an object naming a key twice") from None
    except ValueError:
        raise ValueError("not JSON") from None
    if too_deep(value):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


# Errors of a read that may pass: a network share away or stale (NFS, SMB), a timeout, an
# interrupted call, descriptors, memory or locks short, a file busy.
TRANSIENT_READ_ERRORS = frozenset(
    {
        errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EMFILE,
        errno.ENFILE, errno.ENOMEM, errno.EBUSY, errno.ENOLCK, errno.EHOSTDOWN,
        errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET,
    }
)  # fmt: skip

TRANSIENT_READ_TRIES = 5  # runs in a row (each after the engine's backoff)

CLOCK_PROBE = ".portal-sync-clock"  # a leading dot: never read as an export


def _checksum(path: Path) -> str | None:
    """The file's SHA-256, read in chunks (a snapshot's export is gigabytes); None when it
    cannot be read, or is no longer a regular file."""
    try:
        content = FileContent(_open(path))
    except OSError:
        return None
    try:
        return content.sha256()
    except OSError:
        return None
    finally:
        content.close()


def _is_json(line: str) -> bool:
    try:
        read_json(line)
    except ValueError:
        return False
    return True


def small_int(value: Any) -> int | None:
    """An integer written in ASCII digits ("²" and "٣" are digits to str.isdigit, not to
    the contract), short enough to convert."""
    text = str(value)
    if isinstance(value, bool) or not (text.isascii() and text.isdigit() and len(text) <= 18):
        return None
    return int(text)


@dataclass(frozen=True)
class _Resume:
    files: list[str]  # the state's files before this one
    checksum: str
    read_before: int | None  # the last line an earlier run read whole


def _line_of(origin: str) -> int | None:
    """The line of a record's origin (`name:line`, a portal line's documents
    `name:line#n`); None for the file as a whole."""
    line = origin.rpartition(":")[2].partition("#")[0]
    return int(line) if line.isdigit() else None


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
        self._beyond_report: dict[str, int] = {}  # rejections past REPORT_LIMIT, per file
        self._partial: dict[str, int] = {}  # checksum -> the last line read whole
        # A file's reads that failed for a moment (a share away, memory short) in a row:
        # retried TRANSIENT_READ_TRIES times, then taken as unreadable (a bad block, a file
        # too large for memory held every file after it for ever).
        self._failed_reads: dict[str, int] = {}
        self._observed: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) last poll
        self._stale_markers: set[tuple[str, int]] = set()  # (name, mtime) warned of once
        DONE_FILES_REMOVED.labels(source)  # exported at 0, so increase() sees the first
        SOURCE_ERRORS.labels(source, "unreadable_file")

    def parse(self, path: Path, content: Content) -> Iterator[Record | SkippableRecord]:
        """Check the file as a whole (raise UnreadableFile before returning), then return
        its records lazily; reading them must not raise: a bad line is a SkippableRecord."""
        raise NotImplementedError

    def _retry_read(self, path: Path) -> bool:
        """Count a failure of this file's read that may pass; whether to retry it yet."""
        tries = self._failed_reads[path.name] = self._failed_reads.get(path.name, 0) + 1
        return tries < TRANSIENT_READ_TRIES

    def _failed_read(self, path: Path, error: OSError | MemoryError) -> UnreadableFile:
        """A read of the file failed (its bytes are read from disk at each pass). One that
        may pass (a share away a moment, descriptors or memory short) raises to retry the
        run from its checkpoint, up to TRANSIENT_READ_TRIES runs in a row without progress:
        the file was sent to error/ for good, its records never published. Else, or then,
        why the file is unreadable."""
        if isinstance(error, MemoryError):
            if self._retry_read(path):
                raise error  # not the file's: the run is retried from its checkpoint
            return UnreadableFile("read_failed", "memory ran short reading it, again")
        if error.errno in TRANSIENT_READ_ERRORS and self._retry_read(path):
            name = errno.errorcode.get(error.errno or 0, "?")
            raise RetriableError(f"a file could not be read ({name}): retried") from None
        reason = "permission_denied" if isinstance(error, PermissionError) else "read_failed"
        return UnreadableFile(reason, f"the file cannot be read ({type(error).__name__})")

    def read(self, state: State) -> Iterator[Item]:
        # Checksums of the files published, and `x:`-marked ones of the files found
        # unreadable (dead-lettered once: a move to error/ that fails is only retried).
        done: list[str] = list(state.get("files", []))
        # Files read in part by an earlier run: checksum -> the last line read whole. Kept
        # in every checkpoint until the file is done (another file may be read first).
        self._partial = dict(state.get("partial") or {})
        seen: set[str] = set()  # checksums of the files read this pass
        opened: list[FileContent] = []  # the file being read (closed at the next, or the end)
        try:
            yield from self._read_files(done, seen, opened)
        finally:
            for content in opened:
                content.close()

    def _read_files(
        self, done: list[str], seen: set[str], opened: list[FileContent]
    ) -> Iterator[Item]:
        for path in self._ready_files():
            while opened:
                opened.pop().close()
            try:
                content = FileContent(_open(path))
                opened.append(content)
                checksum = content.sha256()
                after = path.stat()
            except FileNotFoundError:
                self._failed_reads.pop(path.name, None)
                continue  # taken away since it was listed
            except OSError as error:
                unreadable = self._failed_read(path, error)  # or retried, raising
                reason = unreadable.reason
                marker = _stat_marker(path)
                if marker is not None and marker in done:
                    move = self._mover(path, self.error_dir, reason)
                    yield Checkpoint(self._state(done), self._tolerant(path, move, self.error_dir))
                    continue
                if marker is not None:
                    done = [*done, marker][-KEEP_CHECKSUMS:]
                yield from self._unreadable(path, unreadable, done)
                continue
            if _written_to(content.opened, after) or content.changed():
                continue  # written to while it was read: read once it is still
            if checksum in done:  # published before; its move failed or was interrupted
                move = self._mover(path, self.done_dir, read=checksum)
                yield Checkpoint(self._state(done), self._tolerant(path, move, self.done_dir))
                continue
            if f"x:{checksum}" in done:  # dead-lettered before; its move failed
                move = self._mover(path, self.error_dir, "unreadable")
                yield Checkpoint(self._state(done), self._tolerant(path, move, self.error_dir))
                continue
            failed = [*done, f"x:{checksum}"][-KEEP_CHECKSUMS:]
            self._rejections[path.name] = []
            self._beyond_report[path.name] = 0
            seen.add(checksum)
            try:
                records = iter(self.parse(path, content))  # the whole-file checks: a pass each
            except (UnreadableFile, OSError, MemoryError) as error:
                self._partial.pop(checksum, None)
                if content.changed():  # rewritten while checked: its new bytes are not refused
                    log.warning("%s changed while it was read: read again", path.name)
                    continue
                refused = error if isinstance(error, UnreadableFile) else (
                    self._failed_read(path, error)  # or retried, raising
                )  # fmt: skip
                done = failed
                yield from self._unreadable(path, refused, done)
                continue
            read_before = self._partial.get(checksum)
            if read_before is not None:
                self._rejections[path.name].append(
                    {
                        "line": 0,
                        "code": "resumed",
                        "message": f"the lines up to {read_before} were read by an earlier "
                        "run: their rejections are in the dead-letter topic only",
                    }
                )
            resume = _Resume(done, checksum, read_before)
            read_whole = yield from self._guarded(path, records, failed, resume, content)
            if read_whole is None or (read_whole and content.changed()):
                # Its bytes changed after the checksum (rewritten in place): what was read
                # is not the file checked. Read whole again once it is still; its records
                # sent already are sent again (the version rule keeps one of each).
                self._partial.pop(checksum, None)
                log.warning("%s changed while it was read: read again", path.name)
                continue
            if read_whole:
                self._partial.pop(checksum, None)
                done = [*done, checksum][-KEEP_CHECKSUMS:]
                yield Checkpoint(self._state(done), self._mover(path, self.done_dir, read=checksum))
            else:
                done = failed
        # A file read in part and no longer there (taken away, exported again with other
        # bytes) is forgotten: the same bytes dropped later are read from their start.
        gone = set(self._partial) - seen
        for checksum in gone:
            del self._partial[checksum]
        if gone:
            yield Checkpoint(self._state(done))
        expired = self.expired_done_files()
        if expired:  # removed as a checkpoint's clean-up: a check run removes nothing
            yield Checkpoint(self._state(done), lambda: self._remove(expired))

    def _state(self, done: list[str]) -> State:
        """A checkpoint's state: the files done, and those read in part (a copy: the
        engine saves it later)."""
        if not self._partial:
            return {"files": done}
        return {"files": done, "partial": dict(self._partial)}

    def _guarded(
        self,
        path: Path,
        records: Iterator[Record | SkippableRecord],
        done: list[str],
        resume: _Resume,
        content: FileContent,
    ) -> Generator[Item, None, bool | None]:
        """The file's records; True when all were read, None when the file changed while
        they were (read again once still). Should reading itself fail (a bug, not the
        data), the rest of the file is unreadable: error/, never a retry loop; a read of
        the file that may pass (`TRANSIENT_READ_ERRORS`, memory short) is retried as the
        first read is (`_failed_read`), the run going on from its last checkpoint.
        `resume`: the lines an earlier run read whole are passed over (sent and
        acknowledged then), and a checkpoint between two lines, every
        FILE_CHECKPOINT_RECORDS records or so, says how far this run is: by line, so that
        a configuration changed between the runs (a line's records) skips no line."""
        count = since = 0
        last: int | None = None  # the line of the last record yielded
        while True:
            try:
                item = next(records)
            except StopIteration:
                self._failed_reads.pop(path.name, None)
                return True
            except Exception as error:
                if content.changed():  # cut short or rewritten while read: not its fault
                    return None
                reason = "read_failed"
                if isinstance(error, (OSError, MemoryError)):  # a failure that may pass
                    reason = self._failed_read(path, error).reason  # or retried, raising
                again = ", again" if isinstance(error, MemoryError) else ""
                detail = f"reading stopped after {count} records ({type(error).__name__}{again})"
                self._partial.pop(resume.checksum, None)
                yield from self._unreadable(path, UnreadableFile(reason, detail), done)
                return False
            count += 1
            line = _line_of(item.origin)
            if line is None:  # the file as a whole
                yield item
                continue
            if resume.read_before is not None and line <= resume.read_before:
                continue
            if since >= FILE_CHECKPOINT_RECORDS and last is not None and line != last:
                self._partial[resume.checksum] = last  # every record of it and before sent
                self._failed_reads.pop(path.name, None)  # failures count while none goes on
                yield Checkpoint(self._state(resume.files))
                since = 0
            yield item
            since, last = since + 1, line

    def _unreadable(self, path: Path, error: UnreadableFile, done: list[str]) -> Iterator[Item]:
        """One dead letter naming the file, then error/. `done` holds its `x:` mark, so a
        move to error/ that fails is retried without a second dead letter; a repaired
        file (other bytes) is read."""
        self._failed_reads.pop(path.name, None)  # the next file of its name starts afresh
        self._rejections.setdefault(path.name, [])
        value = {"file": path.name, "reason": error.reason, "moved_to": "error/"}
        yield SkippableRecord(
            error.code, error.message, path.name, self.entity, raw=json.dumps(value).encode()
        )
        yield Checkpoint(self._state(done), self._mover(path, self.error_dir, error.reason))

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

    def _ready_files(self) -> list[Path]:
        """The complete files of the directory, oldest first (see the module's docstring);
        remembers each file's size and modification time for the next poll."""
        if not self.directory.is_dir():
            return []
        now, marker = self._share_now(), self.options.complete_marker
        observed: dict[str, tuple[int, int]] = {}
        ready: list[tuple[float, str, Path]] = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(".") or path.suffix not in self.options.suffixes:
                continue
            if ".rejected." in name:
                continue
            try:
                info = path.stat()
            except OSError:
                continue  # gone since the listing
            if not stat.S_ISREG(info.st_mode):
                continue
            if marker is not None:
                # A marker older than its file is a run's leftover (killed between the
                # file's move and the marker's removal) or the last export's, while the
                # next one is written over the same name: the file is not complete.
                marked = _mtime_ns(path.parent / f"{name}{marker}")
                if marked >= info.st_mtime_ns:
                    ready.append((info.st_mtime, name, path))
                elif marked >= 0 and (name, info.st_mtime_ns) not in self._stale_markers:
                    self._stale_markers.add((name, info.st_mtime_ns))
                    log.warning(
                        "%s: %s's %s marker is older than the file: waiting for a new one "
                        "(write the marker after the file)", self.source, name, marker,
                    )  # fmt: skip
                continue
            now_seen = observed[name] = (info.st_size, info.st_mtime_ns)
            if now - info.st_mtime < self.options.settle_seconds:
                continue  # written too recently: perhaps still being written
            if self._observed.get(name, now_seen) != now_seen:
                continue  # it changed since the last poll: still being written
            ready.append((info.st_mtime, name, path))
        self._observed = observed
        return [path for *_, path in sorted(ready)]

    def _share_now(self) -> float:
        """The time by the clock that stamps the directory's files (a file server's may
        run behind ours: a file being written would look old enough): the modification
        time of a probe file made now and removed at once, ours when the directory cannot
        be written."""
        if self.options.settle_seconds <= 0:
            return time.time()
        probe = self.directory / f"{CLOCK_PROBE}-{os.getpid()}"
        try:
            probe.touch()
            try:
                return probe.stat().st_mtime
            finally:
                probe.unlink(missing_ok=True)
        except OSError:
            return time.time()

    def rejected(self, origin: str, code: str, message: str) -> None:
        if origin in self._rejections:  # the file as a whole
            name, line = origin, "0"
        else:
            name, _, line = origin.rpartition(":")
        entry = {"line": int(line) if line.isdigit() else line, "code": code, "message": message}
        kept = self._rejections.setdefault(name, [])
        if len(kept) < REPORT_LIMIT:
            kept.append(entry)
        else:  # a wrong value map rejects every line: the report stays a size to read
            self._beyond_report[name] = self._beyond_report.get(name, 0) + 1

    def _tolerant(self, path: Path, move: Callable[[], None], target: Path) -> Callable[[], None]:
        """The move of a file published (or dead-lettered) before, which fails again:
        logged and counted (`read_error`), never raised, so the files after it are still
        read. What it held is in the topics; the file stays until a move succeeds."""

        def attempt() -> None:
            try:
                move()
            except OSError as error:
                SOURCE_ERRORS.labels(self.source, "read_error").inc()
                log.warning(
                    "%s: %s was handled but cannot be moved to %s (%s); retried next run",
                    self.source, path.name, target, type(error).__name__,
                )  # fmt: skip

        return attempt

    def _mover(
        self, path: Path, target: Path, unreadable: str | None = None, read: str | None = None
    ) -> Callable[[], None]:
        """Move the file to `target` (its report beside it). `read`: the checksum of what
        was read; a file that is no longer that one (the next export renamed over the same
        name meanwhile) goes back unread, with its marker, for the next run."""

        def move() -> None:
            target.mkdir(parents=True, exist_ok=True)
            rejections = self._rejections.pop(path.name, [])
            beyond = self._beyond_report.pop(path.name, 0)
            if beyond:
                rejections.append(
                    {
                        "line": None,
                        "code": "more",
                        "message": f"{beyond} more rejections, not listed: the dead-letter "
                        "topic holds every one",
                    }
                )
            moved = _free_name(target, path.name)
            if rejections:
                report = target / f"{moved.name}.rejected.jsonl"
                report.write_text("".join(json.dumps(r) + "\n" for r in rejections))
            shutil.move(str(path), moved)
            if read is not None and _checksum(moved) != read:
                if not path.exists():
                    shutil.move(str(moved), path)
                log.warning(
                    "%s: %s changed after it was read: left for the next run",
                    self.source, path.name,
                )  # fmt: skip
                return
            if moved.name != path.name:
                log.info("%s: %s moved as %s (the name was taken)", self.source, path.name,
                         moved)  # fmt: skip
            if target == self.done_dir:
                os.utime(moved)  # its retention counts from now, when it was done
            if self.options.complete_marker is not None:
                (path.parent / f"{path.name}{self.options.complete_marker}").unlink(missing_ok=True)
            if unreadable is not None:  # the name and the reason only, never the content
                log.warning(
                    "%s: %s is unreadable (%s), moved to %s", self.source, path.name, unreadable,
                    target,
                )  # fmt: skip

        return move


def _free_name(target: Path, name: str) -> Path:
    """Where a file of this name goes in done/ or error/: its own name, or, when a file or
    a rejection report of that name is there already (a daily export of one name), the
    name with a number before its suffix. A move onto it replaced the earlier file: one
    in error/ was then nowhere, and a report left from it described the new file."""
    candidate = target / name
    stem, dot, suffix = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    number = 1
    while candidate.exists() or (target / f"{candidate.name}.rejected.jsonl").exists():
        number += 1
        candidate = target / f"{stem}.{number}{dot}{suffix}"
    return candidate


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
            raise UnreadableFile("not_csv", f"the header names a column twice: {_named(twice)}")
        missing = [column for column in self._required() if column not in names]
        if missing:  # every row would carry null for it, erasing the value others gave
            raise UnreadableFile("not_csv", f"the header lacks mapped columns: {_named(missing)}")
        deleted = self.options.deleted_field
        if deleted is not None and deleted not in names:  # an export of upserts only
            log.warning("%s: no column %s in this file: its rows are live", self.source,
                        deleted[:64])  # fmt: skip
        return self._csv_rows(reader, len(names))

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


def _mtime_ns(path: Path) -> int:
    """A file's modification time, -1 when it is not there."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def _written_to(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file changed while it was read (its size or time moved): an exporter still
    writing it, whose complete file is read later."""
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


def _stat_marker(path: Path) -> str | None:
    """An unreadable file's mark in the state (name, size, modification time), or None
    when even that cannot be read."""
    try:
        found = path.stat()
    except OSError:
        return None
    return f"x:{path.name}:{found.st_size}:{found.st_mtime_ns}"


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (float timestamps lose the last digits)."""
    return (moment - EPOCH) // timedelta(microseconds=1)
