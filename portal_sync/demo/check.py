"""The demo's self-check (the store equals the merge rules applied to what the sources
hold, and every event injected on purpose was refused with its reason) and its summary."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from consumers.config import load_rules
from consumers.merge import merge_events
from consumers.scope import scope_violation
from observability.terminal import plain
from portal_sync.demo.feed import PORTAL_FEED_SOURCE
from portal_sync.demo.model import DEMO_PREFIX, DemoRun, Injected, console
from portal_sync.ops.dlq import read_dead_letters
from portal_sync.settings import Settings
from producers.adapters.directory import DirectoryAdapter
from producers.sdk import Record
from schemas import InvalidEvent, parse_event
from store import Store, queries, redacted_url


def scrape_metrics(port: int) -> dict[str, float]:
    """The worker's counters, summed by metric name and outcome."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "portal_sync_events_total":
                name = f"events.{sample.labels['outcome']}"
            elif sample.name == "portal_sync_dead_letters_total":
                name = "dead_letters"
                reason = f"reason.{sample.labels['reason']}"
                totals[reason] = totals.get(reason, 0.0) + sample.value
            else:
                continue
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def expected_records(run: DemoRun) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, int]]]:
    """The merge rules applied to every source's current rows, independently of Kafka."""
    registry, authority = load_rules(run.settings.registry, run.settings.authority_file)
    events = []
    for runner in run.runners():
        adapter = runner.adapter
        if isinstance(adapter, DirectoryAdapter):  # processed files have moved to done/
            adapter.directory = adapter.done_dir
        for item in adapter.read({}):
            if not isinstance(item, Record):
                continue
            raw = json.dumps(item.event(adapter.source, adapter.entity), ensure_ascii=False)
            try:
                event = parse_event(raw.encode()).event
            except InvalidEvent:
                continue
            if registry.accepts(event.source) and scope_violation(event, registry) is None:
                events.append(event)
    return {
        key: (record.data, record.sources)
        for key, record in merge_events(events, authority).items()
    }


def refusals(run: DemoRun) -> list[tuple[Injected, str]]:
    """Each injected event with the reason of its dead letter ("missing": none)."""
    letters = read_dead_letters(run.settings)
    found = {(letter.key, letter.value): letter.reason_code for letter in letters}
    return [(item, found.get((item.key, item.value), "missing")) for item in run.refusals]


def check_refusals(run: DemoRun) -> bool:
    """Every injected event was refused with its reason: the forged and out-of-scope
    events the worker turned away, shown one by one."""
    results = refusals(run)
    table = Table(title="events injected on purpose, and what the worker did")
    for column in ("event", "sent as", "expected", "dead letter", ""):
        table.add_column(column)
    for item, got in results:
        mark = "[green]✓[/green]" if got == item.expected else "[red]✗[/red]"
        sender = f"User:{item.sender}" if run.secured else "-"
        table.add_row(plain(item.what), sender, item.expected, plain(got), mark)
    console.print(table)
    ok = all(got == item.expected for item, got in results)
    verdict = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
    forged = sum(1 for item, _ in results if item.expected in ("unsigned", "bad_signature"))
    scope = sum(1 for item, _ in results if item.expected == "out_of_scope")
    right = sum(1 for item, got in results if got == item.expected)
    console.print(
        f"refusal check {verdict}: {right} of {len(results)} injected events refused with the "
        f"expected reason ({forged} forged or signed by a key not theirs, {scope} out of "
        f"scope, {len(results) - forged - scope} malformed)"
    )
    return ok


def self_check(run: DemoRun) -> bool:
    refused = check_refusals(run)
    expected = expected_records(run)
    store = Store(run.settings.store_url)
    try:
        actual = {(e, k): (d, s) for e, k, d, s, _ in store.iter_records()}
    finally:
        store.close()
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    differ = [k for k in expected.keys() & actual.keys() if expected[k] != actual[k]]
    ok = not (missing or extra or differ) and refused
    verdict = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
    console.print(
        f"self-check {verdict}: {len(actual)} records in the store, {len(expected)} "
        f"expected; missing {len(missing)}, extra {len(extra)}, differing {len(differ)}"
    )
    return ok


