"""The reconciler worker on faust-streaming.

Offsets are owned by the store, not by Kafka: every batch commits its data together with
the next offset of each partition, and on every partition assignment the consumer is moved
to the store's offsets. Faust's own offset commit still runs (it feeds lag monitoring) but
is never trusted for resuming (faust-streaming issue #606).

Faust seeks to its committed offsets in `Consumer.perform_seek`, after the
`on_partitions_assigned` signal has run, so seeking inside the signal is silently undone;
the worker therefore wraps `perform_seek` itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust

from consumers.config import (
    RULES_FILES,
    RULES_FINGERPRINT,
    load_rules,
    rules_files,
    rules_fingerprint,
)
from consumers.merge import Authority
from consumers.metrics import (
    COMMIT_SECONDS,
    FRESHNESS,
    WorkerHealth,
    record_batch,
    record_dead_letters,
    record_warnings,
)
from consumers.reconciler import DeadLetter, Reconciler, classify
from consumers.registry import Registry
from observability.freshness import read_freshness
from observability.http import Liveness, serve
from schemas.dead_letter import Reason, dead_letter_headers
from schemas.errors import Refused, TransientError
from store import Store, TopicPartition, utcnow
from transport import admin, clients
from transport.config import KafkaConnection
from transport.publisher import Publisher
from transport.reader import Message
from transport.topics import DEAD_LETTER_MAX_MESSAGE_BYTES, Topics

log = logging.getLogger(__name__)
MAX_RETRY_SECONDS = 30.0
EXIT_BATCH_FAILED = 3  # a batch failed in an unexpected way: restart from the store


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker runs with (the CLI builds it from the settings)."""

    connection: KafkaConnection
    topics: Topics
    group_id: str
    store_url: str
    faust_dir: Path
    registry_file: Path | None = None
    authority_file: Path | None = None
    history_retention_days: int = 730
    batch_max_events: int = 2000
    batch_max_wait_seconds: float = 0.5
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    freshness_objective_seconds: float = 60.0
    stall_after_seconds: float = 300.0


class Stopping(Exception):
    """The worker is shutting down: the batch in hand is abandoned (rolled back)."""


