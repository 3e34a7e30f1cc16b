"""The reconciler worker: a consumer-group member (transport.group) feeding batches to
the store.

Offsets are owned by the store, not by Kafka: every batch commits its data together with
the next offset of each partition, and on every partition assignment the consumer is moved
to the store's offsets. Kafka's group offsets are a copy written after each batch, for the
usual tools, never read back.

The worker consumes with aiokafka's batch API rather than faust-streaming's agents: on this
project's 2-core machine faust's per-event stream machinery alone delivered about 13,000
events/s with no processing at all (every event an object through its stream), against
about 420,000 for `getmany` on the same topic; with the GIL the worker's whole budget at the
10,000 events/s target is 100 µs per event (docs/performance.md).

This module starts the worker (`run_worker`): the rules loaded, the topics and the store
checked or created (waiting for them), then the loop (consumers.loop) runs; one batch's
work is consumers.processor's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from consumers.config import (
    RULES_FILES,
    RULES_FINGERPRINT,
    load_rules,
    rules_files,
    rules_fingerprint,
    with_registry,
)
from consumers.loop import ReconcilerLoop, StopAsked, stop_signals
from consumers.metrics import (
    FRESHNESS,
    WorkerHealth,
    phase_summary,
    phase_totals,
    seed_series,
)
from consumers.processor import BatchProcessor, WorkerConfig
from consumers.runtime import SWITCH_INTERVAL_SECONDS, tune_garbage_collector
from observability.freshness import read_freshness
from observability.http import serve
from observability.web_config import load_web_config
from schemas.errors import (
    ConfigurationError,
    until_available,
)
from store import Store, StoreUnavailable
from store.failures import refused_setting
from transport import admin

log = logging.getLogger(__name__)
# A batch waits this long for a lock another session holds on the store (an operator's
# command or transaction, a schema upgrade) before it retries: a SIGTERM is seen between
# two waits, not after SQLite's minute or never on PostgreSQL.
STORE_LOCK_WAIT_SECONDS = 5.0


# Full batches of the group's workers that PostgreSQL's lock table should hold at once.
LOCK_TABLE_BATCHES = 4


def _check_lock_capacity(store: Store, batch_max_events: int) -> None:
    """Warn when PostgreSQL's lock table is small for the group: each batch holds one
    advisory lock per record (and one per partition, a few) until it commits, and a full
    table fails every transaction that needs one more ("out of shared memory"), the
    workers' included (retried)."""
    capacity = store.lock_capacity()
    if capacity is not None and capacity < LOCK_TABLE_BATCHES * batch_max_events:
        log.warning(
            "PostgreSQL's lock table is sized for %d locks (max_locks_per_transaction x "
            "connections) and a batch holds up to %d: fewer than %d workers' batches fit "
            'at once; raise max_locks_per_transaction (docs/operations.md, "Sizing '
            'PostgreSQL")',
            capacity,
            batch_max_events,
            LOCK_TABLE_BATCHES,
        )


def _start(config: WorkerConfig, lock_wait: float | None = None) -> bool:
    """The start's work on the broker and the store: topics made and checked, the schema
    created or upgraded, the rules' fingerprint recorded. A job's writes go without the
    batches' lock wait (`lock_wait` None): beside another worker that creates the store
    it waits under the schema lock, and beside an operator's long write as any command
    does. A long-running worker waits `lock_wait` at a time, between tries
    (`until_available`), where a stop is heard (it went unheard for a minute inside
    SQLite's wait, and for ever on PostgreSQL's schema lock)."""
    admin.ensure_topics(config.connection, config.topics)
    admin.check_partition_counts(config.connection, config.topics)
    starting = Store(config.store_url, lock_wait=lock_wait)
    try:
        try:
            starting.create_schema()
        except StoreUnavailable as error:
            if refused_setting(error):  # waiting would not mend it: exit 2, say what
                raise ConfigurationError(str(error)) from None
            raise
        _refuse_development_mode(starting, config)
        # The rules this store is reconciled with: replay, rebuild and remerge compare theirs.
        starting.set_meta(
            RULES_FINGERPRINT, rules_fingerprint(config.registry_file, config.authority_file)
        )
        starting.set_meta(RULES_FILES, rules_files(config.registry_file, config.authority_file))
    finally:
        starting.close()
    return True


