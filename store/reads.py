"""Reads of the store's current state outside a batch: records in key order, the keys
some source has a view of, counts, the sources' freshness and sync lag."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, tuple_

from schemas.views import RecordKey, expand_provenance
from store.base import CHUNK, StoreBase, chunks, keyset_after
from store.failures import translated
from store.tables import records, source_freshness, source_views
from store.times import aware_utc


@dataclass(frozen=True)
class Freshness:
    source: str
    last_change: datetime
    last_applied: datetime


class StoreReads(StoreBase):
    def freshness(self) -> list[Freshness]:
        """Per source, the newest `occurred_at` live batches applied, and when the last
        was applied (a small table kept by each batch: no scan of the views)."""
        query = select(
            source_freshness.c.source,
            func.max(source_freshness.c.last_change),
            func.max(source_freshness.c.last_applied),
        ).group_by(source_freshness.c.source)
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            Freshness(source, aware_utc(change), aware_utc(applied))
            for source, change, applied in rows
            if change is not None and applied is not None
        ]

    def sync_lags(self) -> list[float]:
        """`applied_at - occurred_at` in seconds of every current source view, sorted."""
        query = select(source_views.c.occurred_at, source_views.c.applied_at)
        with translated(), self.engine.connect() as conn:
            return sorted((a - o).total_seconds() for o, a in conn.execute(query))

    def view_version(self, entity: str, key: str, source: str) -> int | None:
        """The version of a source's stored view of a record (a tombstone's included)."""
        query = select(source_views.c.version).where(
            source_views.c.entity == entity,
            source_views.c.key == key,
            source_views.c.source == source,
        )
        with translated(), self.engine.connect() as conn:
            version: int | None = conn.execute(query).scalar_one_or_none()
            return version

    def iter_records(
        self, entity: str | None = None, page: int = CHUNK
    ) -> Iterator[tuple[str, str, dict[str, Any], dict[str, int], dict[str, Any] | None]]:
        """Canonical records (entity, key, data, sources, provenance), sorted by entity and
        the key's bytes (on every backend: one dump for both).

        Read in keyset pages of `page` records along the primary key, each in a short
        transaction of its own: no snapshot is held between pages, however long the
        reader takes (`export` into a slow pipe, `rebuild --compare` waiting on the other
        store), and a store of any size is read in bounded memory without a sort. Each
        record is as it was when its page was read; one written meanwhile ahead of the
        read is read as written."""
        after: tuple[str, str] | None = None
        while True:
            query = select(records).order_by(records.c.entity, records.c.key).limit(page)
            if entity is not None:
                query = query.where(records.c.entity == entity)
            if after is not None:
                query = query.where(keyset_after(records, entity, after))
            with translated(), self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                origins = row.provenance
                provenance = None if origins is None else expand_provenance(origins, row.sources)
                yield row.entity, row.key, row.data, row.sources, provenance
            if len(rows) < page:
                return
            after = (rows[-1].entity, rows[-1].key)

    def changed_since(self, keys: Sequence[RecordKey], moment: datetime) -> set[RecordKey]:
        """Of these records, those changed at or after `moment`: a view of theirs applied,
        or the merged record written (`rebuild --compare` sets apart what the live
        workers applied while the rebuild ran). By primary key, a chunk at a time."""
        found: set[RecordKey] = set()
        with translated(), self.engine.connect() as conn:
            for chunk in chunks(list(keys)):
                for table, column in (
                    (source_views, source_views.c.applied_at),
                    (records, records.c.updated_at),
                ):
                    pair = tuple_(table.c.entity, table.c.key)
                    query = select(table.c.entity, table.c.key).where(
                        pair.in_(chunk), column >= moment
                    )
                    found.update((row.entity, row.key) for row in conn.execute(query.distinct()))
        return found

    def view_versions(self, keys: Sequence[RecordKey]) -> dict[RecordKey, dict[str, int]]:
        """Of these records, the version of every source's view (tombstones included), by
        primary key, a chunk at a time."""
        found: dict[RecordKey, dict[str, int]] = {}
        view = source_views.c
        with translated(), self.engine.connect() as conn:
            for chunk in chunks(list(keys)):
                query = select(view.entity, view.key, view.source, view.version).where(
                    tuple_(view.entity, view.key).in_(chunk)
                )
                for row in conn.execute(query):
                    found.setdefault((row.entity, row.key), {})[row.source] = row.version
        return found

    def record_keys(
        self, entity: str | None = None, after: RecordKey | None = None, limit: int | None = None
    ) -> list[RecordKey]:
        """(entity, key) some source has a view of, in order: every one, or the `limit`
        after `after` (keyset pages along the primary key: a store of any size is read in
        bounded memory, page by page)."""
        query = select(source_views.c.entity, source_views.c.key).distinct()
        if entity is not None:
            query = query.where(source_views.c.entity == entity)
        if after is not None:
            query = query.where(keyset_after(source_views, entity, after))
        query = query.order_by(source_views.c.entity, source_views.c.key)
        if limit is not None:
            query = query.limit(limit)
        with translated(), self.engine.connect() as conn:
            return [(e, k) for e, k in conn.execute(query)]

    def record_key_pages(
        self, entity: str | None = None, size: int = CHUNK
    ) -> Iterator[list[RecordKey]]:
        """`record_keys` page by page, to the end."""
        after = None
        while page := self.record_keys(entity, after, size):
            yield page
            if len(page) < size:
                return
            after = page[-1]

    def count_record_keys(self, entity: str | None = None) -> int:
        """How many (entity, key) some source has a view of."""
        keys = select(source_views.c.entity, source_views.c.key).distinct()
        if entity is not None:
            keys = keys.where(source_views.c.entity == entity)
        with translated(), self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(keys.subquery())).scalar_one())

    def keys_without_provenance(self) -> list[RecordKey]:
        """Records written before the store kept provenance (migrated first-schema stores)."""
        query = select(records.c.entity, records.c.key).where(records.c.provenance.is_(None))
        with self.engine.connect() as conn:
            return sorted((e, k) for e, k in conn.execute(query))

    def count_records(self) -> dict[str, int]:
        with translated(), self.engine.connect() as conn:
            query = select(records.c.entity, func.count()).group_by(records.c.entity)
            return {entity: count for entity, count in conn.execute(query)}
