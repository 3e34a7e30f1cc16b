"""What the store keeps of the contract's events: each source's view of a record, and the
canonical record merged from them. Plain values, shared by the merge rules and the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

RecordKey = tuple[str, str]  # (entity, key)


@dataclass(frozen=True)
class SourceView:
    """One source's current view of one record, or its tombstone."""

    source: str
    version: int
    event_id: str
    occurred_at: datetime
    deleted: bool
    data: Mapping[str, Any] | None


@dataclass(frozen=True)
class CanonicalRecord:
    data: dict[str, Any]
    sources: dict[str, int]  # contributing source -> version of its current view
    provenance: dict[str, dict[str, Any]]  # field -> {"source": id, "version": n}
