"""The national store: the only package that touches SQL tables or the engine."""

from store.core import (
    Anomaly,
    BatchChanges,
    BatchTransaction,
    Freshness,
    HistoryEntry,
    OffsetRange,
    Store,
    StoreRefused,
    StoreUnavailable,
    TopicPartition,
    ViewRow,
    utcnow,
)
from store.schema import SchemaOutdated

__all__ = [
    "Anomaly",
    "BatchChanges",
    "BatchTransaction",
    "Freshness",
    "HistoryEntry",
    "OffsetRange",
    "SchemaOutdated",
    "Store",
    "StoreRefused",
    "StoreUnavailable",
    "TopicPartition",
    "ViewRow",
    "utcnow",
]
