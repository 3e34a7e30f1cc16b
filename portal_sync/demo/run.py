"""`portal-sync demo`: the whole pipeline on sample provinces and a ministry, self-checked.

Steps: local Kafka up; reset the demo's topics and store; make a signing key per sample
source (in the work dir, 0600) and the demo's copy of the registry with their public keys
(signatures required); create the sample source databases; start a reconciler worker (a
real `portal-sync worker` process); run the sources, signing, through the same producer
code path as `portal-sync produce`; make updates, deletes and late changes at the sources;
inject malformed, forged and out-of-scope events; wait until everything is applied; print
a summary; check that the store equals the merge rules applied to what the sources hold,
and that each injected event was refused with its reason.

By default the demo's own local broker is secured (`kafka up --secure`, a data dir of its
own): SASL_SSL with SCRAM-SHA-512 and ACLs, each sample source producing as its own
principal (its deployment file's [kafka] table), the worker as the reconciler, the forgers
with a source's credentials but not its key, and the demo's own reads as the admin.
`--plain` runs it on the plaintext local broker, as `portal-sync kafka up` starts it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from consumers.config import load_registry
from observability.http import serve
from portal_sync.demo.check import print_summary, scrape_metrics, self_check
from portal_sync.demo.feed import PORTAL_FEED_SOURCE, PortalFeed, portal_feed_toml
from portal_sync.demo.model import (
    DEFAULT_AUTHORITY,
    DEFAULT_REGISTRY,
    DEMO_MARK,
    DEMO_PREFIX,
    DemoError,
    DemoFailed,
    DemoRun,
    console,
)
from portal_sync.demo.population import World
from portal_sync.demo.scenario import inject_refused, make_changes
from portal_sync.demo.signing import make_keys
from portal_sync.demo.systems import SOURCES, SampleSource, deployment_toml, toml_value
from portal_sync.settings import Settings, default_store_url, deployment_settings, user_data_dir
from producers.deployment import load_deployment
from producers.produce import ProduceResult, SourceGroup, build_groups
from schemas.errors import Refused
from store import Store
from transport import admin
from transport.local import LocalKafka, free_port
from transport.local_secure import ADMIN, RECONCILER, SecureSetup
from transport.reader import RangeReader, Selection


def run_demo(
    settings: Settings, people: int = 3000, allow_reset: bool = False, secure: bool = True
) -> bool:
    started = time.monotonic()
    run = DemoRun(_demo_settings(settings, allow_reset), demo_workdir())
    console.print(
        f"[bold]portal-sync demo[/bold]: resets its own topics ({DEMO_PREFIX}.*) and store"
    )
    secure = secure and run.settings.kafka_bootstrap is None  # a configured cluster: as it is
    _step("Kafka" + (" (secured)" if secure else ""), lambda: _broker_up(run, secure))
    _step("reset demo topics and store", lambda: _reset(run))
    _step("signing keys of the sample sources", lambda: make_keys(run))
    worker, metrics_port = _start_worker(run)
    try:
        _step("reconciler joined its group", lambda: _wait_worker_ready(run, worker))
        _step("sample sources", lambda: _create_sources(run, people))
        stop = threading.Event()
        threads = _start_producers(run, stop)
        _step("changes at the sources", lambda: make_changes(run))
        _step("malformed, forged and out-of-scope events", lambda: inject_refused(run))
        stop.set()
        for thread in threads:
            thread.join()
        _step("final poll of every source", lambda: _drain_producers(run))
        _step("reconciler catching up", lambda: _wait_caught_up(run, worker))
        if run.secured:
            _step("ACLs: a source's principal may not read the changes", lambda: _acl_check(run))
        metrics = scrape_metrics(metrics_port)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    ok = self_check(run)
    print_summary(run, metrics, time.monotonic() - started, ok)
    return ok


def _step(title: str, action: Callable[[], object]) -> None:
    began = time.monotonic()
    with console.status(f"{title}…"):
        action()
    console.print(f"[green]✓[/green] {title} ({time.monotonic() - began:.1f}s)")


def demo_store_url() -> str:
    """The demo's own store, beside (never in place of) the default one, and outside the
    run's work dir (which every run empties)."""
    return f"sqlite:///{user_data_dir() / 'demo-store.db'}"


def demo_workdir() -> Path:
    return user_data_dir() / "demo"


def demo_kafka_dir() -> Path:
    """The demo's own secured broker: beside the work dir (which every run empties), never
    the data dir of `portal-sync kafka up`."""
    return user_data_dir() / "demo-kafka"


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