def _lag_percentiles(settings: Settings) -> tuple[float, float, int]:
    """p50 and p99 of applied_at - occurred_at over every current source view."""
    store = Store(settings.store_url)
    try:
        lags = store.sync_lags()
    finally:
        store.close()
    if not lags:
        return 0.0, 0.0, 0
    return lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.99))], len(lags)


def _kafka_summary(run: DemoRun) -> str:
    connection = run.settings.connection()
    if not run.secured:
        return f"{connection.redacted()}, no ACLs"
    return (
        f"{connection.bootstrap} SASL_SSL ({connection.sasl_mechanism}) with ACLs "
        "(StandardAuthorizer): each source as its own principal, the worker as reconciler, "
        "the demo's reads as admin"
    )


def print_summary(run: DemoRun, metrics: dict[str, float], seconds: float, ok: bool) -> None:
    store = Store(run.settings.store_url)
    counts = store.count_records()
    quality = {
        "dossiers": queries.distinct_dossiers(store),
        "conflicts": queries.open_conflicts(store),
        "anomalies": queries.anomaly_count(store),
        "waiting": queries.waiting_documents(store),
    }
    store.close()
    p50, p99, samples = _lag_percentiles(run.settings)
    table = Table(title="portal-sync demo", show_header=False)
    rows = [
        ("sources", ", ".join([*(s.spec.source for s in run.sources), PORTAL_FEED_SOURCE])),
        ("events produced (acknowledged)", f"{run.published}"),
        ("rows rejected at the source → dead letters", f"{run.producer_dead_letters}"),
        ("events injected (malformed, forged, out of scope)", f"{run.injected}"),
        ("applied", f"{metrics.get('events.applied', 0):.0f}"),
        ("duplicate", f"{metrics.get('events.duplicate', 0):.0f}"),
        ("stale", f"{metrics.get('events.stale', 0):.0f}"),
        ("dead-lettered by the reconciler", f"{metrics.get('dead_letters', 0):.0f}"),
        *[
            (f"  of which {code}", f"{metrics.get(f'reason.{code}', 0):.0f}")
            for code in ("unsigned", "bad_signature", "out_of_scope")
        ],
        *[(f"records: {entity}", f"{count}") for entity, count in sorted(counts.items())],
        ("dossiers counted once (inter-agency with original)", f"{quality['dossiers']}"),
        ("open field conflicts (record fields)", f"{quality['conflicts']}"),
        ("dossier lifecycle anomalies", f"{quality['anomalies']}"),
        ("documents waiting for their owner", f"{quality['waiting']}"),
        (f"sync lag p50 / p99 ({samples} views)", f"{p50:.2f} s / {p99:.2f} s"),
        ("wall time", f"{seconds:.1f} s"),
        ("self-check", "PASS" if ok else "FAIL"),
        ("store", redacted_url(run.settings.store_url)),
        ("topics and group", f"{DEMO_PREFIX}.*, {DEMO_PREFIX}"),
        ("Kafka", _kafka_summary(run)),
    ]
    if run.acl_refusal is not None:
        rows.append(("a source reading the change topics", "refused by the ACLs"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if run.broker is not None and run.secured:
        admin_env = run.broker.secure_files.env_file("admin")
        console.print(f"as the admin: set -a; . {admin_env}; set +a", markup=False, highlight=False)
    console.print(
        f"inspect it: PORTAL_SYNC_STORE_URL={redacted_url(run.settings.store_url)} "
        f"PORTAL_SYNC_TOPIC_PREFIX={DEMO_PREFIX} PORTAL_SYNC_GROUP_ID={DEMO_PREFIX} "
        "portal-sync lag | show | history | conflicts",
        markup=False,
        highlight=False,
    )
