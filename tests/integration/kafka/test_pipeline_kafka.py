"""End to end against the real local Apache Kafka broker and real stores."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from sqlalchemy import select

from consumers.merge import Authority
from schemas import message_key, parse_event
from schemas.dead_letter import read_headers
from store.core import Store
from store.tables import apply_journal
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    dead_letters_written,
    end_offsets,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    shuffled_with_duplicates,
    start_worker,
    write_jsonl,
)
from transport import admin
from transport.publisher import Publisher, RecordPartitioner

pytestmark = pytest.mark.kafka


def test_publish_worker_export_equals_merge_rules(
    settings_for: Any, store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(store_url)
    events = citizen_events(keys=120, versions=3)
    feed = write_jsonl(tmp_path / "events.jsonl", shuffled_with_duplicates(events))

    published = cli(settings, "publish", str(feed))
    assert published.returncode == 0, published.stderr
    assert "invalid 0" in published.stderr
    worker = cli(settings, "worker", "--until-caught-up")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    out = tmp_path / "export.jsonl"
    dumped = cli(settings, "export", "--output", str(out), "--reason", "test")
    assert dumped.returncode == 0, dumped.stderr

    expected = expected_export(events, Authority())
    assert expected, "the sample must leave records"
    import json

    assert [json.loads(line) for line in out.read_text().splitlines()] == expected


def test_publish_reports_invalid_lines_and_sends_the_valid_ones(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    good = citizen_events(keys=3, versions=1)
    lines = [good[0], {"schema_version": 1, "entity": "citizen"}, good[1], {"nope": True}]
    feed = write_jsonl(tmp_path / "mixed.jsonl", lines)
    feed.write_text(feed.read_text() + "{broken\n" + __import__("json").dumps(good[2]) + "\n")

    result = cli(settings, "publish", str(feed))

    assert result.returncode == 1
    assert "line 2: missing_field" in result.stderr
    assert "line 4: unsupported_schema_version" in result.stderr
    assert "line 5: invalid_json" in result.stderr
    assert "published 3, invalid 3" in result.stderr
    assert sum(end_offsets(settings).values()) == 3


def test_publish_with_check_store_sends_only_versions_newer_than_the_store_and_the_file(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Sent, a version older than the store's would be the last event of its compaction
    key: the log cleaner would remove the newer one, and a rebuild would bring the old
    data back. So would a line after a newer one of the file, or a correction sent while
    the worker has not yet applied a newer event of the key waiting in the log. An equal
    version (the file published again) is not sent, and is no error."""
    settings = settings_for(sqlite_store_url)
    events = citizen_events(keys=1, versions=4)
    first, second, third, fourth = (e for e in events if e["source"] == events[0]["source"])
    assert [e["version"] for e in (first, second, third)] == [1, 2, 3]
    newer = cli(settings, "publish", str(write_jsonl(tmp_path / "v2.jsonl", [second])))
    assert newer.returncode == 0, newer.stderr
    assert cli(settings, "worker", "--until-caught-up").returncode == 0
    again = cli(settings, "publish", str(write_jsonl(tmp_path / "v2-again.jsonl", [second])),
                "--check-store")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "published 0, invalid 0, already in the store or the file 1" in again.stderr
    lines = [first, second, fourth, third]  # v1 older than the store's, v2 its own, v3 < v4
    corrections = write_jsonl(tmp_path / "corrections.jsonl", lines)

    refused = cli(settings, "publish", str(corrections), "--check-store")

    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1, said
    assert "line 1: stale_version: version 1 is older than the store's 2" in said
    assert "line 2:" not in said
    assert "line 4: stale_version: version 3 is older than the file's 4" in said
    assert "published 1, invalid 2, already in the store or the file 1" in said
    assert first["data"]["full_name"] not in said + refused.stdout
    assert sum(end_offsets(settings).values()) == 2
    # v4 waits in the log, unapplied: a correction of the key is held back, not sent.
    behind = cli(settings, "publish", str(write_jsonl(tmp_path / "v3.jsonl", [third])),
                 "--check-store", "--wait", "1")  # fmt: skip
    assert behind.returncode == 1 and "line 1: held_back:" in behind.stderr, behind.stderr
    said = " ".join(behind.stderr.split())  # not counted invalid: to be published again
    assert "published 0, invalid 0, already in the store or the file 0, held back 1" in said
    assert sum(end_offsets(settings).values()) == 2
    unchecked = cli(settings, "publish", str(corrections))  # the worker's stale rule holds
    assert unchecked.returncode == 0 and "published 4, invalid 0" in unchecked.stderr


