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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from consumers.cache import DEFAULT_RECORDS, RecordCache
from consumers.checks import DEFAULT_MAX_CLOCK_SKEW_SECONDS, Checked, DeadLetter, classify
from consumers.config import (
    RULES_FILES,
    RULES_FINGERPRINT,
    load_rules,
    rules_files,
    rules_fingerprint,
    with_registry,
)
from consumers.merge import Authority
from consumers.metrics import (
    COMMIT_SECONDS,
    FRESHNESS,
    RETENTION_FAILURES,
    WorkerHealth,
    phase_summary,
    phase_totals,
    record_batch,
    record_check,
    record_dead_letters,
    record_warnings,
)
from consumers.reconciler import Reconciler, starts_after
from consumers.registry import Registry
from consumers.retention import Retention, catch_up_if_due, purge_within, retention_now
from consumers.runtime import SWITCH_INTERVAL_SECONDS, tune_garbage_collector
from consumers.validators import CHILD_TIMEOUT_SECONDS, Rules, Validators
from observability.freshness import read_freshness
from observability.http import Liveness, serve
from observability.web_config import load_web_config
from schemas.dead_letter import Reason, dead_letter_headers, fit_letter, kept_headers
from schemas.errors import (
    Backoff,
    ConfigurationError,
    PortalSyncError,
    RecordError,
    Refused,
    TransientError,
    until_available,
)
from schemas.identifiers import ReferenceKey
from store import OffsetGap, Store, StoreUnavailable, TopicPartition, utcnow
from store.failures import refused_setting
from transport import admin
from transport.config import KafkaConnection
from transport.group import GroupMember, check_topic_ids, check_within_logs
from transport.publisher import Publisher
from transport.reader import Message, OpenTransaction, nothing_before
from transport.topics import DEAD_LETTER_MAX_MESSAGE_BYTES, Topics

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long the loop beats while a batch is checked: a hung validator child's timeout, and
# the batch's check in the worker after it, with room to spare.
CHECK_BEATS_SECONDS = CHILD_TIMEOUT_SECONDS + 60
# A failed batch's or store read's first wait before it is tried again, and its longest.
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 30.0
# A batch waits this long for a lock another session holds on the store (an operator's
# command or transaction, a schema upgrade) before it retries: a SIGTERM is seen between
# two waits, not after SQLite's minute or never on PostgreSQL.
STORE_LOCK_WAIT_SECONDS = 5.0
# `worker --until-caught-up`: how often one partition whose offset stays put is asked whether
# anything is left before its target (a read of the topic each time).
SETTLE_EVERY_SECONDS = 10.0
# The retention job's time on deleted records per run, between two batches: a backlog (a
# large source purge) is worked off a minute apart, never holding the batches for long.
RETENTION_SECONDS = 5.0
EXIT_BATCH_FAILED = 3  # a batch failed in an unexpected way: restart from the store
EXIT_CONFIGURATION = 2  # a setting the next start would meet again (the taxonomy's code)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker runs with (the CLI builds it from the settings)."""

    connection: KafkaConnection
    topics: Topics
    group_id: str
    store_url: str
    registry_file: Path | None = None
    authority_file: Path | None = None
    history_retention_days: int = 730
    deleted_retention_days: int = 180
    access_log_retention_days: int = 730
    journal_retention_days: int = 30
    batch_max_events: int = 2000
    batch_max_wait_seconds: float = 0.5
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    metrics_web_config: Path | None = None  # TLS and basic auth (observability.web_config)
    freshness_objective_seconds: float = 60.0
    stall_after_seconds: float = 300.0
    max_clock_skew_seconds: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    topic_check_seconds: float = 60.0  # the change topics' ids checked between rebalances
    validator_processes: int = 0  # 0: a batch's contract checks in the worker's process
    record_cache_records: int = DEFAULT_RECORDS  # consumers.cache; 0: every batch reads
    reference_key: ReferenceKey | None = None  # PORTAL_SYNC_REFERENCE_KEY_FILE's secret

    def retention(self) -> Retention:
        return Retention(
            history_days=self.history_retention_days,
            deleted_days=self.deleted_retention_days,
            access_log_days=self.access_log_retention_days,
            journal_days=self.journal_retention_days,
            reference_key=self.reference_key,
        )


@dataclass(frozen=True)
class Prepared:
    """A batch parsed and validated ahead of its store transaction."""

    valid: list[Checked]
    dead: list[DeadLetter]

    def part(self, messages: Sequence[Message]) -> Prepared:
        """The judgement of `messages`, a part of this batch: a halved batch keeps the
        verdicts it was given, since a check against the clock may judge differently later
        (an event dead-lettered as from the future must not be applied in a half)."""
        kept = {(m.tp, m.offset) for m in messages}
        return Prepared(
            [c for c in self.valid if (c.message.tp, c.message.offset) in kept],
            [d for d in self.dead if (d.message.tp, d.message.offset) in kept],
        )


