"""Publishing events to Kafka with kafka-python: acks=all, idempotent, keyed per record.

`flush()` returns only when the broker has acknowledged every message sent before it, and
raises if any failed: callers checkpoint their source cursor only after it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka import KafkaProducer

from portal_sync.settings import Settings
from portal_sync.topics import change_topic, dead_letter_topic
from schemas import CHANGE_EVENT, ChangeEvent, message_key
from schemas.validation import MAX_EVENT_BYTES


class PublishError(RuntimeError):
    """The broker did not acknowledge a message; nothing after it may be checkpointed."""


def encode_event(event: ChangeEvent) -> bytes:
    """The wire form of an event; unset payload fields stay absent."""
    return CHANGE_EVENT.dump_json(event, exclude_unset=True)


class Publisher:
    def __init__(self, settings: Settings, client_id: str = "portal-sync-producer") -> None:
        self.settings = settings
        self._producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap(),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            batch_size=256 * 1024,
            max_request_size=2 * MAX_EVENT_BYTES,
            request_timeout_ms=30_000,
        )
        self._pending: list[Any] = []

    def send_event(self, event: ChangeEvent) -> None:
        self.send(
            change_topic(self.settings, event.entity),
            message_key(event.entity, event.key),
            encode_event(event),
        )

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        future = self._producer.send(topic, key=key, value=value, headers=list(headers))
        self._pending.append(future)

    def send_dead_letter(
        self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        self.send(dead_letter_topic(self.settings), key, value, headers)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for the broker's acknowledgement of everything sent; return how many."""
        self._producer.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.get(timeout=0)
            except Exception as error:
                raise PublishError(f"broker did not acknowledge a message: {error!r}") from error
        return len(pending)

    def close(self) -> None:
        self._producer.close(timeout=30)
