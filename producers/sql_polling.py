"""SQL polling adapter: query-based change capture through SQLAlchemy.

The cursor is (updated_at, primary key). A row that commits late (under a long transaction)
carries an `updated_at` older than rows already read, which a plain `> cursor` query misses:

- on a PostgreSQL table, each poll records its snapshot's xmin with the cursor and the next
  poll also reads the rows behind the cursor written by transactions at or above it
  (`producers.sql_snapshot`): nothing committed late is missed, however late;
- on any other source (and on PostgreSQL views or queries) each poll re-reads a lookback
  window of `lookback_seconds` behind the cursor.

Rows read again are recognised from the cursor state's `seen` map: per row the version
sent, its `updated_at`, a marker of the change (the source's version column, else a hash of
the mapped content) and, on PostgreSQL, the writing transaction. A row whose own version
(the version column, else `updated_at`) rose is a new change, as before; one whose own
version did not rise is a new change when its marker changed (two updates within the
column's precision, a clock gone back), sent with the last version + 1, so versions rise
per row whatever the source's clocks do. On a PostgreSQL table, a row read behind the
window that `seen` no longer holds (committed late, after a later change of it was sent)
is sent above the highest version sent so far (`top`). `seen` keeps the rows of the
lookback window behind the cursor (and, on PostgreSQL, those a next poll reads again, and
those sent above their window's start): the state stays bounded. Each page's versions are
journaled before it is sent (`reservation`, taken in at the next run by `CursorState.fold`):
anything sent twice after a crash carries the same version and event id, and the
reconciler's version rule drops it; a row's change after a crash is raised above the
version sent, as without one; a late row sent again so may carry another version above
`top` (the same values: `stale` or applied again, nothing lost).
Hard deletes are invisible to polling: sources mark deletes in a soft-delete column.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from pydantic import ConfigDict, Field, field_validator, model_validator
from sqlalchemy import (
    Date,
    DateTime,
    MetaData,
    Table,
    and_,
    column,
    func,
    literal,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.exc import ArgumentError, DataError, NoSuchTableError, OperationalError

from producers.mapping import (
    FieldMapping,
    field_plan,
    map_fields,
    soft_deleted,
    sorts_in_time_order,
    strptime_pattern,
)
from producers.sdk import FatalError, RetriableError, source_engine, source_url
from producers.sql_snapshot import (
    XID_LABEL,
    current_xmin_xmax,
    is_plain_table,
    row_xid8,
    written_since,
)
from producers.state import write_json_atomic
from schemas import build_event
from schemas.builder import has_non_finite_float
from schemas.events import Entity

log = logging.getLogger(__name__)

Capture = Literal["auto", "snapshot", "lookback"]
Raised = Literal["same_instant", "lower"]
SQLITE_PAGES_PER_QUERY = 10  # pages read by one query where no index serves the order
# Rows in a row the database driver cannot read before the source stops: one bad row is
# data (rejected), a column no row of which reads is a configuration (a column's type).
UNDECODABLE_IN_A_ROW = 20
# What fetching a row whose value the driver (or the server) cannot produce raises: a date
# out of Python's range, text or a number in a DATE column, an ENUM value unknown.
UNREADABLE = (ValueError, TypeError, LookupError, OverflowError, DataError)
SQLITE_NOT_UTF8 = "Could not decode to UTF-8"  # sqlite3's text for such a value


class SqlMapping(FieldMapping):
    """Where one table's (or query's) records live and how its columns map to the contract.

    The cursor is (`updated_at_column`, `pk_column`); `query` replaces the table by any
    SELECT (then `table` only names it in dead-letter origins). `capture`: `snapshot`
    (PostgreSQL tables; what `auto` chooses there) or `lookback` (any source)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    entity: Entity
    table: str
    query: str | None = None
    key_column: str
    pk_column: str | None = None
    updated_at_column: str = "updated_at"
    updated_at_format: str | None = None  # the cursor column is text, e.g. yyyyMMddHHmmss
    version_column: str | None = None
    deleted_column: str | None = None
    capture: Capture = "auto"
    lookback_seconds: float = Field(default=60.0, ge=0)
    batch_size: int = Field(default=1000, gt=0)

    @field_validator("updated_at_format")
    @classmethod
    def _cursor_text_sorts_in_time_order(cls, pattern: str | None) -> str | None:
        # The cursor reads and compares the column as text: a pattern that does not sort
        # as time would put a later row before the cursor, and it would never be read.
        if pattern is not None and not sorts_in_time_order(pattern):
            raise ValueError(
                f"updated_at_format {pattern!r}: the cursor compares the column as text, "
                "so its fields must run from the year down (yyyy, MM, dd, HH, mm, ss, none "
                "skipped), as in yyyyMMddHHmmss or yyyy-MM-dd HH:mm:ss; for other text, "
                "map the column to a timestamp in a `query`"
            )
        return pattern

    @model_validator(mode="after")
    def _snapshot_needs_a_postgresql_table(self) -> SqlMapping:
        if self.capture != "snapshot":
            return self
        if self.query is not None:
            raise ValueError(
                "capture = 'snapshot' reads the rows' xmin: it needs a table, no query"
            )
        try:
            backend = source_url(self.url).get_backend_name()
        except ArgumentError:
            backend = ""
        if backend != "postgresql":
            raise ValueError("capture = 'snapshot' needs a PostgreSQL source")
        return self


