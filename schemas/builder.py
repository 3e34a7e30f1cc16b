"""The one way to build a contract-v1 event: producers, tests and benches all call it.

The event id is derived here (UUIDv5 of source, entity, key and version), so the same
change sent twice keeps its id. The result is a JSON-ready dict; `parse_event` validates it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import orjson

from schemas.events import SCHEMA_VERSION
from schemas.validation import derive_event_id_text

Op = Literal["upsert", "delete"]


def build_event(
    source: str,
    entity: str,
    key: str,
    version: int,
    occurred_at: datetime | str,
    data: Mapping[str, Any] | None = None,
    op: Op | None = None,
) -> dict[str, Any]:
    """A contract event; `data=None` with no `op` is a delete, otherwise an upsert."""
    op = op or ("delete" if data is None else "upsert")
    event: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": derive_event_id_text(source, entity, key, version),
        "source": source,
        "entity": entity,
        "key": key,
        "op": op,
        "version": version,
        "occurred_at": occurred_at if isinstance(occurred_at, str) else occurred_at.isoformat(),
    }
    if data is not None:
        event["data"] = dict(data)
    return event


def event_bytes(event: Mapping[str, Any]) -> bytes:
    """A built event as a message value: compact UTF-8 JSON, the form `parse_event` reads
    fastest (its own encoder writes it back byte for byte).

    orjson, 0.2 µs against 4 for `json` (an eighth of a SQL source's publishing thread).
    What orjson would write otherwise than `json`, or refuses, is written by `json` as
    before: a float that is NaN or infinite (orjson writes null; `json` writes NaN, which
    `parse_event` then refuses as `invalid_json`), an integer beyond 64 bits, a key that
    is not text, a date or time object (`json` raises). A lone surrogate (no UTF-8 has
    one) is written as it is, so that `parse_event` refuses the bytes as `not_utf8` and the
    record goes to the dead letters instead of stopping its source."""
    try:
        raw = orjson.dumps(
            event, option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
        )
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        raw = None
    if raw is None or (b"null" in raw and has_non_finite_float(event)):
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "surrogatepass")
    return raw


def has_non_finite_float(value: Any) -> bool:
    """Whether a JSON-like value holds a NaN or an infinity (orjson writes them as null)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(has_non_finite_float(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(has_non_finite_float(item) for item in value)
    return False
