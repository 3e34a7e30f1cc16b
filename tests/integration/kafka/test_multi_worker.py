"""Several workers in one group on 12 partitions, started, stopped and killed while they
work (rebalances under load): the store is the pure merge of the events (what one worker
makes of them) and every partition's journal runs from 0 to its end without a gap or an
overlap (nothing lost, nothing applied twice). Real broker, real PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from consumers.merge import Authority
from schemas import parse_event
from store import Store
from tests.integration.kafka.test_pipeline_kafka import _assert_journal_contiguous
from tests.support.kafka_helpers import (
    dead_letters_written,
    end_offsets,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import (
    citizen_events,
    expected_export,
    exported,
    shuffled_with_duplicates,
    start_worker,
)

pytestmark = pytest.mark.kafka


def _applied(store: Store) -> int:
    try:
        return sum(store.all_offsets().values())
    except Exception:  # the schema is being created by the first worker
        return 0


def _wait_for(store: Store, at_least: int, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _applied(store)
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"no progress to {at_least} events in {timeout} s")


def test_workers_joining_leaving_and_killed_under_load_lose_and_repeat_nothing(
    settings_for: Any, postgres_store_url: str
) -> None:
    settings = settings_for(postgres_store_url, change_partitions=12)
    ensure_topics(settings)
    events = citizen_events(keys=2000, versions=3, seed=41)
    feed = shuffled_with_duplicates(events, seed=42)

    def publish() -> None:  # a steady load for about 10 s, whatever the workers' speed
        publisher = publisher_for(settings)
        for number, raw in enumerate(feed, 1):
            publisher.send_event(parse_event(json.dumps(raw).encode()).event)
            if number % 500 == 0:
                publisher.flush()
                time.sleep(0.4)
        publisher.flush()
        publisher.close()

    store = Store(settings.store_url)
    small = {"PORTAL_SYNC_BATCH_MAX_EVENTS": "100"}
    workers: list[subprocess.Popen[str]] = [start_worker(settings, **small) for _ in range(3)]
    producer = threading.Thread(target=publish)
    producer.start()
    under_load: list[tuple[str, bool]] = []
    try:
        _wait_for(store, 500)
        under_load.append(("3 workers applying", producer.is_alive()))
        workers[1].send_signal(signal.SIGTERM)  # leaves the group gracefully
        assert workers[1].wait(timeout=60) == 0
        under_load.append(("one stopped", producer.is_alive()))
        workers[2].send_signal(signal.SIGKILL)  # its partitions wait for the session timeout
        workers[2].wait(timeout=30)
        workers.append(start_worker(settings, **small))
        under_load.append(("one killed, one joined", producer.is_alive()))
        time.sleep(1.0)
        workers.append(start_worker(settings, **small))
        under_load.append(("another joined", producer.is_alive()))
        producer.join(timeout=120)
        ends = end_offsets(settings)
        total = sum(ends.values())
        assert total == len(feed) and len([tp for tp, end in ends.items() if end]) == 12
        _wait_for(store, total, timeout=300)
    finally:
        producer.join(timeout=120)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    # Every step happened while events were still being published (else it proved nothing).
    assert all(alive for _, alive in under_load), under_load

    assert exported(settings) == expected_export(events, Authority())
    _assert_journal_contiguous(store, ends)
    assert dead_letters_written(settings) == 0  # every event is valid
    store.close()
