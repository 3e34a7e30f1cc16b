"""Publishing to Kafka with kafka-python: acks=all, idempotent, keyed per record.

`flush()` returns only when the broker has acknowledged every message sent before it, and
raises if any failed: callers checkpoint their source cursor (or commit the offsets that
skip a dead letter) only after it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner import Partitioner

from schemas import CHANGE_EVENT, ChangeEvent, message_key, partition_for
from schemas.errors import TransientError
from schemas.signing import Signer
from transport import clients
from transport.config import KafkaConnection
from transport.topics import CHANGE_MAX_MESSAGE_BYTES, DEAD_LETTER_MAX_MESSAGE_BYTES, Topics

log = logging.getLogger(__name__)


class PublishError(TransientError):
    """The broker did not acknowledge a message; nothing after it may be checkpointed."""


def encode_event(event: ChangeEvent) -> bytes:
    """The wire form of an event; unset payload fields stay absent."""
    return CHANGE_EVENT.dump_json(event, exclude_unset=True)


def _flush_until(
    producer: Any, deadline: float, stop: threading.Event | None, grace: float = 0.0
) -> None:
    """`producer.flush` by the deadline; with `stop`, in slices of a second, the deadline
    brought to `grace` seconds after it is set (kafka-python waits in the call, where a
    signal is not seen)."""
    stopping = False
    while True:
        now = time.monotonic()
        if stop is not None and not stopping and stop.is_set():
            stopping, deadline = True, min(deadline, now + grace)
        remaining = max(0.0, deadline - now)
        if stop is None:
            producer.flush(timeout=remaining)
            return
        try:
            producer.flush(timeout=min(1.0, remaining))
            return
        except KafkaTimeoutError:
            if remaining <= 1.0 or (stop.is_set() and grace <= 0.0):
                raise


class RecordPartitioner(Partitioner):  # type: ignore[misc]
    """Places a message by the record part of its key (`<entity>:<key>` of
    `<entity>:<key>:<source>`): every source's events of one record share a partition."""

    def partition(
        self, topic: str, key: Any, serialized_key: bytes | None, value: Any,
        serialized_value: bytes | None, cluster: Any,
    ) -> int:  # fmt: skip
        # Every partition of the topic, whether its leader is up or not: Kafka numbers
        # them 0 to n-1, so the n-th of them in order is partition n.
        count = len(cluster.partitions_for_topic(topic) or ())
        if not count:
            raise ValueError(f"topic {topic} not found in the cluster's metadata")
        if serialized_key is None:
            return 0
        return partition_for(serialized_key, count)


# A dead letter as a caller keeps it: key, value, headers.
Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


# Sends acknowledged are let go once this many are pending (and twice as many as were
# still unacknowledged the time before).
PRUNE_PENDING = 10_000


