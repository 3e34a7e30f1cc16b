"""The publisher's bookkeeping of sends not yet acknowledged: a flush that returns means
every send since the last one was acknowledged, whatever was refused in between."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from schemas.errors import Refused
from transport.publisher import Publisher, PublishError


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
    publisher._pending = []
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