class BatchProcessor:
    """Synchronous part of the worker: dead letters first, then one store transaction.

    What each failure does (the batch loop branches only on the error families):

    | failure                                   | reaction                                   |
    |-------------------------------------------|--------------------------------------------|
    | `TransientError` (store, broker down)     | retry with backoff; /readyz false; stall   |
    |                                           | gauge and /healthz false after a while     |
    | `RecordError` or an unexpected exception  | halve the batch down to the one event that |
    | met by some data                          | fails alone; dead-letter it (apply_failed) |
    | `Refused` (the store refuses the batch's  | raised: the worker stops and resumes from  |
    | offsets: a gap) or anything else          | the store's offsets when restarted         |

    Every dead letter is published (and acknowledged) before the offsets that move past it
    are committed; each invalid message is dead-lettered once per delivery, however often
    its batch is halved.
    """

    def __init__(
        self, config: WorkerConfig, store: Store, registry: Registry, authority: Authority
    ) -> None:
        self.config = config
        self.registry = registry
        self.reconciler = Reconciler(store, authority)
        self.publisher = Publisher.for_dead_letters(
            config.connection, config.topics, client_id="portal-sync-dead-letters"
        )
        self.next_prune = 0.0
        self.stopping = threading.Event()
        self.health = WorkerHealth(config.stall_after_seconds)

    def process(self, messages: Sequence[Message]) -> None:
        """Apply a batch; raise `Stopping` when asked to stop while it waits."""
        self._process(messages, set())
        self.health.progressed()

    def _process(self, messages: Sequence[Message], lettered: set[Offset]) -> None:
        try:
            self._retrying(lambda: self._process_once(messages, lettered))
        except (Stopping, Refused):
            raise
        except Exception as error:  # a record error, or a bug met by some data
            self._isolate(messages, error, lettered)

    def _retrying(self, action: Callable[[], None]) -> None:
        """Run `action` until it passes; transient failures wait with backoff."""
        delay = 0.5
        while True:
            if self.stopping.is_set():
                raise Stopping()
            try:
                action()
                self.health.recovered()
                return
            except TransientError as error:
                self.health.retrying(type(error).__name__)
                log.error("batch failed (%s), retrying in %.1fs", type(error).__name__, delay)
                if self.stopping.wait(delay):
                    raise Stopping() from None
                delay = min(delay * 2, MAX_RETRY_SECONDS)

    def _isolate(
        self, messages: Sequence[Message], error: Exception, lettered: set[Offset]
    ) -> None:
        """Halve the batch until the event that fails alone is found; dead-letter it."""
        if len(messages) == 1:
            self._retrying(lambda: self._poison(messages[0], error, lettered))
            return
        middle = len(messages) // 2
        self._process(messages[:middle], lettered)
        self._process(messages[middle:], lettered)

    def _poison(self, message: Message, error: Exception, lettered: set[Offset]) -> None:
        """An event the store cannot apply: dead-letter it and move past it."""
        log.error("event at %s:%d:%d cannot be applied (%s): dead-lettered", message.topic,
                  message.partition, message.offset, type(error).__name__)  # fmt: skip
        letter = DeadLetter(
            message, Reason.APPLY_FAILED, f"the store refused it: {type(error).__name__}"
        )
        self._dead_letter([letter], lettered)
        self.reconciler.apply([], [message])
        record_dead_letters([letter])

    def _process_once(self, messages: Sequence[Message], lettered: set[Offset]) -> None:
        fresh = self.reconciler.unapplied(messages)
        valid, dead = classify(fresh, self.registry)
        if dead:
            self._dead_letter(dead, lettered)
        for checked in valid:
            if checked.warnings:
                record_warnings(checked.event.entity, checked.warnings)
                # The event id only: the key is a personal identifier.
                log.info(
                    "soft checks %s failed for event %s",
                    ",".join(checked.warnings),
                    checked.event.event_id,
                )
        began = time.perf_counter()
        report = self.reconciler.apply(valid, fresh)
        COMMIT_SECONDS.observe(time.perf_counter() - began)
        record_batch(report, self.config.freshness_objective_seconds)
        if dead:
            record_dead_letters(dead)
        self._prune_history()

    def _prune_history(self) -> None:
        """Drop audit history past its retention, at most once an hour."""
        if time.monotonic() < self.next_prune:
            return
        self.next_prune = time.monotonic() + 3600
        horizon = utcnow() - timedelta(days=self.config.history_retention_days)
        pruned = self.reconciler.store.prune_history(horizon)
        if pruned:
            log.info("pruned %d audit history entries older than %s", pruned, horizon.date())

    def _dead_letter(self, dead: list[DeadLetter], lettered: set[Offset]) -> None:
        """Publish and wait for acks before the offsets that skip them are committed; a
        letter already published in this delivery is not sent again."""
        todo = [d for d in dead if _origin(d.message) not in lettered]
        for letter in todo:
            message = letter.message
            headers = dead_letter_headers(
                letter.code,
                letter.reason,
                message.topic,
                message.partition,
                message.offset,
                attempt=message.attempt,
            )
            value = message.value
            if value is not None and len(value) > DEAD_LETTER_VALUE_LIMIT:
                value, headers = value_reference(message, headers)
            self.publisher.send_dead_letter(message.key, value, headers)
            log.warning(
                "dead letter %s:%d:%d (%s)",
                message.topic,
                message.partition,
                message.offset,
                letter.code,
            )
        if todo:
            self.publisher.flush()
        lettered.update(_origin(d.message) for d in todo)

    def close(self) -> None:
        self.publisher.close(timeout=5)


Offset = tuple[str, int, int]  # topic, partition, offset
# A dead letter keeps the original bytes when they fit the dead-letter topic (which takes
# twice what a change topic does); bigger values are replaced by a reference.
DEAD_LETTER_VALUE_LIMIT = DEAD_LETTER_MAX_MESSAGE_BYTES - 64 * 1024


def _origin(message: Message) -> Offset:
    return (message.topic, message.partition, message.offset)


