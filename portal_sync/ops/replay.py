"""`portal-sync replay` and `rebuild`: re-apply what the change topics retain.

A replay reads a range with its own consumer (transport.reader) and re-applies it
through the reconciler's own code path with `replay=True`: the version rule makes it
idempotent and the live worker's offsets are left alone. A dry run does the same work in
transactions that are rolled back, so its report is what the real run would do.
Invalid events are counted, not dead-lettered again: the live worker already did that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from consumers.config import load_rules
from consumers.reconciler import Reconciler, classify
from portal_sync.settings import Settings
from store import HistoryEntry, Store
from transport.reader import RangeReader, Selection

SAMPLE_SIZE = 20


@dataclass
class ReplaySummary:
    read: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # applied, unchanged, stale, ...
    by_entity: Counter[tuple[str, str]] = field(default_factory=Counter)  # (entity, outcome)
    changed_records: Counter[str] = field(default_factory=Counter)  # entity -> records changed
    sample: list[dict[str, Any]] = field(default_factory=list)  # field-level differences
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


OUTCOME_NAMES = {"applied": "applied", "duplicate": "unchanged", "stale": "stale"}


def replay(
    settings: Settings,
    selection: Selection,
    store: Store,
    source: str | None = None,
    entity: str | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    track_offsets: bool = False,
) -> ReplaySummary:
    """Re-apply the selected records; `on_progress(done, total)` after each batch.

    `track_offsets` (for a rebuild into a fresh store) records the offsets as the live
    worker would, so that the rebuilt store can take over from where the rebuild ended.
    """
    import time

    registry, authority = load_rules(settings.registry, settings.authority_file)
    reconciler = Reconciler(store, authority)
    summary = ReplaySummary()
    began = time.perf_counter()
    with RangeReader(settings.connection()) as reader:
        ranges = reader.resolve(selection)
        total = sum(end - start for start, end in ranges.values())
        for batch in reader.read(ranges):
            summary.read += len(batch)
            valid, dead = classify(
                batch,
                registry,
                topics=settings.topics(),
                max_clock_skew_seconds=settings.max_clock_skew_seconds,
            )
            summary.outcomes["dead_lettered"] += len(dead)
            wanted = [
                c for c in valid
                if (source is None or c.event.source == source)
                and (entity is None or c.event.entity == entity)
            ]  # fmt: skip
            summary.outcomes["skipped"] += len(valid) - len(wanted)
            report = reconciler.apply(
                wanted, batch, replay=not track_offsets, dry_run=dry_run,
                starts=reader.batch_starts if track_offsets else None,
            )  # fmt: skip
            _count(summary, report.outcomes, report.changes)
            if on_progress:
                on_progress(summary.read, total)
    summary.seconds = time.perf_counter() - began
    return summary


def _count(summary: ReplaySummary, outcomes: list[Any], changes: list[HistoryEntry]) -> None:
    for item in outcomes:
        name = OUTCOME_NAMES[item.outcome]
        summary.outcomes[name] += 1
        summary.by_entity[(item.entity, name)] += 1
    for change in changes:
        summary.changed_records[change["entity"]] += 1
        if len(summary.sample) < SAMPLE_SIZE:
            summary.sample.append(
                {"entity": change["entity"], "key": change["key"], "source": change["source"],
                 "changes": change["changes"]}
            )  # fmt: skip


def compare_stores(live: Store, rebuilt: Store) -> dict[str, list[tuple[str, str]]]:
    """Records only in the live store, only in the rebuilt one, or different."""
    left = {(e, k): (d, s) for e, k, d, s, _ in live.iter_records()}
    right = {(e, k): (d, s) for e, k, d, s, _ in rebuilt.iter_records()}
    return {
        "only_live": sorted(left.keys() - right.keys()),
        "only_rebuilt": sorted(right.keys() - left.keys()),
        "different": sorted(k for k in left.keys() & right.keys() if left[k] != right[k]),
    }
