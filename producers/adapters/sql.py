"""Built-in `sql`: declarative polling of one table or query (any SQLAlchemy database)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from producers.cursor_lag import cursor_lag_of
from producers.metrics import CLOCK_BACKWARDS, VERSIONS_RAISED
from producers.sdk import (
    Adapter,
    Checkpoint,
    Item,
    Record,
    Reservation,
    SkippableRecord,
    State,
)
from producers.sql_advice import check_warnings
from producers.sql_config import SqlMapping, SqlSourceConfig
from producers.sql_cursor import CursorState
from producers.sql_polling import SqlPollingAdapter
from producers.sql_rows import RejectedRow, SourceChange
from schemas.dead_letter import Reason


class SqlAdapter(Adapter):
    """SQL polling: cursor (updated_at, pk); late commits by snapshot (PostgreSQL tables)
    or a lookback window; content hashes or a version column per row; soft deletes."""

    key = "key_column"
    cursor = "updated_at_column, pk_column"
    sorted_output = True
    Config = SqlMapping

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        super().__init__(source, config, base_dir)
        assert isinstance(config, SqlMapping)
        self.mapping = config
        self.entity = config.entity
        self.emits_deletes = config.deleted_column is not None
        self._poller: SqlPollingAdapter | None = None
        CLOCK_BACKWARDS.labels(source)
        for reason in ("same_instant", "lower"):
            VERSIONS_RAISED.labels(source, reason)

    @property
    def poller(self) -> SqlPollingAdapter:
        """Connected on first use, so that constructing an adapter never touches the source."""
        if self._poller is None:
            full = SqlSourceConfig(source=self.source, **self.mapping.model_dump())
            self._poller = SqlPollingAdapter(full)
        return self._poller

    def recover(self, state: State, journal: list[Any]) -> State:
        if not journal:
            return state
        cursor = CursorState.from_dict(state)
        cursor.fold(journal)
        return cursor.as_dict()

    def read(self, state: State) -> Iterator[Item]:
        cursor = CursorState.from_dict(state)
        cursor.snapshot()  # what changes from here on is tracked
        for page in self.poller.pages(cursor):
            # a `held` delete is remembered, never sent (another row holds its key live)
            sent = [c for c in page if not (isinstance(c, SourceChange) and c.held)]
            changes = [change for change in sent if isinstance(change, SourceChange)]
            if changes:  # their versions on disk before they are sent
                yield Reservation(self.poller.reservation(changes))
            yield from (self._record(change) for change in sent)
            self.poller.remember(cursor, page)
            # the state computed only if this checkpoint is saved (a copy of every row of
            # the lookback window per page was a twentieth of publishing)
            yield Checkpoint(cursor.snapshot())
        if cursor.moved():  # a snapshot recorded, rows forgotten or touched
            yield Checkpoint(cursor.as_dict())

    def _record(self, change: SourceChange | RejectedRow) -> Record | SkippableRecord:
        if isinstance(change, RejectedRow):
            origin = f"{self.mapping.table}:{self._row_reference(change)}"
            return SkippableRecord(
                Reason.UNMAPPABLE_RECORD, change.message, origin, self.entity, change.key
            )
        if change.raised is not None:
            VERSIONS_RAISED.labels(self.source, change.raised).inc()
        if change.backwards:
            CLOCK_BACKWARDS.labels(self.source).inc()
        return Record(
            key=change.key,
            version=change.version,
            occurred_at=change.occurred_at,
            data=change.data,
            origin=f"{self.mapping.table}:{self._row_reference(change)}",
        )

    def cursor_lag_seconds(self, state: State) -> float | None:
        return cursor_lag_of(self.poller, CursorState.from_dict(state))

    def check_warnings(self) -> list[str]:
        return check_warnings(self.poller)

    def _row_reference(self, change: SourceChange | RejectedRow) -> str:
        """The row's primary key, unless that is the natural key (a personal id): then its
        keyed reference, as origins reach logs and dead-letter headers."""
        if self.mapping.pk_column not in (None, self.mapping.key_column):
            return str(change.pk)
        return self.reference(str(change.pk))

    def close(self) -> None:
        if self._poller is not None:
            self._poller.close()
