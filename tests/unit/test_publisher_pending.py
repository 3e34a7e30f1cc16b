"""The publisher's bookkeeping of sends not yet acknowledged: a flush that returns means
every send since the last one was acknowledged, whatever was refused in between."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from schemas.errors import Refused
from transport.publisher import PRUNE_PENDING, Publisher, PublishError


class _Delivery:
    """A send's outcome as kafka-python's future reports it once the producer flushed."""

    def __init__(self, acknowledged: bool) -> None:
        self.acknowledged = acknowledged
        self.is_done = True

    def failed(self) -> bool:
        return not self.acknowledged

    def get(self, timeout: float | None = None) -> None:
        if not self.acknowledged:
            raise KafkaTimeoutError("batch expired")


class _Producer:
    """The first send's batch expires (a broker outage); the dead-letter topic is closed
    to this principal (a source on a secured cluster)."""

    def __init__(self) -> None:
        self.sends = 0

    def send(self, topic: str, **_: Any) -> _Delivery:
        self.sends += 1
        return _Delivery(acknowledged=self.sends != 1)

    def partitions_for(self, topic: str) -> None:
        raise TopicAuthorizationFailedError({topic})

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_a_refused_dead_letter_does_not_forget_an_earlier_failed_send() -> None:
    publisher = Publisher.__new__(Publisher)
    publisher._producer = _Producer()
    publisher._pending, publisher._acknowledged, publisher._prune_at = [], 0, PRUNE_PENDING
    publisher._dead_letters_writable = False
    publisher.keep_refused_letters = True  # as a producer's
    publisher._letters, publisher._refused_letters, publisher._letters_refused = [], [], None
    publisher._letter_producer = None
    publisher.topics = SimpleNamespace(dead_letters="p.dead-letters")
    publisher.connection = SimpleNamespace(
        security_protocol="SASL_SSL", principal=lambda: "User:province-79"
    )
    publisher.send("p.changes.citizen", b"citizen:1:province-79", b"{}")  # will fail
    with pytest.raises(Refused):  # the engine logs this one and goes on
        publisher.send_dead_letter(None, b"{}", [])
    publisher.send("p.changes.citizen", b"citizen:2:province-79", b"{}")
    with pytest.raises(PublishError):  # no checkpoint may pass the first event
        publisher.flush()


class _Unacknowledged:
    """A broker that takes the sends and never acknowledges them (the partition's replicas
    away): kafka-python's flush waits out its timeout inside the call."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def flush(self, timeout: float | None = None) -> None:
        self.waits.append(timeout or 0.0)
        time.sleep(timeout or 0.0)
        raise KafkaTimeoutError("Timeout waiting for future")


def _waiting_publisher() -> Publisher:
    publisher = Publisher.__new__(Publisher)
    publisher._producer = _Unacknowledged()
    publisher._letter_producer = None
    publisher._pending, publisher._letters, publisher._refused_letters = [], [], []
    publisher._acknowledged, publisher._prune_at = 0, PRUNE_PENDING
    return publisher


def test_a_stop_ends_a_flush_within_a_second() -> None:
    """The worker waits for a batch's dead letters inside its store transaction: a SIGTERM
    went unseen for the flush's 60 s (kafka-python's timeout is per batch: longer)."""
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    with pytest.raises(PublishError):
        _waiting_publisher().flush(timeout=60.0, stop=stop)
    assert time.monotonic() - began < 1.5


def test_without_a_stop_a_flush_waits_its_whole_timeout_in_one_call() -> None:
    publisher = _waiting_publisher()
    with pytest.raises(PublishError):
        publisher.flush(timeout=0.2)
    assert publisher._producer.waits == [pytest.approx(0.2, abs=0.01)]


def test_a_stop_with_a_grace_leaves_the_broker_that_long_to_acknowledge() -> None:
    """A producer asked to stop (SIGTERM) saves its progress once the broker acknowledged
    it: with the broker away it waited its flush's whole 60 s, and its close as long again,
    past a pod's 30 s of grace. A stop now leaves the broker `grace` seconds."""
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    with pytest.raises(PublishError):
        _waiting_publisher().flush(timeout=60.0, stop=stop, grace=2.0)
    assert 2.0 <= time.monotonic() - began < 3.5


class _Closing(_Unacknowledged):
    """kafka-python's close with the broker away: its flush raises, and only a close after
    its unsent batches are given up ends."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self._accumulator = SimpleNamespace(abort_incomplete_batches=self.abort)
        self.closes: list[float] = []

    def abort(self) -> None:
        self.aborted = True

    def close(self, timeout: float) -> None:
        self.closes.append(timeout)
        if not self.aborted:
            raise KafkaTimeoutError("Timeout waiting for future")


def test_a_close_with_the_broker_away_ends_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = _waiting_publisher()
    publisher._producer = _Closing()
    publisher.close(timeout=0.1)  # raised KafkaTimeoutError in a closing thread before
    assert publisher._producer.closes == [0.1, 0]
    assert "the next run sends them again" in caplog.text
