"""The catch-up of the tables live batches keep beside the views (`store.fills`): run
once by one worker, under a lease, in short reads and writes beside the batches."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from sqlalchemy import and_, bindparam, case, delete, func, select, text, tuple_, update

from schemas.views import RecordKey
from store.base import CHUNK, StoreBase, insert_missing, utcnow
from store.failures import translated
from store.fills import CATCH_UP_AFTER, CATCH_UP_LEASE, fill_freshness_row
from store.tables import UTCDateTime, record_deletions, source_views, store_meta
from store.times import aware_utc


class StoreCatchUp(StoreBase):
    def catch_up_due(self, now: datetime) -> bool:
        """Whether the fills of the tables batches keep are due again (`store.fills`)."""
        when = self.meta(CATCH_UP_AFTER)
        return when is not None and datetime.fromisoformat(when) <= now

    def catch_up(self, now: datetime, stop: threading.Event | None = None) -> bool:
        """Fill `source_freshness` and `record_deletions` from the views again (`store.fills`)
        when due, once: the worker that takes the schedule's row runs it, moving the row an
        hour on (a lease, renewed while it runs: another worker takes over should it stop),
        and removes the row when done. False: not due, taken by another worker, or stopped
        by `stop` (the row is then due again at once).

        Every read is a short one and every write a chunk in a short transaction: the
        freshness's aggregate is read, then its few rows written; the deletions are read
        in keyset pages along the views' primary key, each page's notes written at once.
        No batch waits on the scan, and no transaction stays open across it."""
        seen = self.meta(CATCH_UP_AFTER)
        if seen is None or datetime.fromisoformat(seen) > now:
            return False
        if stop is not None and stop.is_set():
            return False
        taken = self._take_over(seen, now)
        if taken is None:
            return False
        lease, renewed = taken, time.monotonic()

        def go_on() -> bool:
            """Whether to go on: not stopped (the row is handed back), and the lease still
            this worker's (renewed once a quarter of it has passed)."""
            nonlocal lease, renewed
            if stop is not None and stop.is_set():
                self._hand_back(lease, seen)
                return False
            if time.monotonic() - renewed > CATCH_UP_LEASE.total_seconds() / 4:
                taken = self._take_over(lease, utcnow())
                if taken is None:  # taken over meanwhile: that worker goes on
                    return False
                lease, renewed = taken, time.monotonic()
            return True

        with translated(), self.engine.connect() as conn:
            newest = conn.execute(
                select(
                    source_views.c.source,
                    func.max(source_views.c.occurred_at),
                    func.max(source_views.c.applied_at),
                ).group_by(source_views.c.source)
            ).all()
        if not go_on():
            return False
        # No views (no source has sent yet, or all purged): nothing to fill, and an
        # `executemany` of no rows runs its statement once without parameters and fails.
        with translated(), self.write_transaction() as conn:
            # As the migration's fill: a row only moves forward, and a source whose views
            # a `source purge` removed since the read gets none.
            typed = [bindparam(n, type_=UTCDateTime()) for n in ("change", "applied")]
            fills = [
                {"source": source, "change": aware_utc(change), "applied": aware_utc(applied)}
                for source, change, applied in newest
            ]
            if fills:
                conn.execute(text(fill_freshness_row(conn.dialect.name)).bindparams(*typed), fills)
        only_tombstones = func.sum(case((source_views.c.deleted, 0), else_=1)) == 0
        page = (
            select(source_views.c.entity, source_views.c.key, func.max(source_views.c.applied_at))
            .group_by(source_views.c.entity, source_views.c.key)
            .having(only_tombstones)
            .order_by(source_views.c.entity, source_views.c.key)
            .limit(CHUNK)
        )
        after: RecordKey | None = None
        while True:
            if not go_on():
                return False
            query = page
            if after is not None:
                key = tuple_(source_views.c.entity, source_views.c.key)
                query = page.where(key > tuple_(*after))
            with translated(), self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                break
            with translated(), self.write_transaction() as conn:
                insert_missing(conn, record_deletions, [
                    {"entity": e, "key": k, "deleted_at": aware_utc(at)} for e, k, at in rows
                ], ["entity", "key"])  # fmt: skip
            after = (rows[-1][0], rows[-1][1])
        with translated(), self.write_transaction() as conn:
            mine = and_(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == lease)
            conn.execute(delete(store_meta).where(mine))
        return True

    def _take_over(self, seen: str, now: datetime) -> str | None:
        """Move the catch-up's row from `seen` to a lease an hour after `now`; None when
        the row no longer says `seen` (another worker took it)."""
        lease = (now + CATCH_UP_LEASE).isoformat()
        with translated(), self.write_transaction() as conn:
            taken = conn.execute(
                update(store_meta)
                .where(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == seen)
                .values(value=lease, updated_at=utcnow())
            ).rowcount
        return lease if taken else None

    def _hand_back(self, lease: str, seen: str) -> None:
        """A stopped catch-up's row, due again (unless another worker took it meanwhile)."""
        with translated(), self.write_transaction() as conn:
            conn.execute(
                update(store_meta)
                .where(store_meta.c.name == CATCH_UP_AFTER, store_meta.c.value == lease)
                .values(value=seen, updated_at=utcnow())
            )
