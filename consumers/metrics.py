"""Prometheus metrics of the reconciler. Labels are bounded; no personal data in them."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from datetime import datetime
from functools import cache

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from consumers.checks import DeadLetter
from consumers.freshness import SourceFreshness
from consumers.reconciler import PHASES, BatchReport
from schemas.dead_letter import DEAD_LETTER_REASONS, Reason

EVENTS = Counter(
    "portal_sync_events_total",
    "Change events by outcome: applied, duplicate, stale, rejected, dead_lettered.",
    ["source", "entity", "outcome"],
)
DEAD_LETTERS = Counter(
    "portal_sync_dead_letters_total",
    "Events sent to the dead-letter topic, by reason code.",
    ["reason"],
)
# Exported at 0 from the start so that `increase()` sees the first of each reason.
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERS.labels(_reason)
FRESHNESS = SourceFreshness()
REGISTRY.register(FRESHNESS)
SOFT_WARNINGS = Counter(
    "portal_sync_soft_check_warnings_total",
    "Soft contract checks that failed (the event was still applied), by entity and check.",
    ["entity", "check"],
)
FIELD_CONFLICTS = Counter(
    "portal_sync_field_conflicts_total",
    "Field disagreements between contributing sources, counted when they appear.",
    ["entity", "field"],
)
DOSSIER_ANOMALIES = Counter(
    "portal_sync_dossier_anomalies_total",
    "Dossier status changes the national lifecycle does not foresee (applied, flagged).",
)
BATCH_EVENTS = Histogram(
    "portal_sync_store_batch_events",
    "Events per store transaction.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
COMMIT_SECONDS = Histogram(
    "portal_sync_store_commit_duration_seconds",
    "Wall time of one store transaction (read views, merge, write, commit).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_PHASE_SECONDS = Histogram(
    "portal_sync_batch_phase_duration_seconds",
    "Wall time of a batch's phases: check (the contract checks, while the batch before is "
    "applied), then its store transaction's read, merge, write and commit.",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
for _phase in ("check", *PHASES):  # exported at 0 from the start
    BATCH_PHASE_SECONDS.labels(_phase)


PHASE_NAMES = ("check", *PHASES)
PhaseTotals = tuple[int, dict[str, float]]  # store transactions, seconds per phase


def phase_totals() -> PhaseTotals:
    """What the phase histogram holds so far in this process: its store transactions (the
    `commit` count) and its seconds per phase."""

    def sample(suffix: str, phase: str) -> float:
        name = f"portal_sync_batch_phase_duration_seconds_{suffix}"
        return REGISTRY.get_sample_value(name, {"phase": phase}) or 0.0

    return int(sample("count", "commit")), {p: sample("sum", p) for p in PHASE_NAMES}


def phase_summary(start: PhaseTotals, end: PhaseTotals) -> tuple[int, str]:
    """The batches between two `phase_totals` and their seconds per phase, as the worker's
    closing line gives them: "check 1.203 s, read 0.912 s, merge 4.480 s, …"."""
    text = ", ".join(f"{p} {end[1][p] - start[1][p]:.3f} s" for p in PHASE_NAMES)
    return end[0] - start[0], text


def record_check(seconds: float) -> None:
    """A batch's contract checks (`BatchProcessor.prepare`)."""
    BATCH_PHASE_SECONDS.labels("check").observe(seconds)


RECORD_READS = Counter(
    "portal_sync_store_batch_records_total",
    "Records the batches merged, by where their current views came from: read from the "
    "store, or kept by the worker from its own batches before (consumers.cache).",
    ["origin"],
)
for _origin in ("store", "kept"):
    RECORD_READS.labels(_origin)

RETENTION_PURGED = Counter(
    "portal_sync_retention_purged_total",
    "What the worker's retention job removed or emptied, by kind: history (entries past "
    "the history retention), deleted_history_values (entries of deleted records emptied), "
    "tombstones, access_log (rows), apply_journal (the batches' journal rows).",
    ["kind"],
)
RETENTION_KINDS = ("history", "deleted_history_values", "tombstones", "access_log", "apply_journal")
for _kind in RETENTION_KINDS:
    RETENTION_PURGED.labels(_kind)
RETENTION_FAILURES = Counter(
    "portal_sync_retention_failures_total",
    "Runs of the worker's retention job that failed, by step: purge (what the store "
    "forgets past its retention), catch_up (the store's fills after migrations 0011/0012).",
    ["step"],
)
for _step in ("purge", "catch_up"):
    RETENTION_FAILURES.labels(_step)

