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

This module holds the adapter (`SqlPollingAdapter`); a source's options are in
`producers.sql_config`, the cursor's state in `producers.sql_cursor`, and what a row read
becomes (a change, a rejected row) and the markers `seen` keeps in `producers.sql_rows`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

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
from sqlalchemy.exc import DataError, NoSuchTableError, OperationalError

from producers.mapping import field_plan, map_fields, soft_deleted, strptime_pattern
from producers.sdk import FatalError, RetriableError, source_engine
from producers.sql_config import SqlSourceConfig
from producers.sql_cursor import CursorState, saved_pk
from producers.sql_rows import (
    Raised,
    RejectedRow,
    RowAhead,
    RowRejected,
    SourceChange,
    fingerprint,
    json_fingerprint,
    rejected_marker,
    reserved,
    same_as_before,
)
from producers.sql_snapshot import (
    XID_LABEL,
    current_xmin_xmax,
    is_plain_table,
    row_xid8,
    written_since,
)

log = logging.getLogger(__name__)

SQLITE_PAGES_PER_QUERY = 10  # pages read by one query where no index serves the order
# Rows in a row the database driver cannot read before the source stops: one bad row is
# data (rejected), a column no row of which reads is a configuration (a column's type).
UNDECODABLE_IN_A_ROW = 20
# What fetching a row whose value the driver (or the server) cannot produce raises: a date
# out of Python's range, text or a number in a DATE column, an ENUM value unknown.
UNREADABLE = (ValueError, TypeError, LookupError, OverflowError, DataError)
SQLITE_NOT_UTF8 = "Could not decode to UTF-8"  # sqlite3's text for such a value

# How far a row's time may run ahead of the producer's clock: the worker's default allowed
# skew (PORTAL_SYNC_MAX_CLOCK_SKEW_SECONDS), beyond which it refuses the event anyway.
AHEAD_TOLERANCE = timedelta(seconds=300)
# Keys looked up in one query (`_hold_live_keys`): within every database's limit of a list.
KEYS_PER_QUERY = 500


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
        # ... and of its changes (`_above_other_rows`)
        self._page_keys: dict[str, Any] = {}
        self._check_held_live = self._held_live_checkable()
        self._check_other_rows = self._other_rows_checkable()

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

    def _other_rows_checkable(self) -> bool:
        """Whether a new row's first change is compared with the versions the key's other
        rows sent (`_above_other_rows`): with `pk_column`, on a table whose key column
        leads an index (the warning of `_held_live_checkable` names a missing one)."""
        config = self.config
        if not config.pk_column or config.pk_column == config.key_column:
            return False
        return config.key_column in (self.leading_columns() or set())

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
                self._deleted_keys, self._page_keys = {}, {}
                changes = [change for row in page if (change := self._read(row, state))]
                changes = self._above_other_rows(self._hold_live_keys(changes), state)
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
            self._deleted_keys, self._page_keys = {}, {}
            changes = [change for row in held if (change := self._read(row, state))]
            changes = self._above_other_rows(self._hold_live_keys(changes), state)
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

    def _above_other_rows(
        self, changes: list[SourceChange | RejectedRow], state: CursorState
    ) -> list[SourceChange | RejectedRow]:
        """The page's changes, a new row's first one raised above what the key's other rows
        sent (with `pk_column`: one key, several rows). Versions rise per row: a record
        re-created under a new row whose `updated_at` is not above the old row's last sent
        version (a transaction that began before the old row's last update and committed
        after it, the same second, a writer's clock behind) went out below it, and the
        reconciler kept the old row's values as `stale`. Only a row the state does not
        hold, whose version is not above everything sent, is looked up: one query per
        page that has one (none in a first snapshot, read in `updated_at` order)."""
        if not self._check_other_rows:
            return changes
        top = self.top_sent(state)
        late = [
            c
            for c in changes
            if isinstance(c, SourceChange)
            and not c.held
            and c.version <= top
            and str(c.pk) not in state.seen
        ]
        if not late:
            return changes
        config = self.config
        key = self.table.c[config.key_column]
        wanted = list({c.key: self._page_keys[c.key] for c in late}.values())
        others: dict[str, int] = {}  # key -> the highest version its other rows sent
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), KEYS_PER_QUERY):
                query = select(self.pk, key).where(key.in_(wanted[start : start + KEYS_PER_QUERY]))
                for pk, found in conn.execute(query):
                    entry = state.seen.get(str(pk))
                    if entry is not None and entry[0]:
                        text = str(found)
                        others[text] = max(others.get(text, 0), int(entry[0]))
        # the page's own changes go out in order: an earlier one of another row counts too
        lookup = {id(c) for c in late}
        raised: list[SourceChange | RejectedRow] = []
        for change in changes:
            if isinstance(change, SourceChange) and id(change) in lookup:
                floor = others.get(change.key, 0)
                if change.version <= floor:
                    change = replace(change, version=floor + 1, raised="lower")
            if isinstance(change, SourceChange) and not change.held:
                others[change.key] = max(others.get(change.key, 0), change.version)
            raised.append(change)
        return raised

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
            marker = "r" + json_fingerprint({name: repr(value) for name, value in values.items()})
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
        self._page_keys[str(values[config.key_column])] = values[config.key_column]
        data = None if deleted else self._data(values)
        marker = derived if config.version_column else fingerprint(data)
        pk = values[self.pk.name]
        xid = int(values[XID_LABEL]) if self.snapshot else None
        stamp = _iso(moment)
        version, backwards = derived, False
        raised: Raised | None = None
        entry = state.seen.get(str(pk))
        rejected = entry is not None and rejected_marker(entry[2] if len(entry) > 2 else None)
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
                    or (not config.version_column and same_as_before(known, data))
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
            mark = (stamp, saved_pk(change.pk))
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


@dataclass(frozen=True)
class _Undecodable:
    """A row of which only its place could be read (`_up_to_undecodable`)."""

    _mapping: dict[str, Any]


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


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _iso(moment: datetime) -> str:
    """Fixed-width ISO text, so that string order is time order (UTC ones end '+00:00')."""
    return moment.isoformat(timespec="microseconds")
