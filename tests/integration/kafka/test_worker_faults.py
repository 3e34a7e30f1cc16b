"""The worker under faults, on the real broker and real stores: never a lost event, never a
silent stall, dead letters that always fit, safe operator commands."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from sqlalchemy import create_engine, text

from consumers.config import load_rules
from consumers.merge import Authority
from schemas import message_key
from schemas.dead_letter import read_headers
from store import OffsetGap, Store
from tests.conftest import _unavailable
from tests.integration.kafka.test_pipeline_kafka import _read_all
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    dead_letters_written,
    end_offsets,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import (
    change_message,
    citizen_events,
    cli,
    expected_export,
    exported,
    registry_without_signatures,
    start_worker,
    write_jsonl,
)
from tests.support.postgres_server import PostgresUnavailable, start_postgres
from tests.support.store_helpers import checked_list, event, refuse_views_of
from transport import admin
from transport.local import free_port

pytestmark = pytest.mark.kafka


def _publish(settings: Any, raws: list[dict[str, Any]]) -> None:
    publisher = publisher_for(settings)
    for raw in raws:
        value = json.dumps(raw, ensure_ascii=False).encode()
        publisher.send(
            change_topic(settings, raw["entity"]),
            message_key(raw["entity"], raw["key"], raw["source"]),
            value,
        )
    publisher.flush()
    publisher.close()


def _probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _metric(port: int, name: str) -> float | None:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _caught_up(settings: Any) -> bool:
    store = Store(settings.store_url)
    try:
        applied = store.all_offsets()
    except Exception:
        return False
    finally:
        store.close()
    return all(applied.get(tp, 0) >= end for tp, end in end_offsets(settings).items())


def _contiguous(store_url: str, ends: dict[tuple[str, int], int] | None = None) -> None:
    """The journal's ranges follow each other without gap or overlap; with `ends`, every
    partition's run from 0 to its end offset."""
    store = Store(store_url)
    try:
        journal = store.journal()
        for tp, ranges in journal.items():
            for (_, end), (first, _) in itertools.pairwise(ranges):
                assert first == end, f"journal of {tp} has a gap or overlap: {ranges}"
        if ends is not None:
            spans = {tp: (ranges[0][0], ranges[-1][1]) for tp, ranges in journal.items()}
            assert spans == {tp: (0, end) for tp, end in ends.items() if end}, spans
    finally:
        store.close()


def _stop(worker: subprocess.Popen[str], timeout: float = 10) -> float:
    """SIGTERM; return how long the worker took to exit."""
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=timeout)
    return time.monotonic() - began


