"""The national store: the only package that touches SQL tables or the engine."""

from store.core import (
    Anomaly,
    BatchChanges,
    BatchTransaction,
    Conflicts,
    Freshness,
    HistoryEntry,
    OffsetRange,
    SourcePartition,
    Store,
    TopicPartition,
    ViewRow,
    redacted_url,
    utcnow,
)
from store.engine import same_database
from store.failures import LockTableFull, OffsetGap, StoreRefused, StoreUnavailable
from store.schema import SchemaOutdated

__all__ = [
    "Anomaly",
    "BatchChanges",
    "BatchTransaction",
    "Conflicts",
    "Freshness",
    "HistoryEntry",
    "LockTableFull",
    "OffsetGap",
    "OffsetRange",
    "SchemaOutdated",
    "SourcePartition",
    "Store",
    "StoreRefused",
    "StoreUnavailable",
    "TopicPartition",
    "ViewRow",
    "redacted_url",
    "same_database",
    "utcnow",
]
