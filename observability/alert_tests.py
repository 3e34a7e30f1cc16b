"""`promtool test rules` cases for the default alert rules, written to
`deploy/prometheus/alerts.test.yml` by `python -m observability.deploy`. Runbook text and
severities come from the rules themselves; each case states when its alert must fire
(and must not) and what its summary says, at one evaluation time or several. A case may
also state only when an alert must stay quiet (what looks like a fault and is not one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from observability.alerts import Rule, rules

WORKER = 'job="portal-sync-worker",instance="w1"'
EXPORTER = 'job="portal-sync-lag-exporter",instance="e1"'
PRODUCER = 'job="portal-sync-producer",instance="p1"'
GROUP = 'group="portal-sync-reconciler"'
LAST_CHANGE = "portal_sync_source_last_change_timestamp_seconds"
PART = f'{GROUP},topic="portal-sync.changes.citizen",partition="0"'
BEYOND = "portal_sync_outbox_rows_beyond_lookback"
ERRORS = "portal_sync_source_errors_total"
CURSOR = "portal_sync_source_cursor_lag_seconds"
KEPT = f'portal_sync_source_kept_dead_letters{{{PRODUCER},source="province-79"}}'


Times = str | tuple[str, ...]


@dataclass(frozen=True)
class Case:
    alert: str
    series: dict[str, str]  # series -> promtool values
    quiet_at: Times  # must not fire yet (or no more)
    fires_at: Times  # () for a case that must stay quiet throughout
    labels: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # the rule's other annotations


def _times(times: Times) -> tuple[str, ...]:
    return (times,) if isinstance(times, str) else times


CASES = [
    Case(
        "PortalSyncWorkerStalled",
        # the store went away at 1m; the batch in hand has waited ever since
        {
            f"portal_sync_worker_retrying_seconds{{{WORKER}}}": "0 0+60x15",
            f'portal_sync_worker_waiting_for{{{WORKER},reason="StoreUnavailable"}}': "_ 1x5",
            # the store came back without its grants at 6m: both within the last 5 minutes
            f'portal_sync_worker_waiting_for{{{WORKER},reason="StoreMisconfigured"}}': (
                "_ _ _ _ _ _ 1x9"
            ),
        },
        "5m",
        "8m",
        {"job": "portal-sync-worker", "instance": "w1"},
        "w1: a batch has waited 7m 0s for the store or the broker; no change is being applied",
        {"waiting_for": "StoreMisconfigured, StoreUnavailable"},
    ),
    Case(
        "PortalSyncWorkerStalled",
        # the store unreachable for good; the worker's /healthz fails after 300s and its
        # supervisor restarts it, every time: its gauge never stays above 300s for long
        {
            f"portal_sync_worker_retrying_seconds{{{WORKER}}}": " ".join(
                ["0 60 120 180 240 300"] * 3
            )
        },
        "4m",
        "16m",
        {"job": "portal-sync-worker", "instance": "w1"},
        "w1: a batch has waited 5m 0s for the store or the broker; no change is being applied",
        {"waiting_for": ""},  # no reason exported: one attempt that blocks
    ),
    Case(
        "PortalSyncConsumerStalled",
        {f"portal_sync_consumer_status{{{GROUP},{EXPORTER}}}": "0 1 1 3x10"},
        "4m",  # WARN at 1-2m does not page; STOP since 3m, pending for 2m
        "5m",
        {"group": "portal-sync-reconciler"},
        "portal-sync-reconciler is STALL (2) or STOP (3): value 3; changes are not reaching "
        "the national store",
    ),
    Case(
        "PortalSyncConsumerStalled",
        # STALL alone (members, no progress) pages as STOP does: STALL since 2m, for 2m
        {f"portal_sync_consumer_status{{{GROUP},{EXPORTER}}}": "0 0 2x10"},
        "3m",
        ("4m", "8m"),
        {"group": "portal-sync-reconciler"},
        "portal-sync-reconciler is STALL (2) or STOP (3): value 2; changes are not reaching "
        "the national store",
    ),
    Case(
        "PortalSyncSourceStopped",
        # one adapter of the source stopped on a fatal error at 2m, until a restart
        {f'portal_sync_source_stopped{{{PRODUCER},source="province-79"}}': "0 0 1x10"},
        "1m",
        "3m",
        {"source": "province-79"},
        "province-79: 1 of its adapters stopped on a fatal error; their changes are no longer read",
    ),
    Case(
        "PortalSyncDeadLettersKeptAtSource",
        # a record rejected at 2m is kept on disk; the operator imports the file at 20m
        {KEPT: "0 0 1x17 0x5"},
        "11m",  # kept since 2m, pending for 10m
        "13m",
        {"source": "province-79"},
        "province-79: 1 dead letters kept on its producer's disk (the cluster does not let "
        "the source write them), waiting for `dlq import`",
    ),
    Case(
        "PortalSyncDeadLettersKeptAtSource",
        # the same: renamed aside for its import at 20m, the file counts 0 and it resolves
        {KEPT: "0 0 1x17 0x5"},
        "21m",
        "13m",
        {"source": "province-79"},
        "province-79: 1 dead letters kept on its producer's disk (the cluster does not let "
        "the source write them), waiting for `dlq import`",
    ),
    Case(
        "PortalSyncRetentionFailing",
        # a worker up for hours: its hourly run fails at 4h in both steps (the store was
        # down), then its purge again at 5h; the single run's failures do not page (one
        # step's, between real scrapes, reads a little over 1: the rule asks 1.5), the
        # second of one step does, held 10 minutes
        {
            f'portal_sync_retention_failures_total{{{WORKER},step="purge"}}': "0x239 1x60 2x60",
            f'portal_sync_retention_failures_total{{{WORKER},step="catch_up"}}': "0x239 1x120",
        },
        "290m",
        "315m",
        {"job": "portal-sync-worker", "instance": "w1"},
        "w1: a step of the retention job failed more than once in 3h; what the store must forget "
        "(deleted records' values, old history, the access log) may be kept past its "
        "retention",
    ),
    Case(
        "PortalSyncRetentionFailing",
        # a worker started at 0 whose first run fails before its first scrape (the series is
        # first seen at 1), and again an hour later: increase() sees one failure; the count
        # since its start, two, pages (held 10 minutes)
        {
            f"process_start_time_seconds{{{WORKER}}}": "0x120",
            f'portal_sync_retention_failures_total{{{WORKER},step="purge"}}': "1x59 2x60",
        },
        ("59m", "65m"),
        ("70m", "80m"),
        {"job": "portal-sync-worker", "instance": "w1"},
        "w1: a step of the retention job failed more than once in 3h; what the store must forget "
        "(deleted records' values, old history, the access log) may be kept past its "
        "retention",
    ),
    Case(
        "PortalSyncLagExporterBlind",
        # polls read the lag every minute until 3m, then fail (the last success stays)
        {
            "portal_sync_lag_exporter_last_success_timestamp_seconds"
            f"{{{EXPORTER}}}": "0 60 120 180 180 180 180 180 180 180"
        },
        "4m",  # 60 s since the last poll that read
        "8m",  # more than 120 s since 3m from 6m on, for 2m
        {"job": "portal-sync-lag-exporter", "instance": "e1"},
        "e1: the lag exporter has not read the consumer lag for 5m 0s; the lag series and "
        "their alerts are gone",
    ),
    Case(
        "PortalSyncProcessDown",
        {f"up{{{WORKER}}}": "1 1 0x10"},
        "3m",
        "4m",
        {"job": "portal-sync-worker", "instance": "w1"},
        "portal-sync-worker on w1 is down (scrape failed)",
    ),
    Case(
        "PortalSyncLagExporterMissing",
        # the lag exporter's target leaves service discovery at 4m; the worker's stays
        {f"up{{{WORKER}}}": "1x20", f"up{{{EXPORTER}}}": "1 1 1 1 stale"},
        "8m",  # missing for 4m
        "10m",
        {"job": "portal-sync-lag-exporter"},
        "no portal-sync-lag-exporter target is scraped: the consumer lag and its alerts are gone",
    ),
    Case(
        "PortalSyncWorkerMissing",
        {f"up{{{WORKER}}}": "1 1 stale", f"up{{{EXPORTER}}}": "1x20"},
        "6m",  # missing for 4m
        "8m",
        {"job": "portal-sync-worker"},
        "no portal-sync-worker target is scraped: the worker's alerts cannot fire",
    ),
    Case(
        "PortalSyncProducerMissing",
        # the producer's target leaves service discovery at 2m; the others stay
        {f"up{{{WORKER}}}": "1x20", f"up{{{PRODUCER}}}": "1 1 stale"},
        "6m",  # missing for 4m
        "8m",
        {"job": "portal-sync-producer"},
        "no portal-sync-producer target is scraped: the producers' alerts cannot fire",
    ),
    Case(
        "PortalSyncOutboxRowsBeyondLookback",
        # two rows committed too late for the window since 3m, measured after every poll
        {f'{BEYOND}{{source="ministry-btp",{PRODUCER}}}': "0 0 0 2x10"},
        "4m",
        "5m",
        {"source": "ministry-btp"},
        "ministry-btp: 2 outbox rows committed below the reach of lookback_ids are not being "
        "published",
    ),
    Case(
        "PortalSyncSourceStale",
        # the newest change was made at t=0 and nothing since: stale after 1800 s, for 10m
        {f'{LAST_CHANGE}{{source="province-01",{WORKER}}}': "0x60"},
        "39m",
        "45m",
        {"source": "province-01"},
        "province-01: no change reached the store for 45m 0s (threshold 1800s)",
    ),
    Case(
        "PortalSyncSourceNeverDelivered",
        # province-79 registered from the start, nothing of it applied; province-01 delivers.
        # The worker restarts at 11m and 27m (a scrape missed each time): still 30m.
        {
            f'portal_sync_source_registered{{source="province-79",{WORKER}}}': "1x10 _ 1x15 _ 1x40",
            f'portal_sync_source_registered{{source="province-01",{WORKER}}}': "1x60",
            f'{LAST_CHANGE}{{source="province-01",{WORKER}}}': "0+60x60",
        },
        "29m",
        "31m",
        {"source": "province-79"},
        "province-79: registered, but no worker has reported a change of it in the store for 1d",
    ),
    Case(
        "PortalSyncSourceNeverDelivered",
        # w2 applied province-02's only batch and went at 10m (scaled down): w1 never
        # learns of it. Not "never delivered" within the day; then it is, by its series.
        {
            f'portal_sync_source_registered{{source="province-02",{WORKER}}}': "1x1500",
            f'{LAST_CHANGE}{{source="province-02",job="portal-sync-worker",instance="w2"}}': (
                "0x10"
            ),
        },
        "60m",
        "1485m",
        {"source": "province-02"},
        "province-02: registered, but no worker has reported a change of it in the store for 1d",
    ),
    Case(
        "PortalSyncSourceErrors",
        # the source database refused the producer's reads from 6m on
        {f'{ERRORS}{{source="province-79",kind="read_error",{PRODUCER}}}': "0 0 0 0 0 0 4x10"},
        "5m",
        "7m",
        {"source": "province-79", "kind": "read_error"},
        "province-79: 4 read_error errors in 5m",
    ),
    Case(
        "PortalSyncSourceCursorBehind",
        # the producer falls 20 minutes behind the source's newest change from 6m on
        {f'{CURSOR}{{source="province-79",{PRODUCER}}}': "0x5 1200x30"},
        "15m",
        "17m",
        {"source": "province-79"},
        "province-79: the producer's cursor is 20m 0s behind the source's newest change",
    ),
    Case(
        "PortalSyncDeadLettersRising",
        # `for: 0s`: fires at the first evaluation that sees the letters (6m), not later
        {f'portal_sync_dead_letters_total{{reason="invalid_json",{WORKER}}}': "0 0 0 0 0 0 4x10"},
        "5m",
        ("6m", "7m"),
        {"reason": "invalid_json"},
        "4 events dead-lettered with reason invalid_json in 5m",
    ),
    Case(
        "PortalSyncEventsRefusedAsForged",
        # a principal writes under another source's key from 6m on; invalid JSON all along
        # is no security event
        {
            f'portal_sync_dead_letters_total{{reason="key_mismatch",{WORKER}}}': (
                "0 0 0 0 0 0 2x10"
            ),
            f'portal_sync_dead_letters_total{{reason="invalid_json",{WORKER}}}': "0+3x16",
        },
        "5m",
        ("6m", "7m"),
        {"reason": "key_mismatch"},
        "2 events refused as key_mismatch in 5m: a principal wrote what it may not",
    ),
    Case(
        "PortalSyncEventsRefusedAsForged",
        # a worker started at 30 s refuses 3 unsigned events before its first scrape (the
        # series is first seen at 3): increase() sees none; its count since its start pages
        # until 5 minutes after the start
        {
            f"process_start_time_seconds{{{WORKER}}}": "30x10",
            f'portal_sync_dead_letters_total{{reason="unsigned",{WORKER}}}': "3x10",
        },
        "6m",
        ("0m", "1m", "5m"),
        {"reason": "unsigned"},
        "3 events refused as unsigned in 5m: a principal wrote what it may not",
    ),
    Case(
        "PortalSyncEventsRefusedAsForged",
        # the same count from a worker up for a day, first seen by a Prometheus just
        # started: counted long ago, no page
        {
            f"process_start_time_seconds{{{WORKER}}}": "-86400x10",
            f'portal_sync_dead_letters_total{{reason="unsigned",{WORKER}}}': "3x10",
        },
        ("0m", "1m", "5m"),
        (),
    ),
    Case(
        "PortalSyncSyncLagAboveObjective",
        # 100 events a minute, 80 of them within 60 s: 20 % slower than the objective
        {
            f'portal_sync_sync_lag_seconds_bucket{{source="province-79",le="60.0",{WORKER}}}': (
                "0+80x30"
            ),
            f'portal_sync_sync_lag_seconds_count{{source="province-79",{WORKER}}}': "0+100x30",
        },
        "10m",
        "20m",
        {"source": "province-79"},
        "province-79: 20% of changes took longer than 60s from source commit to the national store",
    ),
    Case(
        "PortalSyncSyncLagAboveObjective",
        # 98 of 100 events a minute within 60 s: 2 % slower, inside the 5 % allowed
        {
            f'portal_sync_sync_lag_seconds_bucket{{source="province-79",le="60.0",{WORKER}}}': (
                "0+98x30"
            ),
            f'portal_sync_sync_lag_seconds_count{{source="province-79",{WORKER}}}': "0+100x30",
        },
        ("15m", "25m"),
        (),
    ),
    Case(
        "PortalSyncSyncLagAboveObjective",
        # a quiet source: a change every 8 minutes, every one late; over 5 minutes alone the
        # share was 0/0 at every quiet stretch and never fired
        {
            f'portal_sync_sync_lag_seconds_bucket{{source="ministry-btp",le="60.0",{WORKER}}}': (
                "0x120"
            ),
            f'portal_sync_sync_lag_seconds_count{{source="ministry-btp",{WORKER}}}': (
                "0 " + " ".join(str(1 + minute // 8) for minute in range(1, 121))
            ),
        },
        ("10m", "30m"),
        ("60m", "110m"),
        {"source": "ministry-btp"},
        "ministry-btp: 100% of changes took longer than 60s from source commit to the national"
        " store",
    ),
    Case(
        "PortalSyncSyncLagAboveObjective",
        # a busy source late for 10 minutes, then on time: judged over 5 minutes, it
        # resolves with them, not an hour later
        {
            f'portal_sync_sync_lag_seconds_bucket{{source="province-79",le="60.0",{WORKER}}}': (
                "0x20 100+100x39"
            ),
            f'portal_sync_sync_lag_seconds_count{{source="province-79",{WORKER}}}': "0+100x60",
        },
        ("50m", "59m"),
        (),
    ),
    Case(
        "PortalSyncConsumerLagGrowing",
        # the oldest unapplied change gets a minute older every minute
        {f"portal_sync_consumer_lag_seconds{{{PART},{EXPORTER}}}": "0+60x30"},
        "10m",
        "22m",
        {
            "group": "portal-sync-reconciler",
            "topic": "portal-sync.changes.citizen",
            "partition": "0",
        },
        "portal-sync-reconciler portal-sync.changes.citizen[0] is falling behind: the oldest "
        "unapplied change is older than 300s and getting older",
    ),
    Case(
        "PortalSyncConsumerLagGrowing",
        # far behind (50 to 20 minutes) but catching up a minute every minute: not growing
        {f"portal_sync_consumer_lag_seconds{{{PART},{EXPORTER}}}": "3000-60x30"},
        ("12m", "20m", "28m"),
        (),
    ),
]


def _expected(rule: Rule, case: Case, series_labels: dict[str, str]) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": rule.severity, **series_labels, **case.labels},
        "exp_annotations": {
            "summary": case.summary,
            "runbook": rule.runbook,
            "runbook_url": rule.as_dict()["annotations"]["runbook_url"],
            **case.notes,
        },
    }


def test_file(extra_labels: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    by_name = {rule.alert: rule for rule in rules()}
    extra = extra_labels or KEPT_LABELS
    tests = []
    for case in CASES:
        rule = by_name[case.alert]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": [
                    *(
                        {"eval_time": at, "alertname": case.alert, "exp_alerts": []}
                        for at in _times(case.quiet_at)
                    ),
                    *(
                        {
                            "eval_time": at,
                            "alertname": case.alert,
                            "exp_alerts": [_expected(rule, case, extra.get(case.alert, {}))],
                        }
                        for at in _times(case.fires_at)
                    ),
                ],
            }
        )
    return {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}


# Labels of the input series that an alert's expression keeps (no aggregation).
KEPT_LABELS: dict[str, dict[str, str]] = {
    "PortalSyncProcessDown": {},
    "PortalSyncConsumerLagGrowing": {"job": "portal-sync-lag-exporter", "instance": "e1"},
}
