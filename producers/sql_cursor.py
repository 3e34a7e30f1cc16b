"""The SQL adapter's durable position (`CursorState`): the cursor (updated_at, pk), the rows
seen behind it (each with the version it was sent with and its marker), the highest
version sent and, on PostgreSQL, the recorded snapshot's xmin; kept as JSON (`as_dict`)."""

from __future__ import annotations

import heapq
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from producers.sdk import FatalError
from producers.sql_rows import reserved
from producers.state import write_json_atomic


@dataclass
class CursorState:
    """Durable position of one adapter: high-water (updated_at, pk), rows seen behind it and,
    on PostgreSQL, the xmin (xid8) of the snapshot of the last complete poll (of a first
    poll from its first page on: `SqlPollingAdapter.pages`)."""

    updated_at: str | None = None
    pk: Any = None
    # pk -> [version sent, updated_at, marker (version column or content hash), xid8 or None]
    seen: dict[str, list[Any]] = field(default_factory=dict)
    xmin: int | None = None
    # The highest version sent so far (None: a state of an older release; see `top_sent`).
    top: int | None = None
    # Not saved, rebuilt from `seen`: its rows by updated_at (a heap; an entry written again
    # since is skipped when it comes up), and those past the window kept for their xid8.
    # `forget_before` takes the rows that fell behind the window from the heap instead of
    # sweeping all of `seen` after every page: a sliding window of 60,000 rows swept after
    # each page of 1,000 was a fifth of a SQL source's publishing (docs/performance-log.md).
    _by_time: list[tuple[str, str]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _held: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Since the last `snapshot`: the entries of `seen` replaced or removed, in order (pk,
    # the entry before, None if there was none), so that the snapshot's state can be
    # rebuilt from a copy of `seen` when it is saved rather than `seen` copied every page.
    _undo: list[tuple[str, list[Any] | None]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _head: tuple[str | None, Any, int | None, int | None] = field(
        default=(None, None, None, None), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_time = [(entry[1], pk) for pk, entry in self.seen.items()]
        heapq.heapify(self._by_time)

    def note(self, pk: str, entry: list[Any]) -> None:
        """Remember a row as `[version sent, updated_at, marker, xid8]` (a new list: entries
        are replaced, never changed in place)."""
        if self._undo is not None:
            self._undo.append((pk, self.seen.get(pk)))
        self.seen[pk] = entry
        heapq.heappush(self._by_time, (entry[1], pk))

    def snapshot(self) -> Callable[[], dict[str, Any]]:
        """The state as it is now (`as_dict`), computed when called: from a copy of `seen`
        with what changed since undone. Only the newest snapshot can be called (a newer one
        drops what an older one needs); a checkpoint per page then copies `seen`, a whole
        lookback window of rows, only for the checkpoints saved."""
        undo: list[tuple[str, list[Any] | None]] = []
        self._undo = undo
        head = self._head = (self.updated_at, self.pk, self.xmin, self.top)

        def state() -> dict[str, Any]:
            if self._undo is not undo:
                raise RuntimeError("a cursor snapshot was called after a newer one was taken")
            seen = dict(self.seen)
            for pk, entry in reversed(undo):
                if entry is None:
                    del seen[pk]
                else:
                    seen[pk] = entry
            return {
                "updated_at": head[0], "pk": head[1], "seen": seen, "xmin": head[2],
                "top": head[3],
            }  # fmt: skip

        return state

    def moved(self) -> bool:
        """Whether anything changed since the last `snapshot` (True when none was taken)."""
        return (
            self._undo is None
            or bool(self._undo)
            or self._head != (self.updated_at, self.pk, self.xmin, self.top)
        )

    def forget_before(self, horizon: str, floor: int | None = None) -> None:
        """Forget the rows last written before `horizon` (an updated_at as `seen` holds it;
        it never moves back), but those written at or after the recorded snapshot's xmin
        (a PostgreSQL poll reads them again) and those sent with a version above `floor`
        (the version of `horizon`: a late row sent above its own): exactly what a sweep of
        `seen` would keep."""
        behind = [(stamp, pk) for pk, stamp in self._held.items()]
        self._held = {}
        while self._by_time and self._by_time[0][0] < horizon:
            behind.append(heapq.heappop(self._by_time))
        for stamp, pk in behind:
            entry = self.seen.get(pk)
            if entry is None or entry[1] != stamp:
                continue  # forgotten already, or written again since (its own item is due)
            if _kept(entry, horizon, self.xmin, floor):
                self._held[pk] = stamp
            else:
                if self._undo is not None:
                    self._undo.append((pk, entry))
                del self.seen[pk]

    @classmethod
    def load(cls, path: Path) -> CursorState:
        if not path.exists():
            return cls()
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Write atomically and durably: a crash leaves the old or the new state, never half."""
        write_json_atomic(path, self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        seen = dict(self.seen)
        return {
            "updated_at": self.updated_at, "pk": self.pk, "seen": seen, "xmin": self.xmin,
            "top": self.top,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CursorState:
        if not raw:
            return cls()
        return cls(raw["updated_at"], raw["pk"], dict(raw["seen"]), raw.get("xmin"), raw.get("top"))

    def fold(self, journal: list[Any]) -> None:
        """Take in the pages a run journaled before sending them (`reservation`), oldest
        first, whose checkpoint it may not have saved: a row the state knows at a lower
        version, or not at all, is remembered at the journaled one with the marker
        `reserved(marker)`, as sent or not. Its next change is raised above it, and the
        same content read again goes out with that version (the same event)."""
        for page in journal:
            for pk, version, stamp, marker, xid in page["rows"]:
                entry = self.seen.get(pk)
                if entry is None or int(entry[0]) < version:
                    self.note(pk, [version, stamp, reserved(marker), xid])
            if self.top is not None:
                self.top = max(self.top, int(page["top"]))


def saved_pk(pk: Any) -> Any:
    """A key as the state file keeps it: a NUMERIC/DECIMAL key (an identity column of SQL
    Server, MySQL or PostgreSQL) as the whole number it is; JSON has no decimal. A UUID as
    its text, which the state file reads back: a UUID read from the table then compared
    with the text of the saved place raised TypeError at every poll (the text orders as
    PostgreSQL orders uuid: lower-case hex, fixed hyphens)."""
    if isinstance(pk, uuid.UUID):
        return str(pk)
    if isinstance(pk, bytes | bytearray | memoryview):
        raise FatalError(
            "pk_column holds binary values (BINARY, RAW, BLOB): the cursor cannot keep its "
            "place by them in its state file; choose a text or whole-number column (a view "
            "can give the key's hex text)"
        )
    if isinstance(pk, Decimal):
        if pk != pk.to_integral_value():
            raise FatalError(
                "pk_column holds numbers that are not whole: the cursor cannot keep its "
                "place by them; choose a whole-number or text column"
            )
        return int(pk)
    return pk


def _kept(seen: list[Any], horizon: str, recorded: int | None, floor: int | None = None) -> bool:
    """A `seen` entry in the window, written at or after the recorded snapshot's xmin, or
    sent with a version above `floor`: a change of its row read within the window has a
    version of its own at or above the floor, which could be below the one sent."""
    if seen[1] >= horizon or (floor is not None and seen[0] > floor):
        return True
    xid = seen[3] if len(seen) > 3 else None
    return xid is not None and recorded is not None and xid >= recorded
