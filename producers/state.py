"""Durable state files: written atomically, so a crash leaves the old or the new one."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from schemas.json_text import loads_exact


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file, fsync it, rename it over `path`, fsync the dir.

    orjson, not `json`: a SQL source's state is written after every page and holds every
    row of its lookback window (tens of thousands under a bulk update); `json.dumps` of it
    was 12 % of the adapter's publishing (docs/performance-log.md). Keys that are not text are
    written as text, as `json` does; what orjson refuses (integers beyond 64 bits: a
    source's NUMBER(38) primary key) is written by `json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _json_bytes(value)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no temporary file left behind at each retry
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_leftovers(path: Path) -> int:
    """Remove the temporary files that a process killed during `write_json_atomic` left
    beside `path` (a SQL source's state can be tens of megabytes: one a restart filled the
    disk in the end); how many. Only for the owner of `path`, before its first save."""
    removed = 0
    for leftover in path.parent.glob(f"{glob.escape(path.name)}{'?' * 8}.tmp"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()


def load_json_state(path: Path) -> dict[str, Any]:
    """The saved state, or an empty one before the first checkpoint."""
    if not path.exists():
        return {}
    loaded = loads_exact(path.read_bytes())
    if not isinstance(loaded, dict):
        raise ValueError(f"state file {path} does not hold a JSON object")
    return loaded


def append_json_line(path: Path, value: Any) -> None:
    """Append one JSON line and fsync it before returning (and the directory, for a new
    file: a new file's name is on disk only then); a new file is readable by its owner
    only (it can hold a source's records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _json_bytes(value) + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a line torn by a crash stays a line of its own
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if not size:
        _sync_directory(path.parent)


def read_json_lines(path: Path) -> list[Any]:
    """The lines `append_json_line` wrote, oldest first (none when there is no file). A
    line a crash cut short is left out: its append never returned, so nothing that waited
    for it happened."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_bytes().splitlines():
        try:
            lines.append(loads_exact(line))
        except ValueError:
            continue
    return lines
