"""Freshness per source as the store holds it: what the worker's collector
(`consumers.freshness.SourceFreshness`) starts from, and what `portal-sync lag` shows."""

from __future__ import annotations

from consumers.freshness import Freshness
from store import Store


def read_freshness(store: Store) -> dict[str, Freshness]:
    """Per source, the newest `occurred_at` the store's live batches applied, and when the
    last was applied (`Store.freshness`)."""
    return {
        f.source: Freshness(f.source, f.last_change.timestamp(), f.last_applied.timestamp())
        for f in store.freshness()
    }