class SqlSourceConfig(SqlMapping):
    """A SQL source's mapping and its contract source id."""

    source: str

    @property
    def name(self) -> str:
        return f"{self.source}.{self.entity}"


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


class RowRejected(ValueError):
    """A row read whose values cannot make an event; the message names the column and the
    rule, never a value."""


class RowAhead(RowRejected):
    """A row whose cursor time is ahead of the producer's clock by more than
    `AHEAD_TOLERANCE`: held, neither sent nor dead-lettered, and the cursor does not move
    to its time. Under lookback capture every later change would otherwise fall behind the
    window for good; under snapshot capture every later change would be read as a late
    one and sent above the held row's version (its time in microseconds: a version years
    ahead, which the change after a repair of the row could never pass). Read again at
    each poll (it stays after the cursor), it is sent as any row once its time has come;
    each poll that holds some says so in a warning (a clock of the source, or of this
    host, that is wrong: this host's behind delays every change by its lag)."""


# How far a row's time may run ahead of the producer's clock: the worker's default allowed
# skew (PORTAL_SYNC_MAX_CLOCK_SKEW_SECONDS), beyond which it refuses the event anyway.
AHEAD_TOLERANCE = timedelta(seconds=300)
# Keys looked up in one query (`_hold_live_keys`): within every database's limit of a list.
KEYS_PER_QUERY = 500


@dataclass(frozen=True)
class RejectedRow:
    """A row that cannot become an event (a NULL key or version, an unreadable soft-delete
    flag, a value the mapping cannot convert): dead-lettered as `unmappable_record` while
    the source goes on. The cursor moves past it and the state remembers it with version
    0 and the hash of its values, so it is dead-lettered once however often a poll reads
    it again, and its next change is read and sent as any row's. A row sent before keeps
    the version it was sent with (`version`), so its next change never goes below it."""

    pk: Any
    key: str | None
    stamp: str
    marker: str
    message: str
    version: int = 0
    xid: int | None = None


@dataclass(frozen=True)
class SourceChange:
    """One row read from a source: its key, version, commit time and mapped data."""

    source: str
    entity: str
    pk: Any
    key: str
    updated_at: datetime  # the cursor value: naive as stored, or UTC when it has a zone
    stamp: str  # updated_at as the cursor's state holds it (`_iso`)
    version: int
    occurred_at: datetime  # updated_at in the source's zone
    data: dict[str, Any] | None  # None: the row is (soft-)deleted
    marker: Any = None  # the version column's value, else the content hash
    xid: int | None = None  # PostgreSQL: the transaction that wrote the row version
    raised: Raised | None = None  # version set to last sent + 1
    backwards: bool = False  # updated_at is earlier than the row's previous one
    # A delete not sent: another row holds the key live (`_hold_live_keys`). Remembered as
    # a sent change is, so the cursor moves past it and it is not read again.
    held: bool = False

    @property
    def event(self) -> dict[str, Any]:
        """The contract event of this change (validation is the framework's job)."""
        return build_event(
            self.source, self.entity, self.key, self.version, self.occurred_at, self.data
        )


