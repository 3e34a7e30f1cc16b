"""Built-in `outbox`: a transactional outbox table, published in order, then deleted or marked.

The source application writes, in the same transaction as its business change, one row per
change: `id` (rising), `entity`, `record_key`, `op`, `occurred_at`, `payload` (the contract's
`data` as JSON text; empty for a delete) and optionally `version` (default: the row id).
Column names are configurable. After the broker acknowledged a batch, its rows are deleted
(`after = "delete"`) or get `processed_at` set (`after = "mark"`); the saved position
(`last_id`) alone makes a restart resume, so a crash between the two repeats nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict
from sqlalchemy import MetaData, Table, create_engine, delete, select, update

from producers.sdk import Adapter, Checkpoint, Item, Record, SkippableRecord, State
from schemas.events import ENTITIES, Entity


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
    timezone: str = "Asia/Ho_Chi_Minh"
    batch_size: int = 1000


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

    def _connect(self) -> Table:
        if self._table is None:
            self._engine = create_engine(self.options.url)
            self._table = Table(self.options.table, MetaData(), autoload_with=self._engine)
        return self._table

    def read(self, state: State) -> Iterator[Item]:
        table = self._connect()
        last_id = int(state.get("last_id", 0))
        while True:
            rows = self._page(table, last_id)
            if not rows:
                return
            for row in rows:
                yield self._item(row._mapping)
            last_id = int(rows[-1]._mapping[self.options.id_column])
            yield Checkpoint({"last_id": last_id}, self._done_callback(table, last_id))
            if len(rows) < self.options.batch_size:
                return

    def _page(self, table: Table, last_id: int) -> list[Any]:
        opts = self.options
        ident = table.c[opts.id_column]
        query = select(table).where(ident > last_id).order_by(ident).limit(opts.batch_size)
        if opts.after == "mark":
            query = query.where(table.c[opts.processed_column].is_(None))
        with self._engine.connect() as conn:
            return list(conn.execute(query))

    def _item(self, values: Any) -> Record | SkippableRecord:
        opts = self.options
        row_id = values[opts.id_column]
        origin = f"{opts.table}:{row_id}"
        entity = opts.entity or values[opts.entity_column]
        key = str(values[opts.key_column] or "")
        if entity not in ENTITIES:
            return SkippableRecord("unknown_entity", "entity: not a contract entity", origin)
        op = str(values[opts.op_column] or "upsert")
        data: dict[str, Any] | None = None
        if op != "delete":
            try:
                data = json.loads(values[opts.payload_column] or "null")
            except ValueError:
                return SkippableRecord("invalid_json", "payload is not JSON", origin, entity, key)
        version = values[opts.version_column] if opts.version_column else row_id
        occurred = values[opts.occurred_at_column]
        if isinstance(occurred, str):
            occurred = datetime.fromisoformat(occurred)
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=self.zone)
        return Record(
            key=key,
            version=int(version),
            occurred_at=occurred,
            data=data,
            origin=origin,
            entity=entity,
            op="delete" if op == "delete" else "upsert",
        )

    def _done_callback(self, table: Table, last_id: int) -> Any:
        opts = self.options
        ident = table.c[opts.id_column]

        def done() -> None:
            with self._engine.begin() as conn:
                if opts.after == "delete":
                    conn.execute(delete(table).where(ident <= last_id))
                else:
                    conn.execute(
                        update(table)
                        .where(ident <= last_id, table.c[opts.processed_column].is_(None))
                        .values({opts.processed_column: datetime.now(self.zone)})
                    )

        return done

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
