"""Built-in `outbox`: a transactional outbox table, published in order, then deleted or marked.

The source application writes, in the same transaction as its business change, one row per
change: `id` (rising), `entity`, `record_key`, `op`, `occurred_at`, `payload` (the contract's
`data` as JSON text; empty for a delete) and optionally `version` (default: the row id).
Column names are configurable. After the broker acknowledged a batch, exactly its rows are
deleted (`after = "delete"`) or get `processed_at` set (`after = "mark"`).

Ids are allocated when a row is written, not when its transaction commits: a row can
appear after rows with higher ids were already read. The saved position is therefore the
highest id read plus the ids read within `lookback_ids` below it; every run first sweeps
that window for rows it has not seen (committed late), then reads on from the position.

The clean-up (delete or mark) runs after the state is saved, so the state also names the
rows of the last batch (`pending`) until a later checkpoint proves their clean-up ran: a
clean-up that failed (lost connection, revoked permission, lock timeout) is run again at
the start of the next poll, before anything else, and those rows are never published
twice. A crash between publishing and saving repeats at most one batch (same event ids).

Rows committed further below the position than `lookback_ids` are not published (the
window no longer reaches them). After every poll the unprocessed rows there are counted
in `portal_sync_outbox_rows_beyond_lookback{source}`, which alerts: every row published
before has been deleted or marked by then. They stay in the table: widening
`lookback_ids` past them publishes them on the next poll.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    Column,
    MetaData,
    String,
    Table,
    delete,
    func,
    select,
    update,
)

from producers.mapping import TimeZoneName
from producers.metrics import OUTBOX_BEYOND_LOOKBACK
from producers.sdk import (
    Adapter,
    Checkpoint,
    FatalError,
    Item,
    Record,
    SkippableRecord,
    State,
    source_engine,
)
from schemas.events import ENTITIES, Entity
from schemas.json_text import loads_unique

# Ids in one statement's IN list: within every database's limit (Oracle 1,000).
IDS_PER_STATEMENT = 500


class OutboxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    table: str = "portal_sync_outbox"
    entity: Entity | None = None  # fixed entity; else from entity_column
    id_column: str = "id"
    entity_column: str = "entity"
    key_column: str = "record_key"
    op_column: str = "op"
    version_column: str | None = None
    occurred_at_column: str = "occurred_at"
    payload_column: str = "payload"
    after: Literal["delete", "mark"] = "delete"
    processed_column: str = "processed_at"
    timezone: TimeZoneName = "Asia/Ho_Chi_Minh"
    batch_size: int = 1000
    lookback_ids: int = 10_000  # how far below the position late rows are looked for


class OutboxAdapter(Adapter):
    """Transactional outbox table: rows in id order, deleted or marked once acknowledged."""

    key = "record_key"
    cursor = "id"
    sorted_output = True
    emits_deletes = True
    Config = OutboxConfig

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, OutboxConfig)
        self.options = config
        self.entity = config.entity
        self.zone = ZoneInfo(config.timezone)
        self._engine: Any = None
        self._table: Table | None = None
        self._cleaned: set[int] = set()
        self._tracked_from = 0
        OUTBOX_BEYOND_LOOKBACK.set(source, config.table, 0)  # exported from the start

    def _connect(self) -> Table:
        if self._table is None:
            # A source row's values are personal data: never in errors or SQL logging.
            self._engine = source_engine(self.options.url)
            # occurred_at is read as the driver returns it, never parsed by SQLAlchemy: one
            # malformed value must become one dead letter, not a failed read of the page.
            raw_time = Column(self.options.occurred_at_column, String)
            self._table = Table(
                self.options.table, MetaData(), raw_time, autoload_with=self._engine
            )
        return self._table

    def read(self, state: State) -> Iterator[Item]:
        table = self._connect()
        last_id = int(state.get("last_id", 0))
        seen = {int(i) for i in state.get("seen", [])}
        pending = [int(i) for i in state.get("pending", [])]
        # Per pending row, what its clean-up checks the row still is (`_mark`).
        marks = {int(i): str(m) for i, m in (state.get("pending_marks") or {}).items()}
        self._cleaned = set()  # rows whose clean-up ran at the last checkpoint
        # Since `pending` is tracked (every state saved by this version), a seen row still
        # in the table unprocessed, and not pending, can only be a reused id; a state of an
        # older release did not track the clean-ups of the rows up to its `last_id`.
        self._tracked_from = int(state.get("tracked_from", 0 if "pending" in state else last_id))
        if pending:  # published; their clean-up may have failed: run it (again) first
            self._check_pending(table, pending, marks)
            yield Checkpoint(
                _state(last_id, seen, pending, self._tracked_from, marks),
                self._done(table, pending),
            )
        # The engine resumes this generator once the checkpoint's clean-up ran; a
        # conformance check resumes it without running any: those rows stay pending.
        pending = [i for i in pending if i not in self._cleaned]
        self._cleaned.clear()  # only the last checkpoint's: a run of ten million rows
        ident = table.c[self.options.id_column]
        late = ident > last_id - self.options.lookback_ids, ident <= last_id
        unclean = set(pending)  # published rows whose clean-up has not run
        pages = [
            self._pages(table, late, seen, unclean),
            self._pages(table, (ident > last_id,), seen, unclean),
        ]
        for page in (page for part in pages for page in part):
            for row in page:
                yield self._item(row._mapping)
            ids = [int(row._mapping[self.options.id_column]) for row in page]
            marks.update(zip(ids, (self._mark(row._mapping) for row in page), strict=True))
            pending = sorted({*pending, *ids})
            unclean.update(ids)
            seen.update(ids)
            last_id = max(last_id, *ids)
            horizon = last_id - self.options.lookback_ids
            seen = {i for i in seen if i > horizon}
            yield Checkpoint(
                _state(last_id, seen, pending, self._tracked_from, marks),
                self._done(table, pending),
            )
            pending = [i for i in pending if i not in self._cleaned]
            marks = {i: marks[i] for i in pending if i in marks}
            unclean.difference_update(self._cleaned)
            self._cleaned.clear()
        self._count_beyond_lookback(table, last_id - self.options.lookback_ids)
        if not pending:  # every clean-up ran: the state need not name their rows any more
            yield Checkpoint(_state(last_id, seen, [], self._tracked_from))

    def _mark(self, values: Any) -> str:
        """What a published row's clean-up checks the row still is: a digest of its time
        and operation as read (never its key or payload, which are personal data)."""
        opts = self.options
        moment = values[opts.occurred_at_column]
        if isinstance(moment, datetime) and moment.tzinfo is not None:
            moment = moment.astimezone(UTC)  # the instant: a session's zone may change
        text = f"{moment}\x1f{values[opts.op_column]}"
        return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]

    def _check_pending(self, table: Table, pending: list[int], marks: dict[int, str]) -> None:
        """Stop the source (`FatalError`) when an id of the saved state's pending rows now
        holds another row: their clean-up ran, the run ended before a state without them
        was saved, and the table gave the ids again (MySQL 5.7 after a restart, SQLite
        without AUTOINCREMENT). Run again, the clean-up deleted or marked the new rows,
        never published."""
        opts = self.options
        ident = table.c[opts.id_column]
        columns = (ident, table.c[opts.occurred_at_column], table.c[opts.op_column])
        marked = [i for i in pending if i in marks]  # a state of an older release: none
        for start in range(0, len(marked), IDS_PER_STATEMENT):
            query = select(*columns).where(ident.in_(marked[start : start + IDS_PER_STATEMENT]))
            if opts.after == "mark":
                query = query.where(table.c[opts.processed_column].is_(None))
            with self._engine.connect() as conn:
                rows = list(conn.execute(query))
            ids = [int(row._mapping[opts.id_column]) for row in rows]
            other = [i for i, row in zip(ids, rows, strict=True)
                     if self._mark(row._mapping) != marks[i]]  # fmt: skip
            if other:
                raise FatalError(
                    f"outbox row id {min(other)} was published and cleaned up before, and "
                    f"holds another row of {opts.table} now: the table reuses ids (give it "
                    "ids that never repeat, AUTOINCREMENT or a sequence, and a "
                    "version_column, then reset this source's state) (docs/adapters.md, "
                    "outbox)"
                )

    def _count_beyond_lookback(self, table: Table, horizon: int) -> None:
        """Unprocessed rows at or below `horizon`: committed too late for the window, never
        published (rows published before are deleted, marked, or pending a clean-up, which
        has run by now)."""
        query = select(func.count()).select_from(table)
        query = query.where(table.c[self.options.id_column] <= horizon)
        if self.options.after == "mark":
            query = query.where(table.c[self.options.processed_column].is_(None))
        with self._engine.connect() as conn:
            rows = int(conn.execute(query).scalar_one())
        OUTBOX_BEYOND_LOOKBACK.set(self.source, self.options.table, rows)

    def _pages(
        self, table: Table, where: tuple[Any, ...], seen: set[int], unclean: set[int]
    ) -> Iterator[list[Any]]:
        """Unprocessed rows matching `where` and not in `seen`, in id order, page by page.
        A row in `seen`, above `tracked_from` and not in `unclean` (the published rows whose
        clean-up has not run) stops the source (`FatalError`): its id was published and cleaned
        up before, so the table reuses ids (SQLite's `INTEGER PRIMARY KEY` without
        `AUTOINCREMENT`, MySQL 5.7 after a restart, `TRUNCATE … RESTART IDENTITY`). Skipped,
        the new row would be lost without a trace; its default version, the id, would also
        rank below what its record's events had."""
        opts = self.options
        ident = table.c[opts.id_column]
        after = -(2**63)
        while True:
            query = (
                select(table).where(*where, ident > after).order_by(ident).limit(opts.batch_size)
            )
            if opts.after == "mark":
                query = query.where(table.c[opts.processed_column].is_(None))
            with self._engine.connect() as conn:
                rows = list(conn.execute(query))
            if not rows:
                return
            after = int(rows[-1]._mapping[opts.id_column])
            fresh = [row for row in rows if int(row._mapping[opts.id_column]) not in seen]
            back = [i for r in rows if (i := int(r._mapping[opts.id_column])) in seen]
            again = [i for i in back if i > self._tracked_from and i not in unclean]
            if again:
                raise FatalError(
                    f"outbox row id {again[0]} was published and cleaned up before, and is in "
                    f"{opts.table} again, unprocessed: the table reuses ids (give it ids "
                    "that never repeat, AUTOINCREMENT or a sequence, and a version_column, "
                    "then reset this source's state), or its delete or mark did not take "
                    "effect (a trigger, a row policy) (docs/adapters.md, outbox)"
                )
            if fresh:
                yield fresh
            if len(rows) < opts.batch_size:
                return

    def _item(self, values: Any) -> Record | SkippableRecord:
        opts = self.options
        row_id = values[opts.id_column]
        origin = f"{opts.table}:{row_id}"
        entity = opts.entity or values[opts.entity_column]
        key = str(values[opts.key_column] or "")
        if entity not in ENTITIES:  # a rejected row's dead letter keeps it: the row goes
            message = "entity: not a contract entity"
            return SkippableRecord("unknown_entity", message, origin, raw=_row_bytes(values))
        op = str(values[opts.op_column] or "upsert").strip().lower()
        if op not in ("upsert", "delete"):  # a "d" or "remove" taken as an upsert would revive
            message = "op: not upsert or delete"
            return SkippableRecord(
                "invalid_field", message, origin, entity, key, _row_bytes(values)
            )
        data: Any = None
        if op != "delete":
            payload = values[opts.payload_column]
            try:
                # A `json`/`jsonb` column comes decoded by the driver (psycopg, SQLAlchemy's
                # JSON type): a dict, or None; text and bytes are decoded here.
                if payload is None or isinstance(payload, dict | list | int | float):
                    data = payload  # not an object: refused below
                elif isinstance(payload, str | bytes | bytearray):
                    data = loads_unique(payload or "null")  # a key named twice: refused
                else:
                    raise TypeError(type(payload).__name__)
            except (ValueError, TypeError, RecursionError):
                return SkippableRecord(
                    "invalid_json", "payload is not JSON", origin, entity, key, _row_bytes(values)
                )
            if data is not None and not isinstance(data, dict):
                message = "payload is not a JSON object"
                raw = _row_bytes(values)
                return SkippableRecord("invalid_json", message, origin, entity, key, raw)
        try:
            version = int(values[opts.version_column] if opts.version_column else row_id)
            occurred = values[opts.occurred_at_column]
            if isinstance(occurred, str):
                occurred = datetime.fromisoformat(occurred)
            if occurred.tzinfo is None:
                occurred = occurred.replace(tzinfo=self.zone)
        except (TypeError, ValueError, AttributeError, OverflowError):
            message = "version or occurred_at missing or malformed"
            return SkippableRecord(
                "invalid_field", message, origin, entity, key, _row_bytes(values)
            )
        return Record(
            key=key,
            version=version,
            occurred_at=occurred,
            data=data,
            origin=origin,
            entity=entity,
            op="delete" if op == "delete" else "upsert",
        )

    def _done(self, table: Table, ids: list[int]) -> Any:
        """After the broker's acknowledgement: delete or mark exactly the rows published."""
        opts = self.options
        ident = table.c[opts.id_column]

        def done() -> None:
            # In lists of IDS_PER_STATEMENT (one transaction): Oracle takes 1,000 at most,
            # SQL Server about 2,100 parameters, and a page of more failed every clean-up.
            with self._engine.begin() as conn:
                for start in range(0, len(ids), IDS_PER_STATEMENT):
                    chunk = ids[start : start + IDS_PER_STATEMENT]
                    if opts.after == "delete":
                        conn.execute(delete(table).where(ident.in_(chunk)))
                    else:
                        conn.execute(
                            update(table)
                            .where(ident.in_(chunk), table.c[opts.processed_column].is_(None))
                            .values({opts.processed_column: datetime.now(self.zone)})
                        )
            self._cleaned.update(ids)

        return done

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _row_bytes(values: Any) -> bytes:
    """An outbox row as its dead letter keeps it (the row itself is deleted or marked with
    its page): its columns as JSON, values other than text and numbers as their text."""
    row = {name: value if isinstance(value, str | int | float | None) else str(value)
           for name, value in values.items()}  # fmt: skip
    return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")


def _state(
    last_id: int,
    seen: set[int],
    pending: list[int],
    tracked_from: int = 0,
    marks: dict[int, str] | None = None,
) -> State:
    """The position; `pending`: rows published whose clean-up is not known to have run,
    with `pending_marks`, what each row was (`OutboxAdapter._mark`); `tracked_from`: the
    ids above it had their clean-ups tracked so (a state of an older release did not: its
    seen rows up to there are never taken for reused ids)."""
    state: State = {"last_id": last_id, "seen": sorted(seen), "pending": sorted(pending)}
    if tracked_from:
        state["tracked_from"] = tracked_from
    kept = {str(i): marks[i] for i in sorted(pending) if marks and i in marks}
    if kept:
        state["pending_marks"] = kept
    return state
