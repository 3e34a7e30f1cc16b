"""Prometheus metrics of the producers. Labels are bounded; no personal data in them."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
CLOCK_BACKWARDS = Counter(
    "portal_sync_source_clock_backwards_total",
    "Changes whose occurred_at is earlier than the previous change of the same row.",
    ["source"],
)
VERSIONS_RAISED = Counter(
    "portal_sync_source_versions_raised_total",
    "Changes sent with their row's last version + 1, their own not being higher "
    "(reason: same_instant, lower).",
    ["source", "reason"],
)
SOURCE_STOPPED = Gauge(
    "portal_sync_source_stopped",
    "Adapters of the source that a fatal error stopped (read no more until produce restarts).",
    ["source"],
)
ERROR_KINDS = ("invalid_record", "read_error", "publish_error", "fatal")


def export_at_zero(source: str, entity: str | None) -> None:
    """Create a source's series at 0, so that `increase()` sees its first event or error."""
    if entity is not None:
        PRODUCED.labels(source, entity)
    for kind in ERROR_KINDS:
        SOURCE_ERRORS.labels(source, kind)
    SOURCE_STOPPED.labels(source)


class OutboxBeyondLookback(Collector):
    """`portal_sync_outbox_rows_beyond_lookback{source}`: unprocessed outbox rows further
    below the adapter's position than its `lookback_ids` reaches, never published; measured
    after every poll, summed over a source's outbox tables."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], int] = {}

    def set(self, source: str, table: str, rows: int) -> None:
        with self._lock:
            self._rows[(source, table)] = rows

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "portal_sync_outbox_rows_beyond_lookback",
            "Unprocessed outbox rows below the position minus lookback_ids: not published.",
            labels=["source"],
        )
        totals: dict[str, int] = {}
        with self._lock:
            for (source, _), rows in self._rows.items():
                totals[source] = totals.get(source, 0) + rows
        for source, rows in sorted(totals.items()):
            family.add_metric([source], rows)
        yield family


OUTBOX_BEYOND_LOOKBACK = OutboxBeyondLookback()
REGISTRY.register(OUTBOX_BEYOND_LOOKBACK)


EDGE_BYTES = 256  # compared at both ends of what was counted of a kept file


def _edges(handle: BinaryIO, counted: int) -> bytes:
    """The first and the last EDGE_BYTES of the first `counted` bytes of a file."""
    handle.seek(0)
    head = handle.read(min(counted, EDGE_BYTES))
    handle.seek(max(counted - EDGE_BYTES, 0))
    return head + handle.read(min(counted, EDGE_BYTES))


class KeptDeadLetters(Collector):
    """`portal_sync_source_kept_dead_letters{source}`: the lines of the kept dead-letter
    files of a source's deployment entries (`<state_dir>/<entry id>.dead-letters.jsonl`:
    the letters a secured cluster did not let the source write), waiting for an
    operator's `dlq import`; disabled entries' too, whose letters still wait.

    Counted from the files at each scrape: only what was appended since the last count is
    read; a file renamed aside (to be imported) counts 0, and one replaced, or cut and
    written again (its bytes at either end of what was counted differ), is counted again
    from its start. A line torn
    by a crash counts once its line ends."""

    def __init__(self) -> None:
        # Two locks: a scrape that counts a large file for the first time holds only the
        # second, so an entry starting meanwhile (`watch`) never waits for it.
        self._lock = threading.Lock()  # the paths watched
        self._counting = threading.Lock()  # the counts, one scrape at a time
        self._paths: dict[str, set[Path]] = {}
        # path -> (device and inode, bytes counted, complete lines in them, their edges)
        self._counted: dict[Path, tuple[tuple[int, int], int, int, bytes]] = {}

    def watch(self, source: str, path: Path) -> None:
        with self._lock:
            self._paths.setdefault(source, set()).add(path)

    def _lines(self, path: Path) -> int:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            self._counted.pop(path, None)
            return 0
        with handle:
            status = os.fstat(handle.fileno())
            identity = (status.st_dev, status.st_ino)
            start, lines = 0, 0
            known = self._counted.get(path)
            if known is not None and known[0] == identity and known[1] <= status.st_size:
                counted_before, lines_before, edges = known[1:]
                # The same file grown, not one cut and written again: its bytes at both
                # ends of what was counted are still there.
                if edges == _edges(handle, counted_before):
                    start, lines = counted_before, lines_before
            handle.seek(start)
            remaining = status.st_size - start
            while remaining > 0:
                chunk = handle.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                remaining -= len(chunk)
            counted = status.st_size - remaining
            self._counted[path] = (identity, counted, lines, _edges(handle, counted))
            return lines

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "portal_sync_source_kept_dead_letters",
            "Dead letters a producer kept on disk because its cluster refused them, waiting "
            "for `portal-sync dlq import`.",
            labels=["source"],
        )
        with self._lock:
            watched = sorted((source, sorted(paths)) for source, paths in self._paths.items())
        with self._counting:
            for source, paths in watched:
                total = 0
                for path in paths:
                    try:
                        total += self._lines(path)
                    except OSError:  # unreadable now: the last count stands
                        known = self._counted.get(path)
                        total += known[2] if known is not None else 0
                family.add_metric([source], total)
        yield family


KEPT_DEAD_LETTERS = KeptDeadLetters()
REGISTRY.register(KEPT_DEAD_LETTERS)
