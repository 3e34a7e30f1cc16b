"""Read-only questions data stewards ask the store: one record, its history, conflicts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sqlalchemy import Text, cast, exists, func, select

from schemas.views import expand_provenance
from store.core import Store
from store.tables import (
    document_owners,
    dossier_anomalies,
    field_conflicts,
    record_history,
    records,
    source_views,
)

# A document waits for its owner while no record of the owner exists (migration 0009).
OWNER_EXISTS = exists().where(
    records.c.entity == document_owners.c.owner_entity,
    records.c.key == document_owners.c.owner_key,
)


@dataclass(frozen=True)
class RecordDetail:
    entity: str
    key: str
    data: dict[str, Any] | None
    provenance: dict[str, dict[str, Any]]
    views: list[dict[str, Any]]  # every source's current view, tombstones included
    conflicts: dict[str, list[list[str]]]  # field -> groups of sources that agree
    waiting_for_owner: tuple[str, str] | None


def record_detail(store: Store, entity: str, key: str) -> RecordDetail | None:
    """The record, where each field came from, and every source's view (None: unknown)."""
    with store.engine.connect() as conn:
        record = conn.execute(
            select(records).where(records.c.entity == entity, records.c.key == key)
        ).one_or_none()
        views = [
            row._asdict()
            for row in conn.execute(
                select(source_views)
                .where(source_views.c.entity == entity, source_views.c.key == key)
                .order_by(source_views.c.source)
            )
        ]
        conflicts = {
            row.field: row.sources
            for row in conn.execute(
                select(field_conflicts).where(
                    field_conflicts.c.entity == entity, field_conflicts.c.key == key
                )
            )
        }
        owner = conn.execute(
            select(document_owners.c.owner_entity, document_owners.c.owner_key).where(
                document_owners.c.entity == entity,
                document_owners.c.key == key,
                ~OWNER_EXISTS,
            )
        ).one_or_none()
    if record is None and not views:
        return None
    return RecordDetail(
        entity, key, record.data if record else None,
        expand_provenance(record.provenance or {}, record.sources) if record else {},
        views, conflicts,
        (owner[0], owner[1]) if owner else None,
    )  # fmt: skip


def history(
    store: Store, entity: str, key: str, limit: int | None = None, reference: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The record's audit history, oldest first: its newest `limit` entries (all with
    None), and how many it has; with `reference`, the entries of it forgotten past the
    deleted records' retention too (kept under the key's reference, `purge_deleted`)."""
    keys = [key] if reference is None or reference == key else [key, reference]
    of_record = (record_history.c.entity == entity, record_history.c.key.in_(keys))
    newest = select(record_history.c.id).where(*of_record).order_by(record_history.c.id.desc())
    query = select(record_history).where(*of_record)
    if limit is not None:
        query = query.where(record_history.c.id.in_(newest.limit(limit).scalar_subquery()))
    counted = select(func.count()).select_from(record_history).where(*of_record)
    with store.engine.connect() as conn:
        rows = [row._asdict() for row in conn.execute(query.order_by(record_history.c.id))]
        return rows, int(conn.execute(counted).scalar_one())


@dataclass(frozen=True)
class ConflictLine:
    entity: str
    field: str
    sources: tuple[str, str]
    records: int


def conflict_report(store: Store, entity: str | None = None) -> list[ConflictLine]:
    """Open conflicts by (entity, field, source pair), the most records first. Counted by
    the database per (entity, field, groups of sources): every open conflict was read
    into this process, tens of millions at national scale. (`json` has no equality: the
    groups are grouped by their text, as the store writes it.)"""
    groups = cast(field_conflicts.c.sources, Text)
    query = select(
        field_conflicts.c.entity, field_conflicts.c.field, groups, func.count()
    ).group_by(field_conflicts.c.entity, field_conflicts.c.field, groups)
    if entity is not None:
        query = query.where(field_conflicts.c.entity == entity)
    counts: Counter[tuple[str, str, tuple[str, str]]] = Counter()
    with store.engine.connect() as conn:
        for row_entity, field_name, text, records in conn.execute(query):
            for first, second in combinations(json.loads(text), 2):  # sources that disagree
                for a in first:
                    for b in second:
                        counts[(row_entity, field_name, (min(a, b), max(a, b)))] += records
    return [
        ConflictLine(e, f, pair, n)
        for (e, f, pair), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def anomalies(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """The latest dossier lifecycle anomalies, newest first."""
    query = select(dossier_anomalies).order_by(dossier_anomalies.c.id.desc()).limit(limit)
    with store.engine.connect() as conn:
        return [row._asdict() for row in conn.execute(query)]


def open_conflicts(store: Store) -> int:
    """Open (record, field) disagreements."""
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(field_conflicts)).scalar_one())


def anomaly_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(dossier_anomalies)).scalar_one())


def waiting_documents(store: Store) -> int:
    """Documents kept while their owner is not in the store yet."""
    query = select(func.count()).select_from(document_owners).where(~OWNER_EXISTS)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def distinct_dossiers(store: Store) -> int:
    """Dossiers counted once: an inter-agency dossier counts with its original."""
    roots = set()
    query = select(records.c.key, records.c.data).where(records.c.entity == "dossier")
    with store.engine.connect() as conn:
        for key, data in conn.execution_options(yield_per=2000).execute(query):
            roots.add(data.get("original_code") or key)
    return len(roots)
