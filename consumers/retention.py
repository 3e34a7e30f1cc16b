"""The retention job: what the store forgets, and when. The worker runs it at most once an
hour (as it pruned the history before); `now` is given, so tests can move the clock.

- history entries: `history_days` after they were written
  (`PORTAL_SYNC_HISTORY_RETENTION_DAYS`, 730);
- a deleted record's history values (emptied, the entries kept under the key's reference,
  without event ids) and its tombstones (removed): `deleted_days` after its last source
  deleted it (`PORTAL_SYNC_DELETED_RETENTION_DAYS`, 180);
- access log rows: `access_log_days` after they were written
  (`PORTAL_SYNC_ACCESS_LOG_RETENTION_DAYS`, 730);
- the batches' journal (`apply_journal`, a row a partition a batch): `journal_days` after
  its batch committed (`PORTAL_SYNC_JOURNAL_RETENTION_DAYS`, 30).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from consumers.metrics import RETENTION_FAILURES, RETENTION_PURGED
from schemas.identifiers import ReferenceKey
from store import Store, utcnow


@dataclass(frozen=True)
class Retention:
    history_days: int = 730
    deleted_days: int = 180
    access_log_days: int = 730
    journal_days: int = 30
    # a forgotten record's history entries are kept under its reference, keyed with this
    reference_key: ReferenceKey | None = None


def retention_now(store: Store) -> datetime:
    """The time a retention run counts from: the earlier of this host's clock and the
    database server's. What a run deletes cannot be brought back, and one host's clock run
    ahead (a bad time server, a VM's clock) deleted history and access log rows early."""
    return min(utcnow(), store.server_now())


def purge(store: Store, retention: Retention, now: datetime) -> dict[str, int]:
    """Forget what is past its retention at `now`; return the counts by kind (and count
    them in `portal_sync_retention_purged_total`)."""
    return purge_within(store, retention, now)[0]


def purge_within(
    store: Store, retention: Retention, now: datetime, seconds: float | None = None
) -> tuple[dict[str, int], bool]:
    """`purge` for about `seconds` at most, each step a chunk at least (the worker's
    batches wait meanwhile); also whether it is done, or more is due."""
    deadline = None if seconds is None else time.monotonic() + seconds

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    pruned, history_done = store.prune_history_within(
        now - timedelta(days=retention.history_days), left()
    )
    emptied, tombstones, deleted_done = store.purge_deleted_within(
        now - timedelta(days=retention.deleted_days), left(), retention.reference_key
    )
    logged, log_done = store.purge_access_log_within(
        now - timedelta(days=retention.access_log_days), left()
    )
    journaled, journal_done = store.purge_journal_within(
        now - timedelta(days=retention.journal_days), left()
    )
    counts = {
        "history": pruned,
        "deleted_history_values": emptied,
        "tombstones": tombstones,
        "access_log": logged,
        "apply_journal": journaled,
    }
    for kind, count in counts.items():
        RETENTION_PURGED.labels(kind).inc(count)
    return counts, history_done and deleted_done and log_done and journal_done


log = logging.getLogger(__name__)


def catch_up_if_due(
    store: Store, now: datetime, stop: threading.Event | None = None
) -> threading.Thread | None:
    """A day after migrations 0011 and 0012, fill their tables from the views again (what
    workers of the release before applied meanwhile: docs/deploy.md, "Upgrades"), in a
    thread of its own beside the batches: one scan of every view, given up at `stop`.
    None when not due, or when the worker is stopping."""
    if (stop is not None and stop.is_set()) or not store.catch_up_due(now):
        return None

    def run() -> None:
        try:
            if not store.catch_up(now, stop):
                return
            log.info("the sources' freshness and the deletion notes filled from the views again")
        except Exception as error:  # taken over an hour later (store.fills.CATCH_UP_LEASE)
            RETENTION_FAILURES.labels("catch_up").inc()
            log.error("filling the freshness and deletion notes again failed (%s); tried "
                      "again in an hour", type(error).__name__)  # fmt: skip

    thread = threading.Thread(target=run, name="store-catch-up", daemon=True)
    thread.start()
    return thread