class SqlPollingAdapter:
    def __init__(self, config: SqlSourceConfig) -> None:
        self.config = config
        self.zone = ZoneInfo(config.timezone)
        self._plan = field_plan(config)
        self._unplaced: int | None = None  # rows without a cursor time, counted once
        # (the cursor, the clock's second, its window's start): the start depends on both
        self._horizon: tuple[str | None, int, str] = (None, 0, "")
        # A source row's values are personal data: never in errors or SQL logging.
        self.engine = source_engine(config.url)
        self.table = self._from_clause()
        self._check_columns()
        self.pk = self.table.c[config.pk_column or config.key_column]
        self.updated_at = self.table.c[config.updated_at_column]
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.postgresql = self.engine.dialect.name == "postgresql"
        self.snapshot = self._snapshot_capture()
        self.held_ahead = 0  # rows `RowAhead` held in the current lookback poll
        # The key values as read of the page's deletes (`_hold_live_keys`), by their text.
        self._deleted_keys: dict[str, Any] = {}
        self._check_held_live = self._held_live_checkable()

    def _from_clause(self) -> Any:
        config = self.config
        if config.query is None:
            try:
                return Table(config.table, MetaData(), autoload_with=self.engine)
            except NoSuchTableError:
                raise FatalError(
                    f"{config.name}: table = {config.table!r}: no such table at the source, "
                    "or not visible to the connection's user (a table of another schema: "
                    "the connection's search path, or a `query`)"
                ) from None
        needed = {
            config.key_column,
            config.pk_column or config.key_column,
            config.updated_at_column,
            *config.fields.values(),
        }
        needed |= {c for c in (config.version_column, config.deleted_column) if c}
        names: list[Any] = [column(name) for name in sorted(needed)]
        return text(config.query).columns(*names).subquery("src")

    def _check_columns(self) -> None:
        """A column the mapping names that the table lacks stops the source, naming the
        option: a wrong name in `fields` made every row assert null for that field,
        erasing what other sources said of it. (A `query` declares its columns: a wrong
        one fails the query.)"""
        config = self.config
        named = {
            "key_column": config.key_column,
            "pk_column": config.pk_column,
            "updated_at_column": config.updated_at_column,
            "version_column": config.version_column,
            "deleted_column": config.deleted_column,
            **{f"fields.{path}": column for path, column in config.fields.items()},
        }
        missing = [
            f"{option} = {column!r}"
            for option, column in named.items()
            if column is not None and column not in self.table.c
        ]
        if missing:
            raise FatalError(
                f"{config.name}: no such column in {config.table}: {', '.join(missing)}"
            )

    def leading_columns(self) -> set[str] | None:
        """The columns that lead an index or a key of the table (None: a `query`, whose
        indexes are not known)."""
        if self.config.query is not None:
            return None
        keyed = [*self.table.indexes, *self.table.constraints]
        return {next(iter(k.columns)).name for k in keyed if len(k.columns)}

    def _held_live_checkable(self) -> bool:
        """Whether a soft delete's key is looked up in the other rows (`_hold_live_keys`):
        with `pk_column` and a `deleted_column`, on a table whose key column leads an
        index (else each page with a delete would scan the table; a warning says so)."""
        config = self.config
        if not (config.deleted_column and config.pk_column) or (
            config.pk_column == config.key_column
        ):
            return False
        if config.key_column in (self.leading_columns() or set()):
            return True
        log.warning(
            "%s: no index of %s begins with %s: a soft delete whose key another row holds "
            "live is sent as a delete (docs/adapters.md, \"One row per key\"); index the "
            "column", config.name, config.table, config.key_column,
        )  # fmt: skip
        return False

    def _snapshot_capture(self) -> bool:
        """Snapshot capture on a PostgreSQL table (`auto`, `snapshot`); else the lookback."""
        if not self.postgresql or self.config.capture == "lookback" or self.config.query:
            return False
        if is_plain_table(self.engine, self.config.table):
            return True
        if self.config.capture == "snapshot":
            raise FatalError(f"capture = 'snapshot': {self.config.table} is no table with xmin")
        log.info("%s: %s has no xmin of its own: lookback capture", self.config.name, self.table)
        return False

    def close(self) -> None:
        self.engine.dispose()

    # -- reading ------------------------------------------------------------------------

    def pages(self, state: CursorState) -> Iterator[list[SourceChange | RejectedRow]]:
        """Pages of new or changed rows; the caller publishes each page and then calls
        `remember` (which advances the high-water mark) before it asks for the next. A
        PostgreSQL poll records its snapshot's xmin in `state` once every page was taken;
        a first poll (or a lookback state's first, once its window is read) before the
        pages it may be stopped between."""
        if self._unplaced is None:  # once a process: a count by the column's index
            unplaced = self.rows_without_cursor_time()
            if unplaced:
                log.warning(
                    "%s: %d rows have no %s (or an infinite one) or no %s and are never read; "
                    "give the columns a value on insert", self.config.source, unplaced,
                    self.config.updated_at_column, self.pk.name,
                )  # fmt: skip
        self.held_ahead = 0
        if not self.snapshot:
            start = self._window_start(state, reading=True)
            yield from self._scan(state, None if start is None else self._at_or_after(start))
            self._warn_held()
            return
        with self.engine.connect() as conn:
            began, xmax = current_xmin_xmax(conn)
        recorded = state.xmin
        if recorded is not None and recorded > xmax:
            log.warning(
                "%s: the source's transaction ids went back (a restored database?): "
                "re-reading the lookback window once",
                self.config.name,
            )
            recorded = None
        high = self._high(state)
        if high is None:
            # Recorded before the first page, not after the last: a first poll stopped
            # between pages saved a cursor without it, and the next poll took that for a
            # state of lookback capture; a row that a transaction open meanwhile wrote
            # further back than the window was never read. Every transaction the scans
            # cannot see has an id of at least `began`, and the next poll reads their rows
            # behind its cursor again (`written_since`).
            state.xmin = began
            yield from self._scan(state, None)
        elif recorded is None:  # a state of lookback capture: its window, this once
            start = high[0] - timedelta(seconds=self.config.lookback_seconds)
            yield from self._scan(state, and_(self._at_or_after(start), not_(self._after(high))))
            # The window read, the rest as a first poll's (above): a stop from here on
            # leaves the snapshot's xmin recorded.
            state.xmin = began
            yield from self._scan(state, self._after(high))
        else:
            if xmax > recorded:  # else no transaction has written since: none is late
                late = and_(written_since(recorded), not_(self._after(high)))
                yield from self._scan(state, late)
            yield from self._scan(state, self._after(high))
        state.xmin = began
        self._forget(state)
        self._warn_held()

    def _warn_held(self) -> None:
        if self.held_ahead:
            log.warning(
                "%s: %d rows held: their %s is more than %d s ahead of this host's "
                "clock (sent once their time has come); check the source's clock and "
                "this host's", self.config.name, self.held_ahead,
                self.config.updated_at_column, AHEAD_TOLERANCE.seconds,
            )  # fmt: skip

    def _scan(
        self, state: CursorState, condition: Any
    ) -> Iterator[list[SourceChange | RejectedRow]]:
        last: tuple[datetime, Any] | None = None
        size = self.config.batch_size
        # SQLite orders by a normalised timestamp no index of the source serves: every
        # query scans and sorts the rows after the cursor, so it reads several pages at a
        # time (the rows then wait in memory, as a bigger page's would).
        fetch = size * SQLITE_PAGES_PER_QUERY if self._unindexed_order() else size
        # Rows the driver could not read, held back while nothing readable follows them:
        # UNDECODABLE_IN_A_ROW of them are a column's type (or a query the server cannot
        # compute), and the source stops before any is dead-lettered or passed.
        held: list[Any] = []
        read_one = False  # a row of this scan read: the held rows are bad rows
        while True:
            rows, cut = self._page(condition, last, fetch)
            for _ in range(3):  # the rows of a cut page all moved meanwhile: read it again
                if rows or not cut:
                    break
                rows, cut = self._page(condition, last, fetch)
            if not rows:
                if cut:  # not the end: fail the poll (retried; nothing saved past it)
                    raise RetriableError(f"{self.config.name}: a page's rows kept moving")
                break
            high = rows[-1]._mapping
            last = (self._cursor_time_of(high), high[self.pk.name])
            if all(isinstance(row, _Undecodable) for row in rows):
                held += rows
                if len(held) >= UNDECODABLE_IN_A_ROW:
                    raise FatalError(
                        f"{self.config.name}: {len(held)} rows in a row cannot be read by the "
                        "database driver: a column's type it cannot read (text in a DATE "
                        "column?) or a query the server cannot compute; fix it, then restart"
                    )
                continue
            rows, held, read_one = [*held, *rows], [], True
            for start in range(0, len(rows), size):
                page = rows[start : start + size]
                self._deleted_keys = {}
                changes = [change for row in page if (change := self._read(row, state))]
                changes = self._hold_live_keys(changes)
                if changes:
                    yield changes
            if len(rows) < fetch and not cut:
                return
        if held:  # the scan's last rows: rejected, as one bad row is, if another reads
            if not (read_one or self._readable_besides(held, state)):
                raise FatalError(
                    f"{self.config.name}: no row can be read by the database driver: a "
                    "column's type it cannot read (text in a DATE column?) or a query the "
                    "server cannot compute; fix it, then restart"
                )
            self._deleted_keys = {}
            changes = [change for row in held if (change := self._read(row, state))]
            changes = self._hold_live_keys(changes)
            if changes:
                yield changes

    def _hold_live_keys(
        self, changes: list[SourceChange | RejectedRow]
    ) -> list[SourceChange | RejectedRow]:
        """The page's changes, its deletes whose key a live row holds marked `held` (with
        `pk_column`: one key, several rows). Versions rise per row: a soft delete and the
        new row of its key, written at one time, went out with one version, and the delete
        won; a delete written after its key's new row won too. Such a delete is not sent:
        the record lives on in the other row, whose own changes and delete are sent as they
        come. Only the deletes about to be sent are looked up, in one query per page."""
        if not self._check_held_live:
            return changes
        deletes = {
            c.key: self._deleted_keys[c.key]
            for c in changes
            if isinstance(c, SourceChange) and c.data is None and c.key in self._deleted_keys
        }
        if not deletes:
            return changes
        config = self.config
        key = self.table.c[config.key_column]
        flag = self.table.c[config.deleted_column]
        live: set[str] = set()
        wanted = list(deletes.values())
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), KEYS_PER_QUERY):
                query = select(key, flag).where(key.in_(wanted[start : start + KEYS_PER_QUERY]))
                for found, deleted in conn.execute(query):
                    try:
                        gone = soft_deleted(deleted)
                    except ValueError:
                        # A flag nobody can read may be a live row's: the delete is held
                        # (`soft_deleted`'s rule: never erase a record on such a flag).
                        gone = False
                    if not gone:
                        live.add(str(found))
        if not live:
            return changes
        log.info(
            "%s: %d deletes not sent: another row holds each one's %s live",
            config.name, len(live), config.key_column,
        )  # fmt: skip
        return [
            replace(c, held=True)
            if isinstance(c, SourceChange) and c.data is None and c.key in live
            else c
            for c in changes
        ]

    def _readable_besides(self, held: list[Any], state: CursorState) -> bool:
        """Whether a row other than `held` reads: then they are bad rows, not a column's
        type or a query the server cannot compute (which fail every row). Tried: the
        cursor's row, then up to UNDECODABLE_IN_A_ROW others, each alone."""
        columns = [self.table, row_xid8()] if self.snapshot else [self.table]
        whole = select(*columns).where(self.pk.is_not(None))
        pks = [row._mapping[self.pk.name] for row in held]
        others = select(self.pk).where(self.pk.is_not(None), self.pk.not_in(pks))
        try:
            candidates = [state.pk] if state.pk is not None else []
            candidates += [r[0] for r in self._fetch(others.limit(UNDECODABLE_IN_A_ROW))]
        except UNREADABLE:
            return False
        for pk in candidates:
            try:
                if self._fetch(whole.where(self.pk == pk).limit(1)):
                    return True
            except UNREADABLE:
                continue
        return False

    def placed(self) -> Any:
        """Rows with a place in the cursor's order: a cursor time and a primary key (the key
        column without `pk_column`), the time finite on PostgreSQL. One 'infinity' (or
        '-infinity') stopped the source at every poll: psycopg cannot read it, so even the
        rows' places could not be."""
        placed = and_(self.updated_at.is_not(None), self.pk.is_not(None))
        timed = isinstance(self.updated_at.type, DateTime | Date)
        if self.engine.dialect.name == "postgresql" and timed:
            placed = and_(placed, func.isfinite(self.updated_at))
        return placed

    def rows_without_cursor_time(self) -> int:
        """Rows without a place in the cursor's order (`placed`): never read. As counted
        the first time this adapter asked."""
        if self._unplaced is None:
            query = select(func.count()).select_from(self.table)
            unplaced = not_(self.placed())
            with self.engine.connect() as conn:
                found = conn.execute(query.where(unplaced)).scalar_one()
            self._unplaced = int(found)
        return self._unplaced

    def _unindexed_order(self) -> bool:
        return self.sqlite and self.config.updated_at_format is None

    def _page(
        self, condition: Any, last: tuple[datetime, Any] | None, limit: int
    ) -> tuple[list[Any], bool]:
        """Up to `limit` rows after `last` in cursor order, and whether the page was cut
        short at a row the database driver cannot read (then the last row returned is that
        row's place, `_Undecodable`, and the scan goes on after it)."""
        columns = [self.table, row_xid8()] if self.snapshot else [self.table]
        moment = self._moment(self.updated_at)
        # A row without a cursor time has no place in the cursor's order: never read
        # (`adapters check` counts them; the column needs a value from the insert on).
        query = select(*columns).where(self.placed())
        query = query.order_by(moment, self.pk).limit(limit)
        if condition is not None:
            query = query.where(condition)
        if last is not None:
            query = query.where(self._after(last))
        try:
            return self._fetch(query), False
        except UNREADABLE:
            # A value the driver cannot turn into Python (a date 'infinity' or before year
            # 1, text in a DATE column): the rows before it, then its place.
            found = self._up_to_undecodable(query)
            return ([], False) if found is None else (found, True)

    def _fetch(self, query: Any) -> list[Any]:
        """One query's rows, on a connection of its own (a server-side error aborts only
        its own transaction)."""
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(query))
        except OperationalError as error:
            # SQLite's driver reads a TEXT value that is not UTF-8 as an error of the
            # database (and quotes the value): a row's data, found and rejected as any
            # value the driver cannot read, not an outage retried for ever.
            if SQLITE_NOT_UTF8 in str(error.orig):
                raise ValueError("a text value is not UTF-8") from None
            raise

    def _up_to_undecodable(self, query: Any) -> list[Any] | None:
        """The rows of `query` before the first one that cannot be read, then that row's
        place (primary key, cursor time, key, transaction) as `_Undecodable`. When even
        the places cannot be read, the source stops.

        The places are read first, in cursor order. A bisection over them finds the
        furthest place up to which the rows read, each try one query of every row up to
        that place (a position, not a LIMIT: rows committed meanwhile are read with the
        others, and a server filters before it computes a `query` source's columns), about
        log2(page) queries. The row at the next place, read alone, is the one that fails;
        if it reads (a row committed meanwhile failed), it is returned as read. None when
        there are no rows after all."""
        light = [self.pk, self.updated_at, self.table.c[self.config.key_column]]
        if self.snapshot:
            light.append(row_xid8())
        try:
            places = [dict(p._mapping) for p in self._fetch(query.with_only_columns(*light))]
        except UNREADABLE:
            raise FatalError(
                f"{self.config.name}: a row's {self.config.updated_at_column}, "
                f"{self.pk.name} or {self.config.key_column} cannot be read by the database "
                "driver; fix the row at the source, then restart"
            ) from None
        if not places:  # no rows after all: the end
            return None
        first = self._alone(query, places[0])  # a run of bad rows: one query each
        if first is None:
            return [_Undecodable(places[0])]
        good, bad = 0, len(places)  # rows up to the first `good` places read; to `bad` not
        prefix: list[Any] = []
        while bad - good > 1:
            middle = (good + bad) // 2
            try:
                prefix, good = self._fetch(self._up_to(query, places[middle - 1])), middle
            except UNREADABLE:
                bad = middle
        suspect = places[good]
        alone = first if good == 0 else self._alone(query, suspect)
        if alone is None:
            return [*prefix, _Undecodable(suspect)]
        return [*prefix, *alone]

    def _alone(self, query: Any, place: dict[str, Any]) -> list[Any] | None:
        """The row at `place` read alone (none when it moved since), or None when it
        cannot be read."""
        at = self._at_place(place)
        try:
            return self._fetch(query.where(self.pk == place[self.pk.name], at).limit(1))
        except UNREADABLE:
            return None

    def _up_to(self, query: Any, place: dict[str, Any]) -> Any:
        """`query` without its LIMIT, restricted to the rows at or before `place`."""
        mark = (self._cursor_time_of(place), place[self.pk.name])
        return query.limit(None).where(not_(self._after(mark)))

    def _at_place(self, place: dict[str, Any]) -> Any:
        """The condition that a row is where `place` read it: its cursor value as read
        (text as it is written, for a text format)."""
        if self.config.updated_at_format is not None:
            return self.updated_at == literal(place[self.updated_at.name])
        return self._moment(self.updated_at) == self._bound(self._cursor_time_of(place))

    def _after(self, mark: tuple[datetime, Any]) -> Any:
        """Rows after a (updated_at, pk) position in cursor order. The first term says no
        more than the second, but an index range can begin there: without it PostgreSQL
        walked the index from its start for every page (a first poll of a million rows
        took 49 s instead of 12)."""
        moment, bound = self._moment(self.updated_at), self._bound(mark[0])
        return and_(moment >= bound, or_(moment > bound, and_(moment == bound, self.pk > mark[1])))

    def _at_or_after(self, start: datetime) -> Any:
        return self._moment(self.updated_at) >= self._bound(start)

    def _high(self, state: CursorState) -> tuple[datetime, Any] | None:
        if state.updated_at is None:
            return None
        return datetime.fromisoformat(state.updated_at), state.pk

    def _window_start(self, state: CursorState, reading: bool = False) -> datetime | None:
        """Where the lookback window begins, at the precision the source's query compares
        cursor values at: a window read from a finer start would re-read the rows of the
        start's millisecond (SQLite) or second (a text format) behind it, and the state,
        forgetting them by the finer start, would send them again at every poll. SQLite's
        strftime('%f') rounds to the millisecond: the window is read from the whole
        millisecond (`reading`), which reads the rows from half a millisecond before it,
        and the state forgets from there.

        The window reaches back from the cursor, or from this host's clock when the cursor
        is ahead of it: a row stamped ahead (a writer's clock fast by less than
        `AHEAD_TOLERANCE`, so not held) took the cursor with it, and the changes other
        writers then stamped at the right time fell behind the window for good."""
        high = self._high(state)
        if high is None:
            return None
        now = datetime.now(UTC)
        if high[0].tzinfo is None:  # the source's local clock times
            now = now.astimezone(self.zone).replace(tzinfo=None)
        start = min(high[0], now) - timedelta(seconds=self.config.lookback_seconds)
        if start.tzinfo is None:  # the source's local clock times
            start -= self._repeated(high[0])
        pattern = self.config.updated_at_format
        if pattern is not None:
            text = strptime_pattern(pattern)
            return datetime.strptime(start.strftime(text), text).replace(tzinfo=start.tzinfo)
        if self.sqlite:
            whole = start.replace(microsecond=start.microsecond // 1000 * 1000)
            return whole if reading else whole - timedelta(microseconds=500)
        return start

    def _repeated(self, local: datetime) -> timedelta:
        """How long the source's zone repeats the local time `local`, when it does (clocks
        set back at the end of daylight saving time: 02:10 comes before 02:59 and again
        after it). Rows written in the second pass carry local times up to that much
        before a cursor left in the first, behind a window of `lookback_seconds`: the
        window reaches that much further back while the cursor is in a repeated hour.
        Zero elsewhere, and in a zone that never sets its clocks back (Asia/Ho_Chi_Minh)."""
        first = local.replace(tzinfo=self.zone, fold=0).utcoffset()
        second = local.replace(tzinfo=self.zone, fold=1).utcoffset()
        if first is None or second is None or first <= second:
            return timedelta(0)
        return first - second

    def _bound(self, moment: datetime) -> Any:
        """A cursor value as a query parameter, in the column's own form."""
        pattern = self.config.updated_at_format
        if pattern is not None:  # fixed-width date text sorts in time order
            return literal(moment.strftime(strptime_pattern(pattern)))
        if self.sqlite:  # compared as UTC text when the values carry an offset
            if moment.tzinfo is not None:
                moment = moment.astimezone(UTC).replace(tzinfo=None)
            return self._moment(literal(moment, DateTime()))
        return literal(moment, DateTime(timezone=moment.tzinfo is not None))

    def cursor_order(self, value: Any) -> Any:
        """The cursor column as the cursor orders it (`adapters check` groups by it)."""
        return self._moment(value)

    def _moment(self, value: Any) -> Any:
        """A timestamp as the database orders it. SQLite keeps timestamps as text in
        whatever form the application wrote ('…09:00:00' sorts before '…09:00:00.000000'),
        so both sides are normalised to one form first (UTC where the text has an offset)."""
        if self.sqlite and self.config.updated_at_format is None:
            return func.strftime("%Y-%m-%d %H:%M:%f", value)
        return value

    # -- one row ------------------------------------------------------------------------

    def _read(self, row: Any, state: CursorState) -> SourceChange | RejectedRow | None:
        """The row's change; a `RejectedRow` when its values cannot make one (the first
        time only); None when it holds nothing new."""
        try:
            return self._change(row, state)
        except RowAhead:
            self.held_ahead += 1
            return None
        except (RowRejected, ValueError, TypeError, ArithmeticError, RecursionError) as error:
            # One row's values never stop the source. Anything else (a column the mapping
            # names that the table lacks: a configuration error) fails the run, loudly.
            values = row._mapping
            stamp = _iso(self._cursor_time_of(values))
            marker = "r" + _json_fingerprint({name: repr(value) for name, value in values.items()})
            pk = values[self.pk.name]
            entry = state.seen.get(str(pk))
            if entry is not None and entry[2] == marker:
                return None  # rejected before, unchanged
            message = str(error) if isinstance(error, RowRejected) else (
                f"a value the mapping cannot convert ({type(error).__name__})"
            )  # fmt: skip
            key = values[self.config.key_column]
            sent = int(entry[0]) if entry is not None else 0
            xid = int(values[XID_LABEL]) if self.snapshot else None
            key_text = None if key is None else str(key)
            return RejectedRow(pk, key_text, stamp, marker, message, sent, xid)

    def _cursor_time_of(self, values: Any) -> datetime:
        """The row's place in the cursor's order. A value no reading can place stops the
        source (`FatalError`): no position past it can be saved, and skipping it unseen
        could skip the rows after it too."""
        try:
            return self.cursor_time(values[self.updated_at.name])
        except (TypeError, ValueError, OverflowError) as error:  # Overflow: no UTC form
            raise FatalError(
                f"{self.config.name}: a row's {self.config.updated_at_column} cannot be read "
                f"as a time ({type(error).__name__}); fix the row at the source, then restart"
            ) from None

    def _change(self, row: Any, state: CursorState) -> SourceChange | None:
        if isinstance(row, _Undecodable):
            raise RowRejected("a value the database driver cannot read (a date out of range?)")
        values = row._mapping
        config = self.config
        moment = self._cursor_time_of(values)
        occurred = self.instant(moment)
        if occurred > datetime.now(UTC) + AHEAD_TOLERANCE:
            raise RowAhead(config.updated_at_column)
        if values[config.key_column] is None:
            raise RowRejected(f"{config.key_column}: NULL (the key column needs a value)")
        if config.version_column:
            derived = _whole_number(values[config.version_column], config.version_column)
        else:
            derived = _micros(occurred)
        try:
            deleted = bool(config.deleted_column) and soft_deleted(values[config.deleted_column])
        except ValueError as error:
            raise RowRejected(str(error)) from None
        if deleted:  # looked up with the page's others (`_hold_live_keys`)
            self._deleted_keys[str(values[config.key_column])] = values[config.key_column]
        data = None if deleted else self._data(values)
        marker = derived if config.version_column else _fingerprint(data)
        pk = values[self.pk.name]
        xid = int(values[XID_LABEL]) if self.snapshot else None
        stamp = _iso(moment)
        version, backwards = derived, False
        raised: Raised | None = None
        entry = state.seen.get(str(pk))
        rejected = entry is not None and _rejected_marker(entry[2] if len(entry) > 2 else None)
        if rejected and entry is not None and not entry[0]:
            entry = None  # rejected, never sent: as a row the state does not hold
        if entry is not None:
            sent, before = entry[0], entry[1]
            # none in states of older releases; a rejected row's marker matches no change
            known = None if rejected else (entry[2] if len(entry) > 2 else None)
            if derived <= sent:  # its own version did not move (same instant), or went back
                if (
                    marker == known
                    or (known is None and derived == sent and not rejected)
                    or (not config.version_column and _same_as_before(known, data))
                ):
                    fresh = [sent, stamp, marker, xid]
                    if entry != fresh:  # touched, no new content: remember it as it is now
                        state.note(str(pk), fresh)
                    return None  # read again, or touched: nothing new
                if known == reserved(marker):  # journaled for this content, maybe sent
                    version = sent
                else:
                    version = sent + 1
                    if isinstance(known, int) and config.version_column:
                        went_back = derived < known
                    else:
                        went_back = stamp < before
                    raised = "lower" if went_back else "same_instant"
            backwards = stamp < before
        elif self.snapshot and not config.version_column and self._forgotten_behind(stamp, state):
            # A transaction held open past the window committed a change to this row: it
            # is the row as it is now, but its updated_at can be below a version sent for
            # the row since then (by a transaction that began later and committed first),
            # which the state no longer remembers. Above everything sent, it is not stale.
            top = self.top_sent(state)
            if derived <= top:
                version, raised = top + 1, "lower"
        return SourceChange(
            config.source,
            config.entity,
            pk,
            str(values[config.key_column]),
            moment,
            stamp,
            version,
            occurred,
            data,
            marker,
            xid,
            raised,
            backwards,
        )

    def _forgotten_behind(self, stamp: str, state: CursorState) -> bool:
        """Whether a row of this updated_at lies behind the lookback window: a row there
        that the state does not remember may have been sent before and forgotten."""
        if state.updated_at is None:
            return False
        second = int(time.time())  # a cursor ahead of the clock: the start moves with it
        if self._horizon[:2] != (state.updated_at, second):
            start = self._window_start(state)
            assert start is not None
            self._horizon = (state.updated_at, second, _iso(start))
        return stamp < self._horizon[2]

    @staticmethod
    def reservation(changes: list[SourceChange]) -> dict[str, Any]:
        """What the journal keeps of a page before it is sent (`CursorState.fold`): each
        row's version, updated_at, marker and xid8, and the page's highest version. A run
        that dies after sending the page and before its checkpoint is saved resumes from a
        state that does not know these versions: a row's next change could then get its
        own version at or below one sent (a writer's clock behind, two changes within the
        column's precision) and be dropped by the reconciler as stale, or share a version
        and event id with other content."""
        rows = [[str(c.pk), c.version, c.stamp, c.marker, c.xid] for c in changes]
        return {"top": max(c.version for c in changes), "rows": rows}

    def top_sent(self, state: CursorState) -> int:
        """The highest version sent so far: saved in the state; for a state of an older
        release, the highest it remembers or the cursor's own, whichever is higher."""
        if state.top is not None:
            return state.top
        known = [int(entry[0]) for entry in state.seen.values()]
        if state.updated_at is not None:
            known.append(_micros(self.instant(datetime.fromisoformat(state.updated_at))))
        return max(known, default=0)

    def cursor_time(self, value: Any) -> datetime:
        """A cursor column value as the cursor holds it: naive as the source wrote it, or
        converted to UTC when it carries a zone (never relabelled)."""
        pattern = self.config.updated_at_format
        if pattern is not None:
            return datetime.strptime(str(value), strptime_pattern(pattern))
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        if not isinstance(parsed, datetime):
            raise TypeError("the cursor column holds no timestamp")
        return parsed.astimezone(UTC) if parsed.tzinfo is not None else parsed

    def instant(self, moment: datetime) -> datetime:
        """A cursor value as an aware time in the source's zone: naive values are local
        time of the source (`timezone`), values with a zone are converted to it."""
        if moment.tzinfo is not None:
            return moment.astimezone(self.zone)
        return moment.replace(tzinfo=self.zone)

    def _data(self, values: Any) -> dict[str, Any]:
        return map_fields(values, self.config, self.zone, self._plan)

    # -- after publishing ---------------------------------------------------------------

    def remember(self, state: CursorState, page: list[SourceChange | RejectedRow]) -> None:
        """After a page is acknowledged: advance the high-water mark, note the rows as seen
        (a rejected row with version 0), and forget rows that no poll will read again."""
        sent = [change.version for change in page if isinstance(change, SourceChange)]
        if sent:
            state.top = max(self.top_sent(state), max(sent))
        for change in page:
            stamp = change.stamp
            state.note(str(change.pk), [change.version, stamp, change.marker, change.xid])
            mark = (stamp, _saved_pk(change.pk))
            if state.updated_at is None or mark > (state.updated_at, state.pk):
                state.updated_at, state.pk = mark
        self._forget(state)

    def _forget(self, state: CursorState) -> None:
        """Keep the rows of the lookback window behind the cursor, those written since
        the recorded snapshot (a PostgreSQL poll reads them again) and, without a version
        column, those sent with a version above the window's start (a late row's)."""
        start = self._window_start(state)
        if start is None:
            return
        floor = None if self.config.version_column else _micros(self.instant(start))
        state.forget_before(_iso(start), floor)


def _saved_pk(pk: Any) -> Any:
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


@dataclass(frozen=True)
class _Undecodable:
    """A row of which only its place could be read (`_up_to_undecodable`)."""

    _mapping: dict[str, Any]


# The marker of a version reserved and maybe sent, for content no longer known (states of
# earlier releases): equal to no content's. `reserved` gives one for known content.
RESERVED = "v"


def reserved(marker: Any) -> str:
    """The marker of a version journaled for the content of `marker` and maybe sent
    (`CursorState.fold`): equal to no content's marker (a version column's value is a
    number, a content hash starts with a letter other than 'v')."""
    return f"{RESERVED}{marker}"


def _rejected_marker(marker: Any) -> bool:
    """The marker `RejectedRow` leaves ('r' and 16 hex digits): no version value, and no
    content hash, which is 'o' and hex digits (or hex digits alone, older releases)."""
    return isinstance(marker, str) and marker.startswith("r")


def _whole_number(raw: Any, column_name: str) -> int:
    """A version column's value: an integer, or a float, decimal or ASCII text holding a
    whole number (a REAL or NUMERIC column). Anything else rejects the row."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().isascii():
        with contextlib.suppress(ArithmeticError):  # decimal.InvalidOperation
            raw = Decimal(raw.strip())
    if isinstance(raw, float | Decimal) and math.isfinite(raw) and raw == int(raw):
        return int(raw)
    raise RowRejected(f"{column_name}: not a whole number")


def _fingerprint(data: dict[str, Any] | None) -> str:
    """A short hash of a change's mapped content (None: a delete): `o` and the hash of its
    JSON by orjson, keys sorted (a twentieth of a SQL source's publishing was `json`'s
    instead). What orjson refuses or writes as null (an integer beyond 64 bits, a lone
    surrogate, a NaN) gets the fingerprint of earlier releases, which `json` computes."""
    try:
        body = orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _json_fingerprint(data)
    if b"null" in body and has_non_finite_float(data):
        return _json_fingerprint(data)
    return "o" + hashlib.blake2b(body, digest_size=8).hexdigest()


def _json_fingerprint(data: dict[str, Any] | None) -> str:
    """The fingerprint of releases before orjson's: 16 hex digits (states saved by them
    hold it for the rows of their lookback window). A lone surrogate, which made them fail,
    is hashed as it is (the row's event is then refused and dead-lettered)."""
    body = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _same_as_before(known: Any, data: dict[str, Any] | None) -> bool:
    """A row remembered by a release before orjson's fingerprint, read again unchanged."""
    return isinstance(known, str) and len(known) == 16 and _json_fingerprint(data) == known


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _iso(moment: datetime) -> str:
    """Fixed-width ISO text, so that string order is time order (UTC ones end '+00:00')."""
    return moment.isoformat(timespec="microseconds")
