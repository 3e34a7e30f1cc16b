"""`portal-sync demo`: the whole pipeline on sample provinces and a ministry, self-checked.

Steps: local Kafka up; reset the demo's topics and store; create the sample source
databases; start a reconciler worker (a real `portal-sync worker` process); run one SQL
polling producer per source table; make updates, deletes and late changes at the sources;
inject malformed events; wait until everything is applied; print a summary; check that the
store equals the merge rules applied to what the sources hold.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from consumers.config import load_rules
from consumers.merge import merge_events
from observability.http import serve
from portal_sync.demo_sources import (
    PORTAL_FEED_SOURCE,
    SOURCES,
    PortalFeed,
    SampleSource,
    World,
    deployment_toml,
    portal_feed_toml,
)
from portal_sync.settings import Settings, default_store_url, user_data_dir
from producers.adapters.filedrop import DirectoryAdapter
from producers.deployment import load_deployment
from producers.engine import AdapterRunner, RunStats
from producers.produce import ProduceResult, SourceGroup, build_groups
from producers.sdk import Record
from schemas import InvalidEvent, parse_event
from schemas.errors import Refused
from store import Store, queries, redacted_url
from transport import admin
from transport.local import REPO_ROOT, LocalKafka, free_port
from transport.publisher import Publisher

console = Console()
DEFAULT_AUTHORITY = REPO_ROOT / "deploy" / "authority.toml"
DEFAULT_REGISTRY = REPO_ROOT / "deploy" / "registry.toml"
DEMO_PREFIX = "portal-sync-demo"
DEMO_MARK = "demo"  # store_meta: this store was made by the demo


class DemoError(Refused):
    """The demo refuses to run here, or its pipeline did not finish."""


@dataclass
class DemoRun:
    settings: Settings
    workdir: Path
    sources: list[SampleSource] = field(default_factory=list)
    feed: PortalFeed | None = None
    groups: list[SourceGroup] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)
    published: int = 0
    producer_dead_letters: int = 0
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, stats: RunStats) -> None:
        with self.lock:
            self.published += stats.published
            self.producer_dead_letters += stats.dead_lettered


def run_demo(settings: Settings, people: int = 3000, allow_reset: bool = False) -> bool:
    started = time.monotonic()
    run = DemoRun(_demo_settings(settings, allow_reset), user_data_dir() / "demo")
    console.print(
        f"[bold]portal-sync demo[/bold]: resets its own topics ({DEMO_PREFIX}.*) and store"
    )
    _step("Kafka", lambda: _broker_up(run))
    _step("reset demo topics and store", lambda: _reset(run))
    worker, metrics_port = _start_worker(run)
    try:
        _step("reconciler joined its group", lambda: _wait_worker_ready(run, worker))
        _step("sample sources", lambda: _create_sources(run, people))
        stop = threading.Event()
        threads = _start_producers(run, stop)
        _step("changes at the sources", lambda: _make_changes(run))
        _step("malformed events", lambda: _inject_malformed(run))
        stop.set()
        for thread in threads:
            thread.join()
        _step("final poll of every source", lambda: _drain_producers(run))
        _step("reconciler catching up", lambda: _wait_caught_up(run, worker))
        metrics = _scrape(metrics_port)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    ok = _self_check(run)
    _summary(run, metrics, time.monotonic() - started, ok)
    return ok


def _step(title: str, action: Callable[[], object]) -> None:
    began = time.monotonic()
    with console.status(f"{title}…"):
        action()
    console.print(f"[green]✓[/green] {title} ({time.monotonic() - began:.1f}s)")


def demo_store_url() -> str:
    """The demo's own store, beside (never in place of) the default one."""
    return f"sqlite:///{user_data_dir() / 'demo' / 'store.db'}"


