"""`portal-sync produce --config FILE`: run every source of a deployment.

Each source (a deployment file's entry) runs in a thread of its own with a Kafka producer
of its own (a Publisher's flush covers only what its own thread sent, which checkpointing
relies on): a province's first snapshot of ten million rows, one run of an hour, does not
hold up its dossiers' entry, as one thread per contract source id did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from producers.deployment import Deployment, SourceEntry
from producers.engine import AdapterRunner, RunStats, kept_letters_path
from producers.metrics import KEPT_DEAD_LETTERS
from producers.sdk import ConfigurationError, FatalError
from producers.signing import load_signer
from schemas.errors import ConfigurationError as SettingError
from schemas.identifiers import ReferenceKey
from schemas.signing import Signer
from transport.config import KafkaConnection
from transport.publisher import Publisher
from transport.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class ProduceResult:
    stats: dict[str, RunStats] = field(default_factory=dict)
    # runs that stopped or gave up, by source id (a count: a source failing every interval
    # for months grew a list by one entry a run)
    failed: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)  # one per source

    def healthy(self) -> bool:
        """For /healthz: every source's polling thread is alive."""
        return all(thread.is_alive() for thread in self.threads)

    def ready(self) -> bool:
        """For /readyz: the polling threads have started."""
        return bool(self.threads) and self.healthy()

    def record(self, source_id: str, stats: RunStats) -> None:
        with self.lock:
            self.stats.setdefault(source_id, RunStats()).add(stats)

    def fail(self, source_id: str) -> None:
        with self.lock:
            self.failed[source_id] += 1


class SourceGroup:
    """Runners polled in one thread, each on its own schedule (`build_groups` makes one
    a source)."""

    def __init__(self, name: str, runners: list[tuple[SourceEntry, AdapterRunner]]) -> None:
        self.name = name
        self.runners = runners

    def run_once(self, result: ProduceResult, stop: threading.Event | None = None) -> None:
        for entry, runner in self.runners:
            if stop is not None and stop.is_set():
                return
            self._run(entry, runner, result, stop)

    def run(self, stop: threading.Event, result: ProduceResult) -> None:
        due = {entry.id: 0.0 for entry, _ in self.runners}
        while not stop.is_set() and due:
            for entry, runner in self.runners:
                if entry.id in due and time.monotonic() >= due[entry.id]:
                    if self._run(entry, runner, result, stop):
                        due[entry.id] = time.monotonic() + entry.interval_seconds
                    else:
                        del due[entry.id]
            if due:
                stop.wait(max(0.05, min(due.values()) - time.monotonic()))
        # A source stopped for good (fatal) keeps its thread until the stop: /healthz counts
        # the threads, and a restart would only stop it again and interrupt the others.
        stop.wait()

    @staticmethod
    def _run(
        entry: SourceEntry,
        runner: AdapterRunner,
        result: ProduceResult,
        stop: threading.Event | None,
    ) -> bool:
        """One scheduled run; False when the source stopped for good (fatal). What it
        published is counted whether or not it ended well."""
        stats = RunStats()
        try:
            runner.run_with_retries(stop, stats)
        except FatalError as error:
            runner.stop_fatally(error)
            result.fail(entry.id)
            return False
        except Exception:
            log.error("%s: giving up this run until the next one", entry.id)
            result.fail(entry.id)
        finally:
            result.record(entry.id, stats)
        return True


def build_groups(
    deployment: Deployment,
    connection: KafkaConnection,
    topics: Topics,
    only: str | None = None,
    reference_key: ReferenceKey | None = None,
) -> tuple[list[SourceGroup], list[Publisher]]:
    """Construct every adapter first: a configuration error refuses the whole start."""
    entries = deployment.enabled(only)
    for entry in deployment.sources:  # disabled or not run here: their letters still wait
        KEPT_DEAD_LETTERS.watch(
            entry.contract_source, kept_letters_path(deployment.state_dir, entry.id)
        )
    adapters = {entry.id: deployment.adapter(entry, reference_key) for entry in entries}
    signers = {entry.id: _signer(deployment, entry) for entry in entries}
    groups, publishers = [], []
    for entry in entries:
        publisher = Publisher(
            connection, topics, client_id=f"portal-sync-{entry.id}", keep_refused_letters=True
        )
        publishers.append(publisher)
        runner = AdapterRunner(
            entry.id,
            adapters[entry.id],
            publisher,
            deployment.state_dir,
            signer=signers[entry.id],
            checkpoint_interval=deployment.producer.checkpoint_interval_seconds,
        )
        groups.append(SourceGroup(entry.id, [(entry, runner)]))
    return groups, publishers


def _signer(deployment: Deployment, entry: SourceEntry) -> Signer | None:
    """The signing key of a source (a key of another source refuses the start)."""
    path = deployment.signing_key_file(entry)
    if path is None:
        log.warning("%s: no signing_key_file: its events go unsigned", entry.id)
        return None
    try:
        return load_signer(path, entry.contract_source)
    except SettingError as error:
        raise ConfigurationError(f"source {entry.id}: {error}") from None


def produce(
    deployment: Deployment,
    connection: KafkaConnection,
    topics: Topics,
    once: bool = False,
    stop: threading.Event | None = None,
    only: str | None = None,
    result: ProduceResult | None = None,
    reference_key: ReferenceKey | None = None,
) -> ProduceResult:
    """Run the deployment's sources once, or until `stop` is set."""
    groups, publishers = build_groups(deployment, connection, topics, only, reference_key)
    result = result or ProduceResult()
    try:
        if once:  # side by side too: a snapshot's pass does not hold up the others'
            passes = [
                threading.Thread(target=g.run_once, args=(result, stop), name=g.name, daemon=True)
                for g in groups
            ]
            for thread in passes:
                thread.start()
            try:
                for thread in passes:
                    thread.join()
            except KeyboardInterrupt:  # a second Ctrl-C: what was not saved is sent again
                if stop is not None:
                    stop.set()
                raise
        else:
            stop = stop or threading.Event()
            result.threads = [
                threading.Thread(target=g.run, args=(stop, result), name=g.name, daemon=True)
                for g in groups
            ]
            for thread in result.threads:
                thread.start()
            for thread in result.threads:
                thread.join()
    finally:
        for group in groups:
            for _, runner in group.runners:
                runner.adapter.close()
        _close_all(publishers)
    return result


# A producer's close waits for what it has not sent yet: nothing a saved state counts on
# (a state is saved once the broker acknowledged what came before it), so a short wait.
CLOSE_TIMEOUT_SECONDS = 10.0


def _close_all(publishers: list[Publisher]) -> None:
    """Close the sources' producers side by side: one after another, each waiting for a
    broker that is away, outlasted the pod's 30 s of grace with a few sources."""
    closing = [
        threading.Thread(target=p.close, args=(CLOSE_TIMEOUT_SECONDS,), daemon=True)
        for p in publishers
    ]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()
