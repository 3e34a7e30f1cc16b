"""Turning raw Kafka message bytes into a valid event, or a dead-letter reason.

Reasons carry a stable code and a message that names the offending field and rule but
never echoes the value: dead-letter reasons end up in logs and dashboards.
"""

from __future__ import annotations

import json
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from schemas.errors import RecordError
from schemas.events import CHANGE_EVENT, ENTITIES, ChangeEvent, nfc
from schemas.identifiers import (
    current_province_codes,
    personal_id_warnings,
    tax_code_warnings,
)

MAX_EVENT_BYTES = 1_048_576
EVENT_ID_NAMESPACE = uuid.UUID("8d0f6a52-0e5e-5b8c-9a53-06d1a0c0de06")


class InvalidEvent(RecordError):
    """An event that breaks the contract: it goes to the dead-letter topic."""


@dataclass(frozen=True)
class ValidEvent:
    event: ChangeEvent
    warnings: list[str] = field(default_factory=list)


def derive_event_id(source: str, entity: str, key: str, version: int) -> uuid.UUID:
    """The id our producers give a change: the same change sent again keeps its id."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{source}\x1f{entity}\x1f{key}\x1f{version}")


def message_key(entity: str, key: str) -> bytes:
    """Kafka message key: every event of one record lands in one partition, in order."""
    return f"{entity}:{key}".encode()


def parse_event(raw: bytes | None) -> ValidEvent:
    """Validate one message value; raise InvalidEvent with a stable reason code."""
    if raw is None:
        raise InvalidEvent("empty_message", "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"message has {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    obj = _decode_json(raw)
    if not isinstance(obj, dict):
        raise InvalidEvent("invalid_json", "message is not a JSON object")
    version = obj.get("schema_version")
    if type(version) is not int or version != 1:  # JSON true and 1.0 equal 1 in Python
        raise InvalidEvent("unsupported_schema_version", "schema_version must be 1")
    if b"\\u" not in raw and unicodedata.is_normalized("NFC", raw.decode("utf-8")):
        normalised: str | bytes = raw  # already NFC, no escapes: validate the bytes as sent
    else:
        normalised = json.dumps(nfc(obj), ensure_ascii=False)
    try:
        event = CHANGE_EVENT.validate_json(normalised, strict=True)
    except ValidationError as error:
        raise _reason(error) from None
    return ValidEvent(event, soft_warnings(event))


def _decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("not_utf8", "message is not valid UTF-8") from None
    try:
        return _DECODER.decode(text)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidEvent(
            "invalid_json", f"message is not JSON ({type(error).__name__})"
        ) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise InvalidEvent("invalid_json", "duplicate key in a JSON object")
        result[name] = value
    return result


def _no_nan(constant: str) -> Any:
    raise InvalidEvent("invalid_json", "non-standard JSON constant (NaN or Infinity)")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_nan)


def _reason(error: ValidationError) -> InvalidEvent:
    """The first validation error as a reason: field path and rule, never the value."""
    first = error.errors(include_input=False, include_url=False)[0]
    kind = first["type"]
    if kind == "union_tag_not_found":
        return InvalidEvent("missing_field", "entity: Field required")
    if kind == "union_tag_invalid":
        return InvalidEvent("unknown_entity", "entity: not one of " + ", ".join(ENTITIES))
    location = ".".join(str(part) for part in first["loc"][1:]) or "event"
    # Messages of these kinds quote part of the input; replace them with the rule alone.
    message = "Input should be a valid UUID" if kind.startswith("uuid") else first["msg"]
    if kind == "extra_forbidden":
        code = "unknown_field"
    elif kind == "missing":
        code = "missing_field"
    elif location == "key":
        code = "invalid_key"
    elif "carry data" in message or "carries no data" in message:
        code = "op_data_mismatch"
    else:
        code = "invalid_field"
    return InvalidEvent(code, f"{location}: {message}")


def soft_warnings(event: ChangeEvent) -> list[str]:
    """Checks that only warn: unverified identifier structure, retired province codes."""
    warnings: list[str] = []
    fields: dict[str, Any] = {} if event.data is None else vars(event.data)
    if event.entity == "citizen":
        dob = fields.get("date_of_birth")
        sex = fields.get("sex")
        warnings += personal_id_warnings(event.key, dob, sex)
    elif event.entity == "organization":
        warnings += tax_code_warnings(event.key)
    address = fields.get("permanent_address") or fields.get("address")
    code = None if address is None else vars(address).get("province_code")
    if code is not None and code not in current_province_codes():
        warnings.append("province_code_not_current")
    return warnings