def value_reference(
    message: Message, headers: list[tuple[str, bytes]]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A too-large value as a reference: its size, SHA-256 and origin (never its content)."""
    value = message.value or b""
    digest = hashlib.sha256(value).hexdigest()
    reference = {
        "value_omitted": "too_large",
        "size": len(value),
        "sha256": digest,
        "origin": {"topic": message.topic, "partition": message.partition,
                   "offset": message.offset},
    }  # fmt: skip
    return json.dumps(reference).encode(), [*headers, ("ps.value.sha256", digest.encode())]


class ReconcilerApp(faust.App):
    """A faust app whose consumer resumes from the store's offsets on every assignment."""

    store: Store
    targets: dict[TopicPartition, int]
    liveness: Liveness

    def _new_consumer(self) -> Any:
        consumer: Any = super()._new_consumer()
        faust_seek = consumer.perform_seek

        async def perform_seek() -> None:
            await faust_seek()
            stored = await asyncio.to_thread(self.store.all_offsets)
            for tp in consumer.assignment():
                offset = stored.get((tp.topic, tp.partition), 0)
                await consumer.seek(tp, offset)
                # Keep faust's ack bookkeeping consistent with where we are.
                consumer._committed_offset[tp] = offset
            log.info("resumed %d partitions from the store's offsets", len(consumer.assignment()))
            self.liveness.set_ready()

        consumer.perform_seek = perform_seek
        return consumer


def run_worker(config: WorkerConfig, until_caught_up: bool = False) -> int:
    """Run until stopped (SIGTERM/SIGINT), or until caught up; return the exit code."""
    admin.ensure_topics(config.connection, config.topics)
    store = Store(config.store_url)
    store.create_schema()
    registry, authority = load_rules(config.registry_file, config.authority_file)
    # The rules this store is reconciled with: replay, rebuild and remerge compare theirs.
    store.set_meta(
        RULES_FINGERPRINT, rules_fingerprint(config.registry_file, config.authority_file)
    )
    store.set_meta(RULES_FILES, rules_files(config.registry_file, config.authority_file))
    note = ""
    if registry.development_mode:
        note = "development mode: no source registry, every source accepted, equal rank"
        log.warning(note)
    processor = BatchProcessor(config, store, registry, authority)
    # Sources no longer registered lose their freshness series (development mode keeps all).
    known = read_freshness(store)
    FRESHNESS.seed({source: f for source, f in known.items() if registry.accepts(source)})
    app = _build_app(config, store)
    health = processor.health
    if config.metrics_port:
        liveness = app.liveness
        serve(
            config.metrics_port,
            config.metrics_host,
            lambda: liveness.healthy() and not health.stalled(),
            lambda: liveness.ready() and health.ready(),
            ready_note=note,
        )
    topic_names = config.topics.change_topics()
    targets = admin.end_offsets(config.connection, topic_names) if until_caught_up else {}
    state: dict[str, Any] = {"stopping": False, "stop_task": None, "code": 0}

    def caught_up() -> bool:
        stored = store.all_offsets()
        return all(stored.get(tp, 0) >= end for tp, end in targets.items())

    def stop(code: int = 0) -> None:
        if not state["stopping"]:
            state["stopping"] = True
            state["code"] = code
            processor.stopping.set()
            state["stop_task"] = asyncio.ensure_future(worker.stop())

    def maybe_stop() -> None:
        if until_caught_up and not state["stopping"] and caught_up():
            stop()

    topic = app.topic(
        *topic_names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    @app.agent(topic)
    async def reconcile(stream: Any) -> None:
        async for events in stream.take_events(
            config.batch_max_events, within=config.batch_max_wait_seconds
        ):
            if state["stopping"]:
                return
            messages = [_message(event) for event in events]
            try:
                await asyncio.to_thread(processor.process, messages)
            except Stopping:
                return
            except Exception as error:
                # Never go on from faust's position after a failure: stop, and let the
                # supervisor restart the worker from the store's offsets.
                log.error(
                    "batch failed unexpectedly (%s): stopping; the next start resumes from "
                    "the store's offsets",
                    type(error).__name__,
                )
                stop(EXIT_BATCH_FAILED)
                return
            maybe_stop()

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def check_caught_up() -> None:
        app.liveness.beat()
        maybe_stop()

    worker = ReconcilerWorker(
        app, loglevel="WARNING", quiet=True, redirect_stdouts=False, on_signal=processor.stopping
    )
    worker.spinner = None
    code: Any = 1
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        processor.close()
        store.close()
    if state["code"]:
        return int(state["code"])
    return 0 if code in (0, None) else int(code)


class ReconcilerWorker(faust.Worker):
    """faust's worker; a stop signal first tells the batch in hand to give up waiting, so
    SIGTERM/SIGINT stop the worker within seconds (the open transaction rolls back)."""

    def __init__(self, *args: Any, on_signal: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_signal = on_signal

    def _schedule_shutdown(self, signal: Any) -> None:
        self._on_signal.set()
        super()._schedule_shutdown(signal)


def _build_app(config: WorkerConfig, store: Store) -> ReconcilerApp:
    broker = clients.stream_broker(config.connection)
    credentials: Any = None
    if broker.sasl_mechanism is not None:
        credentials = faust.SASLCredentials(
            username=broker.sasl_username,
            password=broker.sasl_password,
            ssl_context=broker.ssl_context,
            mechanism=broker.sasl_mechanism,
        )
    elif broker.ssl_context is not None:
        credentials = faust.SSLCredentials(broker.ssl_context)
    config.faust_dir.mkdir(parents=True, exist_ok=True)
    app = ReconcilerApp(
        config.group_id,
        broker=broker.urls,
        broker_credentials=credentials,
        store="memory://",
        topic_allow_declare=False,  # topics are created by portal-sync, never by faust
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        broker_session_timeout=10.0,
        web_enabled=False,
        autodiscover=False,
        datadir=str(config.faust_dir),
        consumer_max_fetch_size=4 * 1024 * 1024,
    )
    app.store = store
    app.liveness = Liveness()
    return app


def _message(event: Any) -> Message:
    raw = event.message
    timestamp = int(raw.timestamp * 1000) if raw.timestamp else None
    headers = raw.headers.items() if isinstance(raw.headers, dict) else raw.headers or ()
    return Message(
        raw.topic,
        raw.partition,
        raw.offset,
        event.value,
        raw.key,
        timestamp,
        tuple((str(k), bytes(v or b"")) for k, v in headers),
    )
