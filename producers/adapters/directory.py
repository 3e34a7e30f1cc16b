"""What the file adapters (`filedrop`, `portal`) share: `DirectoryAdapter` finds the complete
files of a directory, has each read once (its `parse`), and moves it to done/ or error/.

Each file is processed once, identified by its SHA-256 (a file copied in twice is skipped),
oldest first, and only once it is complete: with `complete_marker` (e.g. ".done") once
`<name>.done` exists next to it; otherwise once it is `settle_seconds` old and has not
changed (size, modification time) since the previous poll. Names starting with a dot are
never read, so a writer can write `.name.csv` and rename it: a rename is atomic.

A file never blocks the ones after it. A file that cannot be read at all (permissions, not
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

import errno
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.adapters.file_reading import Content, FileContent, UnreadableFile
from producers.mapping import TimeZoneName
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
from schemas.events import Entity

log = logging.getLogger(__name__)
KEEP_CHECKSUMS = 50_000
# A file's records between two of its checkpoints (saved at most once a second by the
# engine): a run stopped inside a file goes on after the last one saved, where it began
# the file again (a province's first snapshot: ten million lines).
FILE_CHECKPOINT_RECORDS = 10_000
# Rejections of one file its report lists; the dead-letter topic holds every one.
REPORT_LIMIT = 10_000


class DirectoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Path
    done_dir: Path | None = None  # default <directory>/done
    error_dir: Path | None = None  # default <directory>/error
    suffixes: list[str] = Field(default_factory=lambda: [".csv", ".jsonl", ".ndjson"])
    timezone: TimeZoneName = "Asia/Ho_Chi_Minh"
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


def unmappable(error: Exception, origin: str, entity: Entity | None) -> SkippableRecord:
    """A record whose mapping raised: its error's type only (its text may quote values)."""
    message = f"the record could not be mapped ({type(error).__name__})"
    return SkippableRecord(Reason.UNMAPPABLE_RECORD, message, origin, entity)


def small_int(value: Any) -> int | None:
    """An integer written in ASCII digits ("²" and "٣" are digits to str.isdigit, not to
    the contract), short enough to convert."""
    text = str(value)
    if isinstance(value, bool) or not (text.isascii() and text.isdigit() and len(text) <= 18):
        return None
    return int(text)


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


def _open(path: Path) -> int:
    """A file's descriptor, for reading (every file the adapter reads is opened here).
    Without waiting: a FIFO put in a listed file's place would block the source for ever
    (`FileContent` refuses anything but a regular file)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)


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
