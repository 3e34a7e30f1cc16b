"""Helpers of the national store tests: events as the contract's JSON bytes, a feed that
applies them through the reconciler at consecutive offsets, and table snapshots."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text
from sqlalchemy import event as engine_event

from consumers.checks import Checked
from consumers.merge import Authority
from consumers.reconciler import BatchReport, Reconciler
from consumers.registry import Registry, SourceInfo
from schemas import derive_event_id, parse_event
from store.core import Store
from store.queries import OWNER_EXISTS
from store.tables import (
    document_owners,
    dossier_anomalies,
    field_conflicts,
    record_history,
    records,
)
from transport.message import Message

TOPIC = "portal.changes"
T0 = datetime(2024, 1, 15, 3, 0, tzinfo=UTC)

# Identifiers that satisfy the contract.
CITIZEN = "001090012345"
CITIZEN_2 = "079305012345"
CITIZEN_MISSING = "048190000001"
ORG = "0100109106"
H26, H29, G12 = "000.00.01.H26", "000.00.01.H29", "000.00.00.G12"
DOSSIER = f"{H26}-240115-0001"
DOSSIER_2 = f"{H29}-240116-0002"
DOSSIER_3 = f"{H26}-240117-0003"

REGISTRY = Registry(
    {
        "national-population": SourceInfo(kind="national", name="CSDLQG dân cư"),
        "national-business-registry": SourceInfo(kind="national", name="CSDLQG doanh nghiệp"),
        "province-01": SourceInfo(
            kind="province", name="Hà Nội", province_code="01", agency_codes=(H26,)
        ),
        "province-79": SourceInfo(
            kind="province", name="TP HCM", province_code="79", agency_codes=(H29,)
        ),
        "ministry-btp": SourceInfo(kind="ministry", name="Bộ Tư pháp", agency_codes=(G12,)),
    },
    Path("registry.toml"),
)


def event(
    entity: str,
    key: str,
    source: str,
    version: int,
    data: dict[str, Any] | None = None,
    *,
    op: str | None = None,
    minute: int | None = None,
) -> bytes:
    """One change event as message bytes; no data means a delete. occurred_at grows with
    the version unless `minute` is given."""
    op = op or ("delete" if data is None else "upsert")
    occurred = T0 + timedelta(minutes=version if minute is None else minute)
    raw: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(derive_event_id(source, entity, key, version)),
        "source": source,
        "entity": entity,
        "key": key,
        "op": op,
        "version": version,
        "occurred_at": occurred.isoformat(),
    }
    if data is not None:
        raw["data"] = data
    return json.dumps(raw, ensure_ascii=False).encode("utf-8")


def event_id(source: str, entity: str, key: str, version: int) -> str:
    return str(derive_event_id(source, entity, key, version))


def checked_list(raws: Sequence[bytes], start: int = 0, partition: int = 0) -> list[Checked]:
    result = []
    for i, raw in enumerate(raws):
        parsed = parse_event(raw)
        result.append(Checked(Message(TOPIC, partition, start + i, raw), parsed.event, []))
    return result


class Feed:
    """Applies events to a store in batches at consecutive offsets of one partition."""

    def __init__(self, store: Store, authority: Authority | None = None) -> None:
        self.store = store
        self.reconciler = Reconciler(store, authority or Authority())
        self.offset = 0

    def apply(self, *raws: bytes) -> BatchReport:
        batch = checked_list(raws, self.offset)
        self.offset += len(batch)
        return self.reconciler.apply(batch, [c.message for c in batch])

    def redeliver(self, raws: Sequence[bytes], start: int) -> BatchReport:
        batch = checked_list(raws, start)
        return self.reconciler.apply(batch, [c.message for c in batch])


@contextmanager
def fresh_store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 's.db'}")
        store.create_schema()
        try:
            yield store
        finally:
            store.close()


def history_rows(store: Store) -> list[tuple[Any, ...]]:
    """The audit history in order, without ids and write timestamps; a forgotten record's
    entries under one name per record (the retention gives them a random one, without a
    reference key: `forgotten:<hex>`)."""
    query = select(record_history).order_by(record_history.c.id)
    names: dict[str, str] = {}
    with store.engine.connect() as conn:
        return [
            (r.entity, _forgotten(r.key, names), r.event_id, r.source, r.version, r.changes)
            for r in conn.execute(query)
        ]


def _forgotten(key: str, names: dict[str, str]) -> str:
    if not key.startswith("forgotten:"):
        return key
    return names.setdefault(key, f"forgotten:{len(names)}")


def conflict_rows(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(field_conflicts))
        return sorted(
            (r.entity, r.key, r.field, tuple(tuple(group) for group in r.sources)) for r in rows
        )


def owner_rows(store: Store) -> list[tuple[Any, ...]]:
    """Each document's owner, and whether it waits for it (no record of the owner)."""
    waiting = ~OWNER_EXISTS
    with store.engine.connect() as conn:
        rows = conn.execute(select(document_owners, waiting.label("waiting")))
        return sorted((r.entity, r.key, r.owner_entity, r.owner_key, r.waiting) for r in rows)


def anomaly_rows(store: Store) -> list[tuple[Any, ...]]:
    query = select(dossier_anomalies).order_by(dossier_anomalies.c.id)
    with store.engine.connect() as conn:
        return [
            (r.key, r.source, r.from_status, r.to_status, r.event_id) for r in conn.execute(query)
        ]


def refuse_views_of(store_url: str, keys: Sequence[str]) -> None:
    """The store (created if new) whose database itself refuses any view of these keys, as
    a value it cannot hold would be: a trigger that raises a data exception (PostgreSQL,
    SQLSTATE 22023) or aborts (SQLite). Keys are ASCII digits (quoted as they are)."""
    assert keys and all(key.isascii() and key.isdigit() for key in keys)
    store = Store(store_url)
    store.create_schema()
    store.close()
    listed = ", ".join(f"'{key}'" for key in keys)
    if store_url.startswith("sqlite"):
        statements = [
            "CREATE TRIGGER refuse_views BEFORE INSERT ON source_views "
            f"WHEN NEW.key IN ({listed}) BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION refuse_views() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_views BEFORE INSERT OR UPDATE ON source_views FOR EACH ROW "
            f"WHEN (NEW.key IN ({listed})) EXECUTE FUNCTION refuse_views()",
        ]
    engine = create_engine(store_url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def put_records(store: Store, keys: Sequence[str], entity: str = "dossier") -> None:
    """Record rows written straight into the store's table (no views behind them): for
    what reads the records alone, in key order."""
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            insert(records),
            [
                {
                    "entity": entity,
                    "key": k,
                    "data": {"n": k},
                    "sources": {"s": 1},
                    "updated_at": now,
                    "provenance": None,
                }
                for k in keys
            ],
        )


@contextmanager
def record_page_statements(store: Store, table: str = "records") -> Iterator[list[tuple[str, Any]]]:
    """The statements (and their parameters) that read a page of `table`, while inside."""
    found: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if f"FROM {table}" in statement and "LIMIT" in statement:
            found.append((statement, parameters))

    engine_event.listen(store.engine, "before_cursor_execute", seen)
    try:
        yield found
    finally:
        engine_event.remove(store.engine, "before_cursor_execute", seen)
