"""What the store keeps of the contract's events: each source's view of a record, and the
canonical record merged from them. Plain values, shared by the merge rules and the store."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from schemas.values import value_class

RecordKey = tuple[str, str]  # (entity, key)


@value_class
class SourceView:
    """One source's current view of one record, or its tombstone."""

    source: str
    version: int
    event_id: str
    occurred_at: datetime
    deleted: bool
    data: Mapping[str, Any] | None


@value_class
class CanonicalRecord:
    data: dict[str, Any]
    sources: dict[str, int]  # contributing source -> version of its current view
    # Provenance as the store keeps it: contributing source -> the fields it gave, sorted.
    # A field's version is its source's in `sources`, so it is not kept twice.
    origins: dict[str, list[str]]

    @property
    def provenance(self) -> dict[str, dict[str, Any]]:
        """field -> {"source": id, "version": n}, sorted by field."""
        return expand_provenance(self.origins, self.sources)


def expand_provenance(
    origins: Mapping[str, Any], sources: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """The stored provenance (source -> fields) as readers see it: field -> {"source",
    "version"}, sorted by field. A value already in that form (a store written before
    provenance was compacted, read mid-upgrade) is returned as it is."""
    if per_field(origins):
        return dict(sorted(origins.items()))
    return {
        name: {"source": source, "version": sources.get(source)}
        for name, source in sorted(
            (name, source) for source, fields in origins.items() for name in fields
        )
    }


def per_field(provenance: Mapping[str, Any]) -> bool:
    """Whether stored provenance is in the older form, field -> {"source", "version"}."""
    return any(isinstance(origin, Mapping) for origin in provenance.values())


def compact_provenance(provenance: Mapping[str, Any]) -> dict[str, list[str]]:
    """The reverse of `expand_provenance`: field -> {"source", ...} as source -> fields. A
    value already in that form is returned as it is."""
    if not per_field(provenance):
        return dict(provenance)
    origins: dict[str, list[str]] = {}
    for name in sorted(provenance):
        origins.setdefault(provenance[name]["source"], []).append(name)
    return dict(sorted(origins.items()))
