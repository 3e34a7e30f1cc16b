"""Prometheus metrics of the producers. Labels are bounded; no personal data in them."""

from __future__ import annotations

from prometheus_client import Counter

PRODUCED = Counter(
    "portal_sync_produced_events_total",
    "Events published and acknowledged by the broker, by source and entity.",
    ["source", "entity"],
)
SOURCE_ERRORS = Counter(
    "portal_sync_source_errors_total",
    "Errors reading a source, by kind (invalid_record, read_error, publish_error, fatal, "
    "unreadable_file).",
    ["source", "kind"],
)
DONE_FILES_REMOVED = Counter(
    "portal_sync_done_files_removed_total",
    "Processed files (and their rejection reports) removed from done/ past their retention.",
    ["source"],
)
ERROR_KINDS = ("invalid_record", "read_error", "publish_error", "fatal")


def export_at_zero(source: str, entity: str | None) -> None:
    """Create a source's series at 0, so that `increase()` sees its first event or error."""
    if entity is not None:
        PRODUCED.labels(source, entity)
    for kind in ERROR_KINDS:
        SOURCE_ERRORS.labels(source, kind)
