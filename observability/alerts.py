"""Prometheus alert rules of portal-sync, as code: `python -m observability.deploy` writes
`deploy/prometheus/alerts.yml` from these (a test fails when the file is stale).

Each rule has an `expr` (the alert) and a `measure`: the quantity that `expr` compares to
its threshold. The integration test asserts that every measure returns data from a running
pipeline, so that no alert watches a series that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JOBS = 'job=~"portal-sync-.*"'
RUNBOOK = "docs/metrics.md#runbook-"
# Dead-letter reasons that mean a principal wrote what it may not (docs/security.md).
SECURITY_REASONS = "unsigned|bad_signature|key_mismatch|out_of_scope"


@dataclass(frozen=True)
class Thresholds:
    """Thresholds and `for:` durations; the defaults are the production ones."""

    objective_seconds: float = 60.0  # freshness objective: a bucket edge of sync lag
    slow_share: float = 0.05  # share of events slower than the objective that alerts
    stale_after_seconds: float = 1800.0
    # A registered source from which nothing has reached the store, for this long; a
    # change any worker reported within `delivered_window` counts (a worker that applied
    # a source's only batch and was then scaled down took its series with it).
    never_delivered_for: str = "30m"
    delivered_window: str = "1d"
    lag_growing_seconds: float = 300.0
    cursor_lag_seconds: float = 900.0
    # A batch waiting on the store or the broker this long. Below the worker's own stall
    # (`PORTAL_SYNC_WORKER_STALL_AFTER_SECONDS`, 300), after which /healthz fails and a
    # supervisor (the chart's liveness probe) restarts it: the gauge then starts again at
    # 0, so the rule takes the highest value of `stall_window`, which a restart cannot clear.
    worker_stalled_seconds: float = 240.0
    stall_window: str = "10m"
    exporter_blind_seconds: float = 120.0  # the lag exporter's last successful poll
    # The worker's retention job runs hourly: two failed runs within this window.
    retention_window: str = "3h"
    window: str = "5m"  # rate windows
    # A source with fewer changes than `busy_changes` in `window` is judged over
    # `sparse_window` instead, once it has `sparse_min_changes` there: over `window` alone
    # its share of slow changes was 0/0 (no match) at every quiet stretch, and a source
    # that sends a change every few minutes, each late, paged no one.
    busy_changes: int = 20
    sparse_window: str = "1h"
    sparse_min_changes: int = 5
    for_short: str = "2m"  # stalled consumer, process down
    for_missing: str = "5m"  # no target of a job at all (a pod recreated takes less)
    for_long: str = "10m"  # lag above objective, stale source, lag growing


DEFAULT = Thresholds()


@dataclass(frozen=True)
class Rule:
    alert: str
    expr: str
    measure: str
    duration: str
    severity: str
    summary: str
    runbook: str
    # More annotations, each of one query's answer (`WAITING_FOR`): apart from the
    # summary, so that a query that fails leaves the summary whole.
    notes: tuple[tuple[str, str], ...] = ()

    def as_dict(self, runbook_base: str = "") -> dict[str, Any]:
        """The rule as Prometheus reads it. `runbook_base`: where the repository's files
        are served (`https://…/blob/main/`), for a `runbook_url` a page can open; empty,
        the link is relative to the repository."""
        return {
            "alert": self.alert,
            "expr": self.expr,
            "for": self.duration,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "runbook": self.runbook,
                "runbook_url": runbook_base + RUNBOOK + self.alert.lower(),
                **dict(self.notes),
            },
        }


# What the stall's retries wait for (`portal_sync_worker_waiting_for`), the alert's
# `waiting_for` annotation: "StoreUnavailable", or empty for one attempt that blocks. Over
# the last 5 minutes: a worker restarted by its supervisor shows it again only once its
# first retry fails.
WAITING_FOR = (
    "{{ range $i, $s := printf `max by (reason) (max_over_time(portal_sync_worker_waiting_for"
    "{job=%q,instance=%q}[5m]))` $labels.job $labels.instance | query | sortByLabel `reason` }}"
    "{{ if $i }}, {{ end }}{{ $s.Labels.reason }}{{ end }}"
)


def _seconds(duration: str) -> int:
    """A Prometheus duration of one unit ("5m", "3h") in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(duration[:-1]) * units[duration[-1]]


