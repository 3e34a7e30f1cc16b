"""What the store keeps of people's data over time: the access log (who read whose
records, and why), and the retention that prunes the history, the journal and the access
log and forgets the records every source deleted (docs/privacy.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.sql.elements import ColumnElement

from schemas.identifiers import ReferenceKey, key_reference
from store.base import CHUNK, StoreBase, utcnow
from store.batch import batch_io
from store.failures import translated
from store.tables import (
    UTCDateTime,
    access_log,
    apply_journal,
    dossier_anomalies,
    record_deletions,
    record_history,
    source_views,
)

# Rows of the history or the access log one retention transaction deletes.
RETENTION_CHUNK = 5000


class StoreRetention(StoreBase):
    # -- the access log -----------------------------------------------------------------
    def log_access(
        self,
        operator: str,
        command: str,
        reason: str,
        targets: Iterable[tuple[str | None, str | None]],
        now: datetime | None = None,
    ) -> None:
        """Append one row per (entity, reference) read, at `now` (default: the clock), in
        one transaction (one row without either when `targets` is empty). The caller shows
        nothing before this returned."""
        now = now or utcnow()
        rows = [
            {"accessed_at": now, "operator": operator, "command": command,
             "entity": entity, "reference": reference, "reason": reason}
            for entity, reference in (list(targets) or [(None, None)])
        ]  # fmt: skip
        with translated(), self.write_transaction() as conn:
            conn.execute(insert(access_log), rows)

    def access_entries(
        self, since: datetime | None = None, operators: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        """The access log, oldest first; from `since` on, of the `operators` (one person's
        names, as written)."""
        query = select(access_log).order_by(access_log.c.id)
        if since is not None:
            query = query.where(access_log.c.accessed_at >= since)
        if operators is not None:
            query = query.where(access_log.c.operator.in_(sorted(set(operators))))
        with translated(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- retention ----------------------------------------------------------------------
    def prune_history(self, older_than: datetime) -> int:
        """Drop history entries applied before `older_than`; return how many."""
        return self.prune_history_within(older_than)[0]

    def prune_history_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """`prune_history` a chunk at a time until none is left or `seconds` have passed
        (a chunk begun is finished; one at least); also whether none is left."""
        return self._delete_in_chunks(record_history, record_history.c.applied_at,
                                      older_than, seconds)  # fmt: skip

    def purge_access_log(self, older_than: datetime) -> int:
        """Delete access log rows written before `older_than` (the only delete of the log:
        on PostgreSQL its trigger lets a DELETE through only in a transaction that says it
        is this purge); return how many."""
        return self.purge_access_log_within(older_than)[0]

    def purge_access_log_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """`purge_access_log` a chunk at a time, as `prune_history_within`."""
        return self._delete_in_chunks(access_log, access_log.c.accessed_at, older_than,
                                      seconds, "portal_sync_purge_access_log")  # fmt: skip

    def purge_journal_within(
        self, older_than: datetime, seconds: float | None = None
    ) -> tuple[int, bool]:
        """Delete the batches' journal rows committed before `older_than`, as
        `prune_history_within` (on PostgreSQL through the journal's purge function, which
        keeps the last `store.roles.JOURNAL_FLOOR_DAYS` whatever it is asked). By id: of
        the oldest rows those old enough, until none of them is (the ids rise with the
        commits; no index of the time, which a large journal's migration would have had to
        build while every batch waited)."""
        return self._delete_in_chunks(apply_journal, apply_journal.c.committed_at, older_than,
                                      seconds, "portal_sync_purge_apply_journal",
                                      by_id=True)  # fmt: skip

    def _delete_in_chunks(
        self,
        table: Table,
        column: ColumnElement[Any],
        older_than: datetime,
        seconds: float | None,
        purge_function: str | None = None,
        by_id: bool = False,
    ) -> tuple[int, bool]:
        """Delete the rows whose `column` is before `older_than`, RETENTION_CHUNK of them a
        transaction (by the column's index), until none is left or `seconds` have passed:
        a worker's retention run never holds its batches for long, whatever a lowered
        retention or days of failed runs have left due."""
        deadline = None if seconds is None else time.monotonic() + seconds
        chosen = (
            select(table.c.id).where(column < older_than).order_by(column).limit(RETENTION_CHUNK)
        )
        # On PostgreSQL the access log's and the journal's rows go through their purge
        # functions (migrations 0017, 0018), which run as the store's owner: the role
        # running this need not be able to delete from them (`store grant`).
        purging = (
            None
            if purge_function is None
            else getattr(func, purge_function)(
                bindparam("before", older_than, type_=UTCDateTime()), RETENTION_CHUNK
            )
        )
        deleted = 0
        while True:
            with translated(), self.write_transaction() as conn:
                if purging is not None and conn.dialect.name == "postgresql":
                    done = int(conn.execute(select(purging)).scalar_one())
                    deleted += done
                    # a purge beside (another worker's) deletes some of a chunk: done when
                    # none is left, not when a chunk comes out short
                    more = done > 0
                elif by_id:
                    oldest = select(table.c.id, column).order_by(table.c.id)
                    rows = conn.execute(oldest.limit(RETENTION_CHUNK)).all()
                    ids = [row_id for row_id, at in rows if at < older_than]
                    more = bool(ids)
                    if ids:
                        result = conn.execute(delete(table).where(table.c.id.in_(ids)))
                        deleted += int(result.rowcount or 0)
                else:
                    ids = [row_id for (row_id,) in conn.execute(chosen)]
                    more = len(ids) == RETENTION_CHUNK
                    if ids:
                        result = conn.execute(delete(table).where(table.c.id.in_(ids)))
                        deleted += int(result.rowcount or 0)
            if not more:
                return deleted, True
            if deadline is not None and time.monotonic() >= deadline:
                return deleted, False

    def purge_deleted(
        self, older_than: datetime, secret: ReferenceKey | None = None
    ) -> tuple[int, int]:
        """Forget records every source deleted before `older_than`: the old and new values
        of their history entries become null, the entries' key its reference (keyed with
        `secret`; without one, an opaque name) and their event id null (an event id derives
        from the key, without a secret); the entries stay, marked `purged_at`, under that
        name. Their tombstones go. Return (history entries emptied, tombstones
        removed)."""
        emptied, removed, _ = self.purge_deleted_within(older_than, secret=secret)
        return emptied, removed

    def purge_deleted_within(
        self,
        older_than: datetime,
        seconds: float | None = None,
        secret: ReferenceKey | None = None,
    ) -> tuple[int, int, bool]:
        """`purge_deleted`, chunk after chunk until none is due or `seconds` have passed
        (a chunk begun is finished; one at least); the third value says whether none is
        due any more.

        The candidates are the rows of `record_deletions` due before `older_than` (an index
        range, not a scan of the views). Each chunk of them is locked (as a batch locks its
        records) and checked against the views inside its transaction: a record every
        source deleted before `older_than` is forgotten; one deleted since waits for its
        newest tombstone's time; one that came back leaves the table; one with no view at all
        (a source purge took the last) is forgotten at its note's time. So every chunk
        leaves the due ones, and the next is read afresh."""
        deadline = None if seconds is None else time.monotonic() + seconds
        emptied = removed = 0
        due = (
            select(record_deletions.c.entity, record_deletions.c.key)
            .where(record_deletions.c.deleted_at < older_than)
            .order_by(record_deletions.c.deleted_at)
            .limit(CHUNK)
        )
        first = True  # a chunk at least, whatever time is left
        while first or deadline is None or time.monotonic() < deadline:
            first = False
            with translated(), self.engine.connect() as conn:
                chunk = sorted((entity, key) for entity, key in conn.execute(due))
            if not chunk:
                return emptied, removed, True
            with translated(), self.write_transaction() as conn:
                io = batch_io(conn.dialect.name, conn.connection.driver_connection)
                io.lock(chunk)
                newest = io.only_tombstones(chunk)
                keys = sorted(k for k, at in newest.items() if at < older_than)
                # A record a source purge left with no view at all: its note's time (the
                # purge's, or an earlier delete's) is the last time it was held.
                held = io.with_views(chunk)
                keys += [k for k in chunk if k not in held]
                keys.sort()
                later = {k: at for k, at in newest.items() if at >= older_than}
                io.forget_deletions([k for k in chunk if k not in later])
                if later:
                    io.move_deletions(later)
                if not keys:
                    continue
                of_keys = tuple_(record_history.c.entity, record_history.c.key).in_(keys)
                entries = conn.execute(
                    select(
                        record_history.c.id, record_history.c.key, record_history.c.changes
                    ).where(of_keys, record_history.c.purged_at.is_(None))
                ).all()
                # Keyed, the reference finds them again (`history`, with the same secret);
                # without a secret an opaque name per record: a masked key is shared by
                # one record in a hundred, and would list other people's entries.
                aliases = {
                    key: key_reference(key, secret)
                    if secret is not None
                    else f"forgotten:{uuid.uuid4().hex[:16]}"
                    for key in {key for _, key, _ in entries}
                }
                if entries:
                    conn.execute(
                        update(record_history)
                        .where(record_history.c.id == bindparam("entry_id"))
                        .values(
                            changes=bindparam("emptied"),
                            key=bindparam("reference"),
                            event_id=None,
                            purged_at=utcnow(),
                        ),
                        [
                            {
                                "entry_id": entry_id,
                                "emptied": {f: [None, None] for f in changes},
                                "reference": aliases[key],
                            }
                            for entry_id, key, changes in entries
                        ],
                    )
                emptied += len(entries)
                result = conn.execute(
                    delete(source_views).where(
                        tuple_(source_views.c.entity, source_views.c.key).in_(keys)
                    )
                )
                removed += int(result.rowcount or 0)
                # A forgotten dossier's unforeseen status changes go with it: they name it,
                # and are kept while the record exists (privacy.md).
                dossiers = [key for entity, key in keys if entity == "dossier"]
                if dossiers:
                    conn.execute(
                        delete(dossier_anomalies).where(dossier_anomalies.c.key.in_(dossiers))
                    )
                io.count_write(utcnow())
        return emptied, removed, False
