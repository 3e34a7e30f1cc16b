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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust

from consumers.config import load_rules
from consumers.merge import Authority
from consumers.metrics import (
    COMMIT_SECONDS,
    FRESHNESS,
    record_batch,
    record_dead_letters,
    record_warnings,
)
from consumers.reconciler import DeadLetter, Reconciler, classify
from consumers.registry import Registry
from observability.freshness import read_freshness
from observability.http import Liveness, serve
from schemas.dead_letter import Reason, dead_letter_headers
from schemas.errors import RecordError, TransientError
from store import Store, TopicPartition, utcnow
from transport import admin, clients
from transport.config import KafkaConnection
from transport.publisher import Publisher
from transport.reader import Message
from transport.topics import Topics

log = logging.getLogger(__name__)
MAX_RETRY_SECONDS = 30.0


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


class BatchProcessor:
    """Synchronous part of the worker: dead letters first, then one store transaction."""

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

    def process(self, messages: Sequence[Message]) -> None:
        """Apply a batch. Failures of the store or the broker themselves (unreachable, a
        schema error) are retried with backoff until they pass: nothing is skipped. A
        failure caused by data (a value the database refuses, a bug some record meets) is
        narrowed down by halving the batch until the one event that fails alone is found;
        that event goes to the dead letters (reason `apply_failed`), the rest is applied."""
        delay = 0.5
        while True:
            try:
                self._process_once(messages)
                return
            except RecordError as error:
                self._isolate(messages, error)
                return
            except TransientError as error:  # the store or broker
                log.error("batch failed (%s), retrying in %.1fs", type(error).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            except Exception as error:  # a bug met by some data: isolate it, go on
                self._isolate(messages, error)
                return

    def _isolate(self, messages: Sequence[Message], error: Exception) -> None:
        """Halve the batch until the event that fails alone is found; dead-letter it."""
        if len(messages) == 1:
            self._poison(messages[0], error)
            return
        middle = len(messages) // 2
        self.process(messages[:middle])
        self.process(messages[middle:])

    def _poison(self, message: Message, error: Exception) -> None:
        """An event the store cannot apply: dead-letter it and move past it."""
        log.error("event at %s:%d:%d cannot be applied (%s): dead-lettered", message.topic,
                  message.partition, message.offset, type(error).__name__)  # fmt: skip
        letter = DeadLetter(
            message, Reason.APPLY_FAILED, f"the store refused it: {type(error).__name__}"
        )
        self._dead_letter([letter])
        self.reconciler.apply([], [message])
        record_dead_letters([letter])

    def _process_once(self, messages: Sequence[Message]) -> None:
        fresh = self.reconciler.unapplied(messages)
        valid, dead = classify(fresh, self.registry)
        if dead:
            self._dead_letter(dead)
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

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        """Publish and wait for acks before the offsets that skip them are committed."""
        for letter in dead:
            message = letter.message
            headers = dead_letter_headers(
                letter.code,
                letter.reason,
                message.topic,
                message.partition,
                message.offset,
                attempt=message.attempt,
            )
            self.publisher.send_dead_letter(message.key, message.value, headers)
            log.warning(
                "dead letter %s:%d:%d (%s)",
                message.topic,
                message.partition,
                message.offset,
                letter.code,
            )
        self.publisher.flush()

    def close(self) -> None:
        self.publisher.close()


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
    note = ""
    if registry.development_mode:
        note = "development mode: no source registry, every source accepted, equal rank"
        log.warning(note)
    processor = BatchProcessor(config, store, registry, authority)
    # Sources no longer registered lose their freshness series (development mode keeps all).
    known = read_freshness(store)
    FRESHNESS.seed({source: f for source, f in known.items() if registry.accepts(source)})
    app = _build_app(config, store)
    if config.metrics_port:
        liveness = app.liveness
        serve(
            config.metrics_port,
            config.metrics_host,
            liveness.healthy,
            liveness.ready,
            ready_note=note,
        )
    topic_names = config.topics.change_topics()
    targets = admin.end_offsets(config.connection, topic_names) if until_caught_up else {}
    state: dict[str, Any] = {"stopping": False, "stop_task": None}

    def caught_up() -> bool:
        stored = store.all_offsets()
        return all(stored.get(tp, 0) >= end for tp, end in targets.items())

    def maybe_stop() -> None:
        if until_caught_up and not state["stopping"] and caught_up():
            state["stopping"] = True
            state["stop_task"] = asyncio.ensure_future(worker.stop())

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
            messages = [_message(event) for event in events]
            await asyncio.to_thread(processor.process, messages)
            maybe_stop()

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def check_caught_up() -> None:
        app.liveness.beat()
        maybe_stop()

    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.spinner = None
    code: Any = 1
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        processor.close()
        store.close()
    return 0 if code in (0, None) else int(code)


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