def _since_start(aggregate: str, counter: str, window: str) -> str:
    """The whole count of each process that started within `window`. increase() starts
    from a series' first scrape: what a process counted before it (a worker dead-letters
    its first batch, or its retention job fails, seconds after it starts, and the first
    scrape comes up to an interval later) is never an increase. All such a process counted,
    it counted within the window."""
    return (
        f"{aggregate} ({counter} and on (job, instance) "
        f"(time() - process_start_time_seconds < {_seconds(window)}))"
    )


def _edge(seconds: float) -> str:
    """The `le` label value prometheus_client writes for a bucket edge (60 -> "60.0")."""
    return repr(float(seconds))


def rules(t: Thresholds = DEFAULT) -> list[Rule]:
    w = t.window

    def late_share(window: str) -> str:
        return (
            f"1 - sum by (source) (increase(portal_sync_sync_lag_seconds_bucket"
            f'{{le="{_edge(t.objective_seconds)}"}}[{window}]))'
            f" / sum by (source) (increase(portal_sync_sync_lag_seconds_count[{window}]))"
        )

    def changes(window: str) -> str:
        return f"sum by (source) (increase(portal_sync_sync_lag_seconds_count[{window}]))"

    slow = f"({late_share(w)}) and on (source) ({changes(w)} >= {t.busy_changes})"
    slow_sparse = (
        f"({late_share(t.sparse_window)})"
        f" and on (source) ({changes(t.sparse_window)} >= {t.sparse_min_changes})"
        f" unless on (source) ({changes(w)} >= {t.busy_changes})"
    )
    stale = "time() - max by (source) (portal_sync_source_last_change_timestamp_seconds)"
    growing = f"deriv(portal_sync_consumer_lag_seconds[{w}])"
    status = "max by (group) (portal_sync_consumer_status)"
    dead = f"sum by (reason) (increase(portal_sync_dead_letters_total[{w}]))"
    dead_early = _since_start("sum by (reason)", "portal_sync_dead_letters_total", w)
    forged = f'portal_sync_dead_letters_total{{reason=~"{SECURITY_REASONS}"}}'
    refused = f"sum by (reason) (increase({forged}[{w}]))"
    refused_early = _since_start("sum by (reason)", forged, w)
    errors = f"sum by (source, kind) (increase(portal_sync_source_errors_total[{w}]))"
    errors_early = _since_start("sum by (source, kind)", "portal_sync_source_errors_total", w)
    cursor = "max by (source) (portal_sync_source_cursor_lag_seconds)"
    up = f"up{{{JOBS}}}"

    # With no target of a job at all (left service discovery, a pod that never started),
    # `up == 0` has nothing to compare: each job whose alerts need its series, apart (a
    # deployment without the lag exporter drops its rule).
    def missing(job: str) -> str:
        return f'absent(up{{job="{job}"}})'

    def targets(job: str) -> str:
        return f'count by (job) (up{{job="{job}"}})'

    waiting = (
        "max by (job, instance) "
        f"(max_over_time(portal_sync_worker_retrying_seconds[{t.stall_window}]))"
    )
    beyond = "max by (source) (portal_sync_outbox_rows_beyond_lookback)"
    stopped = "max by (source) (portal_sync_source_stopped)"
    kept = "max by (source) (portal_sync_source_kept_dead_letters)"
    retention = (
        "max by (job, instance) "
        f"(increase(portal_sync_retention_failures_total[{t.retention_window}]))"
    )
    retention_early = _since_start(
        "max by (job, instance)", "portal_sync_retention_failures_total", t.retention_window
    )
    # the longest of the stall window: a restarted worker's missed scrape keeps its place
    registered = f"max by (source) (max_over_time(portal_sync_source_registered[{t.stall_window}]))"
    silent = (
        f"{registered} unless on (source) max by (source) "
        f"(max_over_time(portal_sync_source_last_change_timestamp_seconds[{t.delivered_window}]))"
    )
    blind = (
        "time() - max by (job, instance) (portal_sync_lag_exporter_last_success_timestamp_seconds)"
    )
    return [
        Rule(
            "PortalSyncWorkerStalled",
            f"{waiting} >= {t.worker_stalled_seconds:g}",
            waiting,
            "1m",
            "critical",
            "{{ $labels.instance }}: a batch has waited {{ $value | humanizeDuration }} for "
            "the store or the broker; no change is being applied",
            "The worker retries with backoff, or one attempt blocks, and applies nothing "
            "meanwhile: check that "
            "PostgreSQL and Kafka answer, and that the dead-letter topic exists "
            "(`portal-sync topics`). The worker's /readyz is false while it retries; after "
            "PORTAL_SYNC_WORKER_STALL_AFTER_SECONDS its /healthz fails and its supervisor "
            f"restarts it, which does not clear this alert (the longest wait of "
            f"{t.stall_window}); it resolves {t.stall_window} after the batches pass again.",
            (("waiting_for", WAITING_FOR),),
        ),
        Rule(
            "PortalSyncSyncLagAboveObjective",
            f"({slow}) > {t.slow_share:g} or ({slow_sparse}) > {t.slow_share:g}",
            f"({slow}) or ({slow_sparse})",
            t.for_long,
            "warning",
            f"{{{{ $labels.source }}}}: {{{{ $value | humanizePercentage }}}} of changes took "
            f"longer than {t.objective_seconds:g}s from source commit to the national store",
            "Check the consumer lag panel: if a partition lags, see the stalled-consumer "
            "runbook; if not, the store commits are slow (store commit time panel) or the "
            "source's producer is late (cursor lag); compare occurred_at clocks of the source. "
            f"A source with fewer than {t.busy_changes} changes in {w} is judged over the "
            f"last {t.sparse_window} (from {t.sparse_min_changes} changes on). "
            "It resolves when the worker applies nothing of the source (no change to "
            "measure): PortalSyncConsumerStalled or PortalSyncWorkerStalled pages then. "
            "A source's first load, or its records sent again after its state was reset, "
            "fires this by design: their occurred_at is each row's own change time, often "
            "months back. Silence it for that source while the load runs; the cursor lag "
            "panel shows how far it has come.",
        ),
        Rule(
            "PortalSyncSourceStale",
            f"{stale} > {t.stale_after_seconds:g}",
            stale,
            t.for_long,
            "warning",
            f"{{{{ $labels.source }}}}: no change reached the store for "
            f"{{{{ $value | humanizeDuration }}}} (threshold {t.stale_after_seconds:g}s)",
            "Is the source's producer up and polling (process down, source errors, cursor "
            "lag)? Are its events dead-lettered? Ask the province/ministry whether its system "
            "is down or idle; a quiet source is stale too, by design.",
        ),
        Rule(
            "PortalSyncSourceNeverDelivered",
            silent,
            registered,
            t.never_delivered_for,
            "warning",
            "{{ $labels.source }}: registered, but no worker has reported a change of it "
            f"in the store for {t.delivered_window}",
            "PortalSyncSourceStale cannot watch a source that never delivered: it has no "
            "freshness yet (nor one whose only changes a worker since gone applied: "
            f"{t.delivered_window} after it went, treat it as stale). Is its producer "
            "deployed and running (`portal-sync produce` with this source id)? Are its "
            "events dead-lettered (`portal-sync dlq list`, then `dlq show ID`: unsigned, "
            "bad_signature, out_of_scope)? A source registered ahead of its go-live alerts "
            "too: register it when its producer starts.",
        ),
        Rule(
            "PortalSyncConsumerLagGrowing",
            f"({growing} > 0) and portal_sync_consumer_lag_seconds > {t.lag_growing_seconds:g}",
            growing,
            t.for_long,
            "warning",
            f"{{{{ $labels.group }}}} {{{{ $labels.topic }}}}[{{{{ $labels.partition }}}}] "
            f"is falling behind: the oldest unapplied change is older than "
            f"{t.lag_growing_seconds:g}s and getting older",
            "The consumer moves but slower than the producers: check store commit time and "
            "batch size, the worker's CPU and the store's load; add workers (up to the number "
            "of partitions).",
        ),
        Rule(
            "PortalSyncConsumerStalled",
            f"{status} >= 2",
            status,
            t.for_short,
            "critical",
            "{{ $labels.group }} is STALL (2) or STOP (3): value {{ $value }}; changes are "
            "not reaching the national store",
            "STOP: no member consumes; start the worker (`portal-sync worker`) and check its "
            "/healthz; a committed offset above the log end (`portal-sync lag`) is a position "
            'in an earlier log of the topic (docs/operations.md, "A change topic behind the '
            'store"). STALL: members but no progress; check the worker log for a batch '
            "failing in a retry loop (store unreachable, disk full) and `portal-sync lag`.",
        ),
        Rule(
            "PortalSyncDeadLettersRising",
            f"{dead} > 0 or {dead_early} > 0",
            dead,
            "0s",
            "warning",
            f"{{{{ $value }}}} events dead-lettered with reason {{{{ $labels.reason }}}} in {w}",
            "Read the dead-letter topic's headers (ps.reason.code, ps.origin.*) to find the "
            "source; fix the source's mapping or data and let it re-send (never edit the "
            "topic).",
        ),
        Rule(
            "PortalSyncEventsRefusedAsForged",
            f"{refused} > 0 or {refused_early} > 0",
            refused,
            "0s",
            "critical",
            f"{{{{ $value }}}} events refused as {{{{ $labels.reason }}}} in {w}: a "
            "principal wrote what it may not",
            'A security event (docs/security.md, "A compromised province"): '
            "`dlq list --reason REASON` and `dlq show ID` name the origin (topic, "
            "partition, offset, time); the broker's authorizer log (DEBUG: every "
            "request allowed) names the principal that wrote to that topic then. Such a "
            "message also takes its key's place in the compacted "
            "change topic: the store is untouched, but run `rebuild --compare` before "
            "trusting a rebuild from the topics.",
        ),
        Rule(
            "PortalSyncSourceErrors",
            f"{errors} > 0 or {errors_early} > 0",
            errors,
            "0s",
            "warning",
            f"{{{{ $labels.source }}}}: {{{{ $value }}}} {{{{ $labels.kind }}}} errors in {w}",
            "read_error: the source database is unreachable; publish_error: Kafka is; "
            "invalid_record: rows break the contract (see the dead letters); "
            "unreadable_file: a dropped file is in error/ (its dead letter names it).",
        ),
        Rule(
            "PortalSyncSourceCursorBehind",
            f"{cursor} > {t.cursor_lag_seconds:g}",
            cursor,
            t.for_long,
            "warning",
            "{{ $labels.source }}: the producer's cursor is "
            "{{ $value | humanizeDuration }} behind the source's newest change",
            "The producer cannot keep up or keeps failing: check source errors and the "
            "producer's log; raise the adapter's batch size. If the log says rows are "
            "held because their time is ahead of the host's clock, a row dated in the "
            "future (a data-entry error, a source clock ahead) holds the measure up: it is "
            "sent once its time comes; have the source correct the row's time.",
        ),
        Rule(
            "PortalSyncSourceStopped",
            f"{stopped} > 0",
            stopped,
            "0s",
            "critical",
            "{{ $labels.source }}: {{ $value }} of its adapters stopped on a fatal error; "
            "their changes are no longer read",
            "The producer's log names the adapter and the error (`stopped (fatal: …)`): a "
            "configuration the source refuses (a table or column gone, credentials, a "
            "signing key). Fix it and restart `produce`; the adapter resumes from its saved "
            "state, nothing is lost.",
        ),
        Rule(
            "PortalSyncDeadLettersKeptAtSource",
            f"{kept} > 0",
            kept,
            t.for_long,
            "warning",
            "{{ $labels.source }}: {{ $value }} dead letters kept on its producer's disk (the "
            "cluster does not let the source write them), waiting for `dlq import`",
            "The source's rejected records are in <state_dir>/<entry id>.dead-letters.jsonl "
            "(a file per deployment entry of the source) where its producer runs, not in "
            "the dead-letter topic: no one sees or re-drives them there. Rename each file "
            "aside, import it as an operator (`portal-sync dlq import FILE`), then remove it "
            "(docs/operations.md, Dead letters).",
        ),
        Rule(
            "PortalSyncRetentionFailing",
            # One step failing twice (a store down fails both steps of one run at once).
            # increase() extrapolates: one failure reads a little over 1, but up to 1.7 in
            # a series' first half minute (a worker just started): held for 10 minutes.
            f"{retention} >= 1.5 or {retention_early} >= 2",
            retention,
            t.for_long,
            "warning",
            "{{ $labels.instance }}: a step of the retention job failed more than once in "
            f"{t.retention_window}; what the store must forget (deleted records' values, "
            "old history, the access log) may be kept past its retention",
            "The worker's log names the step and the error's type (`retention run failed`, "
            "`the store's catch-up did not start`, `filling the freshness and deletion notes "
            "again failed`): a store that refuses or times out (statement_timeout, "
            "lock_timeout, the access log's trigger), or a `store_meta` row "
            "`catch_up_after` that is not a time. The batches go on meanwhile; each failed "
            "run is tried again an hour later.",
        ),
        Rule(
            "PortalSyncOutboxRowsBeyondLookback",
            f"{beyond} > 0",
            beyond,
            t.for_short,
            "critical",
            "{{ $labels.source }}: {{ $value }} outbox rows committed below the reach of "
            "lookback_ids are not being published",
            "Their transactions committed more than lookback_ids ids behind the newest row "
            "read, or the table gave ids again from 1 (emptied, and ids that repeat: SQLite "
            "without AUTOINCREMENT, MySQL 5.7 after a restart). They wait in the outbox "
            "table. If their ids are old, raise the source's lookback_ids above the gap (the "
            "next poll publishes them) and look for long transactions at the source; if they "
            "are new rows under reused ids, do not: published with their ids as versions, "
            "they would be stale below their records' earlier events. Give the table ids "
            "that never repeat and a version_column, then reset the source's state "
            "(docs/adapters.md, outbox).",
        ),
        Rule(
            "PortalSyncLagExporterBlind",
            f"{blind} > {t.exporter_blind_seconds:g}",
            blind,
            t.for_short,
            "critical",
            "{{ $labels.instance }}: the lag exporter has not read the consumer lag for "
            "{{ $value | humanizeDuration }}; the lag series and their alerts are gone",
            "Its polls fail (its log says why): the brokers unreachable, its Kafka user "
            "refused (ACLs, credentials), no leader answering. While it is blind, neither "
            "PortalSyncConsumerStalled nor PortalSyncConsumerLagGrowing can fire: watch "
            "`portal-sync lag` by hand until it reads again.",
        ),
        Rule(
            "PortalSyncProcessDown",
            f"{up} == 0",
            up,
            t.for_short,
            "critical",
            "{{ $labels.job }} on {{ $labels.instance }} is down (scrape failed)",
            "Check the process and its /healthz; restart it. A worker that is down shows as "
            "STOP in `portal-sync lag` once changes arrive.",
        ),
        Rule(
            "PortalSyncWorkerMissing",
            missing("portal-sync-worker"),
            targets("portal-sync-worker"),
            t.for_missing,
            "critical",
            "no portal-sync-worker target is scraped: the worker's alerts cannot fire",
            "Prometheus finds no worker target at all, so PortalSyncProcessDown has no `up` "
            "to compare. Check that the worker runs (a pod Pending, a Deployment scaled to "
            "0), that its Service and ServiceMonitor (or the scrape configuration) still "
            "select it, and Prometheus's target page.",
        ),
        Rule(
            "PortalSyncLagExporterMissing",
            missing("portal-sync-lag-exporter"),
            targets("portal-sync-lag-exporter"),
            t.for_missing,
            "critical",
            "no portal-sync-lag-exporter target is scraped: the consumer lag and its alerts "
            "are gone",
            "Prometheus finds no lag exporter target at all, so neither "
            "PortalSyncLagExporterBlind nor PortalSyncConsumerStalled nor "
            "PortalSyncConsumerLagGrowing can fire. Check that `portal-sync lag-exporter` "
            "runs and that its Service and ServiceMonitor (or the scrape configuration) "
            "still select it; watch `portal-sync lag` by hand meanwhile. A deployment "
            "without the lag exporter drops this rule (the chart does).",
        ),
        Rule(
            "PortalSyncProducerMissing",
            missing("portal-sync-producer"),
            targets("portal-sync-producer"),
            t.for_missing,
            "critical",
            "no portal-sync-producer target is scraped: the producers' alerts cannot fire",
            "Prometheus finds no producer target at all, so neither PortalSyncProcessDown "
            "nor PortalSyncSourceStopped nor PortalSyncOutboxRowsBeyondLookback can fire "
            "for a producer; PortalSyncSourceStale pages only after its threshold. Check "
            "that the producers run and that their Service and ServiceMonitor (or the "
            "scrape configuration) still select them. A deployment whose producers are "
            "scraped by another Prometheus (a province's own) drops this rule (the chart "
            "does when it deploys no producer).",
        ),
    ]


def rule_file(t: Thresholds = DEFAULT, runbook_base: str = "") -> dict[str, Any]:
    shipped = [r.as_dict(runbook_base) for r in rules(t)]
    return {"groups": [{"name": "portal-sync", "rules": shipped}]}
