"""The checks of each message before it is applied: signature, contract, registry, key and
partition, clock, write scope (`classify`). Pure of the store and of the Kafka clients: the
validator processes (`consumers.validators`) import this module alone, and a spawned
interpreter's modules are its memory (SQLAlchemy and kafka-python took about 45 MB more
of it in every validator process)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from consumers.registry import Registry
from consumers.scope import scope_violation
from consumers.signatures import check_signer, signed_at_ms, verify
from schemas import ChangeEvent, RecordError, message_key, parse_event, partition_for
from schemas.dead_letter import Reason
from schemas.values import value_class
from transport.message import Message
from transport.topics import Topics


@value_class
class DeadLetter:
    message: Message
    code: str
    reason: str


@value_class
class AcceptedEvent:
    """What applying an event needs of it, as a validator process found it valid
    (`consumers.validators`): the worker gets these fields instead of validating the
    message again. `data` is the payload as `ChangeEvent.data_dict()` gives it."""

    entity: str
    key: str
    source: str
    version: int
    op: str
    occurred_at: datetime
    event_id: str
    data: dict[str, Any] | None

    def data_dict(self) -> dict[str, Any] | None:
        return self.data


@value_class
class Checked:
    message: Message
    event: ChangeEvent | AcceptedEvent
    warnings: list[str]
    data: dict[str, Any] | None = None  # the decoded payload, when it is the dump's

    def data_dict(self) -> dict[str, Any] | None:
        """The event's payload as JSON-ready dict (not to be modified)."""
        return self.data if self.data is not None else self.event.data_dict()


DEFAULT_MAX_CLOCK_SKEW_SECONDS = 300.0
KEY_OF_ANOTHER_SOURCE = "signed with a key of another source than the message key names"
UNSIGNED_UNDER_A_SIGNING_SOURCE = (
    "no signature (ps.sig, ps.kid): the message key names a source that has signing keys"
)


def classify(
    messages: Iterable[Message],
    registry: Registry | None = None,
    *,
    topics: Topics | None = None,
    now: datetime | None = None,
    max_clock_skew_seconds: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS,
) -> tuple[list[Checked], list[DeadLetter]]:
    """Split messages into contract-valid events and dead letters with their reasons.

    With a registry, the signature is verified first, before the value is parsed
    (`consumers.signatures`): when the registry requires signatures an unsigned message is
    `unsigned`; a signature that does not verify, by an unknown key or one outside its
    validity, is `bad_signature`, and so is, once parsed, an event whose source is not the
    key's. An event of an unregistered source is a dead letter too: once the source is
    registered it can be re-driven. With `topics`, a message must sit on its entity's
    change topic, keyed `<entity>:<key>:<source>` of its event, on the partition of
    `<entity>:<key>` (`key_mismatch`, schemas.partitioning): otherwise one record could
    span partitions and escape ordering and replays, or compaction could drop the latest
    event of another (source, entity, key). An `occurred_at` later than the message's
    Kafka timestamp (or `now`, if earlier or absent) plus the allowed clock skew is refused
    (`future_timestamp`): it would win recency forever. Measuring from the message's
    timestamp gives a replay, years later, the live worker's verdict. Last, an event
    outside its source's write scope is `out_of_scope` (`consumers.scope`).
    """
    registry = registry or Registry()
    verifying = not registry.development_mode
    now_ms = int((now or datetime.now(UTC)).timestamp() * 1000)
    skew_ms = int(max_clock_skew_seconds * 1000)
    valid: list[Checked] = []
    dead: list[DeadLetter] = []
    for message in messages:
        if message.unreadable is not None:  # the Kafka client could not read it
            dead.append(DeadLetter(message, *message.unreadable))
            continue
        try:
            signer = None
            signed_at: int | None = None
            if verifying:
                signed_at = signed_at_ms(
                    message.headers, message.timestamp_ms, now_ms, message.appended
                )
                signer = verify(
                    message.value,
                    message.headers,
                    registry.keys,
                    signed_at,
                    registry.require_signatures,
                )
                named = (message.key or b"").rpartition(b":")[2].decode("ascii", "replace")
                # Before the value is read: one that does not parse (null, not JSON, too
                # large) would still take that source's place in the compacted topic, and
                # its letter would not say it was forged.
                if signer is not None and named != signer.source and named in registry.sources:
                    raise RecordError(Reason.BAD_SIGNATURE, KEY_OF_ANOTHER_SOURCE)
                if signer is None and registry.signs(named):
                    raise RecordError(Reason.UNSIGNED, UNSIGNED_UNDER_A_SIGNING_SOURCE)
            checked = parse_event(message.value)
            if verifying:
                source = checked.event.source
                check_signer(signer, source, signer is None and registry.signs(source))
        except RecordError as error:
            dead.append(DeadLetter(message, error.code, error.message))
            continue
        event = checked.event
        if not registry.accepts(event.source):
            reason = (
                "source is not in the source registry"
                if not registry.development_mode
                else "a source id with nine digits in a row (a personal id, a tax code)"
            )
            dead.append(DeadLetter(message, Reason.UNREGISTERED_SOURCE, reason))
            continue
        if topics is not None and (
            message.key != message_key(event.entity, event.key, event.source)
            or message.topic != topics.change_topic(event.entity)
            or message.partition != partition_for(message.key, topics.change_partitions)
        ):
            reason = (
                "message key, topic or partition is not the event's "
                "(<entity>:<key>:<source> on its topic, partitioned by <entity>:<key>)"
            )
            dead.append(DeadLetter(message, Reason.KEY_MISMATCH, reason))
            continue
        # The time the key was judged at, when it was: a `ps.origin.timestamp` any producer
        # can set must not date the key back while the event itself is dated now.
        sent_ms = (
            signed_at
            if signed_at is not None  # else the message's own time, no origin header's
            else signed_at_ms((), message.timestamp_ms, now_ms, message.appended)
        )
        if event.occurred_at.timestamp() * 1000 > sent_ms + skew_ms:
            reason = f"occurred_at is more than {max_clock_skew_seconds:g} s in the future"
            dead.append(DeadLetter(message, Reason.FUTURE_TIMESTAMP, reason))
            continue
        out_of_scope = scope_violation(event, registry)
        if out_of_scope is not None:
            dead.append(DeadLetter(message, Reason.OUT_OF_SCOPE, out_of_scope))
            continue
        valid.append(Checked(message, event, checked.warnings, checked.data))
    return valid, dead