def _demo_settings(settings: Settings, allow_reset: bool) -> Settings:
    """The demo works only on its own topics (`portal-sync-demo.*`), its own consumer group
    and its own store; on an external cluster it deletes its topics only with --reset."""
    if settings.kafka_bootstrap is not None and not allow_reset:
        raise DemoError(
            f"the demo deletes and recreates its own topics ({DEMO_PREFIX}.*) and consumer "
            f"group ({DEMO_PREFIX}); on an external cluster pass --reset to allow it"
        )
    own_store = settings.store_url == default_store_url()
    return settings.model_copy(
        update={
            "topic_prefix": DEMO_PREFIX,
            "group_id": DEMO_PREFIX,
            "store_url": demo_store_url() if own_store else settings.store_url,
            "authority_file": settings.authority_file or DEFAULT_AUTHORITY,
            "registry": settings.registry or DEFAULT_REGISTRY,
        }
    )


def _broker_up(run: DemoRun) -> None:
    """Start the local broker unless a cluster is configured; then talk to it."""
    settings = run.settings
    if settings.kafka_bootstrap is None:
        broker = LocalKafka(settings.kafka_data_dir)
        broker.up()
        run.settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap()})


def _reset(run: DemoRun) -> None:
    settings = run.settings
    store = Store(settings.store_url)
    try:
        if store.holds_data() and store.meta(DEMO_MARK) != "true":
            raise DemoError(
                "the store given to the demo holds data the demo did not write: the demo "
                "resets only an empty store or its own (leave PORTAL_SYNC_STORE_URL unset)"
            )
        topics = settings.topics()
        with admin.cluster(settings.connection()) as cluster:
            cluster.delete_topics([*topics.change_topics(), topics.dead_letters])
            cluster.delete_group(settings.group_id)
            cluster.ensure_topics(topics)
        store.drop_schema()
        store.create_schema()
        store.set_meta(DEMO_MARK, "true")
    finally:
        store.close()
    shutil.rmtree(run.workdir, ignore_errors=True)
    run.workdir.mkdir(parents=True)
    _log_to_file(run.workdir / "demo.log")


