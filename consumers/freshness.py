"""Freshness per source at the destination: when each source's newest change was made
(`occurred_at`) and when the store last applied one of its changes.

The worker holds them in a collector (seeded from the store at start, advanced by every
batch) and exports them as Unix timestamps, so `time() - metric` keeps growing when nothing
arrives, and when the updater itself is stuck. A source that never delivered has no such
timestamp: the collector also exports one series per source of the worker's registry
(`portal_sync_source_registered`), and the sources it lists without a freshness series are
the ones from which nothing ever reached the store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Freshness:
    source: str
    last_change: float  # Unix seconds
    last_applied: float


class SourceFreshness(Collector):
    """`portal_sync_source_last_{change,applied}_timestamp_seconds{source}` and
    `portal_sync_source_registered{source}`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, Freshness] = {}
        self._registered: tuple[str, ...] = ()

    def seed(self, known: dict[str, Freshness], registered: Iterable[str] = ()) -> None:
        """Start from the store's freshness and the sources of the registry (none in
        development mode, where every source is accepted and none is expected)."""
        with self._lock:
            self._sources = dict(known)
            self._registered = tuple(sorted(set(registered)))

    def record(self, applied: Iterable[tuple[str, datetime]], committed_at: datetime) -> None:
        """Advance the sources of the (source, occurred_at) changes applied in one commit."""
        applied_at = committed_at.timestamp()
        with self._lock:
            for source, occurred_at in applied:
                change = occurred_at.timestamp()
                known = self._sources.get(source)
                if known is not None:
                    change = max(change, known.last_change)
                self._sources[source] = Freshness(source, change, applied_at)

    def collect(self) -> Iterator[Metric]:
        change = GaugeMetricFamily(
            "portal_sync_source_last_change_timestamp_seconds",
            "Source commit time (occurred_at) of the newest change of a source in the store.",
            labels=["source"],
        )
        applied = GaugeMetricFamily(
            "portal_sync_source_last_applied_timestamp_seconds",
            "When the store last applied a change of a source.",
            labels=["source"],
        )
        registered = GaugeMetricFamily(
            "portal_sync_source_registered",
            "1 for each source the worker's registry lists (none in development mode).",
            labels=["source"],
        )
        with self._lock:
            sources = sorted(self._sources.values(), key=lambda f: f.source)
            listed = self._registered
        for item in sources:
            change.add_metric([item.source], item.last_change)
            applied.add_metric([item.source], item.last_applied)
        for source in listed:
            registered.add_metric([source], 1.0)
        yield change
        yield applied
        yield registered