MALFORMED: list[tuple[str, bytes]] = [
    ("not_utf8", b"\xff\xfe\x00"),
    ("invalid_json", b"{not json"),
    ("invalid_json", b'{"a": 1, "a": 2}'),
    ("unsupported_schema_version", b'{"schema_version": 99}'),
    ("missing_field", b'{"schema_version": 1, "source": "province-01"}'),
    ("unknown_entity", b'{"schema_version": 1, "entity": "vehicle"}'),
    ("empty_message", None),  # type: ignore[list-item]
    ("too_large", b'{"schema_version": 1, "pad": "' + b"x" * 1_100_000 + b'"}'),
]


def _variant(base: dict[str, Any], **changes: Any) -> bytes:
    import json

    return json.dumps(base | changes, ensure_ascii=False).encode()


def test_every_invalid_event_reaches_the_dead_letters_and_the_partition_keeps_flowing(
    settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    valid = citizen_events(keys=20, versions=1)
    base = valid[0]
    hostile = [
        *MALFORMED,
        ("unknown_field", _variant(base, data={"full_name": "A", "password": "x"})),
        ("invalid_key", _variant(base, key="12345")),
        ("invalid_field", _variant(base, version="7")),
        ("invalid_field", _variant(base, occurred_at="2025-08-01T08:00:00")),
        ("invalid_field", _variant(base, data={"full_name": "Nguyễn\x00Văn"})),
        ("invalid_field", _variant(base, source="Province 01")),
        ("op_data_mismatch", _variant(base, op="delete")),
    ]
    producer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap,
        acks="all",
        max_request_size=4_000_000,
        partitioner=RecordPartitioner(),
    )
    topic = change_topic(settings, "citizen")
    origin: dict[int, str] = {}
    rng = random.Random(5)
    queue: list[tuple[str | None, bytes | None, bytes]] = [
        (None, __import__("json").dumps(e).encode(), message_key("citizen", e["key"], e["source"]))
        for e in valid
    ] + [(code, value, b"k") for code, value in hostile]
    rng.shuffle(queue)
    for code, value, key in queue:
        metadata = producer.send(topic, key=key, value=value).get(timeout=30)
        if code is not None:
            origin[metadata.offset] = code
    producer.close()

    worker = cli(settings, "worker", "--until-caught-up")
    assert worker.returncode == 0, worker.stdout + worker.stderr

    letters = _read_all(settings, dead_letter_topic(settings), len(origin))
    found = {}
    for record in letters:
        headers = read_headers(record.headers)
        assert headers["ps.origin.topic"] == topic
        assert headers["ps.origin.partition"] == "0"
        assert headers["ps.attempt"] == "1"
        assert headers["ps.reason.message"]
        found[int(headers["ps.origin.offset"])] = headers["ps.reason.code"]
    assert len(letters) == len(found)  # each once
    assert found == origin
    assert exported(settings) == expected_export(valid, Authority())


def _read_all(settings: Any, topic: str, expected: int, timeout: float = 30) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.connection().bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(consumer)
    consumer.close()
    return records


