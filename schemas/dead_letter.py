"""Dead-letter record format: the original bytes as value, the reason and origin in headers.

| header               | value                                             |
|----------------------|---------------------------------------------------|
| `ps.reason.code`     | stable code, e.g. `invalid_field`, `not_utf8`      |
| `ps.reason.message`  | field path and rule; never the offending value     |
| `ps.origin.topic`    | topic the event was read from (or `source:<id>`)   |
| `ps.origin.partition`| partition, decimal                                 |
| `ps.origin.offset`   | offset, decimal (or the source row's primary key)  |
| `ps.failed_at`       | RFC 3339 UTC                                       |
| `ps.attempt`         | 1 for the first failure, then +1 per redrive       |
| `ps.origin.timestamp`| the original message's Kafka timestamp, ms (worker)|
| `ps.sig`, `ps.kid`   | the original message's signature, kept as it was   |

A dead letter keeps what a redrive needs to be verified as the original was: its
signature headers and the time it was first sent (a key's validity is judged by it).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from schemas.signing import SIGNATURE_HEADERS

HEADER_PREFIX = "ps."
ORIGIN_TIMESTAMP_HEADER = "ps.origin.timestamp"
# What a dead letter keeps of the original message's headers (a redrive copies them back).
KEPT_HEADERS = (*SIGNATURE_HEADERS, ORIGIN_TIMESTAMP_HEADER)


class Reason(StrEnum):
    """Every reason code a dead letter can carry: the contract's hard checks, then the
    worker's, the operators', the adapters'. The values are a public contract (alerts,
    runbooks)."""

    NOT_UTF8 = "not_utf8"
    INVALID_JSON = "invalid_json"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    MISSING_FIELD = "missing_field"
    UNKNOWN_ENTITY = "unknown_entity"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_KEY = "invalid_key"
    INVALID_FIELD = "invalid_field"
    OP_DATA_MISMATCH = "op_data_mismatch"
    TOO_LARGE = "too_large"
    EMPTY_MESSAGE = "empty_message"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    UNREGISTERED_SOURCE = "unregistered_source"
    KEY_MISMATCH = "key_mismatch"
    FUTURE_TIMESTAMP = "future_timestamp"
    OUT_OF_SCOPE = "out_of_scope"
    APPLY_FAILED = "apply_failed"
    SKIPPED_BY_OPERATOR = "skipped_by_operator"
    # a record batch the Kafka clients could not read (transport.guard): no value
    UNREADABLE_BATCH = "unreadable_batch"
    # the producers' adapters
    UNREADABLE_FILE = "unreadable_file"
    UNMAPPABLE_RECORD = "unmappable_record"


DEAD_LETTER_REASONS = tuple(reason.value for reason in Reason)


def dead_letter_headers(
    code: str,
    message: str,
    origin_topic: str,
    origin_partition: int | str,
    origin_offset: int | str,
    attempt: int = 1,
) -> list[tuple[str, bytes]]:
    headers = {
        "ps.reason.code": code,
        "ps.reason.message": message,
        "ps.origin.topic": origin_topic,
        "ps.origin.partition": str(origin_partition),
        "ps.origin.offset": str(origin_offset),
        "ps.failed_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "ps.attempt": str(attempt),
    }
    # an origin with a lone surrogate (a file name read with `surrogateescape`) is
    # written escaped rather than stopping its source
    return [(name, value.encode("utf-8", "backslashreplace")) for name, value in headers.items()]


def origin_timestamp_ms(headers: Iterable[tuple[str, bytes]]) -> int | None:
    """`ps.origin.timestamp` of a re-driven dead letter, when it holds a time in ms."""
    for name, value in headers:
        if name == ORIGIN_TIMESTAMP_HEADER:
            text = (value or b"").decode("ascii", "replace")
            return int(text) if text.isascii() and text.isdigit() and len(text) <= 15 else None
    return None


def kept_headers(
    headers: Iterable[tuple[str, bytes]], timestamp_ms: int | None
) -> list[tuple[str, bytes]]:
    """The headers a dead letter keeps of its original message: `ps.sig`, `ps.kid` as they
    were, and `ps.origin.timestamp` (a re-driven message's original one, else its own)."""
    headers = list(headers)
    kept = [(name, value) for name, value in headers if name in SIGNATURE_HEADERS]
    sent = origin_timestamp_ms(headers)
    if sent is None:
        sent = timestamp_ms
    if sent is not None:
        kept.append((ORIGIN_TIMESTAMP_HEADER, str(sent).encode()))
    return kept


# What a dead letter keeps of a message's key and copied headers. A contract key is under 200
# bytes and a signature header under 100: a part beyond these bounds is hostile or broken,
# and goes as its size and SHA-256 (never its content), as a too-large value does, so that
# any message's letter fits the dead-letter topic. A letter the producer refused for its
# size was retried for ever, and with it every partition of the worker's batches.
LETTER_KEY_LIMIT = 1024
LETTER_HEADER_LIMIT = 1024
LETTER_KEPT_HEADERS = 8
# Room beside the value for the letter's own headers and the record's framing.
LETTER_OVERHEAD = 64 * 1024
Origin = tuple[str, int, int]  # topic, partition, offset
# A producer's letter names its record's place in the source as text (`file.csv:12`).
SourceOrigin = str


def fit_letter(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    kept: list[tuple[str, bytes]],
    origin: Origin | SourceOrigin,
    max_bytes: int,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The dead letter of a message (or of a producer's source record): its key, value and
    `kept` headers (`kept_headers`) after the letter's own `headers`, within `max_bytes`
    (the dead-letter topic's limit, or a producer's request)."""
    out = list(headers)
    fits = [(n, v) for n, v in kept if _size(n, v) <= LETTER_HEADER_LIMIT]
    # The original's time is kept whatever comes before it (many signature headers).
    timed = any(n == ORIGIN_TIMESTAMP_HEADER for n, _ in fits)
    others = LETTER_KEPT_HEADERS - timed
    copied = []
    for header in fits:
        if header[0] == ORIGIN_TIMESTAMP_HEADER and timed:
            copied.append(header)
            timed = False
        elif header[0] != ORIGIN_TIMESTAMP_HEADER and others > 0:
            copied.append(header)
            others -= 1
    omitted = len(kept) - len(copied)
    out += copied
    if omitted:
        out.append(("ps.headers.omitted", str(omitted).encode()))
    if key is not None and len(key) > LETTER_KEY_LIMIT:
        out += [("ps.key.sha256", hashlib.sha256(key).hexdigest().encode()),
                ("ps.key.size", str(len(key)).encode())]  # fmt: skip
        key = None
    room = max_bytes - LETTER_OVERHEAD - len(key or b"") - sum(_size(n, v) for n, v in out)
    if value is not None and len(value) > room:
        value, digest = value_reference(value, origin)
        out.append(("ps.value.sha256", digest.encode()))
    return key, value, out


def _size(name: str, value: bytes) -> int:
    return len(name.encode("utf-8", "surrogateescape")) + len(value)


def value_reference(value: bytes, origin: Origin | SourceOrigin) -> tuple[bytes, str]:
    """A too-large value as a reference: its size, SHA-256 and origin (never its content),
    and the digest."""
    digest = hashlib.sha256(value).hexdigest()
    where: str | dict[str, str | int] = origin if isinstance(origin, str) else {}
    if not isinstance(origin, str):
        topic, partition, offset = origin
        where = {"topic": topic, "partition": partition, "offset": offset}
    reference = {
        "value_omitted": "too_large",
        "size": len(value),
        "sha256": digest,
        "origin": where,
    }
    return json.dumps(reference).encode(), digest


def read_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The `ps.*` headers of a dead letter as text."""
    return {
        name: value.decode("utf-8", "replace")
        for name, value in headers or []
        if name.startswith(HEADER_PREFIX)
    }


def letter_line(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]
) -> dict[str, Any]:
    """A dead letter as one line of a file (base64 bytes): what a producer keeps when its
    cluster does not let it write the dead letters, for `portal-sync dlq import`."""

    def text(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode()

    return {"key": text(key), "value": text(value),
            "headers": [[name, text(raw)] for name, raw in headers]}  # fmt: skip


def letter_from_line(
    line: Mapping[str, Any],
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """`letter_line` read back; ValueError (or KeyError, TypeError) on anything else."""

    def raw(text: Any) -> bytes | None:
        return None if text is None else base64.b64decode(str(text), validate=True)

    headers = [(str(name), raw(value) or b"") for name, value in line["headers"]]
    return raw(line["key"]), raw(line["value"]), headers
