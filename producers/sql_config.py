"""A `sql` source's configuration: the table (or query) it reads, its cursor columns and
how its columns map to the contract (`SqlMapping`), with the source's id (`SqlSourceConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from sqlalchemy.exc import ArgumentError

from producers.mapping import FieldMapping, sorts_in_time_order
from producers.sdk import source_url
from schemas.events import Entity

Capture = Literal["auto", "snapshot", "lookback"]


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
