"""One batch of the reconciler worker (`BatchProcessor`): checked (in the validator
processes for a backlog's full batches, else here), then applied in one store transaction
with the next offset of each of its partitions, its dead letters published and acknowledged
first. The loop (consumers.loop) runs it in a thread; how each failure is met is the
table in `BatchProcessor`'s docstring, by the error taxonomy's families (schemas.errors).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.cache import DEFAULT_RECORDS, RecordCache
from consumers.checks import DEFAULT_MAX_CLOCK_SKEW_SECONDS, Checked, DeadLetter, classify
from consumers.merge import Authority
from consumers.metrics import (
    COMMIT_SECONDS,
    RETENTION_FAILURES,
    WorkerHealth,
    record_batch,
    record_check,
    record_dead_letters,
    record_warnings,
)
from consumers.reconciler import Reconciler, starts_after
from consumers.registry import Registry
from consumers.retention import Retention, catch_up_if_due, purge_within, retention_now
from consumers.validators import Rules, Validators
from schemas.dead_letter import Reason, dead_letter_headers, fit_letter, kept_headers
from schemas.errors import (
    NOT_THE_DATAS,
    Backoff,
    RecordError,
    TransientError,
)
from schemas.identifiers import ReferenceKey
from store import LockTableFull, Store, TopicPartition, utcnow
from transport.config import KafkaConnection
from transport.publisher import Publisher
from transport.reader import Message
from transport.topics import DEAD_LETTER_MAX_MESSAGE_BYTES, Topics

log = logging.getLogger(__name__)
# A failed batch's or store read's first wait before it is tried again, and its longest.
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 30.0
# The retention job's time on deleted records per run, between two batches: a backlog (a
# large source purge) is worked off a minute apart, never holding the batches for long.
RETENTION_SECONDS = 5.0
# Failures of a batch in a row for a full lock table before it is applied in halves.
LOCK_TABLE_TRIES = 3


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


# Never isolated to an event (`NOT_THE_DATAS`), and a stop asked for.
NOT_THE_WORKERS: tuple[type[BaseException], ...] = (Stopping, *NOT_THE_DATAS)


class TooManyLocks(Exception):
    """PostgreSQL's lock table refused the batch `LOCK_TABLE_TRIES` times in a row: it is
    applied in halves instead (a table that other workers' batches or a purge fill, or one
    sized below a full batch, held a worker retrying the same batch for ever)."""


class BatchProcessor:
    """Synchronous part of the worker: dead letters first, then one store transaction.

    What each failure does (the batch loop branches only on the error families):

    | failure                                   | reaction                                   |
    |-------------------------------------------|--------------------------------------------|
    | `TransientError` (store, broker down)     | retry with backoff; /readyz false; stall   |
    |                                           | gauge and /healthz false after a while     |
    | `LockTableFull` (PostgreSQL's lock table) | retried so; three in a row: in halves      |
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
            self._retrying(
                lambda: self._process_once(messages, lettered, ready, starts),
                halvable=len(messages) > 1,
            )
        except TooManyLocks:
            log.warning("PostgreSQL's lock table holds no batch of %d events: applied in "
                        "halves", len(messages))  # fmt: skip
            self._halves(messages, lettered, judged, starts)
        except NOT_THE_WORKERS:
            # Not the data's: a setting the store or the broker refuses, or memory short
            # (every event would fail alone too, and go to the dead letters: valid ones).
            raise
        except Exception as error:  # a record error, or a bug met by some data
            self._isolate(messages, error, lettered, judged, starts)

    def _retrying(self, action: Callable[[], None], halvable: bool = False) -> None:
        """Run `action` until it passes; transient failures wait with backoff. `halvable`:
        after `LOCK_TABLE_TRIES` failures in a row for a full lock table, raise
        `TooManyLocks` (the batch is applied in halves, each taking half its locks)."""
        backoff = Backoff(FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS)
        full = 0  # failures in a row for a full lock table
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
                full = full + 1 if isinstance(error, LockTableFull) else 0
                if halvable and full >= LOCK_TABLE_TRIES:
                    raise TooManyLocks() from None
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
        self._halves(messages, lettered, judged, starts)

    def _halves(
        self,
        messages: Sequence[Message],
        lettered: set[Offset],
        judged: Prepared | None,
        starts: Mapping[TopicPartition, int] | None,
    ) -> None:
        """The batch as two, one after the other: each its own transaction, the second
        starting where the first ends."""
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
        were not applied before: a line per check and partition, naming the events by
        their offsets. A line an event flooded the log of a source whose every event fails
        a check (41 % of the peer harness's events fail one) and cost the batch thread
        4 % of its time (docs/performance-log.md, thirty-eighth round)."""
        failed: dict[tuple[str, str, str, int], list[int]] = {}
        for checked in warned:
            message = checked.message
            for check in checked.warnings:
                place = (checked.event.entity, check, message.topic, message.partition)
                failed.setdefault(place, []).append(message.offset)
        for (entity, check, _, _), offsets in failed.items():
            record_warnings(entity, check, len(offsets))
        if not log.isEnabledFor(logging.INFO):
            return
        for (_, check, topic, partition), offsets in failed.items():
            # Where the events are, never what they name: the key is a personal id, and
            # our producers derive the event id from it with no secret.
            log.info(
                "soft check %s failed for %d event(s) at %s:%d, offsets %s",
                check,
                len(offsets),
                topic,
                partition,
                offset_spans(offsets),
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


def offset_spans(offsets: Iterable[int]) -> str:
    """Offsets as runs, in order: `3-5,9,12-13`."""
    runs: list[list[int]] = []
    for offset in sorted(offsets):
        if runs and offset <= runs[-1][1] + 1:  # sorted: the run ends here now
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
