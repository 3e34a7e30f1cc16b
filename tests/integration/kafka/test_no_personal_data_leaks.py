"""No personal data in logs, dead-letter headers or metrics.

The worker runs over the hostile corpus (`tests/support/hostile.py`) with every logger at
DEBUG, through two faults (the dead-letter topic gone, then a SIGKILL and a restart that
meets an event the store refuses); then every log line, everything it printed, every
dead-letter header and its metrics are searched for each personal id, tax code and name
the corpus used, in every spelling: none may appear.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from consumers.merge import Authority
from store import Store
from tests.integration.kafka.test_pipeline_kafka import _read_all
from tests.integration.kafka.test_worker_faults import _caught_up, _probe, _wait
from tests.support.hostile import (
    NAMES,
    PERSONAL_IDS,
    SOURCES,
    Hostile,
    change_event,
    hostile_corpus,
    needles,
    valid_message,
)
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import (
    expected_export,
    exported,
    registry_without_signatures,
)
from transport import admin
from transport.local import free_port

pytestmark = pytest.mark.kafka

# `portal-sync worker` with the root logger at DEBUG, into a file (the CLI's own logging
# set-up then leaves it as it is).
DEBUG_WORKER = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.DEBUG, filename=sys.argv.pop(1),\n"
    "                    format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "from portal_sync.cli import main_entry\n"
    "main_entry()\n"
)
# A valid event the store refuses (a trigger): isolated and dead-lettered as apply_failed.
REFUSED = change_event("citizen", PERSONAL_IDS[2], {"full_name": NAMES[2]}, source=SOURCES[1])


def _publish(settings: Any, messages: list[Hostile]) -> None:
    publisher = publisher_for(settings)
    for message in messages:
        publisher.send(change_topic(settings, message.entity), message.key, message.value)
    publisher.flush()
    publisher.close()


def _refuse_on_sqlite(store_url: str, key: str, source: str) -> None:
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
        db.execute(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON source_views "
            f"WHEN NEW.key = '{key}' AND NEW.source = '{source}' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )


def _start(settings: Any, log: Path, output: Path, port: int) -> subprocess.Popen[bytes]:
    with output.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", DEBUG_WORKER, str(log), "worker"],
            env=os.environ | settings.as_env() | {"PORTAL_SYNC_METRICS_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _leaks(text: str) -> list[str]:
    return [needle for needle in needles() if needle in text]


def test_no_personal_id_or_name_reaches_logs_dead_letter_headers_or_metrics(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url, registry=registry_without_signatures(tmp_path))
    ensure_topics(settings)
    Store(settings.store_url).create_schema()
    _refuse_on_sqlite(settings.store_url, REFUSED["key"], REFUSED["source"])
    corpus = hostile_corpus()
    assert len(corpus) >= 60
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    output = tmp_path / "worker.out"
    metrics: list[str] = []

    # Fault 1: the dead-letter topic is gone; the worker retries until it is back.
    port = free_port()
    worker = _start(settings, logs[0], output, port)
    try:
        _wait(lambda: _probe(port, "/readyz") == 200, 90, "the worker to be ready")
        with admin.cluster(settings.connection()) as cluster:
            cluster.delete_topics([dead_letter_topic(settings)])
        _publish(settings, corpus)
        _wait(lambda: _probe(port, "/readyz") == 503, 90,
              "the worker to retry the dead letters")  # fmt: skip
        ensure_topics(settings)
        _wait(lambda: _caught_up(settings), 120, "the worker to catch up")
        metrics.append(_metrics(port))
        # Fault 2: killed with work left (an event the store refuses, published while the
        # worker is stopped: it cannot have applied it), then restarted: the new worker
        # isolates it and dead-letters it. (Published to a running worker, it was at times
        # applied before the kill, and the restarted worker had caught up before its
        # endpoint was up.)
        worker.send_signal(signal.SIGSTOP)
        _publish(settings, [valid_message("refused by the store", REFUSED)])
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)

    port = free_port()
    worker = _start(settings, logs[1], output, port)
    try:
        assert not _caught_up(settings)  # the refused event is left to the restarted worker
        _wait(lambda: _caught_up(settings), 120, "the restarted worker to catch up")
        metrics.append(_metrics(port))
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=15)
    finally:
        if worker.poll() is None:
            worker.kill()

    # The corpus went through: valid events applied, the rest dead-lettered once each.
    invalid = [m for m in corpus if not m.valid]
    keys = {(r["entity"], r["key"]) for r in exported(settings)}
    applied = {  # message keys are <entity>:<key>:<source>
        (m.entity, m.key.decode().split(":", 1)[1].rsplit(":", 1)[0])
        for m in corpus
        if m.valid and m.key
    }
    deleted = ("citizen", PERSONAL_IDS[3])  # the corpus's upsert and delete of one citizen
    assert len(applied) >= 8 and applied - {deleted} <= keys
    valid = [json.loads(m.value) for m in corpus if m.valid and m.value]
    assert exported(settings) == expected_export(valid, Authority())
    expected = len(invalid) + 1  # and the event the store refused
    letters = _read_all(settings, dead_letter_topic(settings), expected, timeout=60)
    origins = set()
    headers_text = []
    for letter in letters:
        for name, value in letter.headers:
            headers_text.append(f"{name}={value.decode('utf-8', 'replace')}")
        found = dict(letter.headers)
        origins.add((found["ps.origin.topic"], found["ps.origin.partition"],
                     found["ps.origin.offset"]))  # fmt: skip
    assert len(letters) == len(origins) == expected  # each once, none twice
    codes = {dict(r.headers)["ps.reason.code"] for r in letters}
    assert {b"unknown_field", b"invalid_key", b"not_utf8", b"too_large", b"apply_failed",
            b"unregistered_source", b"empty_message"} <= codes  # fmt: skip
    assert "portal_sync_dead_letters_total" in metrics[0]

    log_text = "\n".join(path.read_text("utf-8", "replace") for path in logs)
    assert "DEBUG" in log_text and "soft check " in log_text  # the logs did capture the work
    channels = {
        "worker log (DEBUG)": log_text,
        "worker output": output.read_text("utf-8", "replace"),
        "dead-letter headers": "\n".join(headers_text),
        "worker metrics": "\n".join(metrics),
    }
    leaks = {channel: _leaks(text) for channel, text in channels.items()}
    assert leaks == {channel: [] for channel in channels}, "personal data leaked"