class Stopping(Exception):
    """The worker is shutting down: the batch in hand is abandoned (rolled back)."""


class BatchProcessor:
    """Synchronous part of the worker: dead letters first, then one store transaction.

    What each failure does (the batch loop branches only on the error families):

    | failure                                   | reaction                                   |
    |-------------------------------------------|--------------------------------------------|
    | `TransientError` (store, broker down)     | retry with backoff; /readyz false; stall   |
    |                                           | gauge and /healthz false after a while     |
    | `RecordError` (the store refused a value) | halve the batch down to the one event that |
    | or another exception (a fault of the      | fails alone; dead-letter it (apply_failed, |
    | worker met by some data)                  | the message names which); the rest applies |
    | `Refused` (the store refuses the batch's  | raised: the worker stops and resumes from  |
    | offsets: a gap), `Stopping`               | the store's offsets when restarted         |

    Every dead letter is published (and acknowledged) before the offsets that move past it
    are committed; each invalid message is dead-lettered once per delivery, however often
    its batch is halved.
    """

    def __init__(
        self,
        config: WorkerConfig,
        store: Store,
        registry: Registry,
        authority: Authority,
        health: WorkerHealth | None = None,  # the start's, when it waited for the cluster
    ) -> None:
        self.config = config
        self.registry = registry
        cache = RecordCache(config.record_cache_records) if config.record_cache_records else None
        self.reconciler = Reconciler(store, authority, cache=cache)
        self.publisher = Publisher.for_dead_letters(
            config.connection, config.topics, client_id="portal-sync-dead-letters"
        )
        self.next_prune = 0.0
        self.catching_up: threading.Thread | None = None  # store.fills, once after 0012
        self.stopping = threading.Event()
        self.health = health or WorkerHealth(config.stall_after_seconds)
        self.validators: Validators | None = None
        self.validators_from = max(1, config.batch_max_events // 2)  # events in a batch
        if config.validator_processes > 0:
            rules = Rules(registry, config.topics, config.max_clock_skew_seconds)
            try:
                self.validators = Validators(config.validator_processes, rules)
                log.info("batches checked in %d validator processes", config.validator_processes)
            except Exception as error:  # no process could start: slower, never wrong
                log.error("validator processes did not start (%s): batches are checked in "
                          "the worker", type(error).__name__)  # fmt: skip

    def prepare(self, messages: Sequence[Message]) -> Prepared:
        """Parse and validate a batch (no I/O): may run while another batch is applied."""
        began = time.perf_counter()
        valid, dead = self._classify(messages)
        record_check(time.perf_counter() - began)
        return Prepared(valid, dead)

    def _classify(self, messages: Sequence[Message]) -> tuple[list[Checked], list[DeadLetter]]:
        # A backlog's full batches go to the validator processes (throughput); the small
        # batches of a steady load are checked here, without the round trip to a child
        # (at 2,000 events/s its p99 lag was 1.17 s against 0.59 s checked here).
        if self.validators is not None and len(messages) >= self.validators_from:
            return self.validators.classify(messages)
        return classify(
            messages,
            self.registry,
            topics=self.config.topics,
            max_clock_skew_seconds=self.config.max_clock_skew_seconds,
        )

    def process(
        self,
        messages: Sequence[Message],
        prepared: Prepared | None = None,
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Apply a batch; raise `Stopping` when asked to stop while it waits. `starts`:
        where the fetch of each partition began (a compacted log may have no record there:
        the batch then starts later, and the store accepts it from there)."""
        self.health.busy()
        try:
            self._process(messages, set(), prepared, starts)
        finally:
            self.health.free()
        self.health.progressed()
        self.purge_if_due()  # after the batch: its time is not the batch's

    def _process(
        self,
        messages: Sequence[Message],
        lettered: set[Offset],
        prepared: Prepared | None = None,
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        judged = prepared
        try:
            if judged is None:  # judged once: its halves keep the verdicts (`Prepared.part`)
                judged = self.prepare(messages)
            ready = judged
            self._retrying(lambda: self._process_once(messages, lettered, ready, starts))
        except (Stopping, Refused, ConfigurationError, MemoryError):
            # Not the data's: a setting the store or the broker refuses, or memory short
            # (every event would fail alone too, and go to the dead letters: valid ones).
            raise
        except Exception as error:  # a record error, or a bug met by some data
            self._isolate(messages, error, lettered, judged, starts)

    def _retrying(self, action: Callable[[], None]) -> None:
        """Run `action` until it passes; transient failures wait with backoff."""
        backoff = Backoff(FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS)
        while True:
            if self.stopping.is_set():
                raise Stopping()
            try:
                action()
                self.health.recovered()
                return
            except TransientError as error:
                if self.stopping.is_set():  # a wait that a stop ended (a flush) is no failure
                    raise Stopping() from None
                self.health.retrying(error.kind)
                delay = backoff.next()
                # Our own errors' messages are fixed texts (a condition to fix, never a
                # value): a grant missing is named so.
                log.error(
                    "batch failed (%s: %s), retrying in %.1fs", type(error).__name__, error, delay
                )
                if self.stopping.wait(delay):
                    raise Stopping() from None

    def _isolate(
        self,
        messages: Sequence[Message],
        error: Exception,
        lettered: set[Offset],
        judged: Prepared | None,
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """Halve the batch until the event that fails alone is found; dead-letter it. The
        halves keep the batch's judgement (`Prepared.part`)."""
        if len(messages) == 1:
            self._retrying(lambda: self._poison(messages[0], error, lettered, starts))
            return
        middle = len(messages) // 2
        first, second = messages[:middle], messages[middle:]
        halves = (judged.part(first), judged.part(second)) if judged is not None else (None, None)
        self._process(first, lettered, halves[0], starts)
        self._process(second, lettered, halves[1], starts_after(first, starts))

    def _poison(
        self,
        message: Message,
        error: Exception,
        lettered: set[Offset],
        starts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        """An event the store cannot apply: dead-letter it and move past it."""
        log.error("event at %s:%d:%d cannot be applied (%s): dead-lettered", message.topic,
                  message.partition, message.offset, type(error).__name__)  # fmt: skip
        letter = DeadLetter(message, Reason.APPLY_FAILED, apply_failure(error))
        # As a batch's: sent once the store's offsets are read and locked, so that one a
        # new owner of the partition applied meanwhile is not dead-lettered too.
        self._process_once([message], lettered, Prepared([], [letter]), starts)

    def _process_once(
        self,
        messages: Sequence[Message],
        lettered: set[Offset],
        prepared: Prepared,
        starts: Mapping[TopicPartition, int] | None,
    ) -> None:
        valid, dead = prepared.valid, prepared.dead
        # Inside the batch's transaction, once the store's offsets are read (and locked):
        # what the store has already applied (a redelivery) is neither dead-lettered nor
        # counted again. Dead letters are sent then and their acknowledgements awaited just
        # before the commit: the broker's round trip overlaps the store's work, and the
        # offsets that move past a dead letter are never committed before it is
        # acknowledged.
        sent: list[DeadLetter] = []
        waits: list[Callable[[], None]] = []
        warned: list[Checked] = []  # counted once the batch commits (a retry reads again)

        def unapplied(stored: Mapping[TopicPartition, int]) -> None:
            todo = [d for d in dead if d.message.offset >= stored.get(d.message.tp, 0)]
            if todo:
                sent.extend(todo)
                waits.append(self._send_dead_letters(todo, lettered))
            warned.extend(
                checked
                for checked in valid
                if checked.warnings and checked.message.offset >= stored.get(checked.message.tp, 0)
            )

        def flush() -> None:
            # Each wait runs once: when an acknowledgement fails, the publisher forgets
            # what it had pending, so those letters and any later wait's stay unpublished
            # (not in `lettered`) and the retry sends them again.
            pending = waits[:]
            waits.clear()
            for wait in pending:
                wait()

        began = time.perf_counter()
        try:
            report = self.reconciler.apply(
                valid, messages, after_offsets=unapplied, before_commit=flush, starts=starts
            )
        finally:  # the store failed: still settle what was sent, so that a retry does not
            flush()  # send it again (a no-op once acknowledged)
        COMMIT_SECONDS.observe(time.perf_counter() - began)
        record_batch(report, self.config.freshness_objective_seconds)
        if sent:
            record_dead_letters(sent)
        self._soft_checks(warned)

    @staticmethod
    def _soft_checks(warned: Sequence[Checked]) -> None:
        """Count and log the soft checks that failed, of a committed batch's events that
        were not applied before."""
        for checked in warned:
            message = checked.message
            record_warnings(checked.event.entity, checked.warnings)
            # Where the event is, never what it names: the key is a personal id, and our
            # producers derive the event id from it with no secret.
            log.info(
                "soft checks %s failed for the event at %s:%d:%d",
                ",".join(checked.warnings),
                message.topic,
                message.partition,
                message.offset,
            )

    def purge_if_due(self) -> None:
        """The retention job (consumers.retention), at most once an hour; while anything
        is left due, again a minute later (each run spends about RETENTION_SECONDS, a chunk
        of each step at least: the batches wait meanwhile).

        It runs after a batch committed, and while no batch comes (the consume loop asks):
        a failure of its own is logged and tried at the next run, never raised into a
        batch's retries (the batch would be retried, or bisected and dead-lettered,
        although applied)."""
        if time.monotonic() < self.next_prune:
            return
        self.next_prune = time.monotonic() + 3600
        # A run is short (about RETENTION_SECONDS); one that hangs (a lock never granted)
        # counts towards a stall as a batch does.
        self.health.busy()
        try:
            self._purge()
        finally:
            self.health.free()

    def _purge(self) -> None:
        try:
            if self.catching_up is None or not self.catching_up.is_alive():
                self.catching_up = catch_up_if_due(self.reconciler.store, utcnow(), self.stopping)
        except Exception as error:  # the purge below runs all the same
            RETENTION_FAILURES.labels("catch_up").inc()
            log.error("the store's catch-up did not start (%s)", type(error).__name__)
        try:
            store = self.reconciler.store
            counts, done = purge_within(
                store, self.config.retention(), retention_now(store), RETENTION_SECONDS
            )
        except Exception as error:
            RETENTION_FAILURES.labels("purge").inc()
            log.error("retention run failed (%s); tried again in an hour", type(error).__name__)
            return
        if not done:
            self.next_prune = time.monotonic() + 60
        if any(counts.values()):
            log.info("retention: %s", ", ".join(f"{n} {kind}" for kind, n in counts.items()))

    def _send_dead_letters(
        self, dead: list[DeadLetter], lettered: set[Offset]
    ) -> Callable[[], None]:
        """Send the letters not yet published in this delivery; return what waits for
        their acknowledgements (and then counts them as published)."""
        todo = [d for d in dead if _origin(d.message) not in lettered]
        for letter in todo:
            message = letter.message
            key, value, headers = fit_letter(
                message.key,
                message.value,
                dead_letter_headers(
                    letter.code,
                    letter.reason,
                    message.topic,
                    message.partition,
                    message.offset,
                    attempt=message.attempt,
                ),
                kept_headers(message.headers, message.timestamp_ms),
                _origin(message),
                DEAD_LETTER_MAX_MESSAGE_BYTES,
            )
            self.publisher.send_dead_letter(key, value, headers)
            log.warning(
                "dead letter %s:%d:%d (%s)",
                message.topic,
                message.partition,
                message.offset,
                letter.code,
            )

        def acknowledged() -> None:  # called once (a failed flush leaves them unpublished)
            if todo:
                self.publisher.flush(stop=self.stopping)
                lettered.update(_origin(d.message) for d in todo)

        return acknowledged

    def close(self) -> None:
        self.stopping.set()
        if self.catching_up is not None:  # gives its row back between two chunks
            self.catching_up.join(timeout=30)
        self.publisher.close(timeout=5)
        if self.validators is not None:
            self.validators.close()


Offset = tuple[str, int, int]  # topic, partition, offset


def apply_failure(error: Exception) -> str:
    """A dead letter's message for an event that failed alone: the store's refusal says
    so (its cause by type); anything else is a fault of the worker that this event meets,
    named by its type (never its text, which may quote values)."""
    if isinstance(error, RecordError):
        return error.message
    return f"the worker failed on it: {type(error).__name__}"


def _origin(message: Message) -> Offset:
    return (message.topic, message.partition, message.offset)


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


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT, and SIGHUP unless ignored (`nohup`): a worker run from a terminal or
    SSH session that closes stops as on SIGTERM (the entry point's own handler raised out
    of the loop, and a batch retrying for a store away held the process)."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


class StopAsked(threading.Event):
    """A stop a signal asked for while the worker started, and which signal it was."""

    signum = 0

    def ask(self, signum: int) -> None:
        self.signum = signum
        self.set()


# How long a revoke waits for the batch in flight; the group waits longer for this member's
# rejoin (`transport.group.REBALANCE_TIMEOUT_MS`), else it would be expelled meanwhile.
REVOKE_WAIT_SECONDS = 30.0


class ReconcilerLoop:
    """The worker's main loop: a consumer-group member feeding the batch processor.

    On every assignment the partitions are moved to the store's offsets (never Kafka's);
    each batch is applied in a worker thread while the consumer keeps fetching; after each
    batch the store's offsets are copied to Kafka's group offsets for the usual tools.
    """

    def __init__(
        self,
        config: WorkerConfig,
        store: Store,
        processor: BatchProcessor,
        until_caught_up: bool,
        early_stop: StopAsked | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.processor = processor
        self.until_caught_up = until_caught_up
        self.early_stop = early_stop  # set by a signal received before the loop ran
        self.signals: list[int] = []  # the stop signals received
        self.liveness = Liveness()
        self.stop_event = asyncio.Event()
        self.code = 0
        self.idle = asyncio.Event()  # no batch in flight
        self.idle.set()
        self.targets: dict[TopicPartition, int] = {}
        self.applied: dict[TopicPartition, int] = {}
        self.checked_store_at = 0.0  # monotonic time of the last progress read from the store
        self.stalled_at: dict[TopicPartition, int] = {}  # offsets unmoved over a check
        self.settle_asked: dict[TopicPartition, float] = {}  # `_settle_one`'s last question
        self.to_copy: dict[TopicPartition, int] = {}  # for Kafka's group offsets (`_copy`)
        self.topics_checked_at = 0.0  # monotonic time of the last `_check_topics`
        self.copying: asyncio.Future[None] | None = None

    def healthy(self) -> bool:
        """/healthz: the loop beats, and no batch has failed past the stall limit."""
        return self.liveness.healthy() and not self.processor.health.stalled()

    def ready(self) -> bool:
        """/readyz: the loop runs, and its batches are not retrying."""
        return self.liveness.ready() and self.processor.health.ready()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, self.signalled, sig)
        if self.early_stop is not None and self.early_stop.is_set():
            self.signalled(self.early_stop.signum)  # asked for while starting
        topic_names = self.config.topics.change_topics()
        if self.until_caught_up:
            # The store first: other workers may commit meanwhile, up to the log ends
            # read after it, never past them.
            self.applied = await asyncio.to_thread(self.store.all_offsets)
            self.targets = await asyncio.to_thread(
                admin.end_offsets, self.config.connection, topic_names
            )
            check_within_logs(self.applied, self.targets)
        member = GroupMember(
            self.config.connection,
            topic_names,
            self.config.group_id,
            on_assigned=self._assigned,
            on_revoked=self._revoked,
        )
        await member.start()
        try:
            await self._consume(member)
        finally:
            await self._copied()
            await member.stop()
        return self.code

    def signalled(self, signum: int) -> None:
        """SIGTERM, SIGINT or SIGHUP: stop soon. A job (`--until-caught-up`) cut short exits 128 +
        the signal, as a shell reports it: exit 0 told a Kubernetes Job, or `&&`, that it
        had caught up. A second signal exits at once, without waiting for the batch in
        hand or the group's leave: the store keeps what it committed, and the group's
        offsets are only a copy of it."""
        if self.signals:
            log.warning("a second stop signal: exiting now, the batch in hand not applied")
            os._exit(128 + signum)
        self.signals.append(signum)  # a stop of its own (caught up, failed) is no signal
        self.stop(128 + signum if self.until_caught_up else 0)

    def stop(self, code: int = 0) -> None:
        """Stop soon: the batch in hand gives up waiting (its transaction rolls back)."""
        if not self.stop_event.is_set():
            self.code = code
            self.processor.stopping.set()
            self.stop_event.set()

    async def _assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The store's offsets of newly assigned partitions, their topics checked. A
        partition past the configured count (partitions added to the change topics while
        workers ran: a rebalance hands them out) stops the worker before it applies an
        event: it would dead-letter their valid events as `key_mismatch`, and a record
        placed on two partitions by producers before and after the change defeats the
        record cache, which holds each record on one partition."""
        count = self.config.topics.change_partitions
        beyond = sorted(f"{topic}[{partition}]" for topic, partition in partitions
                        if partition >= count)  # fmt: skip
        if beyond:
            raise ConfigurationError(
                f"assigned {', '.join(beyond)}, past PORTAL_SYNC_CHANGE_PARTITIONS ({count}): "
                "partitions were added to the change topics, which moves records to other "
                "partitions: raise the count with a new topic prefix instead "
                '(docs/operations.md, "Topics")'
            )
        stored = await self._stored_offsets(partitions)
        if stored is None:
            return {}
        self._sought(partitions, stored)
        self.liveness.set_ready()
        return stored

    def _sought(
        self, partitions: Iterable[TopicPartition], stored: dict[TopicPartition, int]
    ) -> None:
        """Partitions sought from the store's offsets (or their log's start, those it has
        none for): what the worker has applied of them, and what the store must keep."""
        partitions = list(partitions)
        self.processor.reconciler.note_offsets(partitions, stored)
        for tp in partitions:
            self.applied[tp] = stored.get(tp, 0)

    async def _stored_offsets(
        self, partitions: set[TopicPartition]
    ) -> dict[TopicPartition, int] | None:
        """The store's offsets of these partitions, their topics checked; a store that is
        away is waited for (with backoff), never guessed. None: asked to stop meanwhile."""
        backoff = Backoff(FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS)
        retried = False  # this wait's own: a batch retrying meanwhile keeps its state
        try:
            while True:
                try:
                    stored = await asyncio.to_thread(self.store.stored_offsets, partitions)
                    await self._check_topics({topic for topic, _ in partitions}, stored)
                    if retried:
                        self.processor.health.recovered()
                    return stored
                except TransientError as error:
                    if self.stop_event.is_set():
                        return None
                    # as a batch's retries: /readyz false, then /healthz and the stall alert
                    self.processor.health.retrying(error.kind)
                    retried = True
                    log.error("store offsets unreadable (%s), retrying", type(error).__name__)
                    with contextlib.suppress(TimeoutError):  # a stop ends the wait at once
                        await asyncio.wait_for(self.stop_event.wait(), backoff.next())
                    if self.stop_event.is_set():
                        return None
                    self.liveness.beat()  # waiting for the store, as a batch does: not stuck
        except asyncio.CancelledError:
            # A rebalance took the partitions meanwhile (`GroupMember`): the next
            # assignment's read may pass at once, and /readyz stayed 503, then /healthz.
            if retried:
                self.processor.health.recovered()
            raise

    async def _check_topics_again(self, member: GroupMember) -> None:
        """`_check_topics` between rebalances: a topic deleted and created again with as
        many partitions starts no rebalance, and a member that fetches at the store's
        offset in a new log already that long sees no gap either. Refused within
        `topic_check_seconds` (60 by default; the events of the new log below the
        store's offsets are then not applied: the reset that follows applies them)."""
        self.topics_checked_at = time.monotonic()  # tried again a minute on, whatever comes
        assigned = member.assignment()
        if not assigned:
            return
        try:
            stored = await asyncio.to_thread(self.store.stored_offsets, assigned)
            await self._check_topics({topic for topic, _ in assigned}, stored)
        except TransientError as error:
            log.warning("topic ids not checked (%s)", type(error).__name__)

    async def _check_topics(self, topics: set[str], stored: dict[TopicPartition, int]) -> None:
        """Refuse a topic created again since the store applied events of it
        (`check_topic_ids`); record the cluster's id of a topic the store has none of.
        A cluster that cannot say now is not checked this time, as the log ends are not."""
        try:
            current = await asyncio.to_thread(admin.topic_ids, self.config.connection, topics)
        except TransientError as error:
            log.warning("topic ids not read (%s): not checked this time", type(error).__name__)
            return
        saved = await asyncio.to_thread(self.store.topic_ids)
        check_topic_ids(stored, saved, current)
        new = {topic: found for topic, found in current.items() if saved.get(topic) != found}
        if new:  # first seen, or created again before any event of it was applied
            await asyncio.to_thread(self.store.record_topic_ids, new)
        self.topics_checked_at = time.monotonic()

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        """Let the batch in flight finish before the partitions move to another member;
        the records kept of them are dropped before the next batch."""
        if self.processor.reconciler.cache is not None:
            self.processor.reconciler.cache.invalidate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout=REVOKE_WAIT_SECONDS)

    async def _consume(self, member: GroupMember) -> None:
        """Two stages: while batch N is applied (its thread mostly waits for the database),
        batch N+1 is fetched and parsed in another thread. Batches are applied one after
        the other, in order. Whatever ends the loop with a batch in flight stops that
        batch (its transaction rolls back): the process would wait for its thread, which
        retries while the store is away, for ever."""
        try:
            await self._batches(member)
        except BaseException:
            self.processor.stopping.set()
            raise

    async def _batches(self, member: GroupMember) -> None:
        config = self.config
        health = self.processor.health
        applying: tuple[asyncio.Future[None], list[Message]] | None = None
        while not self.stop_event.is_set():
            self.liveness.beat()
            if applying is None and self.until_caught_up and await self._caught_up():
                return
            try:
                messages = await member.batch(
                    config.batch_max_events, 0.0 if applying else config.batch_max_wait_seconds
                )
            except TransientError as error:
                log.error("fetch failed (%s), retrying", type(error).__name__)
                health.fetch_failed(f"fetch: {error.kind}")  # a stall if it lasts
                if applying is not None:
                    # Its end first: the next fetch may wait out a rebalance, whose revoke
                    # waits for this batch (`_revoked`), which only this loop ends.
                    outcome, ended = await self._finished(member, *applying)
                    applying = None
                    self._copy(member, ended)
                    if outcome == "stop":
                        return
                await asyncio.sleep(1.0)
                continue
            health.fetched()
            if member.failed is not None:
                raise member.failed
            fetched_in = member.rebalances
            if time.monotonic() - self.topics_checked_at > config.topic_check_seconds:
                await self._check_topics_again(member)
            starts = member.starts  # where this batch's fetches began
            prepared: Prepared | None = None
            fetched = bool(messages) and not self.stop_event.is_set()
            if fetched:
                try:
                    # The loop beats meanwhile: a validator child that hangs is waited for
                    # up to its timeout (`Validators`), longer than /healthz allows a loop
                    # without a beat, and the batch is then checked here. A check that
                    # hangs beyond that is no more beaten for: /healthz fails.
                    checking = asyncio.ensure_future(
                        asyncio.to_thread(self.processor.prepare, messages)
                    )
                    prepared = await self._beating(checking, CHECK_BEATS_SECONDS)
                except Exception as error:  # a bug met by some data: isolated when applied
                    log.error("the batch's checks failed (%s): checked again as it is "
                              "applied", type(error).__name__)  # fmt: skip
            done: dict[TopicPartition, int] = {}
            if applying is not None:
                outcome, done = await self._finished(member, *applying)
                applying = None
                if outcome == "stop":
                    return
                if outcome == "reseek":
                    continue  # the batch in hand was read from the wrong position
                if self.until_caught_up and await self._caught_up():
                    # Under a steady flow every fetch brings a batch, and the check at the
                    # loop's top (between batches) never came: the job ran for ever. What
                    # was fetched meanwhile lies past the targets and is not applied.
                    self._copy(member, done)
                    return
            if fetched and member.rebalances != fetched_in:
                # A rebalance began since the fetch: its partitions may be another member's
                # now, and are sought again from the store's offsets if they stay ours.
                log.info("a batch fetched before a rebalance is dropped: read again")
                fetched = False
            if not messages and applying is None and not self.stop_event.is_set():
                # A quiet pipeline still forgets what is past its retention; the loop beats
                # meanwhile, and a run that hangs shows as a stall (WorkerHealth).
                await self._beating(asyncio.ensure_future(
                    asyncio.to_thread(self.processor.purge_if_due)
                ))  # fmt: skip
            if fetched and not self.stop_event.is_set():
                self.idle.clear()
                task = asyncio.ensure_future(
                    asyncio.to_thread(self.processor.process, messages, prepared, starts)
                )
                applying = (task, messages)
            self._copy(member, done)
        if applying is not None:
            outcome, done = await self._finished(member, *applying)
            self._copy(member, done)

    async def _beating(
        self,
        task: asyncio.Future[T],
        beat_for: float | None = None,
        poll: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """The result of `task`, which runs in a thread, with the loop's beat kept while it
        runs (/healthz fails after 15 s without one), for at most `beat_for` seconds;
        `poll` is awaited each second meanwhile (`GroupMember.keep_polling`)."""
        until = None if beat_for is None else time.monotonic() + beat_for
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if until is None or time.monotonic() < until:
                    self.liveness.beat()
                if poll is not None and not task.done():
                    await poll()
        except asyncio.CancelledError:
            task.cancel()  # as if awaited directly (a thread's work goes on regardless)
            raise
        return await task

    def _copy(self, member: GroupMember, offsets: dict[TopicPartition, int]) -> None:
        """Copy the store's offsets to Kafka's group offsets, in the background: the next
        batch starts without waiting for the broker's round trip (it was on every batch's
        path), and a copy that waits out a rebalance never holds up the batch in flight,
        which the rebalance waits for. One copy at a time, of the newest offsets."""
        if not offsets:
            return
        self.to_copy.update(offsets)
        if self.copying is None or self.copying.done():
            self.copying = asyncio.ensure_future(self._copy_pending(member))

    async def _copy_pending(self, member: GroupMember) -> None:
        while self.to_copy:
            offsets, self.to_copy = self.to_copy, {}
            try:
                await member.commit_copy(offsets)
            except Exception as error:  # best effort: the store's offsets are the truth
                log.info("offsets not copied to Kafka (%s)", type(error).__name__)

    async def _copied(self) -> None:
        """Before leaving the group: let the last copy finish (for a while)."""
        if self.copying is not None and not self.copying.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.copying, timeout=10)

    async def _finished(
        self, member: GroupMember, task: asyncio.Future[None], messages: list[Message]
    ) -> tuple[str, dict[TopicPartition, int]]:
        """Wait for a batch being applied: "ok", "reseek" or "stop", and the offsets the
        store now holds for its partitions ("ok" only), for Kafka's copy."""
        try:
            # A batch that takes long (retrying while the store or the broker is away, or
            # one attempt that blocks) is judged by the stall threshold (WorkerHealth), not
            # by the beat of the loop that waits for it: /healthz would fail after 15 s of
            # any outage. The member polls meanwhile, or it left the group after 10 minutes.
            await self._beating(task, poll=member.keep_polling)
        except Stopping:
            return "stop", {}
        except OffsetGap as error:
            # The consumer is not where the store is (a seek lost in a rebalance, an
            # operator's reset): nothing was committed; go back to the store's offsets.
            log.warning("%s: resuming from the store's offsets", error)
            self.processor.health.recovered()  # that batch is over, retried or not
            # A store away now is waited for, as at an assignment (raised from here, its
            # error stopped the worker with a traceback), the member polling meanwhile.
            assigned = member.assignment()
            reading = asyncio.ensure_future(self._stored_offsets(assigned))
            stored = await self._beating(reading, poll=member.keep_polling)
            if stored is None:
                return "stop", {}
            # Those still ours: a rebalance while the store was read sought the new ones
            # itself, and the consumer refuses a seek of one that went (a crash before).
            still = assigned & member.assignment()
            await member.seek(stored, still)
            self._sought(still, stored)
            return "reseek", {}
        except ConfigurationError as error:  # the broker refuses its credentials or TLS: exit 2
            log.error("batch refused by a setting: %s; stopping", error)
            self.stop(EXIT_CONFIGURATION)
            return "stop", {}
        except Exception as error:
            # Never go on from the consumer's position after a failure: stop, and let the
            # supervisor restart the worker from the store's offsets. Our own errors'
            # messages never quote values; others' may: the type only.
            detail = str(error) if isinstance(error, PortalSyncError) else ""
            log.error(
                "batch failed unexpectedly (%s%s): stopping; the next start resumes from "
                "the store's offsets",
                type(error).__name__,
                f": {detail}" if detail else "",
            )
            self.stop(EXIT_BATCH_FAILED)
            return "stop", {}
        finally:
            self.idle.set()
        ends: dict[TopicPartition, int] = {}
        for message in messages:
            ends[message.tp] = max(ends.get(message.tp, 0), message.offset + 1)
        for tp, end in ends.items():  # a batch the store had applied already moves nothing back
            ends[tp] = self.applied[tp] = max(self.applied.get(tp, 0), end)
        return "ok", ends

    async def _caught_up(self) -> bool:
        """Every partition reached the end offsets seen at start (other workers' included:
        their progress is read from the store), or holds no committed message before them:
        a log that ends in a transactional writer's marker or aborted events ends past the
        last event applied, and was waited for until the process was killed. A partition
        that a transaction still open holds back is waited for (its events, and all after
        them, are applied once it ends), with a warning each time it is asked."""
        behind = [tp for tp, end in self.targets.items() if self.applied.get(tp, 0) < end]
        if not behind:
            return True
        now = time.monotonic()
        if now - self.checked_store_at > 1.0:
            self.checked_store_at = now
            before = {tp: self.applied.get(tp, 0) for tp in behind}
            try:
                stored = await asyncio.to_thread(self.store.stored_offsets, behind)
            except TransientError as error:  # the store away: asked again at the next check
                log.warning("progress not read (%s)", type(error).__name__)
                return False
            for tp, offset in stored.items():
                self.applied[tp] = max(self.applied.get(tp, 0), offset)
            unmoved = []
            for tp in behind:
                at = self.applied.get(tp, 0)
                if at == self.stalled_at.get(tp) and at < self.targets[tp]:
                    unmoved.append(tp)
                self.stalled_at[tp] = at if at == before[tp] else -1
            await self._settle_one(unmoved, now)
        return all(self.applied.get(tp, 0) >= end for tp, end in self.targets.items())

    async def _settle_one(self, unmoved: list[TopicPartition], now: float) -> None:
        """Ask of one partition whose store offset did not move since the last check
        whether anything is left before its target; each partition at most every
        `SETTLE_EVERY_SECONDS` (a read of the topic each time)."""
        for tp in unmoved:
            if now - self.settle_asked.get(tp, -SETTLE_EVERY_SECONDS) < SETTLE_EVERY_SECONDS:
                continue
            self.settle_asked[tp] = now
            at, target = self.applied.get(tp, 0), self.targets[tp]
            try:
                empty = await asyncio.to_thread(
                    nothing_before, self.config.connection, tp, at, target
                )
            except OpenTransaction as error:  # its events, and all after them, wait for it
                log.warning("%s: waiting for it to end", error)
                empty = False
            except Exception as error:  # asked again later; never stops the worker
                log.info("%s:%d not read to its end (%s)", *tp, type(error).__name__)
                empty = False
            if empty:
                self.targets[tp] = at
            self.liveness.beat()
            return
