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
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

HEADER_PREFIX = "ps."


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
    UNREGISTERED_SOURCE = "unregistered_source"
    KEY_MISMATCH = "key_mismatch"
    FUTURE_TIMESTAMP = "future_timestamp"
    APPLY_FAILED = "apply_failed"
    SKIPPED_BY_OPERATOR = "skipped_by_operator"
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
    return [(name, value.encode()) for name, value in headers.items()]


def read_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The `ps.*` headers of a dead letter as text."""
    return {
        name: value.decode("utf-8", "replace")
        for name, value in headers or []
        if name.startswith(HEADER_PREFIX)
    }
