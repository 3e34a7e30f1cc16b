"""One Kafka record as the project's code sees it. Apart from the rest of the transport so
that a validator process (`consumers.validators`) can take messages without importing a
Kafka client: a spawned interpreter's modules are its memory, about 45 MB for those."""

from __future__ import annotations

from schemas.values import value_class

TP = tuple[str, int]


@value_class
class Message:
    """One Kafka record."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    # The broker's time of the append (the topic's `LogAppendTime`), not the producer's.
    appended: bool = False
    # (reason code, reason) of a record the Kafka client could not read (`transport.guard`):
    # a record batch too large when decompressed, a header name that is not UTF-8.
    unreadable: tuple[str, str] | None = None

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        for header, value in self.headers:
            if header == name:
                return value
        return None

    @property
    def attempt(self) -> int:
        """1 for a first delivery; a re-driven dead letter carries its previous attempt.
        Anyone who can write a change topic can set the header: only up to 9 ASCII digits
        count (`int` would take spaces, underscores and 4,000 digits, whose text Python
        then refuses to write: the dead letter could not be built, ever)."""
        value = self.header("ps.attempt")
        if value is None or not (value.isdigit() and len(value) <= ATTEMPT_DIGITS):
            return 1  # bytes.isdigit: ASCII digits only
        return int(value) + 1


ATTEMPT_DIGITS = 9
