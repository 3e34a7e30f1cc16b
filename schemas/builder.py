"""The one way to build a contract-v1 event: producers, tests and benches all call it.

The event id is derived here (UUIDv5 of source, entity, key and version), so the same
change sent twice keeps its id. The result is a JSON-ready dict; `parse_event` validates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from schemas.events import SCHEMA_VERSION
from schemas.validation import derive_event_id

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
        "event_id": str(derive_event_id(source, entity, key, version)),
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
