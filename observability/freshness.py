"""Freshness per source at the destination: when each source's newest change was made
(`occurred_at`) and when the store last applied one of its changes.

The worker holds them in a collector (seeded from the store at start, advanced by every
batch) and exports them as Unix timestamps, so `time() - metric` keeps growing when nothing
arrives, and when the updater itself is stuck.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from consumers.reconciler import BatchReport
from consumers.store import Store, source_views


@dataclass(frozen=True)
class Freshness:
    source: str
    last_change: float  # Unix seconds
    last_applied: float


def read_freshness(store: Store) -> dict[str, Freshness]:
    """Per source, the newest `occurred_at` and `applied_at` of its views in the store."""
    query = select(
        source_views.c.source,
        func.max(source_views.c.occurred_at),
        func.max(source_views.c.applied_at),
    ).group_by(source_views.c.source)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    return {
        source: Freshness(source, _unix(change), _unix(applied))
        for source, change, applied in rows
        if change is not None and applied is not None
    }


def _unix(value: object) -> float:
    """A timestamp from an aggregate (SQLite hands back text, other drivers datetimes)."""
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class SourceFreshness(Collector):
    """`portal_sync_source_last_{change,applied}_timestamp_seconds{source}`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, Freshness] = {}

    def seed(self, known: dict[str, Freshness]) -> None:
        with self._lock:
            self._sources = dict(known)

    def record(self, report: BatchReport) -> None:
        """Advance the sources that had events applied in this batch."""
        if report.committed_at is None:
            return
        applied_at = report.committed_at.timestamp()
        with self._lock:
            for item in report.outcomes:
                if item.outcome != "applied":
                    continue
                change = item.occurred_at.timestamp()
                known = self._sources.get(item.source)
                if known is not None:
                    change = max(change, known.last_change)
                self._sources[item.source] = Freshness(item.source, change, applied_at)

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
        with self._lock:
            sources = sorted(self._sources.values(), key=lambda f: f.source)
        for item in sources:
            change.add_metric([item.source], item.last_change)
            applied.add_metric([item.source], item.last_applied)
        yield change
        yield applied
