"""Running a source adapter: read pages, validate, publish, wait for acks, checkpoint.

The cursor is saved only after the broker acknowledged every event of the page (at least
once, never a loss). Rows that break the contract go to the dead-letter topic with their
reason and the source row as origin, and the cursor moves on.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from producers.cursor_lag import measure as measure_cursor_lag
from producers.publisher import Publisher
from producers.sql_polling import CursorState, SqlPollingAdapter
from schemas import InvalidEvent, message_key, parse_event
from schemas.dead_letter import dead_letter_headers

log = logging.getLogger(__name__)

PRODUCED = Counter(
    "portal_sync_produced_events_total",
    "Events published and acknowledged by the broker, by source and entity.",
    ["source", "entity"],
)
SOURCE_ERRORS = Counter(
    "portal_sync_source_errors_total",
    "Errors reading a source, by kind (invalid_record, read_error, publish_error).",
    ["source", "kind"],
)
ERROR_KINDS = ("invalid_record", "read_error", "publish_error")


@dataclass
class RunStats:
    published: int = 0
    dead_lettered: int = 0


class SourceRunner:
    def __init__(self, adapter: SqlPollingAdapter, publisher: Publisher, state_dir: Path) -> None:
        self.adapter = adapter
        self.publisher = publisher
        self.state_path = state_dir / f"{adapter.config.name}.cursor.json"
        self.state = CursorState.load(self.state_path)
        config = adapter.config  # series exported at 0, so increase() sees the first one
        PRODUCED.labels(config.source, config.entity)
        for kind in ERROR_KINDS:
            SOURCE_ERRORS.labels(config.source, kind)

    def run_once(self) -> RunStats:
        """Publish everything new in the source now; return what was sent."""
        stats = RunStats()
        config = self.adapter.config
        for page in self.adapter.pages(self.state):
            sent = 0
            for change in page:
                raw = json.dumps(change.event, ensure_ascii=False).encode()
                try:
                    event = parse_event(raw).event
                except InvalidEvent as error:
                    SOURCE_ERRORS.labels(config.source, "invalid_record").inc()
                    log.warning("%s: row rejected (%s)", config.name, error.code)
                    headers = dead_letter_headers(
                        error.code,
                        error.message,
                        f"source:{config.source}",
                        config.table,
                        str(change.pk),
                    )
                    self.publisher.send_dead_letter(
                        message_key(config.entity, str(change.event["key"])), raw, headers
                    )
                    stats.dead_lettered += 1
                    continue
                self.publisher.send_event(event)
                sent += 1
            try:
                self.publisher.flush()
            except Exception:
                SOURCE_ERRORS.labels(config.source, "publish_error").inc()
                raise
            self.adapter.remember(self.state, page)
            self.state.save(self.state_path)
            PRODUCED.labels(config.source, config.entity).inc(sent)
            stats.published += sent
        measure_cursor_lag(self.adapter, self.state)
        return stats

    def run(self, stop: threading.Event, interval: float) -> RunStats:
        """Poll until `stop` is set; a failed poll is logged, counted and retried."""
        total = RunStats()
        while not stop.is_set():
            try:
                stats = self.run_once()
                total.published += stats.published
                total.dead_lettered += stats.dead_lettered
            except Exception as error:
                SOURCE_ERRORS.labels(self.adapter.config.source, "read_error").inc()
                # The type only: driver messages can quote row values (personal data).
                log.error("%s: poll failed (%s)", self.adapter.config.name, type(error).__name__)
            stop.wait(interval)
        return total