def _broker_up(run: DemoRun, secure: bool) -> None:
    """Start the local broker unless a cluster is configured; then talk to it (on the
    secured one as the admin)."""
    settings = run.settings
    if settings.kafka_bootstrap is not None:
        return
    if not secure:
        broker = LocalKafka(settings.kafka_data_dir)
        broker.up()
        run.settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap()})
        return
    # A principal per source of the registry (the demo's copy adds keys, not sources), the
    # ACLs for the demo's topics and group; its topics are created as the admin.
    assert settings.registry is not None
    sources = tuple(load_registry(settings.registry).sources)
    setup = SecureSetup(sources=sources, topics=settings.topics(), group_id=settings.group_id)
    broker = LocalKafka(demo_kafka_dir())
    broker.up(None if broker.status().pid else free_port(), secure=setup)
    run.broker = broker
    run.settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap()})
    run.settings = run.settings_as(ADMIN)


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
        raise DemoFailed(f"the worker did not start; see {run.workdir / 'worker.log'}")


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
    env = os.environ | run.settings_as(RECONCILER).as_env()
    env.pop("PORTAL_SYNC_METRICS_WEB_CONFIG_FILE", None)  # the demo scrapes its own worker
    log = (run.workdir / "worker.log").open("wb")
    command = [sys.executable, "-m", "portal_sync", "worker", "--metrics-port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    console.print(
        f"[green]✓[/green] reconciler worker started (pid {process.pid}, "
        f"metrics http://127.0.0.1:{port}/metrics)"
    )
    return process, port


def _start_producers(run: DemoRun, stop: threading.Event) -> list[threading.Thread]:
    """Each sample source system as its own deployment file of adapters (on the secured
    broker with its own principal in its [kafka] table), run as `produce` does."""
    assert run.feed is not None
    keys = run.signing_keys
    texts = {s.spec.source: deployment_toml([s], Path("state"), 0.5, keys) for s in run.sources}
    texts[PORTAL_FEED_SOURCE] = deployment_toml([], Path("state"), 0.5) + portal_feed_toml(
        run.feed, 0.5, keys.get(PORTAL_FEED_SOURCE)
    )
    for source, text in texts.items():
        config = run.workdir / f"{source}.toml"
        config.write_text(text + _kafka_toml(run, source), encoding="utf-8")
        deployment = load_deployment(config)
        groups, publishers = build_groups(
            deployment, deployment_settings(deployment, run.settings).connection(),
            run.settings.topics(), reference_key=run.settings.reference_key(),
        )  # fmt: skip
        run.groups += groups
        run.publishers += publishers
    threads: list[threading.Thread] = []
    for group in run.groups:
        thread = threading.Thread(target=_poll_loop, args=(run, group, stop), daemon=True)
        thread.start()
        threads.append(thread)
    port = free_port()
    serve(port, healthy=lambda: all(thread.is_alive() for thread in threads) or stop.is_set())
    who = ", each as its source's Kafka principal" if run.secured else ""
    console.print(
        f"[green]✓[/green] producers started from {run.workdir}/<source>.toml{who} "
        f"(metrics http://127.0.0.1:{port}/metrics)"
    )
    return threads


def _kafka_toml(run: DemoRun, source: str) -> str:
    """A deployment file's [kafka] table with the source's own principal (secured)."""
    if not run.secured:
        return ""
    values = run.connection(source).model_dump(exclude_none=True)
    return "\n[kafka]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def _acl_check(run: DemoRun) -> None:
    """A source's principal reading a change topic: the broker must refuse it."""
    topic = run.settings.topics().change_topic("citizen")
    try:
        with RangeReader(run.connection("province-01")) as reader:
            next(iter(reader.read(reader.resolve(Selection([topic])), batch=1)), None)
    except Refused as refused:
        run.acl_refusal = str(refused)
        return
    raise DemoFailed(f"the broker let User:province-01 read {topic}: its ACLs are missing")


def _poll_loop(run: DemoRun, group: SourceGroup, stop: threading.Event) -> None:
    result = ProduceResult()
    group.run(stop, result)
    for stats in result.stats.values():
        run.count(stats)


def _drain_producers(run: DemoRun) -> None:
    """Poll every source once more; one producer first loses its checkpoint, as after a
    crash before saving it, and re-sends what it had sent: the version rule drops it."""
    amnesiac = next(r for r in run.runners() if r.source_id == "province-48.citizen")
    amnesiac.state_path.unlink()
    for runner in run.runners():
        run.count(runner.run_once())
    for publisher in run.publishers:
        publisher.close()


def _wait_caught_up(run: DemoRun, worker: subprocess.Popen[bytes], timeout: float = 300) -> None:
    ends = admin.end_offsets(run.settings.connection(), run.settings.topics().change_topics())
    store = Store(run.settings.store_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise DemoFailed(f"the worker exited ({worker.returncode}); see {run.workdir}")
            applied = store.all_offsets()
            if all(applied.get(tp, 0) >= end for tp, end in ends.items()):
                return
            time.sleep(0.5)
    finally:
        store.close()
    raise DemoFailed(f"the worker did not catch up within {timeout:.0f}s")