class Publisher:
    def __init__(
        self,
        connection: KafkaConnection,
        topics: Topics,
        client_id: str = "portal-sync-producer",
        max_request_size: int = CHANGE_MAX_MESSAGE_BYTES,
        keep_refused_letters: bool = False,
    ) -> None:
        """`keep_refused_letters`: dead letters the cluster refuses to write (a source's
        principal, on a secured cluster) are handed back by `take_refused_letters` after
        the flush instead of failing it; the next ones are refused at once. They go through
        a producer of their own without idempotence: an idempotent producer takes a topic's
        refused write as fatal and fails every later send, the events' too."""
        self.topics = topics
        self.keep_refused_letters = keep_refused_letters
        self.connection = connection
        self._client_id = client_id
        self._options: dict[str, Any] = {
            "acks": "all",
            "partitioner": RecordPartitioner(),
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            "max_request_size": max_request_size,
            # A first snapshot of ten million events, three replicas, kept 30 days: lz4
            # writes this project's events in about a quarter of the bytes (50,000 citizen
            # events of the SQL bench: 4.7 MB against 18.5), at no cost seen in its rate;
            # every reader of ours reads it (transport/guard.py inflates it once).
            "compression_type": "lz4",
            "request_timeout_ms": 30_000,
            # A missing topic or an unreachable cluster fails a send after 10 s (instead
            # of 60) so that callers retry, and show that they do, sooner.
            "max_block_ms": 10_000,
        }
        self._producer = self._new_producer()
        self._letter_producer: Any = None  # with keep_refused_letters, on the first letter
        self._pending: list[Any] = []
        self._acknowledged = 0  # of the sends since the last flush, no longer in _pending
        self._prune_at = PRUNE_PENDING
        self._dead_letters_writable = False
        self._letters: list[tuple[Any, Letter]] = []  # in flight, when kept if refused
        self._letters_prune_at = PRUNE_PENDING
        self._refused_letters: list[Letter] = []
        self._letters_refused: Exception | None = None  # what the cluster said

    def _new_producer(self) -> Any:
        return clients.producer(
            self.connection, self._client_id, enable_idempotence=True, **self._options
        )

    def _renew_if_broken(self, error: BaseException | None) -> None:
        """After a failed flush: an idempotent producer that met an error the broker says
        not to retry (a message larger than the topic takes, a write its ACLs refuse, a
        record it calls invalid) fails every later send, of every topic, until it is
        closed; it is replaced. (Unreplaced, the source stayed stuck after the topic was
        fixed, until the process restarted.)"""
        manager = getattr(self._producer, "_transaction_manager", None)
        fatal = manager is not None and manager.has_fatal_error()
        if fatal or (error is not None and not getattr(error, "retriable", True)):
            broken, self._producer = self._producer, self._new_producer()
            try:  # its unacknowledged sends are the caller's to send again
                broken.close(timeout=0)
            except KafkaError:  # its flush could not end at once: its sender stopped by force
                sender = getattr(broken, "_sender", None)
                if sender is not None:
                    sender.force_close()

    @classmethod
    def for_dead_letters(
        cls, connection: KafkaConnection, topics: Topics, client_id: str
    ) -> Publisher:
        """A publisher whose requests fit anything the dead-letter topic accepts."""
        return cls(connection, topics, client_id, max_request_size=DEAD_LETTER_MAX_MESSAGE_BYTES)

    def send_event(
        self, event: ChangeEvent, signer: Signer | None = None, value: bytes | None = None
    ) -> None:
        """Send an event to its change topic; with a `signer`, signed (`ps.sig`, `ps.kid`
        over the exact value bytes sent). `value`: the event's bytes as they were validated
        (`parse_event(value)` gave `event`, validated as sent), sent instead of dumping the
        model again."""
        value = encode_event(event) if value is None else value
        headers = signer.headers(value) if signer is not None else ()
        self.send(
            self.topics.change_topic(event.entity),
            message_key(event.entity, event.key, event.source),
            value,
            headers,
        )

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        producer: Any = None,
    ) -> Any:
        """Send one record; its future (acknowledged at the next `flush`)."""
        client = self._producer if producer is None else producer
        try:
            future = client.send(topic, key=key, value=value, headers=list(headers))
        except KafkaError as error:
            self._refuse_unauthorized(error, topic)
            raise PublishError(f"the producer refused a message: {type(error).__name__}") from None
        self._pending.append(future)
        if len(self._pending) >= self._prune_at:
            # A file of a million rows has one checkpoint, at its end: its futures held
            # 160 MB until the flush. Those acknowledged are let go (the failed kept for it).
            kept = [f for f in self._pending if not f.is_done or f.failed()]
            self._acknowledged += len(self._pending) - len(kept)
            self._pending = kept
            self._prune_at = max(PRUNE_PENDING, 2 * len(kept))
        return future

    def send_dead_letter(
        self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        """Raises Refused at once (not at the flush) when the principal may not write the
        dead letters, as a source on a secured cluster: when it may not even see the
        topic's metadata, or (`keep_refused_letters`) once a write of one was refused."""
        if self._letters_refused is not None:
            raise self._letters_refused
        if key is None and value is None:  # a record needs one (a batch's letter has neither)
            value = b""
        if not self._dead_letters_writable:
            self._check_writable(self.topics.dead_letters)
            self._dead_letters_writable = True
        if not self.keep_refused_letters:
            self.send(self.topics.dead_letters, key, value, headers)
            return
        if self._letter_producer is None:
            self._letter_producer = clients.producer(
                self.connection,
                f"{self._client_id}-dead-letters",
                enable_idempotence=False,  # kafka-python's default is True
                # without idempotence a retried request could land after later letters
                max_in_flight_requests_per_connection=1,
                **self._options,
            )
        future = self.send(self.topics.dead_letters, key, value, headers, self._letter_producer)
        self._letters.append((future, (key, value, list(headers))))
        if len(self._letters) >= self._letters_prune_at:
            # A file whose every row is refused (a wrong value map) kept each letter until
            # the file's end: 6.6 KB a row, gigabytes for a snapshot. Those acknowledged
            # are let go; the pending and the failed are kept for the flush.
            self._letters = [
                (f, letter) for f, letter in self._letters if not f.is_done or f.failed()
            ]
            self._letters_prune_at = max(PRUNE_PENDING, 2 * len(self._letters))

    def take_refused_letters(
        self,
    ) -> list[Letter]:
        """The dead letters the cluster refused to write since the last call (with
        `keep_refused_letters`): the caller keeps them elsewhere."""
        refused, self._refused_letters = self._refused_letters, []
        return refused

    def _set_aside_refused_letters(self) -> None:
        """After the producer's flush: the dead letters refused for the principal's rights
        leave the pending sends, kept for `take_refused_letters`."""
        letters, self._letters = self._letters, []
        self._letters_prune_at = PRUNE_PENDING
        refused = set()
        for future, letter in letters:
            error = future.exception if future.is_done else None
            if error is not None and "Authorization" in type(error).__name__:
                refused.add(id(future))
                self._refused_letters.append(letter)
                if self._letters_refused is None:
                    topic = self.topics.dead_letters
                    self._letters_refused = clients.translate(
                        error, f"write to {topic}", self.connection
                    )
        if refused:
            self._pending = [f for f in self._pending if id(f) not in refused]

    def _check_writable(self, topic: str) -> None:
        if self.connection.security_protocol == "PLAINTEXT":
            return
        try:
            self._producer.partitions_for(topic)
        except KafkaError as error:  # anything but a refusal shows at the flush, as before
            self._refuse_unauthorized(error, topic)

    def flush(
        self, timeout: float = 60.0, stop: threading.Event | None = None, grace: float = 0.0
    ) -> int:
        """Wait for the broker's acknowledgement of everything sent; return how many. With
        `stop`, the wait ends within a second of `grace` seconds after it is set
        (PublishError: what was sent is then unacknowledged, as after a timeout)."""
        try:
            for producer in (self._producer, self._letter_producer):
                if producer is not None:  # each its whole timeout, as kafka-python's flush
                    _flush_until(producer, time.monotonic() + timeout, stop, grace)
        except KafkaError as error:
            self._pending, self._letters, self._refused_letters = [], [], []
            self._acknowledged, self._prune_at = 0, PRUNE_PENDING
            self._letters_prune_at = PRUNE_PENDING
            self._renew_if_broken(error)
            raise PublishError(f"flush failed: {type(error).__name__}") from None
        self._set_aside_refused_letters()
        pending, self._pending = self._pending, []
        acknowledged, self._acknowledged, self._prune_at = self._acknowledged, 0, PRUNE_PENDING
        for future in pending:
            if future.is_done and not future.failed():
                continue  # acknowledged (`get` would build a timer for each of them)
            try:
                future.get(timeout=0)
            except Exception as error:
                # The caller goes back to its last checkpoint: the records of the letters
                # set aside are rejected (and their letters kept) again.
                self._refused_letters = []
                self._renew_if_broken(error)
                self._refuse_unauthorized(error, "a topic")
                raise PublishError(
                    f"broker did not acknowledge a message: {type(error).__name__}"
                ) from None
        return acknowledged + len(pending)

    def _refuse_unauthorized(self, error: Exception, topic: str) -> None:
        """Writing where the cluster's ACLs do not allow it is refused, not retried. What
        was sent before stays pending: a caller that goes on (a source's dead letter kept
        out by the ACLs) still has its earlier sends checked at the next flush."""
        if "Authorization" in type(error).__name__:
            raise clients.translate(error, f"write to {topic}", self.connection) from None

    def close(self, timeout: float = 30.0) -> None:
        """Close the producers, waiting up to `timeout` for what they have not sent. With a
        broker away, kafka-python's close raises once its flush times out (a traceback in
        a closing thread, the process's exit held meanwhile): what it held is logged as
        unsent, sent again by the next run from its last checkpoint."""
        for producer in (self._letter_producer, self._producer):
            if producer is None:
                continue
            try:
                producer.close(timeout=timeout)
            except KafkaTimeoutError:
                log.warning(
                    "closed with messages the broker had not acknowledged within %g s: the "
                    "next run sends them again from its last checkpoint",
                    timeout,
                )
                # kafka-python's close stopped at its flush, its network thread left
                # running and a second close (its `__del__`) to fail the same way: the
                # unsent batches given up, the close then ends without waiting.
                producer._accumulator.abort_incomplete_batches()
                producer.close(timeout=0)
