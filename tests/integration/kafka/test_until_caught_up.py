"""`worker --until-caught-up` ends once it applied what the logs held at its start, even
while events keep coming. Under a steady flow every fetch brought a batch, and the check,
made only between batches, never came: a job (a catch-up after maintenance, the benches)
ran until the flow stopped."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import pytest

from schemas import message_key
from store import Store
from tests.support.kafka_helpers import change_topic, end_offsets, ensure_topics, publisher_for
from tests.support.pipeline_helpers import citizen_events, start_worker

pytestmark = pytest.mark.kafka


def test_the_job_ends_at_its_start_s_log_ends_while_events_keep_coming(
    settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url, change_partitions=2)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    events = citizen_events(3000, 2, seed=48)
    backlog, flow = events[: len(events) // 3], events[len(events) // 3 :]
    publisher = publisher_for(settings)

    def send(event: dict[str, Any]) -> None:
        key = message_key("citizen", event["key"], event["source"])
        publisher.send(topic, key, json.dumps(event, ensure_ascii=False).encode())

    stop = threading.Event()

    def flowing() -> None:  # as fast as the publisher goes, over and over, until the end
        while not stop.is_set():
            for index, event in enumerate(flow):
                if stop.is_set():
                    return
                send(event)
                if index % 200 == 199:
                    publisher.flush()

    for event in backlog:
        send(event)
    publisher.flush()
    at_start = end_offsets(settings)
    sender = threading.Thread(target=flowing, daemon=True)
    sender.start()
    worker = start_worker(settings, "--until-caught-up")
    try:
        try:
            code = worker.wait(timeout=45)
        except subprocess.TimeoutExpired:
            code = None
        flowed = sender.is_alive()
    finally:
        stop.set()
        sender.join(timeout=30)
        publisher.close()
        if worker.poll() is None:
            worker.kill()
        output = worker.communicate()[0]
    assert code == 0, output[-3000:]
    assert flowed, "the flow ended before the worker: the test proved nothing"
    store = Store(settings.store_url)
    try:
        applied = store.all_offsets()
    finally:
        store.close()
    behind = {
        tp: end for tp, end in at_start.items() if tp[0] == topic and applied.get(tp, 0) < end
    }
    assert not behind