def _processor(settings_for: Any, url: str) -> tuple[Any, Store, Any]:
    """A worker's batch processor in this process, on change topics of one partition (one
    offset sequence), with a fresh store."""
    from consumers.processor import BatchProcessor
    from consumers.registry import Registry

    settings = settings_for(url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    return settings, store, BatchProcessor(settings.worker_config(), store, Registry(), Authority())


def _valid(count: int, seed: int) -> list[bytes]:
    """`count` valid citizen events, as their bytes."""
    return [json.dumps(e).encode() for e in citizen_events(count, 1, seed=seed)[:count]]


def test_refused_event_with_the_dead_letter_topic_gone_stalls_loudly_and_loses_nothing(
    settings_for: Any, postgres_store_url: str
) -> None:
    """Findings 1 and 3: the poison's dead letter cannot be published (topic deleted). The
    worker must neither skip valid events nor look healthy; once the topic is back, the
    poison is dead-lettered and everything else applied, with a contiguous journal."""
    port = free_port()
    settings = settings_for(postgres_store_url, metrics_port=port)
    ensure_topics(settings)
    Store(settings.store_url).create_schema()
    events = [e for e in citizen_events(40, 1, seed=31) if e["op"] == "upsert"][:30]
    poison = events[5]
    refuse_views_of(settings.store_url, [poison["key"]])
    # The batch's first dead-letter send blocks about 10 s (the topic's metadata) before
    # it retries: the stall counts from the batch's start.
    worker = start_worker(settings, PORTAL_SYNC_WORKER_STALL_AFTER_SECONDS="40")
    try:
        _wait(lambda: _probe(port, "/readyz") == 200, 90, "the worker to be ready")
        with admin.cluster(settings.connection()) as cluster:  # the worker made it at start
            cluster.delete_topics([dead_letter_topic(settings)])
        _publish(settings, events)
        # Not ready once it retries; the stall gauge counts from the batch's start (a first
        # attempt that blocks counts as a retry does).
        _wait(lambda: _probe(port, "/readyz") == 503, 90, "the worker to retry the dead letter")
        assert (_metric(port, "portal_sync_worker_retrying_seconds") or 0) > 0
        # Healthy while it retries, past the loop's 15 s beat, up to the stall threshold.
        _wait(lambda: (_metric(port, "portal_sync_worker_retrying_seconds") or 0) > 16, 60,
              "the worker to retry for 16 s")  # fmt: skip
        assert _probe(port, "/healthz") == 200
        _wait(lambda: _probe(port, "/healthz") == 503, 40, "/healthz to report the stall")
        assert not _caught_up(settings)

        ensure_topics(settings)  # the operator recreates the topic
        _wait(lambda: _caught_up(settings), 120, "the worker to catch up")
        _wait(lambda: _probe(port, "/readyz") == 200, 30, "/readyz to recover")
        assert _probe(port, "/healthz") == 200
        assert _stop(worker) < 10
    finally:
        if worker.poll() is None:
            worker.kill()
    rest = [e for e in events if e is not poison]
    assert exported(settings) == expected_export(rest, Authority())
    _contiguous(settings.store_url, end_offsets(settings))
    letters = _read_all(settings, dead_letter_topic(settings), 1)
    assert [read_headers(r.headers)["ps.reason.code"] for r in letters] == ["apply_failed"]
    assert json.loads(letters[0].value)["key"] == poison["key"]


def test_a_message_at_the_change_topic_limit_is_dead_lettered_whole_and_the_rest_applied(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """A change-topic message near its 2 MiB limit becomes a dead letter that
    fits (its original bytes, with headers); the worker goes on."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    huge = json.dumps({"padding": "x" * (2 * 1_048_576 - 4096)}).encode()
    producer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap, max_request_size=4_000_000
    )
    producer.send(change_topic(settings, "citizen"), key=b"citizen:huge", value=huge).get(30)
    producer.close()
    events = citizen_events(10, 1, seed=32)
    _publish(settings, events)

    worker = cli(settings, "worker", "--until-caught-up", timeout=180)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert exported(settings) == expected_export(events, Authority())
    (letter,) = _read_all(settings, dead_letter_topic(settings), 1)
    assert read_headers(letter.headers)["ps.reason.code"] == "too_large"
    assert letter.value == huge


def test_a_message_whose_key_or_headers_would_not_fit_a_letter_is_dead_lettered_bounded(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """A gzip record with a 5 MiB key, and one with 64 (the most a record may carry) 24 KiB
    `ps.sig` headers, each fit the change topic's 2 MiB compressed. Their letters, key and
    headers copied, did not fit the dead-letter topic: the producer refused them, the
    batch was retried for ever, and every partition of the worker with it (`offsets skip`
    failed the same way). Now an oversized key or header goes as its size and SHA-256; the
    worker goes on. A record with a thousand headers is refused before they are read
    (`transport.guard`)."""
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    hostile = KafkaProducer(bootstrap_servers=settings.connection().bootstrap,
                            compression_type="gzip", max_request_size=16_000_000)  # fmt: skip
    big_key = b"k" * (5 * 1_048_576)
    hostile.send(topic, key=big_key, value=b"{}", partition=0).get(30)
    signatures = [("ps.sig", bytes([65 + i % 26]) * 24_576) for i in range(64)]
    hostile.send(topic, key=b"citizen:1", value=b"{}", headers=signatures, partition=0).get(30)
    many = [("ps.sig", b"s")] * 1000
    hostile.send(topic, key=b"citizen:2", value=b"{}", headers=many, partition=0).get(30)
    events = citizen_events(10, 1, seed=34)
    _publish(settings, events)

    worker = cli(settings, "worker", "--until-caught-up", timeout=180)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert exported(settings) == expected_export(events, Authority())
    first, second, third = _read_all(settings, dead_letter_topic(settings), 3)
    assert first.key is None and first.value == b"{}"
    assert read_headers(first.headers)["ps.key.size"] == str(len(big_key))
    assert read_headers(first.headers)["ps.key.sha256"] == hashlib.sha256(big_key).hexdigest()
    assert second.key == b"citizen:1"
    assert read_headers(second.headers)["ps.headers.omitted"] == "64"
    assert third.key is None  # its batch is not read (`transport.guard`)
    assert read_headers(third.headers)["ps.reason.code"] == "unreadable_batch"

    # The operators' way past such a message, which failed the same way.
    hostile.send(topic, key=big_key, value=b"x" * 5_000_000, partition=0).get(30)
    hostile.close()
    skipped = cli(settings, "offsets", "skip", "--topic", topic, "--partition", "0",
                  "--offset", str(len(events) + 3), "--reason", "drill")  # fmt: skip
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    *_, letter = _read_all(settings, dead_letter_topic(settings), 4)
    assert read_headers(letter.headers)["ps.reason.code"] == "skipped_by_operator"
    assert letter.key is None and json.loads(letter.value)["value_omitted"] == "too_large"


def test_the_store_refuses_a_batch_that_does_not_start_at_its_next_offset(
    store_url: str,
) -> None:
    """Gap-proof offsets: a batch past the stored next offset is an error, never a commit."""
    from consumers.reconciler import Reconciler

    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    first = checked_list([event("citizen", "001090012345", "province-01", 1, {"sex": "male"})])
    reconciler.apply(first, [c.message for c in first])
    skipped_ahead = checked_list(
        [event("citizen", "079305012345", "province-01", 1, {"sex": "female"})], start=3
    )
    told: list[object] = []  # the worker publishes the batch's dead letters when told
    with pytest.raises(OffsetGap):
        reconciler.apply(skipped_ahead, [c.message for c in skipped_ahead],
                         after_offsets=told.append)  # fmt: skip
    assert told == []  # refused before: the batch read again sends its letters only once
    assert store.all_offsets() == {("portal.changes", 0): 1}
    assert [k for _, k, *_ in store.iter_records()] == ["001090012345"]
    store.close()


@pytest.mark.parametrize("held", ["committed", "sought"])
def test_a_store_that_lost_a_partitions_offset_under_a_running_worker_is_refused_once(
    store_url: str, held: str
) -> None:
    """A partition the store has no offset for is taken from any offset (its log may begin
    after 0). But when the store held one and lost it (restored from a backup taken before
    the partition's first batch, or failed over to a replica behind) a running worker's
    next batch would skip the lost events: refused once, whether this worker committed the
    offset or was sought from it at an assignment, and the batch read again from the log's
    start (where the worker then seeks) is applied, every event in it."""
    from consumers.reconciler import Reconciler

    store = Store(store_url)
    store.create_schema()
    reconciler = Reconciler(store, Authority())
    first = checked_list([event("citizen", "001090012345", "province-01", 1, {"sex": "male"})])
    if held == "committed":
        reconciler.apply(first, [c.message for c in first])
    else:  # another worker committed it; this one was given the partition then
        Reconciler(store, Authority()).apply(first, [c.message for c in first])
        reconciler.note_offsets([("portal.changes", 0)], store.all_offsets())
    engine = create_engine(store_url)
    with engine.begin() as conn:  # the store as a backup from before that batch holds it
        for table in ("applied_offsets", "apply_journal", "record_history", "source_views",
                      "records", "source_freshness"):  # fmt: skip
            conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()
    after = checked_list(
        [event("citizen", "079305012345", "province-01", 1, {"sex": "female"})], start=1
    )
    other = checked_list(  # a partition the store never held: taken from where it begins
        [event("citizen", "048190012345", "province-01", 1, {"sex": "male"})], 7, partition=1
    )
    told: list[object] = []
    with pytest.raises(
        OffsetGap, match=r"portal.changes\[0\]: the store no longer holds the offset"
    ):
        reconciler.apply(after + other, [c.message for c in after + other],
                         after_offsets=told.append)  # fmt: skip
    assert told == [] and store.all_offsets() == {}

    again = first + after + other  # partition 0 from its log's start
    reconciler.apply(again, [c.message for c in again])
    assert store.all_offsets() == {("portal.changes", 0): 2, ("portal.changes", 1): 8}
    assert sorted(k for _, k, *_ in store.iter_records()) == [
        "001090012345", "048190012345", "079305012345"]  # fmt: skip
    store.close()


def test_a_worker_never_goes_on_from_a_position_the_store_did_not_give_it(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """When the store's offsets and the consumer's position part
    (here an operator rewinds the store under a running worker, then the store loses the
    partition), the store refuses the batch instead of committing past unapplied events,
    and the worker goes back to the store's offsets (the log's start when it has none):
    everything is applied again, idempotently, and the result is exact."""
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    first = citizen_events(20, 1, seed=33)
    _publish(settings, first)
    worker = start_worker(settings, PORTAL_SYNC_BATCH_MAX_EVENTS="10")
    try:
        _wait(lambda: _caught_up(settings), 120, "the first events")
        store = Store(settings.store_url)
        (tp,) = store.all_offsets()
        store.reset_offsets({tp: 0}, "test", "rewind under a running worker")
        store.close()
        more = [dict(e, source="province-79") for e in citizen_events(5, 1, seed=34)]
        _publish(settings, more)
        _wait(lambda: _caught_up(settings), 120, "the worker to resume from the store")
        # The store loses all of the partition under the running worker (restored from a
        # backup taken before its first batch): the worker goes back to the log's start.
        with sqlite3.connect(settings.store_url.removeprefix("sqlite:///")) as db:
            for table in ("applied_offsets", "apply_journal", "record_history",
                          "source_views", "records", "source_freshness"):  # fmt: skip
                db.execute(f"DELETE FROM {table}")
        last = [dict(e, source="province-48") for e in citizen_events(5, 1, seed=35)]
        _publish(settings, last)
        _wait(lambda: _caught_up(settings), 120, "the worker to apply the log again")
        assert worker.poll() is None
        assert _stop(worker) < 10
    finally:
        if worker.poll() is None:
            worker.kill()
    output = worker.stdout.read() if worker.stdout else ""
    assert "resuming from the store's offsets" in output
    assert "the store no longer holds the offset it held" in output
    assert exported(settings) == expected_export(first + more + last, Authority())
    store = Store(settings.store_url)
    ranges = store.journal()[tp]
    store.close()
    assert ranges[-1][1] == sum(end_offsets(settings).values())


def test_sigterm_stops_a_worker_that_waits_for_the_dead_letter_topic(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A worker retrying a batch's dead letter stops within
    10 s, and cleanly."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    Store(settings.store_url).create_schema()
    port = free_port()
    worker = start_worker(settings, "--metrics-port", str(port))
    try:
        _wait(lambda: _probe(port, "/readyz") == 200, 90, "the worker to be ready")
        with admin.cluster(settings.connection()) as cluster:
            cluster.delete_topics([dead_letter_topic(settings)])
        _publish(settings, citizen_events(5, 1, seed=35))
        publisher = publisher_for(settings)
        publisher.send(change_topic(settings, "citizen"), b"x", b"not json")
        publisher.flush()
        publisher.close()
        # not ready: retrying (the stall gauge counts a first attempt too)
        _wait(lambda: _probe(port, "/readyz") == 503, 90,
              "the worker to wait for the dead-letter topic")  # fmt: skip
        assert _stop(worker, timeout=15) < 10
        assert worker.returncode == 0
    finally:
        if worker.poll() is None:
            worker.kill()


def test_sigterm_stops_a_worker_that_waits_for_a_stopped_store(settings_for: Any) -> None:
    """A worker retrying a batch against a PostgreSQL server stopped under it (immediate
    shutdown) stops within 10 s of SIGTERM, and cleanly."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        _unavailable("PostgreSQL", error)
    try:
        settings = settings_for(server.url("postgres"))
        pg_ctl = [*server.prefix, str(server.bindir / "pg_ctl"), "-D", str(server.root / "data")]

        def stop_the_server() -> None:
            subprocess.run(
                [*pg_ctl, "-m", "immediate", "-w", "stop"], check=True, capture_output=True
            )

        _sigterm_while_the_store_is_away(settings, stop_the_server)
    finally:
        server.stop()


def test_sigterm_stops_a_worker_that_waits_for_a_locked_sqlite_store(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """An operator's write transaction holds a SQLite store: the worker's batch waits for
    it a few seconds at a time (it waited a minute inside SQLite, SIGTERM unseen, and took
    55 s to stop), and a SIGTERM stops it within 10 s, cleanly."""
    settings = settings_for(sqlite_store_url)
    holder = sqlite3.connect(sqlite_store_url.split("///", 1)[1], isolation_level=None)
    try:
        _sigterm_while_the_store_is_away(settings, lambda: holder.execute("BEGIN EXCLUSIVE"))
    finally:
        holder.close()


def test_sigterm_stops_a_worker_that_waits_for_a_lock_on_a_postgresql_store(
    settings_for: Any, postgres_store_url: str
) -> None:
    """An operator's transaction holds a lock the worker's batch needs (here the offsets'
    table): the batch waits for it 5 s at a time (it waited for ever, SIGTERM unseen), and
    a SIGTERM stops the worker within 10 s, cleanly."""
    settings = settings_for(postgres_store_url)
    engine = create_engine(postgres_store_url)
    holder = engine.connect()
    try:
        lock = text("LOCK TABLE applied_offsets IN ACCESS EXCLUSIVE MODE")
        _sigterm_while_the_store_is_away(settings, lambda: holder.execute(lock))
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


def test_a_worker_started_while_its_store_is_away_waits_for_it_alive_and_not_ready(
    settings_for: Any,
) -> None:
    """A PostgreSQL server down when the worker starts: the worker waits for it (it exited
    1, and a supervisor's restart backoff delayed it for minutes after the server was
    back), /healthz answers ok up to the stall threshold and /readyz not, its wait counted
    in `portal_sync_worker_retrying_seconds`; once the server is back it applies
    everything. `--until-caught-up`, a job, still fails at once."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        _unavailable("PostgreSQL", error)
    pg_ctl = [*server.prefix, str(server.bindir / "pg_ctl"), "-D", str(server.root / "data")]
    worker = None
    try:
        settings = settings_for(server.url("postgres"))
        ensure_topics(settings)
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
        job = cli(settings, "worker", "--until-caught-up", timeout=60)
        assert job.returncode == 1, job.stdout + job.stderr
        port = free_port()
        worker = start_worker(settings, "--metrics-port", str(port))
        _wait(lambda: _probe(port, "/healthz") == 200, 60, "the worker to serve /healthz")
        assert _probe(port, "/readyz") == 503
        # counted as a batch's retries are: the stall alert sees a start that never ends.
        # Past its first attempts (1 s, then 2 s) it is still waiting, and alive. The count
        # starts at the first failed attempt, which a loaded machine delays past /healthz.
        _wait(
            lambda: (_metric(port, "portal_sync_worker_retrying_seconds") or 0) > 3,
            60,
            "the worker's wait for its store to be counted past 3 s",
        )
        assert worker.poll() is None, worker.communicate()[0]
        assert _probe(port, "/healthz") == 200
        waiting_for = 'portal_sync_worker_waiting_for{reason="StoreUnavailable"}'
        assert _metric(port, waiting_for) == 1.0  # the stall alert's `waiting_for` names it
        # `restart` starts a stopped server with the options it last ran with
        log_file = str(server.root / "server.log")  # not our pipes: the server keeps them
        subprocess.run([*pg_ctl, "-l", log_file, "-w", "restart"], check=True, capture_output=True)
        events = citizen_events(20, 1, seed=41)
        _publish(settings, events)
        _wait(lambda: _caught_up(settings), 120, "the worker to catch up")
        _wait(lambda: _probe(port, "/readyz") == 200, 30, "/readyz once running")
        assert _metric(port, waiting_for) is None
        assert _stop(worker) < 10
        assert worker.returncode == 0
        assert exported(settings) == expected_export(events, Authority())
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.stop()


def test_a_worker_starting_on_a_locked_sqlite_store_says_so_and_hears_a_stop(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """An operator's write holds the SQLite store as a worker starts: it waited inside
    SQLite for a minute, a SIGTERM unheard, then exited 1 with "the store failed:
    OperationalError". It now tries 5 s at a time, says the store is locked, and stops
    at once, cleanly."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    store.close()
    holder = sqlite3.connect(sqlite_store_url.split("///", 1)[1], isolation_level=None)
    port = free_port()
    worker = None
    try:
        holder.execute("BEGIN EXCLUSIVE")
        worker = start_worker(settings, "--metrics-port", str(port))
        _wait(lambda: _probe(port, "/healthz") == 200, 60, "the worker to serve /healthz")
        assert _probe(port, "/readyz") == 503
        # past one lock wait (5 s): the failure is logged, then counted
        _wait(
            lambda: (_metric(port, "portal_sync_worker_retrying_seconds") or 0) > 0,
            60,
            "the worker's first lock wait to end",
        )
        assert worker.poll() is None
        assert _stop(worker, timeout=15) < 10
        assert worker.returncode == 0
        said = worker.communicate()[0]
        assert "the store is locked by another session" in said, said
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        holder.close()


def test_a_worker_starting_while_the_store_is_being_created_waits_for_it(
    settings_for: Any, postgres_store_url: str
) -> None:
    """Another process holds the schema lock (it creates the store) for longer than a
    batch's lock wait: the worker's start waits for it as before, and then runs."""
    from store.schema import SCHEMA_LOCK

    settings = settings_for(postgres_store_url)
    ensure_topics(settings)
    engine = create_engine(postgres_store_url)
    holder = engine.connect()
    worker = None
    try:
        holder.execute(text(f"SELECT pg_advisory_lock({SCHEMA_LOCK})"))
        worker = start_worker(settings, "--until-caught-up")
        waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        with engine.connect() as conn:
            _wait(lambda: conn.execute(waiting).scalar() == 1, 60, "the worker to wait")
        time.sleep(6)  # past the 5 s a batch waits for a lock
        assert worker.poll() is None, worker.communicate()[0]
        holder.execute(text(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})"))
        assert worker.wait(timeout=120) == 0, worker.communicate()[0]
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        holder.close()
        engine.dispose()


def _sigterm_while_the_store_is_away(settings: Any, away: Callable[[], object]) -> None:
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    store.close()
    port = free_port()
    worker = start_worker(settings, "--metrics-port", str(port))
    try:
        _wait(lambda: _probe(port, "/readyz") == 200, 90, "the worker to be ready")
        away()
        _publish(settings, citizen_events(5, 1, seed=37))
        _wait(lambda: _probe(port, "/readyz") == 503, 90,
              "the worker to retry against the store")  # fmt: skip
        time.sleep(1.5)  # past the first retry's backoff (0.5 s): waiting for the store again
        assert _stop(worker, timeout=90) < 10
        assert worker.returncode == 0
    finally:
        if worker.poll() is None:
            worker.kill()


def test_invalid_events_are_dead_lettered_once_when_a_batch_is_halved(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Isolating a poison re-published the batch's other dead letters once per
    halving level; now each invalid message is dead-lettered once per delivery."""
    from consumers.checks import Checked
    from transport.reader import Message

    settings, store, processor = _processor(settings_for, sqlite_store_url)
    valid = _valid(16, seed=36)
    raws = [*valid[:3], b"not json", *valid[3:9], b"{}", *valid[9:]]
    messages = [change_message(settings, i, raw) for i, raw in enumerate(raws)]
    poison = messages[12]
    real_apply = processor.reconciler.apply

    def refuse_the_poison(events: list[Checked], batch: list[Message], **kw: Any) -> Any:
        if any(c.message == poison for c in events):
            raise ValueError("a value the store cannot hold")
        return real_apply(events, batch, **kw)

    monkeypatch.setattr(processor.reconciler, "apply", refuse_the_poison)
    processor.process(messages)
    processor.close()
    letters = _read_all(settings, dead_letter_topic(settings), 3, timeout=10)
    codes = sorted(read_headers(r.headers)["ps.reason.code"] for r in letters)
    assert codes == ["apply_failed", "invalid_json", "unsupported_schema_version"]
    assert store.all_offsets() == {(change_topic(settings, "citizen"), 0): len(raws)}
    store.close()


def test_dead_letters_are_acknowledged_before_the_commit_and_sent_once_across_store_retries(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dead letters are sent once the batch's stored offsets are read, before its writes,
    and awaited just before its commit; a store that fails transiently after they were
    sent does not make the retry send them again, and the batch's offsets are committed
    only after the acks."""
    from consumers.checks import Checked
    from store import StoreUnavailable
    from transport.reader import Message

    settings, store, processor = _processor(settings_for, sqlite_store_url)
    valid = _valid(8, seed=37)
    raws = [*valid[:3], b"not json", *valid[3:], b"{}"]
    messages = [change_message(settings, i, raw) for i, raw in enumerate(raws)]
    real_apply = processor.reconciler.apply
    calls: list[dict[tuple[str, int], int]] = []

    def fail_once_then_check(events: list[Checked], batch: list[Message], **kw: Any) -> Any:
        if not calls:
            calls.append({})
            kw["after_offsets"]({})  # the letters are sent once the offsets are read ...
            raise StoreUnavailable("the store went away")  # ... then the store fails
        settle = kw["before_commit"]

        def settled_then_nothing_committed_yet() -> None:
            settle()
            reader = Store(settings.store_url)
            calls.append(reader.all_offsets())
            reader.close()

        return real_apply(
            events,
            batch,
            after_offsets=kw["after_offsets"],
            before_commit=settled_then_nothing_committed_yet,
        )

    monkeypatch.setattr(processor.reconciler, "apply", fail_once_then_check)
    processor.process(messages)
    processor.close()
    assert calls == [{}, {}]  # one failure; the acks came while nothing was committed
    assert store.all_offsets() == {(change_topic(settings, "citizen"), 0): len(raws)}
    letters = _read_all(settings, dead_letter_topic(settings), 2, timeout=10)
    codes = sorted(read_headers(r.headers)["ps.reason.code"] for r in letters)
    assert codes == ["invalid_json", "unsupported_schema_version"]
    store.close()


def test_a_dead_letter_the_broker_did_not_acknowledge_is_sent_again_before_the_commit(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """The broker refuses the first dead letter (its acknowledgement fails): the batch is
    not committed, and its retry sends that letter again and commits only once it is
    acknowledged; the failed wait is never counted as published by the next one."""
    from kafka.errors import NotEnoughReplicasError
    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
    from kafka.structs import TopicPartition

    settings, store, processor = _processor(settings_for, sqlite_store_url)
    valid = _valid(6, seed=39)
    raws = [*valid[:2], b"not json", *valid[2:], b"{}"]
    messages = [change_message(settings, i, raw) for i, raw in enumerate(raws)]
    producer = processor.publisher._producer
    real_send = producer.send
    refused: list[bytes] = []

    def refuse_the_first(topic: str, **kw: Any) -> Any:
        if refused:
            return real_send(topic, **kw)
        refused.append(kw["value"])  # never reaches the broker; its ack fails
        result = FutureProduceResult(TopicPartition(topic, 0))
        future = FutureRecordMetadata(result, 0, -1, None, 0, 0, 0)
        result.failure(NotEnoughReplicasError())
        return future

    producer.send = refuse_the_first
    processor.process(messages)
    processor.close()
    assert refused == [b"not json"]
    assert store.all_offsets() == {(change_topic(settings, "citizen"), 0): len(raws)}
    # The other letter, acknowledged in the failed try, may be sent again (at least once).
    letters = _read_all(settings, dead_letter_topic(settings), 3, timeout=6)
    codes = sorted(read_headers(r.headers)["ps.reason.code"] for r in letters)
    assert codes.count("invalid_json") == 1, codes
    assert set(codes) == {"invalid_json", "unsupported_schema_version"}
    store.close()


def test_offsets_reset_refuses_skipping_unapplied_events_and_naive_times_and_records_resets(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """An offsets reset that would skip events the store has not applied is refused (without
    --allow-skip), a time without an offset is a configuration error, and every reset done
    is recorded."""
    settings = settings_for(sqlite_store_url)
    _ = write_jsonl(tmp_path / "e.jsonl", citizen_events(20, 1, seed=37))
    assert cli(settings, "publish", str(tmp_path / "e.jsonl")).returncode == 0
    Store(settings.store_url).create_schema()  # nothing applied yet: every event unapplied
    group = settings.group_id

    naive = cli(settings, "offsets", "reset", "--group", group, "--to-time",
                "2030-01-01T00:00:00", "--yes")  # fmt: skip
    assert naive.returncode == 2 and "offset" in naive.stderr
    future = "2030-01-01T00:00:00+07:00"
    refused = cli(settings, "offsets", "reset", "--group", group, "--to-time", future, "--yes")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    total = sum(end_offsets(settings).values())
    assert f"skip {total} events" in refused.stdout + refused.stderr
    assert "(end)" in refused.stdout
    assert Store(settings.store_url).all_offsets() == {}

    done = cli(settings, "offsets", "reset", "--group", group, "--to-time", future, "--yes",
               "--allow-skip", "--operator", "ops-1", "--reason", "drill")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(settings.store_url)
    assert sum(store.all_offsets().values()) == total
    changes = store.offset_changes()
    assert {c["operator"] for c in changes} == {"ops-1"}
    assert {c["reason"] for c in changes} == {"drill"}
    assert sum(c["to_offset"] for c in changes) == total
    store.close()


def test_offsets_skip_copies_the_message_to_the_dead_letters_and_moves_past_it(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """An escape hatch for a message that can never pass."""
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    events = citizen_events(3, 1, seed=38)
    _publish(settings, events)
    Store(settings.store_url).create_schema()
    topic = change_topic(settings, "citizen")
    wrong = cli(settings, "offsets", "skip", "--topic", topic, "--partition", "0",
                "--offset", "1", "--reason", "stuck")  # fmt: skip
    assert wrong.returncode == 1 and "next offset to apply is 0" in wrong.stderr
    blank = cli(settings, "offsets", "skip", "--topic", topic, "--partition", "0",
                "--offset", "0", "--reason", "  ")  # fmt: skip
    assert blank.returncode == 1 and "--reason: say why" in blank.stderr, blank.stderr
    elsewhere = cli(settings, "offsets", "skip", "--topic", dead_letter_topic(settings),
                    "--partition", "0", "--offset", "0", "--reason", "stuck")  # fmt: skip
    assert elsewhere.returncode == 1 and "not a change topic" in elsewhere.stderr
    began = time.monotonic()  # a partition the topic does not have: 30 s, then a traceback
    nowhere = cli(settings, "offsets", "skip", "--topic", topic, "--partition", "9",
                  "--offset", "0", "--reason", "stuck")  # fmt: skip
    assert nowhere.returncode == 1, nowhere.stderr
    assert f"--partition: {topic} has partitions 0 to 0, not 9" in nowhere.stderr
    assert time.monotonic() - began < 25
    assert dead_letters_written(settings) == 0  # none copied anything
    skipped = cli(settings, "offsets", "skip", "--topic", topic, "--partition", "0",
                  "--offset", "0", "--reason", "stuck", "--operator", "ops-2")  # fmt: skip
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    (letter,) = _read_all(settings, dead_letter_topic(settings), 1)
    headers = read_headers(letter.headers)
    assert headers["ps.reason.code"] == "skipped_by_operator"
    assert (headers["ps.origin.topic"], headers["ps.origin.offset"]) == (topic, "0")
    worker = cli(settings, "worker", "--until-caught-up", timeout=180)
    assert worker.returncode == 0
    skipped_id = json.loads(letter.value)["event_id"]
    assert exported(settings) == expected_export(
        [e for e in events if e["event_id"] != skipped_id], Authority()
    )
    store = Store(settings.store_url)
    assert store.offset_changes()[0]["kind"] == "skip"
    _contiguous(settings.store_url, end_offsets(settings))
    store.close()
    # A redrive by source leaves the skipped message where the operator put it.
    source = json.loads(letter.value)["source"]
    kept = cli(settings, "dlq", "redrive", "--source", source)
    said = " ".join(kept.stdout.split())
    assert kept.returncode == 0 and "selected 0:" in said, said + kept.stderr
    assert "left out 1 that an operator skipped" in said, said  # said, not silently


def test_offsets_skip_reaches_a_message_past_a_transaction_marker(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """The store's next offset holds no message (a transactional producer's commit marker
    follows each of its transactions): the message the worker is at comes after it, and
    is the one that can be skipped."""
    from kafka import KafkaProducer

    from schemas.partitioning import message_key

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    first, stuck, last = citizen_events(3, 1, seed=39)[:3]
    producer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap, transactional_id=f"{topic}-tx"
    )
    producer.init_transactions()
    for raw in (first, stuck, last):  # one transaction each: offsets 0, 2, 4; markers 1, 3, 5
        producer.begin_transaction()
        key = message_key(raw["entity"], raw["key"], raw["source"])
        producer.send(topic, key=key, value=json.dumps(raw).encode(), partition=0)
        producer.commit_transaction()
    producer.close()
    store = Store(settings.store_url)
    store.create_schema()
    store.skip_offset((topic, 0), 0, 0, "test", "the first one applied, as a worker would")
    assert store.all_offsets() == {(topic, 0): 1}  # on the first marker

    def skip(offset: int) -> Any:
        return cli(settings, "offsets", "skip", "--topic", topic, "--partition", "0",
                   "--offset", str(offset), "--reason", "stuck")  # fmt: skip

    marker = skip(1)
    assert marker.returncode == 1 and "has no message at offset 1" in marker.stderr
    beyond = skip(4)
    assert beyond.returncode == 1 and "next offset to apply is 1, not 4" in beyond.stderr
    skipped = skip(2)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert store.all_offsets() == {(topic, 0): 3}
    (letter,) = _read_all(settings, dead_letter_topic(settings), 1)
    assert read_headers(letter.headers)["ps.origin.offset"] == "2"
    assert json.loads(letter.value)["event_id"] == stuck["event_id"]
    _contiguous(settings.store_url)
    store.close()


def test_an_aborted_transaction_is_never_applied_and_a_log_ending_in_a_marker_is_caught_up(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """A transactional writer's aborted events were applied (the clients' default reads
    uncommitted records), and `worker --until-caught-up` never returned when the log ended
    in a transaction's marker: the store's offset stops one before the log's end."""
    from tests.support.kafka_helpers import send_in_transactions
    from transport.reader import RangeReader, Selection

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    aborted, committed = citizen_events(2, 1, seed=41)[:2]
    # offsets 0 and 2, markers 1 and 3
    send_in_transactions(settings, topic, [(aborted, False), (committed, True)])

    worker = cli(settings, "worker", "--until-caught-up", timeout=90)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert [record["key"] for record in exported(settings)] == [committed["key"]]
    assert Store(settings.store_url).all_offsets() == {(topic, 0): 3}
    _contiguous(settings.store_url)
    with RangeReader(settings.connection()) as reader:  # replay's and rebuild's reader
        read = [m.offset for b in reader.read(reader.resolve(Selection([topic]))) for m in b]
    assert read == [2]


def test_replay_and_remerge_refuse_other_rules_and_remerge_has_a_dry_run(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """The worker records its rules; replay, rebuild and remerge refuse others."""
    repo = Path(__file__).resolve().parents[3]
    rules = {
        "PORTAL_SYNC_REGISTRY": str(registry_without_signatures(tmp_path)),
        "PORTAL_SYNC_AUTHORITY_FILE": str(repo / "deploy" / "authority.toml"),
    }
    settings = settings_for(sqlite_store_url)
    events = citizen_events(10, 1, seed=39)
    _ = write_jsonl(tmp_path / "e.jsonl", events)
    assert cli(settings, "publish", str(tmp_path / "e.jsonl")).returncode == 0
    worker = cli(settings, "worker", "--until-caught-up", timeout=180, **rules)
    assert worker.returncode == 0, worker.stdout
    before = exported(settings)
    # applied under the rules: what stays the same below is neither empty nor unmerged
    _, authority = load_rules(None, Path(rules["PORTAL_SYNC_AUTHORITY_FILE"]))
    assert before and before == expected_export(events, authority)

    replay = cli(settings, "replay", "--since", "1h")  # development mode: no rules
    assert replay.returncode == 1 and "--rules-mismatch-ok" in replay.stderr
    remerge = cli(settings, "remerge", "--yes")
    assert remerge.returncode == 1 and "--rules-mismatch-ok" in remerge.stderr
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    rebuild = cli(settings, "rebuild", "--store", rebuilt)
    assert rebuild.returncode == 1 and "--rules-mismatch-ok" in rebuild.stderr

    # Without a registry, events the worker refused (unsigned, unregistered, out of
    # scope) would be applied: replay and rebuild refuse it whatever the flag says.
    for command in (("replay", "--since", "1h"), ("rebuild", "--store", rebuilt)):
        unchecked = cli(settings, *command, "--rules-mismatch-ok")
        assert unchecked.returncode == 1, unchecked.stdout + unchecked.stderr
        assert "without a registry" in unchecked.stderr
    assert exported(settings) == before

    dry = cli(settings, "remerge", "--dry-run", "--rules-mismatch-ok")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would change" in dry.stdout
    assert exported(settings) == before
    asked = cli(settings, "remerge", **rules)  # no --yes, no terminal: not confirmed
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "re-merge" in asked.stdout and "Aborted" in asked.stdout + asked.stderr
    same = cli(settings, "replay", "--since", "1h", "--json", **rules)
    assert same.returncode == 0, same.stderr
    assert exported(settings) == before


def test_the_demo_refuses_a_store_with_other_data_and_touches_only_its_own_topics(
    kafka_bootstrap: str, settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Run with production settings, the demo destroyed the production topics,
    group and every table of the database."""
    settings = settings_for(sqlite_store_url)
    _ = write_jsonl(tmp_path / "e.jsonl", citizen_events(5, 1, seed=40))
    assert cli(settings, "publish", str(tmp_path / "e.jsonl")).returncode == 0
    assert cli(settings, "worker", "--until-caught-up", timeout=180).returncode == 0
    engine = create_engine(settings.store_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE operators_notes (note TEXT)"))
    engine.dispose()
    before = exported(settings)

    env = os.environ | settings.as_env() | {"XDG_DATA_HOME": str(tmp_path / "data")}
    demo = subprocess.run(
        [sys.executable, "-m", "portal_sync", "demo", "--reset", "--people", "50"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert "holds data the demo did not write" in demo.stderr
    assert exported(settings) == before
    with admin.cluster(settings.connection()) as cluster:
        assert set(settings.topics().change_topics()) <= cluster.topic_names()

    # The store's own drop touches only the project's tables.
    store = Store(settings.store_url)
    store.drop_schema()
    store.close()
    engine = create_engine(settings.store_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM operators_notes")).scalar() == 0
    engine.dispose()


def test_soft_check_warnings_are_counted_once_across_store_retries(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed soft check is counted when its batch commits, not at each attempt: a
    store that fails after the batch's offsets were read makes the worker try again."""
    from prometheus_client import REGISTRY

    from consumers.checks import Checked
    from store import StoreUnavailable
    from transport.reader import Message

    settings, store, processor = _processor(settings_for, sqlite_store_url)
    event = next(e for e in citizen_events(10, 1, seed=38) if e["op"] == "upsert")
    event["data"]["sex"] = "female" if int(event["key"][3]) % 2 == 0 else "male"  # not the id's
    raws = [json.dumps(event).encode(), *_valid(3, seed=39)]
    messages = [change_message(settings, i, raw) for i, raw in enumerate(raws)]
    real_apply = processor.reconciler.apply
    attempts: list[int] = []

    def fail_once(events: list[Checked], batch: list[Message], **kw: Any) -> Any:
        attempts.append(len(events))
        if len(attempts) == 1:
            kw["after_offsets"]({})  # the offsets were read ...
            raise StoreUnavailable("the store went away")  # ... then the store fails
        return real_apply(events, batch, **kw)

    def counted() -> float:
        labels = {"entity": "citizen", "check": "personal_id_sex"}
        return REGISTRY.get_sample_value("portal_sync_soft_check_warnings_total", labels) or 0.0

    before = counted()
    monkeypatch.setattr(processor.reconciler, "apply", fail_once)
    processor.process(messages)
    processor.close()
    assert attempts == [4, 4]
    assert counted() - before == 1
    assert store.all_offsets() == {(change_topic(settings, "citizen"), 0): len(raws)}
    store.close()
