"""`portal-sync dlq import` of the dead letters a producer kept on disk, against the real
broker's dead-letter topic (the unit tests of `tests/unit/test_kept_dead_letters.py` read
and write a stand-in): each letter sent once, whatever the topic holds already; the same
bytes that came from a change topic are another letter; a letter older than the topic's
retention, read from the broker, is not sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from portal_sync.ops.dlq import import_letters
from schemas.dead_letter import dead_letter_headers, letter_from_line, letter_line
from tests.support.adapter_helpers import read_topic
from tests.support.kafka_helpers import dead_letter_topic, ensure_topics, publisher_for


def kept_line(n: int, days_ago: float = 0.0) -> dict[str, Any]:
    """A line of `<entry>.dead-letters.jsonl` as a producer writes it, failed `days_ago`."""
    headers = dead_letter_headers("invalid_json", "payload is not JSON", "source:province-79",
                                  "hcm-outbox", f"portal_sync_outbox:{n}")  # fmt: skip
    at = (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(timespec="milliseconds")
    stamped = [(name, at.encode() if name == "ps.failed_at" else value) for name, value in headers]
    return letter_line(f"k{n}".encode(), b"{", stamped)


def test_kept_letters_go_to_the_topic_once_and_not_past_its_retention(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url, dead_letter_retention_hours=48)
    ensure_topics(settings)
    topic = dead_letter_topic(settings)
    fresh, second, stale = kept_line(1), kept_line(2, days_ago=0.5), kept_line(3, days_ago=3)
    # The topic already holds the second letter's bytes, sent from a change topic: a
    # worker's letter, not this producer's. It does not count as imported.
    key, value, headers = letter_from_line(second)
    origin = b"%s.changes.citizen" % settings.topic_prefix.encode()
    elsewhere = [(n, origin if n == "ps.origin.topic" else v) for n, v in headers]
    publisher = publisher_for(settings)
    publisher.send(topic, key, value, elsewhere)
    publisher.flush()
    publisher.close()
    path = tmp_path / "hcm-outbox.dead-letters.jsonl"
    lines = [fresh, second, second, stale]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    summary = import_letters(settings, path)

    assert (summary.imported, summary.repeated, summary.expired, summary.present) == (2, 1, 1, 0)
    held = sorted(
        (m.key, m.value, [(n, bytes(v)) for n, v in m.headers]) for m in read_topic(settings, topic)
    )
    as_kept = [letter_from_line(line) for line in (fresh, second)]
    assert held == sorted([*as_kept, (key, value, elsewhere)]), held

    again = import_letters(settings, path)  # run twice: nothing more
    assert (again.imported, again.present, again.repeated, again.expired) == (0, 2, 1, 1)
    assert len(read_topic(settings, topic)) == 3