def _log_to_file(path: Path) -> None:
    """Producer warnings go to the demo's log file; the console shows steps and summary."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _wait_worker_ready(run: DemoRun, worker: subprocess.Popen[bytes]) -> None:
    with admin.cluster(run.settings.connection()) as cluster:
        stable = cluster.wait_group_stable(run.settings.group_id)
    if not stable or worker.poll() is not None:
        raise DemoError(f"the worker did not start; see {run.workdir / 'worker.log'}")


def _create_sources(run: DemoRun, people: int) -> None:
    world = World.create(seed=6, people=people, companies=max(20, people // 10))
    run.sources = [SampleSource(spec, run.workdir / f"{spec.source}.db", world) for spec in SOURCES]
    rng = world.rng
    for index, source in enumerate(run.sources):
        ministry = source.spec.source.startswith("ministry")
        share = 0.15 if ministry else 0.4
        held = [p for p in world.people if rng.random() < share]
        source.insert("citizen", [source.citizen_row(p, disagree=index > 0) for p in held])
        if not ministry:
            companies = [c for c in world.companies if rng.random() < 0.4]
            source.insert("organization", [source.organization_row(c) for c in companies])
            source.insert("dossier", [source.dossier_row() for _ in range(people // 6)])
        source.insert("document", [source.document_row(n) for n in range(people // 10)])
        # Rows that break the contract at the source: they must reach the dead letters.
        bad = source.citizen_row(world._person())
        bad["dien_thoai"] = "không có"
        source.insert("citizen", [bad])
    # Inter-agency dossiers: Ho Chi Minh City receives some of Hanoi's dossiers.
    hanoi, hcm = run.sources[0], run.sources[1]
    originals = rng.sample(hanoi.keys("dossier"), 25)
    hcm.insert("dossier", [hcm.transferred_row(key) for key in originals])
    run.feed = PortalFeed(run.workdir / "portal-inbox", world)
    run.feed.submit(max(10, people // 30))


def _start_worker(run: DemoRun) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = os.environ | run.settings.as_env()
    log = (run.workdir / "worker.log").open("wb")
    command = [sys.executable, "-m", "portal_sync", "worker", "--metrics-port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    console.print(
        f"[green]✓[/green] reconciler worker started (pid {process.pid}, "
        f"metrics http://127.0.0.1:{port}/metrics)"
    )
    return process, port


def _start_producers(run: DemoRun, stop: threading.Event) -> list[threading.Thread]:
    """The sample sources as one deployment file of adapters, run as `produce` does."""
    config = run.workdir / "sources.toml"
    assert run.feed is not None
    text = deployment_toml(run.sources, Path("state"), 0.5) + portal_feed_toml(run.feed, 0.5)
    config.write_text(text, encoding="utf-8")
    run.groups, run.publishers = build_groups(
        load_deployment(config), run.settings.connection(), run.settings.topics()
    )
    threads: list[threading.Thread] = []
    for group in run.groups:
        thread = threading.Thread(target=_poll_loop, args=(run, group, stop), daemon=True)
        thread.start()
        threads.append(thread)
    port = free_port()
    serve(port, healthy=lambda: all(thread.is_alive() for thread in threads) or stop.is_set())
    console.print(
        f"[green]✓[/green] producers started from {config} "
        f"(metrics http://127.0.0.1:{port}/metrics)"
    )
    return threads


def _runners(run: DemoRun) -> list[AdapterRunner]:
    return [runner for group in run.groups for _, runner in group.runners]


def _poll_loop(run: DemoRun, group: SourceGroup, stop: threading.Event) -> None:
    result = ProduceResult()
    group.run(stop, result)
    for stats in result.stats.values():
        run.count(stats)


def _drain_producers(run: DemoRun) -> None:
    """Poll every source once more; one producer first loses its checkpoint, as after a
    crash before saving it, and re-sends what it had sent: the version rule drops it."""
    amnesiac = next(r for r in _runners(run) if r.source_id == "province-48.citizen")
    amnesiac.state_path.unlink()
    for runner in _runners(run):
        run.count(runner.run_once())
    for publisher in run.publishers:
        publisher.close()


def _make_changes(run: DemoRun) -> None:
    """Three rounds of updates, deletes and late changes while the pipeline runs."""
    time.sleep(3)
    for round_number in range(3):
        for source in run.sources:
            rng = source.rng
            citizens = source.keys("citizen")
            for key in rng.sample(citizens, min(40, len(citizens))):
                source.change("citizen", key, {"dien_thoai": f"03{rng.randrange(10**8):08d}"})
            for key in rng.sample(citizens, min(5, len(citizens))):
                source.change("citizen", key, {"da_xoa": True})
            for key in rng.sample(source.keys("dossier"), min(60, len(source.keys("dossier")))):
                _advance_dossier(source, key)
            for key in rng.sample(source.keys("document"), min(5, len(source.keys("document")))):
                source.change("document", key, {"trang_thai": "revoked"})
            # Records created by mistake and deleted at the source (soft delete).
            for entity in ("document", "dossier", "organization"):
                if keys := source.keys(entity):
                    source.change(entity, rng.choice(keys), {"da_xoa": True})
            # A long transaction that commits now with a timestamp 20 s in the past.
            late = [source.citizen_row(source.world._person()) for _ in range(3)]
            source.insert("citizen", late, behind=20)
        if run.feed is not None:
            run.feed.advance(max(5, len(run.feed.dossiers) * 3 // 4))
        time.sleep(1.5 + round_number)


def _advance_dossier(source: SampleSource, key: str) -> None:
    from sqlalchemy import select

    table = source.tables["dossier"]
    with source.engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.ma_ho_so == key)).one()
    following = {1: 2, 2: 4, 4: 9, 9: 10, 5: 4}.get(row.trang_thai)
    if source.rng.random() < 0.1 and row.trang_thai == 4:
        following = 5
    if source.rng.random() < 0.05 and row.trang_thai in (2, 4):
        following = 1  # sent back to "submitted": applied, flagged as an anomaly
    if following is None:
        return
    values: dict[str, Any] = {"trang_thai": following}
    if following == 10:
        values["ngay_tra"] = row.ngay_hen_tra
    source.change("dossier", key, values)


MALFORMED: list[tuple[str, bytes]] = [
    ("citizen", b"\xff\xfe not utf-8"),
    ("citizen", b"{not json"),
    ("citizen", b"[1, 2, 3]"),
    ("organization", b'{"schema_version": 2}'),
    ("citizen", b'{"schema_version": 1, "entity": "citizen"}'),
    (
        "dossier",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000000", '
        b'"source": "province-01", "entity": "dossier", "key": "HS-1", "op": "upsert", '
        b'"version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", "data": {}}',
    ),
    (
        "citizen",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000001", '
        b'"source": "province-01", "entity": "citizen", "key": "001090000001", '
        b'"op": "upsert", "version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", '
        b'"data": {"full_name": "X", "password": "hunter2"}}',
    ),
    (  # well-formed, but from a system that is not in the source registry
        "citizen",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000002", '
        b'"source": "province-99", "entity": "citizen", "key": "001090000001", '
        b'"op": "upsert", "version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", '
        b'"data": {"full_name": "Nguy\u1ec5n V\u0103n A"}}',
    ),
]


def _inject_malformed(run: DemoRun) -> None:
    topics = run.settings.topics()
    publisher = Publisher(run.settings.connection(), topics, client_id="demo-malformed")
    for entity, value in MALFORMED:
        publisher.send(topics.change_topic(entity), b"malformed", value)
    run.injected = publisher.flush()
    publisher.close()


def _wait_caught_up(run: DemoRun, worker: subprocess.Popen[bytes], timeout: float = 300) -> None:
    ends = admin.end_offsets(run.settings.connection(), run.settings.topics().change_topics())
    store = Store(run.settings.store_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise DemoError(f"the worker exited ({worker.returncode}); see {run.workdir}")
            applied = store.all_offsets()
            if all(applied.get(tp, 0) >= end for tp, end in ends.items()):
                return
            time.sleep(0.5)
    finally:
        store.close()
    raise DemoError(f"the worker did not catch up within {timeout:.0f}s")


def _scrape(port: int) -> dict[str, float]:
    """The worker's counters, summed by metric name and outcome."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "portal_sync_events_total":
                name = f"events.{sample.labels['outcome']}"
            elif sample.name == "portal_sync_dead_letters_total":
                name = "dead_letters"
            else:
                continue
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def expected_records(run: DemoRun) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, int]]]:
    """The merge rules applied to every source's current rows, independently of Kafka."""
    registry, authority = load_rules(run.settings.registry, run.settings.authority_file)
    events = []
    for runner in _runners(run):
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
            if registry.accepts(event.source):
                events.append(event)
    return {
        key: (record.data, record.sources)
        for key, record in merge_events(events, authority).items()
    }