BASE_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@cache
def sync_lag(objective_seconds: float = 60.0) -> Histogram:
    """Seconds from the source's commit (`occurred_at`) to the store commit.

    Buckets run from 50 ms to 1 h and always include the freshness objective as an edge,
    so `le="<objective>"` reads the share of events within objective exactly.
    """
    buckets = sorted(set(BASE_LAG_BUCKETS) | {objective_seconds})
    return Histogram(
        "portal_sync_sync_lag_seconds",
        "End-to-end sync lag: source commit (occurred_at) to national store commit.",
        ["source", "entity"],
        buckets=buckets,
    )


# The outcome series of refused events: they have no trustworthy source or entity.
REJECTED = ("unregistered", "unregistered", "rejected")
DEAD_LETTERED = ("invalid", "invalid", "dead_lettered")


def seed_series(writers: Iterable[tuple[str, str]], objective_seconds: float) -> None:
    """Export at 0, from the worker's start, the series that alerts and the dashboard read
    with `increase()` and `rate()`: the sync lag and the outcomes of each (source, entity)
    that may write, and the refused events' two series. A series born at its first batch
    holds that batch in its first sample, which `increase()` never counts: after every
    start, the first late batch of a source missed the sync-lag alert."""
    histogram = sync_lag(objective_seconds)
    for source, entity in writers:
        histogram.labels(source, entity)
        for outcome in ("applied", "duplicate", "stale"):
            EVENTS.labels(source, entity, outcome)
    EVENTS.labels(*REJECTED)
    EVENTS.labels(*DEAD_LETTERED)


def record_batch(report: BatchReport, objective_seconds: float) -> list[float]:
    """Count outcomes and observe the sync lag of applied events; return the lags."""
    lags: list[float] = []
    histogram = sync_lag(objective_seconds)
    assert report.committed_at is not None
    committed = report.committed_at.timestamp()
    outcomes = report.outcomes
    counts = Tally([(item.source, item.entity, item.outcome) for item in outcomes])
    by_source: dict[tuple[str, str], list[float]] = {}
    # per source: its freshness needs only the newest (compared as timestamps: cheaper)
    newest: dict[str, tuple[float, datetime]] = {}
    for item in outcomes:
        if item.outcome == "applied":
            at = item.occurred_at.timestamp()
            lag = committed - at if committed > at else 0.0
            pair = (item.source, item.entity)
            values = by_source.get(pair)
            if values is None:
                by_source[pair] = [lag]
            else:
                values.append(lag)
            lags.append(lag)
            known = newest.get(item.source)
            if known is None or at > known[0]:
                newest[item.source] = (at, item.occurred_at)
    if report.records_read:
        RECORD_READS.labels("store").inc(report.records_read)
    if report.records_kept:
        RECORD_READS.labels("kept").inc(report.records_kept)
    for series, count in counts.items():  # one label lookup per series, not per event
        EVENTS.labels(*series).inc(count)
    for pair, values in by_source.items():
        observe = histogram.labels(*pair).observe
        for value in values:
            observe(value)
    BATCH_EVENTS.observe(len(report.outcomes))
    for phase, seconds in report.phases.items():
        BATCH_PHASE_SECONDS.labels(phase).observe(seconds)
    for (entity, field_name), count in Tally(report.new_conflicts).items():
        FIELD_CONFLICTS.labels(entity, field_name).inc(count)
    DOSSIER_ANOMALIES.inc(report.anomalies)
    FRESHNESS.record([(source, at) for source, (_, at) in newest.items()], report.committed_at)
    return lags


def record_dead_letters(dead: Iterable[DeadLetter]) -> None:
    """A contract violation is `dead_lettered` (it has no trustworthy source or entity); a
    valid event the store's rules refuse (an unregistered source) is `rejected`. Both go
    to the dead letters; the source label stays bounded either way."""
    for letter in dead:
        EVENTS.labels(
            *(REJECTED if letter.code == Reason.UNREGISTERED_SOURCE else DEAD_LETTERED)
        ).inc()
        DEAD_LETTERS.labels(letter.code).inc()


def record_warnings(entity: str, check: str, count: int) -> None:
    """`count` events of `entity` failed the soft check `check`."""
    SOFT_WARNINGS.labels(entity, check).inc(count)


