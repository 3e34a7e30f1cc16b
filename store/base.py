"""What every part of the store shares: the engine, its writer transactions, the
`store_meta` rows, and the statements the parts build the same way (multi-row upserts and
inserts of missing rows, keys in chunks).

`store.core.Store` is one class made of the parts (`store.offsets`, `store.reads`,
`store.catch_up`, `store.retention`), each a `StoreBase` with the methods of one concern.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, and_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from store.batch import OffsetRange as OffsetRange
from store.batch import TopicPartition as TopicPartition
from store.engine import IDLE_IN_TRANSACTION_SECONDS, create_store_engine
from store.failures import translated
from store.tables import store_meta

CHUNK = 500


class StoreBase:
    """The engine and what every part of the store does with it."""

    def __init__(
        self,
        url: str,
        lock_wait: float | None = None,
        idle_in_transaction: float | None = IDLE_IN_TRANSACTION_SECONDS,
    ) -> None:
        self.url = url
        self.engine = create_store_engine(url, lock_wait, idle_in_transaction)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write_transaction(self, commit: bool = True) -> Iterator[Connection]:
        """One writer transaction: committed on success (unless `commit` is False, for a
        dry run), rolled back on error."""
        with self.engine.connect().execution_options(writer=True) as conn:
            transaction = conn.begin()
            try:
                yield conn
            except BaseException:
                transaction.rollback()
                raise
            if commit:
                transaction.commit()
            else:
                transaction.rollback()

    def meta(self, name: str) -> str | None:
        with translated(), self.engine.connect() as conn:
            row = conn.execute(select(store_meta.c.value).where(store_meta.c.name == name))
            value = row.scalar_one_or_none()
            return None if value is None else str(value)

    def set_meta(self, name: str, value: str) -> None:
        with translated(), self.write_transaction() as conn:
            upsert(
                conn,
                store_meta,
                [{"name": name, "value": value, "updated_at": utcnow()}],
                ["name"],
            )


def upsert(
    conn: Connection,
    table: Table,
    values: list[dict[str, Any]],
    keys: list[str],
    guard: str | None = None,
    updated: Sequence[str] | None = None,
) -> None:
    """Multi-row insert-or-update; with `guard`, a row only replaces a smaller guard value;
    with `updated`, a row found updates those columns only (else all but the keys).

    `values` must hold one row per key (the callers deduplicate per batch): one statement
    cannot update a row twice. The RETURNING clause makes SQLAlchemy send the rows as
    multi-row `INSERT ... VALUES (...), (...) ON CONFLICT` pages ("insertmanyvalues") from
    one cached compiled statement, instead of compiling a statement per batch.
    """
    if not values:
        return
    insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert_fn(table)
    names = [c.name for c in table.columns if c.name not in keys] if updated is None else updated
    update = {name: statement.excluded[name] for name in names}
    where = None if guard is None else and_(table.c[guard] < statement.excluded[guard])
    upserting = statement.on_conflict_do_update(index_elements=keys, set_=update, where=where)
    conn.execute(upserting.returning(table.c[keys[0]]), values)


def insert_missing(
    conn: Connection, table: Table, values: list[dict[str, Any]], keys: list[str]
) -> None:
    """Multi-row insert of the rows whose keys the table does not hold yet."""
    if values:
        insert_fn = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(insert_fn(table).on_conflict_do_nothing(index_elements=keys), values)


def keyset_after(table: Table, entity: str | None, after: tuple[str, str]) -> ColumnElement[bool]:
    """The condition of a keyset page along (entity, key) after `after`. With the entity
    fixed by an equality, by the key alone: PostgreSQL does not join `entity = $1` and
    `(entity, key) > ($1, $2)` into one start in the index, and SQLite neither, so each
    page walked the index from the entity's first key (a review on 1.6 million records:
    the pages of `remerge --entity` grew from 5 to 96 ms, days at national scale)."""
    if entity is not None:
        return table.c.key > after[1]
    return tuple_(table.c.entity, table.c.key) > tuple_(*after)


def chunks(items: list[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def utcnow() -> datetime:
    return datetime.now(UTC)