def _self_check(run: DemoRun) -> bool:
    expected = expected_records(run)
    store = Store(run.settings.store_url)
    try:
        actual = {(e, k): (d, s) for e, k, d, s, _ in store.iter_records()}
    finally:
        store.close()
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    differ = [k for k in expected.keys() & actual.keys() if expected[k] != actual[k]]
    ok = not (missing or extra or differ)
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


def _summary(run: DemoRun, metrics: dict[str, float], seconds: float, ok: bool) -> None:
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
        ("malformed events injected", f"{run.injected}"),
        ("applied", f"{metrics.get('events.applied', 0):.0f}"),
        ("duplicate", f"{metrics.get('events.duplicate', 0):.0f}"),
        ("stale", f"{metrics.get('events.stale', 0):.0f}"),
        ("dead-lettered by the reconciler", f"{metrics.get('dead_letters', 0):.0f}"),
        ("  of which unregistered source", f"{metrics.get('events.rejected', 0):.0f}"),
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
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(
        "inspect it: PORTAL_SYNC_STORE_URL=<the store above> "
        f"PORTAL_SYNC_TOPIC_PREFIX={DEMO_PREFIX} PORTAL_SYNC_GROUP_ID={DEMO_PREFIX} "
        "portal-sync lag | show | history | conflicts",
        markup=False,
        highlight=False,
    )


__all__ = ["DemoError", "run_demo"]