WORKER_RETRYING_SECONDS = Gauge(
    "portal_sync_worker_retrying_seconds",
    "How long the batch in hand has been waiting for the store or the broker (0: not waiting).",
)
WORKER_WAITING_FOR = Gauge(
    "portal_sync_worker_waiting_for",
    "1 for the kind of error the worker's retries wait for (an error's class, or `fetch: "
    "<class>` for the broker's fetches); no series while nothing is retried.",
    ["reason"],
)
WORKER_LAST_PROGRESS = Gauge(
    "portal_sync_worker_last_progress_timestamp_seconds",
    "When the worker last committed a batch (Unix time).",
)


# A batch takes well under a second on a healthy worker (and a few under a long backlog):
# one in hand this long waits for something (a lock, a broker, the store).
BUSY_UNREADY_SECONDS = 15.0


class WorkerHealth:
    """Whether the worker makes progress: a batch that keeps failing is never silent.

    Ready while no batch is retrying or has taken BUSY_UNREADY_SECONDS; healthy until a
    batch has retried longer than `stall_after_seconds` (then a supervisor may restart it,
    and an alert fires)."""

    def __init__(self, stall_after_seconds: float = 300.0) -> None:
        self.stall_after_seconds = stall_after_seconds
        self._lock = threading.Lock()
        self._since: float | None = None
        self._busy_since: float | None = None  # the batch in hand began
        self._fetch_since: float | None = None  # fetches fail since (a corrupt segment …)
        self._retry_reason = ""  # what a batch's (or a start's) retries wait for
        self._fetch_reason = ""  # what the failing fetches say
        self._shown = ""  # the reason `portal_sync_worker_waiting_for` shows
        WORKER_WAITING_FOR.clear()  # one worker a process: none shown yet
        # What /healthz judges by, so that the alert on it sees a batch that blocks (a
        # commit, a lock, a connection that hangs) as it sees one that retries.
        WORKER_RETRYING_SECONDS.set_function(self.waiting_seconds)

    @property
    def reason(self) -> str:
        """What the worker waits for while it is not ready (an error's kind), else ''."""
        return self._retry_reason or self._fetch_reason

    def _show_reason(self) -> None:
        """The reason in `portal_sync_worker_waiting_for` (under the lock): the stall
        alert's `waiting_for` annotation names it."""
        reason = self.reason
        if reason == self._shown:
            return
        if self._shown:
            with contextlib.suppress(KeyError):  # cleared by another WorkerHealth (tests)
                WORKER_WAITING_FOR.remove(self._shown)
        if reason:
            WORKER_WAITING_FOR.labels(reason).set(1)
        self._shown = reason

    def retrying(self, reason: str) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
            self._retry_reason = reason
            self._show_reason()

    def recovered(self) -> None:
        with self._lock:
            self._since = None
            self._retry_reason = ""
            self._show_reason()

    def fetch_failed(self, reason: str) -> None:
        """A fetch failed: until one passes (`fetched`), the time counts as retries."""
        with self._lock:
            if self._fetch_since is None:
                self._fetch_since = time.monotonic()
            self._fetch_reason = reason
            self._show_reason()

    def fetched(self) -> None:
        with self._lock:
            self._fetch_since = None
            self._fetch_reason = ""
            self._show_reason()

    def busy(self) -> None:
        """A batch begins: until it ends (`free`), its time counts towards a stall."""
        self._busy_since = time.monotonic()

    def free(self) -> None:
        self._busy_since = None

    def progressed(self) -> None:
        self.recovered()
        WORKER_LAST_PROGRESS.set(time.time())

    def retrying_seconds(self) -> float:
        """How long a batch, or the fetches, have been failing."""
        since = [t for t in (self._since, self._fetch_since) if t is not None]
        return 0.0 if not since else time.monotonic() - min(since)

    def waiting_seconds(self) -> float:
        """The longer of the retries and the batch in hand (0 between batches)."""
        busy = self._busy_since
        taken = 0.0 if busy is None else time.monotonic() - busy
        return max(self.retrying_seconds(), taken)

    def ready(self) -> bool:
        """No batch retrying, no fetch failing, and the batch in hand (if any) younger than
        BUSY_UNREADY_SECONDS: one send of a dead letter to a topic gone blocks a minute
        before it fails (the producer's flush), and /readyz said 200 all along."""
        busy = self._busy_since
        return (
            self._since is None
            and self._fetch_since is None
            and (busy is None or time.monotonic() - busy < BUSY_UNREADY_SECONDS)
        )

    def stalled(self) -> bool:
        """A batch has retried, or one batch has taken, longer than the threshold."""
        return self.waiting_seconds() > self.stall_after_seconds