def _refuse_development_mode(store: Store, config: WorkerConfig) -> None:
    """A worker without a registry (development mode: every source, unsigned events, no
    write scope) on a store whose workers ran with one is refused: a worker started with
    the setting missing (a second deployment, an operator's shell) accepted every event,
    and recorded "no registry" as the store's rules, which then let `replay` and `rebuild`
    run without one too."""
    if config.registry_file is not None:
        return
    theirs = store.meta(RULES_FILES)
    if with_registry(theirs):
        raise ConfigurationError(
            f"PORTAL_SYNC_REGISTRY is not set (development mode: no signature, source or "
            f"write-scope check), but this store's workers run with {theirs}: set it as "
            "they have it"
        )


def _ready_note(note: str, health: WorkerHealth) -> str:
    """/readyz's words beside ok / not ok: the mode, and what the worker's retries wait for
    (an error's kind, e.g. `StoreMisconfigured`: never a value)."""
    reason = health.reason
    waiting = f"retrying: {reason}" if reason and not health.ready() else ""
    return "\n".join(part for part in (note, waiting) if part)


def run_worker(config: WorkerConfig, until_caught_up: bool = False) -> int:
    """Run until stopped (SIGTERM/SIGINT), or until caught up; return the exit code."""
    # A stop asked for during start-up (topics, schema, rules) is kept and honoured once
    # the loop runs, instead of killing the process half-started.
    early_stop = StopAsked()
    for sig in stop_signals():
        signal.signal(sig, lambda signum, _frame: early_stop.ask(signum))
    web = load_web_config(config.metrics_web_config) if config.metrics_port else None
    registry, authority = load_rules(config.registry_file, config.authority_file)
    note = ""
    if registry.development_mode:
        note = (
            "development mode: no source registry, every source accepted, unsigned events "
            "too, equal rank"
        )
        log.warning(note)
    elif not registry.require_signatures:
        log.warning(
            "the registry does not require signatures: unsigned events of the sources "
            "without keys are accepted"
        )
    # A start that waits for the broker or the store counts as a batch's retries do:
    # /readyz false, `portal_sync_worker_retrying_seconds` growing, then the stall.
    health = WorkerHealth(config.stall_after_seconds)
    running: list[ReconcilerLoop] = []  # the loop, once the start is done
    if config.metrics_port:
        serve(
            config.metrics_port,
            config.metrics_host,
            lambda: running[0].healthy() if running else not health.stalled(),
            lambda: bool(running) and running[0].ready(),
            ready_note=lambda: _ready_note(note, health),
            web=web,
        )
    if until_caught_up:  # a job: its caller hears at once that the cluster or store is away
        _start(config)
    else:
        waited = until_available(
            lambda: _start(config, STORE_LOCK_WAIT_SECONDS),
            "worker start",
            early_stop,
            log,
            on_retry=lambda error: health.retrying(error.kind),
        )
        if waited is None:
            return 0  # stopped while waiting (a long-running worker: a stop is no failure)
        health.recovered()
    store = Store(config.store_url, lock_wait=STORE_LOCK_WAIT_SECONDS)
    _check_lock_capacity(store, config.batch_max_events)
    processor = BatchProcessor(config, store, registry, authority, health)
    # Sources no longer registered lose their freshness series (development mode keeps all).
    known = read_freshness(store)
    FRESHNESS.seed(
        {source: f for source, f in known.items() if registry.accepts(source)},
        () if registry.development_mode else registry.sources,
    )
    seed_series(registry.writers(), config.freshness_objective_seconds)
    running.append(ReconcilerLoop(config, store, processor, until_caught_up, early_stop))
    loop = running[0]
    tune_garbage_collector()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    started = phase_totals()
    try:
        return asyncio.run(loop.run())
    finally:
        batches, phases = phase_summary(started, phase_totals())
        if batches:  # where the run's batches spent their time (docs/performance.md)
            log.info("%d batches; time by phase: %s", batches, phases)
        processor.close()
        store.close()
