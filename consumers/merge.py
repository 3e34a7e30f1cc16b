"""Merge rules of the national store: pure functions, no I/O.

The store's state depends only on the set of events received, never on their order or
on duplicates:

1. Per (source, entity, key) only the highest version counts; an equal or lower version
   changes nothing (counted as duplicate or stale).
2. A delete removes that source's contribution and keeps a tombstone with its version, so a
   late, older upsert cannot bring it back.
3. The canonical record merges the sources' current views field by field: each field comes
   from the source with the highest authority for that (entity, field), then the latest
   `occurred_at`, then the greatest source id. A record exists while a source contributes.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

Outcome = Literal["applied", "duplicate", "stale"]


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


@dataclass(frozen=True)
class Authority:
    """Ordered sources per (entity, field); the first named ranks highest.

    Sources a rule does not name rank equal, below every named one. A rule for field "*"
    applies to every field of the entity without a rule of its own.
    """

    rules: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def rank(self, entity: str, field_name: str, source: str) -> int:
        order = self.rules.get((entity, field_name)) or self.rules.get((entity, "*"), ())
        try:
            return len(order) - order.index(source)
        except ValueError:
            return 0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Mapping[str, Iterable[str]]]) -> Authority:
        rules = {
            (entity, field_name): tuple(sources)
            for entity, fields in raw.items()
            for field_name, sources in fields.items()
        }
        return cls(rules)

    @classmethod
    def load(cls, path: Path | None) -> Authority:
        """Read an authority TOML file (`[entity] field = ["source", ...]`); None: all equal."""
        if path is None:
            return cls()
        with path.open("rb") as handle:
            return cls.from_mapping(tomllib.load(handle))


def decide(current: SourceView | None, version: int) -> Outcome:
    """Rule 1: does an event of this version replace the source's current view?"""
    if current is None or version > current.version:
        return "applied"
    if version == current.version:
        return "duplicate"
    return "stale"


def merge(entity: str, views: Iterable[SourceView], authority: Authority) -> CanonicalRecord | None:
    """Rule 3: the canonical record from every source's current view (None: no record)."""
    live = [view for view in views if not view.deleted and view.data is not None]
    if not live:
        return None
    data: dict[str, Any] = {}
    names = sorted({name for view in live for name in view.data or {}})
    for name in names:
        candidates = [view for view in live if view.data is not None and name in view.data]
        best = max(
            candidates,
            key=lambda view: (
                authority.rank(entity, name, view.source),
                view.occurred_at,
                view.source,
            ),
        )
        assert best.data is not None
        data[name] = best.data[name]
    return CanonicalRecord(data, {view.source: view.version for view in live})
