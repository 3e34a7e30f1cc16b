"""A dropped file's content, read safely: from its descriptor as it is wanted, never held
whole (`FileContent`: a province's first export is gigabytes), checked to be UTF-8, as text
in lines of at most MAX_LINE_CHARS characters, and as JSON texts of bounded depth
(`read_json`). `UnreadableFile` says why a file as a whole cannot be read.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterator
from typing import Any

from schemas.dead_letter import Reason
from schemas.errors import RecordError
from schemas.json_text import DuplicateKey, loads_unique
from schemas.validation import MAX_DEPTH, too_deep


class UnreadableFile(RecordError):
    """The file as a whole cannot be read: it is dead-lettered once and goes to error/.
    `reason`: permission_denied, read_failed, not_utf8, not_csv or not_json."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(Reason.UNREADABLE_FILE, f"{reason}: {message}")
        self.reason = reason


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


def _is_json(line: str) -> bool:
    try:
        read_json(line)
    except ValueError:
        return False
    return True
