"""What the store offers `portal-sync source purge`: the plan (counts), the keys of a
source's views page by page, and the purge's audit row (`source_purges`).

The purge itself goes through the reconciler's batch path (`Reconciler.purge`): per chunk
of keys one store transaction locks the records as a batch does, removes the source's
views (`BatchChanges.purged_views`), writes the re-merged records, history, conflicts and
document owners, and the audit row with the counts so far (`BatchChanges.purge`).
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, delete, exists, func, select

from schemas.views import RecordKey
from store.base import keyset_after, upsert, utcnow
from store.core import Store
from store.failures import translated
from store.tables import SOURCE_PURGE_PROGRESS, source_freshness, source_purges, source_views


@dataclass(frozen=True)
class PurgeCounts:
    """What a purge removed and re-merged: the source's views and tombstones; the touched
    records that still exist, re-merged from the other sources' views, and how many of
    them changed their data; the records no source contributes to any more (removed).
    Every changed or removed record has a history entry."""

    views: int = 0
    tombstones: int = 0
    records_remerged: int = 0
    records_changed: int = 0
    records_removed: int = 0

    def __add__(self, other: PurgeCounts) -> PurgeCounts:
        return PurgeCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class SourcePurge:
    """The audit row of one `source purge` command: who, when, which source and scope (the
    key as its reference, never the key), why, and what it changed so far."""

    id: str
    source: str
    entity: str | None
    reference: str | None
    operator: str
    reason: str
    started_at: datetime
    counts: PurgeCounts = PurgeCounts()
    finished_at: datetime | None = None

    def add(self, counts: PurgeCounts) -> SourcePurge:
        return replace(self, counts=self.counts + counts)

    def row(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "counts"}
        return {**fields, **asdict(self.counts)}


@dataclass(frozen=True)
class PurgePlan:
    """A purge's plan from the views alone: the source's views and tombstones in scope;
    records that other sources' views keep (re-merged) and records only this source held
    (removed)."""

    views: int
    tombstones: int
    records_remerged: int
    records_removed: int

    @property
    def keys(self) -> int:
        return self.views + self.tombstones


def _scope(source: str, entity: str | None, key: str | None) -> list[ColumnElement[bool]]:
    where = [source_views.c.source == source]
    if entity is not None:
        where.append(source_views.c.entity == entity)
    if key is not None:
        where.append(source_views.c.key == key)
    return where


def purge_plan(store: Store, source: str, entity: str | None, key: str | None) -> PurgePlan:
    """Count what purging `source` (of one entity, of one key) would touch."""
    other = source_views.alias("other")
    others_live = exists().where(
        other.c.entity == source_views.c.entity,
        other.c.key == source_views.c.key,
        other.c.source != source_views.c.source,
        ~other.c.deleted,
    )
    # Each view's `others_live` once (it was evaluated twice, as two sums' conditions:
    # 2.6 million index probes for 331,000 views); `OFFSET 0` keeps the subquery from
    # being pulled up into the sums, which would copy the EXISTS into both again.
    views = (
        select(source_views.c.deleted, others_live.label("others_live"))
        .where(*_scope(source, entity, key))
        .offset(0)
        .subquery()
    )
    query = select(
        func.count(),
        func.coalesce(func.sum(case((views.c.deleted, 1), else_=0)), 0),
        func.coalesce(func.sum(case((views.c.others_live, 1), else_=0)), 0),
        func.coalesce(
            func.sum(case((and_(~views.c.deleted, ~views.c.others_live), 1), else_=0)), 0
        ),
    )
    with translated(), store.engine.connect() as conn:
        total, tombstones, remerged, removed = conn.execute(query).one()
    return PurgePlan(int(total) - int(tombstones), int(tombstones), int(remerged), int(removed))


def purge_keys(
    store: Store,
    source: str,
    entity: str | None,
    key: str | None,
    after: RecordKey | None,
    limit: int,
) -> list[RecordKey]:
    """The next `limit` records (entity, key order) after `after` that `source` has a view
    or tombstone of: keyset pages along the primary key, one pass over the views."""
    query = select(source_views.c.entity, source_views.c.key).where(*_scope(source, entity, key))
    if after is not None:
        query = query.where(keyset_after(source_views, entity, after))
    query = query.order_by(source_views.c.entity, source_views.c.key).limit(limit)
    with translated(), store.engine.connect() as conn:
        return [(e, k) for e, k in conn.execute(query)]


def finish_purge(store: Store, purge: SourcePurge) -> SourcePurge:
    """Write the audit row as complete (every chunk committed). A purge of all of a
    source's views also forgets its freshness: a worker starting next has no series for it
    until it delivers again (its views left the store). A batch of the source applied after
    the purge began keeps its row: the source delivered again."""
    done = replace(purge, finished_at=utcnow())
    with translated(), store.write_transaction() as conn:
        upsert(conn, source_purges, [done.row()], ["id"], updated=SOURCE_PURGE_PROGRESS)
        if purge.entity is None and purge.reference is None:
            conn.execute(
                delete(source_freshness).where(
                    source_freshness.c.source == purge.source,
                    source_freshness.c.last_applied < purge.started_at,
                )
            )
    return done


def purges(store: Store) -> list[dict[str, Any]]:
    """Every recorded purge, oldest first."""
    query = select(source_purges).order_by(source_purges.c.started_at, source_purges.c.id)
    with translated(), store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def unfinished_purge(
    store: Store, source: str, entity: str | None, reference: str | None
) -> SourcePurge | None:
    """The latest purge of this source and scope that committed chunks but never finished
    (interrupted), to be carried on by the same command run again; None if there is none."""
    rows = [
        row
        for row in purges(store)
        if row["finished_at"] is None
        and (row["source"], row["entity"], row["reference"]) == (source, entity, reference)
    ]
    if not rows:
        return None
    row = rows[-1]
    counted = {name: row[name] for name in PurgeCounts.__dataclass_fields__}
    kept = {name: row[name] for name in SourcePurge.__dataclass_fields__ if name != "counts"}
    return SourcePurge(**kept, counts=PurgeCounts(**counted))


def undoable_purges(store: Store) -> list[dict[str, Any]]:
    """The recorded purges (`store.purge.purges`) that removed something: one that removed
    nothing (a source with no views then, a misspelt one) has nothing a read of the
    topics, a redrive or a rebuild could bring back."""
    return [row for row in purges(store) if row["views"] or row["tombstones"]]


def touches(
    purge: dict[str, Any],
    moment: datetime | None,
    source: str | None = None,
    entities: set[str] | None = None,
) -> bool:
    """Whether a recorded purge was still removing after `moment` (any, when None), is
    of `source` (or of any) and touches `entities` (or any). A purge removes from its
    start to its finish, chunk by chunk: one that began before `moment` and finished after
    it (or never finished: it may be resumed) counts as well."""
    finished = purge["finished_at"]
    if moment is not None and finished is not None and finished <= moment:
        return False
    if source and purge["source"] != source:
        return False
    return entities is None or purge["entity"] is None or purge["entity"] in entities