def test_worker_killed_with_sigkill_loses_nothing_and_applies_nothing_twice(
    settings_for: Any, store_url: str
) -> None:
    settings = settings_for(store_url)
    ensure_topics(settings)
    events = citizen_events(keys=2500, versions=3, seed=9)
    feed = shuffled_with_duplicates(events, seed=10)
    publisher = publisher_for(settings)
    for raw in feed:
        publisher.send_event(parse_event(__import__("json").dumps(raw).encode()).event)
    publisher.flush()
    publisher.close()
    ends = end_offsets(settings)
    assert sum(ends.values()) == len(feed)

    rng = random.Random(11)
    store = Store(settings.store_url)
    store.create_schema()
    for kill in range(1, 4):
        worker = start_worker(settings, PORTAL_SYNC_BATCH_MAX_EVENTS="150")
        if not _wait_some_progress(store, worker, applied_at_least=kill * 1500):
            worker.kill()
            pytest.fail(f"no progress before kill {kill}: {worker.communicate()[0][-3000:]}")
        time.sleep(rng.uniform(0.0, 0.7))
        assert worker.poll() is None, "the worker stopped before it was killed"
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    # Each kill came while work was left: the last before the last event was applied.
    assert sum(store.all_offsets().values()) < sum(ends.values())
    final = start_worker(settings, "--until-caught-up")
    assert final.wait(timeout=300) == 0, final.stdout.read() if final.stdout else ""

    assert exported(settings) == expected_export(events, Authority())
    _assert_journal_contiguous(store, ends)
    # Every event is valid: none may have been dead-lettered (a valid event dead-lettered
    # still moves the offsets on, and its superseded versions never show in the export).
    assert dead_letters_written(settings) == 0
    store.close()


def _wait_some_progress(store: Store, worker: Any, applied_at_least: int) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.poll() is None:
        if sum(store.all_offsets().values()) >= applied_at_least:
            return True
        time.sleep(0.05)
    return False


def _assert_journal_contiguous(store: Store, ends: dict[tuple[str, int], int]) -> None:
    """Every partition's applied ranges run from 0 to its end without gap or overlap, and
    each range counts every message in it as applied (these topics have no transaction
    markers and are not compacted: every offset holds a message). A worker that skipped
    messages of a range it read (a fetch past a seek) would count fewer."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(apply_journal).order_by(apply_journal.c.id)).all()
    position: dict[tuple[str, int], int] = {}
    for row in rows:
        tp = (row.topic, row.partition)
        assert row.first_offset == position.get(tp, 0), f"gap or overlap at {tp}"
        assert row.events == row.next_offset - row.first_offset, f"messages not applied at {tp}"
        position[tp] = row.next_offset
    assert position == {tp: end for tp, end in ends.items() if end > 0}
    assert store.all_offsets() == position


def test_message_key_routes_a_record_to_one_partition() -> None:
    assert message_key("citizen", "001090000001", "p-1") == b"citizen:001090000001:p-1"


def test_a_publisher_lets_go_of_dead_letters_acknowledged_before_its_flush(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose every row is refused (a wrong value map) kept each letter, kept in
    case the cluster refused it, until the file's end: 6.6 KB a row. Those acknowledged
    are let go on the way; the flush still counts every send."""
    import transport.publisher as module

    monkeypatch.setattr(module, "PRUNE_PENDING", 500)
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    publisher = Publisher(settings.connection(), settings.topics(), keep_refused_letters=True)
    try:
        most = 0
        for n in range(6000):
            publisher.send_dead_letter(b"citizen:%d:p" % n, b"{}", [("ps.reason.code", b"x")])
            if n % 1000 == 999:
                time.sleep(0.2)  # acknowledged meanwhile
            most = max(most, len(publisher._letters))
        assert most < 3000, most
        assert publisher.flush() == 6000
        assert publisher.take_refused_letters() == []
    finally:
        publisher.close()
    letters = admin.end_offsets(settings.connection(), [settings.topics().dead_letters])
    assert sum(letters.values()) == 6000


def test_a_publisher_lets_go_of_what_was_acknowledged_before_its_flush(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file drop has one checkpoint, at the file's end: a million rows held a million
    futures (160 MB) until the flush. What the broker acknowledged is let go on the way;
    the flush still counts every send."""
    import transport.publisher as module

    monkeypatch.setattr(module, "PRUNE_PENDING", 500)
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    publisher = publisher_for(settings)
    try:
        most = 0
        for n in range(6000):
            publisher.send(topic, b"citizen:%d:p" % n, b"{}")
            if n % 1000 == 999:
                time.sleep(0.2)  # acknowledged meanwhile
            most = max(most, len(publisher._pending))
        assert most < 3000, most
        assert publisher.flush() == 6000
    finally:
        publisher.close()
    assert sum(end_offsets(settings).values()) == 6000
