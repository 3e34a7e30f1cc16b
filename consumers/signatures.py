"""Verifying signed events (pure: no I/O).

The worker checks a message's signature before it parses the value: the headers `ps.sig`
(base64 of the Ed25519 signature of the exact value bytes) and `ps.kid` (the key's id in
the source registry, `schemas.signing`). A key counts only inside its validity
(`not_before` inclusive, `not_after` exclusive), compared with the time the message was
first sent: its Kafka timestamp, or for a re-driven dead letter the original message's
(`ps.origin.timestamp`), never later than now. A replay, years later, or a redrive after a
key rotation therefore gets the live worker's verdict. That header is not signed: whoever
may write a change topic can date a message back into a retired key's validity, so a key
whose private half may have leaked is removed from the registry, never just retired
(docs/operations.md, "Signing keys and their rotation").

Once the value is parsed, the key must be one of the event's own source
(`check_signer`): a province cannot sign for another; and a source that has keys in the
registry must sign, even where the registry does not require signatures of all.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.dead_letter import Reason, origin_timestamp_ms
from schemas.errors import RecordError
from schemas.signing import KEY_ID_HEADER, SIGNATURE_BYTES, SIGNATURE_HEADER

Headers = Sequence[tuple[str, bytes]]


class SignatureError(RecordError):
    """A message refused for its signature: `unsigned` or `bad_signature`."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key of the registry: whose it is and when it may sign."""

    key_id: str
    source: str
    public_key: Ed25519PublicKey
    not_before_ms: int | None = None
    not_after_ms: int | None = None

    def valid_at(self, moment_ms: int) -> bool:
        if self.not_before_ms is not None and moment_ms < self.not_before_ms:
            return False
        return self.not_after_ms is None or moment_ms < self.not_after_ms


def signed_at_ms(
    headers: Headers, timestamp_ms: int | None, now_ms: int, appended: bool = False
) -> int:
    """When the message was first sent, as far as the broker's records tell: the original
    timestamp of a re-driven dead letter, else the message's own.

    On a topic that stamps its messages with the broker's time (`appended`: LogAppendTime,
    as the project creates its change topics), never after the message's own: the same
    answer on every read, live or replayed years later. Else (a producer's CreateTime,
    which any clock can set) never after now: a replay may then judge otherwise."""
    sent = origin_timestamp_ms(headers)
    if appended and timestamp_ms is not None:
        return timestamp_ms if sent is None else min(sent, timestamp_ms)
    if sent is None:
        sent = timestamp_ms
    return now_ms if sent is None else min(sent, now_ms)


def _only(headers: Headers, name: str) -> bytes | None:
    """The one value of a header; two of them are a forgery attempt, never a choice."""
    values = [value for header, value in headers if header == name]
    if len(values) > 1:
        raise SignatureError(Reason.BAD_SIGNATURE, f"more than one {name} header")
    return values[0] if values else None


def verify(
    value: bytes | None,
    headers: Headers,
    keys: Mapping[str, TrustedKey],
    at_ms: int,
    required: bool,
) -> TrustedKey | None:
    """The registry key that signed `value` (None: unsigned, and signatures are not
    required). Raise `SignatureError` for a missing (when required) or bad signature."""
    signature_b64 = _only(headers, SIGNATURE_HEADER)
    key_id_bytes = _only(headers, KEY_ID_HEADER)
    if signature_b64 is None and key_id_bytes is None:
        if required:
            raise SignatureError(Reason.UNSIGNED, "no signature (ps.sig, ps.kid): required")
        return None
    if signature_b64 is None or key_id_bytes is None:
        raise SignatureError(Reason.BAD_SIGNATURE, "ps.sig and ps.kid go together")
    try:
        key_id = key_id_bytes.decode("ascii")
        signature = base64.b64decode(signature_b64, validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        raise SignatureError(Reason.BAD_SIGNATURE, "ps.sig or ps.kid is malformed") from None
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(Reason.BAD_SIGNATURE, "ps.sig is not an Ed25519 signature")
    key = keys.get(key_id)
    if key is None:
        raise SignatureError(Reason.BAD_SIGNATURE, "the signing key (ps.kid) is not registered")
    if not key.valid_at(at_ms):
        raise SignatureError(
            Reason.BAD_SIGNATURE,
            "the signing key was not valid when the message was sent (not_before/not_after)",
        )
    try:
        key.public_key.verify(signature, value or b"")
    except InvalidSignature:
        raise SignatureError(
            Reason.BAD_SIGNATURE, "the signature does not verify with its key"
        ) from None
    return key


def check_signer(key: TrustedKey | None, source: str, has_keys: bool = False) -> None:
    """A verified key must be one of the event's own source; and a source that has keys in
    the registry signs every event, even where the registry does not require signatures
    of every source (else anyone who can write a change topic writes in its name)."""
    if key is None:
        if has_keys:
            raise SignatureError(
                Reason.UNSIGNED, "no signature (ps.sig, ps.kid): the source has signing keys"
            )
        return
    if key.source != source:
        raise SignatureError(
            Reason.BAD_SIGNATURE, "the signing key belongs to another source than the event's"
        )
