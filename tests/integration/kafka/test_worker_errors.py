"""The worker's error tolerance: a poison event is isolated and dead-lettered, the rest
of its batch is applied (real broker, real SQLite store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from consumers.checks import Checked
from consumers.merge import Authority
from consumers.metrics import RETENTION_FAILURES
from consumers.processor import BatchProcessor
from consumers.reconciler import Message
from consumers.registry import Registry
from schemas.dead_letter import read_headers
from schemas.errors import ConfigurationError
from store.core import Store
from store.failures import StoreRefused
from tests.integration.kafka.test_pipeline_kafka import _read_all
from tests.support.kafka_helpers import dead_letter_topic, dead_letters_written, ensure_topics
from tests.support.pipeline_helpers import (
    change_message,
    citizen_events,
    cli,
    expected_export,
    exported,
    write_jsonl,
)
from transport import admin

pytestmark = pytest.mark.kafka


def _one_partition(
    settings_for: Any, store_url: str, seed: int, count: int
) -> tuple[Any, Store, BatchProcessor, list[dict[str, Any]], list[Message]]:
    """Settings with one change partition (one offset sequence), a store, a processor,
    and `count` citizen events of one source as that partition's messages."""
    settings = settings_for(store_url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    processor = BatchProcessor(settings.worker_config(), store, Registry(), Authority())
    events = [e for e in citizen_events(count + 2, 1, seed=seed) if e["source"] == "province-01"]
    messages = [
        change_message(settings, offset, json.dumps(e).encode())
        for offset, e in enumerate(events[:count])
    ]
    return settings, store, processor, events[:count], messages


def _refusing(
    processor: BatchProcessor,
    monkeypatch: pytest.MonkeyPatch,
    refused: Message,
    error: Exception | None = None,
) -> None:
    """Every batch that holds `refused` fails with `error` (default: the store refuses a
    value it cannot hold)."""
    real_apply = processor.reconciler.apply

    def refuse(valid: list[Checked], batch: list[Message], **kw: Any) -> Any:
        if any(c.message == refused for c in valid):
            raise error or StoreRefused(ValueError("a value the store cannot hold"))
        return real_apply(valid, batch, **kw)

    monkeypatch.setattr(processor.reconciler, "apply", refuse)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (None, "the store refused it: ValueError"),
        (KeyError("ho_ten"), "the worker failed on it: KeyError"),  # a fault some data meets
    ],
)
def test_an_event_the_store_refuses_is_dead_lettered_and_the_batch_goes_on(
    settings_for: Any,
    sqlite_store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception | None,
    said: str,
) -> None:
    """The letter says which: a value the store refused, or a fault of the worker (before,
    both read "the store refused it")."""
    settings, store, processor, events, messages = _one_partition(
        settings_for, sqlite_store_url, 21, 10
    )
    poison = messages[6]
    _refusing(processor, monkeypatch, poison, error)
    processor.process(messages)
    processor.close()

    assert store.all_offsets() == {(change_message(settings, 0, b"").topic, 0): 10}
    rest = [e for i, e in enumerate(events) if i != 6]
    assert exported(settings) == expected_export(rest, Authority())
    letters = _read_all(settings, dead_letter_topic(settings), 1)
    assert len(letters) == 1
    headers = read_headers(letters[0].headers)
    assert headers["ps.reason.code"] == "apply_failed"
    assert headers["ps.reason.message"] == said
    assert headers["ps.origin.offset"] == "6"
    assert letters[0].value == poison.value
    store.close()


@pytest.mark.parametrize(
    "error", [MemoryError(), ConfigurationError("permission denied for table records")]
)
def test_memory_short_or_a_setting_refused_stops_the_batch_and_letters_nothing(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Not the data's fault: each event alone would fail the same way, and every valid
    one of the batch went to the dead letters as `apply_failed` with the offsets moved
    past them. Raised instead: the worker stops (exit 2 for a setting, 3 else) and its
    next start resumes from the store's offsets."""
    settings, store, processor, _events, messages = _one_partition(
        settings_for, sqlite_store_url, 23, 6
    )
    _refusing(processor, monkeypatch, messages[2], error)
    with pytest.raises(type(error)):
        processor.process(messages)
    processor.close()
    assert store.all_offsets() == {}
    assert dead_letters_written(settings) == 0
    store.close()


def test_an_event_the_store_applied_meanwhile_is_not_dead_lettered_when_isolated(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch retried past the revoke wait: the partition's new owner applied it. The
    isolated event's letter is sent only once the store's offsets are read, as a batch's
    letters are: this one is behind them, so none (it had gone out before the check)."""
    settings, store, processor, _, messages = _one_partition(settings_for, sqlite_store_url, 23, 10)
    processor.process(messages)  # the new owner
    _refusing(processor, monkeypatch, messages[6])
    processor.process(messages[6:7])  # this worker's batch, at last
    processor.close()

    assert store.all_offsets() == {(messages[0].topic, 0): 10}
    assert dead_letters_written(settings) == 0
    store.close()


@pytest.mark.parametrize("attempt", [b"9" * 4300, b"1_0", b" 7", "\u0663".encode()])
def test_a_forged_attempt_header_is_a_first_attempt_and_the_batch_goes_on(
    settings_for: Any, sqlite_store_url: str, attempt: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who can write a change topic sets `ps.attempt`: 4,300 digits made the dead
    letter's headers unwritable (Python refuses to print such an integer), which stopped
    the worker at that message after every restart."""
    settings, store, processor, events, messages = _one_partition(
        settings_for, sqlite_store_url, 23, 6
    )
    forged = [("ps.attempt", attempt)]
    invalid = Message(messages[0].topic, 0, 6, b"not json", b"citizen:1", None, tuple(forged))
    refused = messages[3]  # valid, and then refused by the store: dead-lettered alone
    messages[3] = Message(refused.topic, 0, 3, refused.value, refused.key, None, tuple(forged))
    _refusing(processor, monkeypatch, messages[3])
    processor.process([*messages, invalid])
    processor.close()

    assert store.all_offsets() == {(messages[0].topic, 0): 7}
    letters = _read_all(settings, dead_letter_topic(settings), 2)
    headers = sorted(
        (read_headers(letter.headers) for letter in letters), key=lambda h: h["ps.origin.offset"]
    )
    assert [(h["ps.origin.offset"], h["ps.reason.code"], h["ps.attempt"]) for h in headers] == [
        ("3", "apply_failed", "1"),
        ("6", "invalid_json", "1"),
    ]
    assert exported(settings) == expected_export(events[:3] + events[4:], Authority())
    store.close()


def test_a_halved_batch_keeps_its_judgement_when_the_clock_moves_on(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event dead-lettered as from the future, in a batch that then fails in the store,
    is not judged again in the halves (by then the clock has passed it): it stays a dead
    letter, sent once, and is never applied."""
    from datetime import UTC, datetime, timedelta

    import consumers.processor as processor_module

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    processor = BatchProcessor(settings.worker_config(), store, Registry(), Authority())
    events = [e for e in citizen_events(12, 1, seed=21) if e["source"] == "province-01"][:10]
    start = datetime.now(UTC)
    skew = settings.worker_config().max_clock_skew_seconds
    events[2]["occurred_at"] = (start + timedelta(seconds=skew + 60)).isoformat()
    messages = [  # without a broker's timestamp: the worker's clock judges the future
        change_message(settings, offset, json.dumps(e).encode()) for offset, e in enumerate(events)
    ]
    poison = messages[6]
    calls: list[int] = []
    real_classify = processor_module.classify

    def two_minutes_a_check(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_classify(*args, now=start + timedelta(minutes=2 * (len(calls) - 1)), **kwargs)

    real_apply = processor.reconciler.apply

    def fail_after_the_dead_letters(valid: list[Checked], batch: list[Message], **kw: Any) -> Any:
        sent = kw.get("after_offsets")
        if sent is None:  # the poison's own transaction: its offset only
            return real_apply(valid, batch, **kw)

        def then_fail(stored: Any) -> None:
            sent(stored)  # the batch's dead letters go out, then the store fails
            if any(c.message == poison for c in valid):
                raise ValueError("a value the store cannot hold")

        return real_apply(valid, batch, **{**kw, "after_offsets": then_fail})

    monkeypatch.setattr(processor_module, "classify", two_minutes_a_check)
    monkeypatch.setattr(processor.reconciler, "apply", fail_after_the_dead_letters)
    processor.process(messages)
    processor.close()

    assert len(calls) == 1  # judged once
    assert store.all_offsets() == {(poison.topic, 0): 10}
    rest = [e for i, e in enumerate(events) if i not in (2, 6)]
    assert exported(settings) == expected_export(rest, Authority())
    letters = _read_all(settings, dead_letter_topic(settings), 2)
    assert sorted(
        (read_headers(r.headers)["ps.origin.offset"], read_headers(r.headers)["ps.reason.code"])
        for r in letters
    ) == [("2", "future_timestamp"), ("6", "apply_failed")]
    store.close()


def test_unregistered_sources_count_as_rejected_and_contract_violations_as_dead_lettered() -> None:
    from prometheus_client import REGISTRY

    from consumers.checks import DeadLetter
    from consumers.metrics import record_dead_letters

    def count(source: str, outcome: str) -> float:
        labels = {"source": source, "entity": source, "outcome": outcome}
        return REGISTRY.get_sample_value("portal_sync_events_total", labels) or 0.0

    before = (count("unregistered", "rejected"), count("invalid", "dead_lettered"))
    message = Message("t", 0, 0, b"{}")
    record_dead_letters([
        DeadLetter(message, "unregistered_source", "not in the registry"),
        DeadLetter(message, "invalid_json", "not JSON"),
        DeadLetter(message, "invalid_key", "bad key"),
    ])  # fmt: skip
    after = (count("unregistered", "rejected"), count("invalid", "dead_lettered"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)


@pytest.mark.parametrize("kept", [None, 0])
def test_a_workers_next_batch_over_its_records_takes_what_it_kept(
    settings_for: Any, sqlite_store_url: str, kept: int | None
) -> None:
    """The worker's settings give its reconciler the kept records (default 10,000; 0:
    none); the second batch over the same records takes them instead of reading them, and
    the store is the one every event gives either way."""
    from prometheus_client import REGISTRY

    from consumers.cache import DEFAULT_RECORDS
    from tests.support.store_helpers import event

    def counted(origin: str) -> float:
        labels = {"origin": origin}
        return REGISTRY.get_sample_value("portal_sync_store_batch_records_total", labels) or 0.0

    overrides = {} if kept is None else {"record_cache_records": kept}
    settings = settings_for(sqlite_store_url, change_partitions=1, **overrides)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    processor = BatchProcessor(settings.worker_config(), store, Registry(), Authority())
    cache = processor.reconciler.cache
    assert (cache.size if cache is not None else 0) == (DEFAULT_RECORDS if kept is None else 0)
    keys = [f"0010900{n:05d}" for n in range(5)]
    raws = [
        event("citizen", key, "province-01", version, {"full_name": f"Tên {version}"})
        for version in (1, 2)
        for key in keys
    ]
    messages = [change_message(settings, offset, raw) for offset, raw in enumerate(raws)]
    before = counted("kept"), counted("store")
    processor.process(messages[:5])
    processor.process(messages[5:])
    processor.close()
    kept_now, read_now = counted("kept") - before[0], counted("store") - before[1]
    assert (kept_now, read_now) == ((5, 5) if kept is None else (0, 10))
    assert exported(settings) == expected_export([json.loads(raw) for raw in raws], Authority())
    store.close()


@pytest.mark.parametrize("failure", ["a bug", "the store unavailable"])
def test_a_failing_retention_run_neither_retries_nor_dead_letters_the_batch_it_follows(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The retention runs after a batch committed: its failure is logged and tried an hour
    later; the batch is neither retried for it nor bisected into dead letters."""
    import consumers.processor as processor_module
    from store import StoreUnavailable

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    processor = BatchProcessor(settings.worker_config(), store, Registry(), Authority())
    events = [e for e in citizen_events(12, 1, seed=21) if e["source"] == "province-01"][:8]
    messages = [
        change_message(settings, offset, json.dumps(e).encode()) for offset, e in enumerate(events)
    ]
    runs: list[int] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        if len(runs) > 3:  # a code that re-runs it at each retry ends here, and fails below
            return {}, True
        raise ValueError("a bug") if failure == "a bug" else StoreUnavailable("timeout")

    monkeypatch.setattr(processor_module, "purge_within", broken)
    failed = RETENTION_FAILURES.labels("purge")._value.get()
    processor.process(messages[:6])
    processor.process(messages[6:])  # within the hour: not run again
    processor.close()

    assert runs == [1]
    assert RETENTION_FAILURES.labels("purge")._value.get() == failed + 1  # alerts
    assert store.all_offsets() == {(messages[0].topic, 0): 8}
    assert exported(settings) == expected_export(events, Authority())
    letters = admin.end_offsets(settings.connection(), [dead_letter_topic(settings)])
    assert sum(letters.values()) == 0
    store.close()


def test_a_worker_with_nothing_to_apply_still_runs_the_retention(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet pipeline (sources stopped, a staging store) still forgets what is past its
    retention: the job is asked for from the consume loop, not only after a batch."""
    import asyncio

    import consumers.processor as processor_module
    from consumers.loop import ReconcilerLoop

    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    config = settings.worker_config()
    processor = BatchProcessor(config, store, Registry(), Authority())
    runs: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return {}, True

    monkeypatch.setattr(processor_module, "purge_within", counted)
    loop = ReconcilerLoop(config, store, processor, until_caught_up=False)

    async def quiet_for_a_while() -> int:
        task = asyncio.ensure_future(loop.run())
        for _ in range(300):
            if runs or task.done():
                break
            await asyncio.sleep(0.1)
        loop.stop()
        return await asyncio.wait_for(task, 60)

    try:
        assert asyncio.run(quiet_for_a_while()) == 0
    finally:
        processor.close()
        store.close()
    assert runs == [1]  # once: the next is an hour later


def test_a_retention_run_that_hangs_shows_as_a_stall_and_one_that_ends_does_not(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retention runs after the batch, a chunk at a time for about 5 s: a run that
    takes longer than the stall threshold is one that hangs (a lock never granted), and
    /healthz reports it while it lasts, as it does a batch; once it ends, nothing stays."""
    import time as clock

    import consumers.processor as processor_module

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    processor = BatchProcessor(settings.worker_config(), store, Registry(), Authority())
    processor.health.stall_after_seconds = 0.5
    stalled: list[bool] = []

    def hanging(*args: Any, **kwargs: Any) -> Any:
        clock.sleep(1.0)
        stalled.append(processor.health.stalled())
        return {}, True

    monkeypatch.setattr(processor_module, "purge_within", hanging)
    events = [e for e in citizen_events(4, 1, seed=22) if e["source"] == "province-01"][:2]
    messages = [
        change_message(settings, offset, json.dumps(e).encode()) for offset, e in enumerate(events)
    ]
    processor.process(messages)
    after = processor.health.stalled()
    processor.close()
    store.close()
    assert stalled == [True] and not after


def test_topics_the_cluster_will_not_create_as_asked_are_a_configuration_error(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """Three replicas asked of a one-broker cluster: the broker's answer ended `topics`, a
    worker or a producer with a traceback (exit 1) instead of the settings' error (exit 2)."""
    settings = settings_for(sqlite_store_url)
    for command in (("topics",), ("worker", "--until-caught-up")):
        result = cli(settings, *command, timeout=120, PORTAL_SYNC_REPLICATION_FACTOR="3")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "InvalidReplicationFactorError" in result.stderr
        assert "PORTAL_SYNC_REPLICATION_FACTOR" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_partition_count_unlike_the_topics_is_a_configuration_error(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """The change topics have 3 partitions, a worker was told 6: it started without a
    word and dead-lettered every valid event it placed otherwise as `key_mismatch`
    (`publish` partitions by the topic's own count). It and `topics` now refuse to start
    (exit 2), naming the setting and the topics' count; `publish` and the producers,
    which never use the setting, go on."""
    settings = settings_for(sqlite_store_url)  # 3 partitions
    ensure_topics(settings)
    feed = write_jsonl(tmp_path / "feed.jsonl", citizen_events(10, 1))
    sent = cli(settings, "publish", str(feed), PORTAL_SYNC_CHANGE_PARTITIONS="6")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    for command in (("topics",), ("worker", "--until-caught-up")):
        result = cli(settings, *command, timeout=120, PORTAL_SYNC_CHANGE_PARTITIONS="6")
        assert result.returncode == 2, result.stdout + result.stderr
        said = " ".join(result.stderr.split())
        assert "PORTAL_SYNC_CHANGE_PARTITIONS is 6, but" in said, said
        assert f"{settings.topics().change_topic('citizen')} has 3" in said, said
        assert "Traceback" not in result.stderr
    dead = admin.end_offsets(settings.connection(), [settings.topics().dead_letters])
    assert sum(dead.values()) == 0  # nothing dead-lettered
    fine = cli(settings, "topics")
    assert fine.returncode == 0 and "all topics exist" in fine.stderr, fine.stdout + fine.stderr
    applied = cli(settings, "worker", "--until-caught-up")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert exported(settings) == expected_export(citizen_events(10, 1), Authority())


def test_a_store_that_refuses_the_worker_s_settings_stops_it_with_exit_2(
    settings_for: Any, postgres_store_url: str
) -> None:
    """A database that does not exist (a name mistyped, a wrong password alike): the
    long-running worker waited as for a store away, retrying for ever with /readyz false
    and nothing else to go on. Such a refusal is the settings' error (exit 2), named."""
    from sqlalchemy.engine import make_url

    missing = make_url(postgres_store_url).set(database="khong_co").render_as_string(False)
    settings = settings_for(missing)
    result = cli(settings, "worker", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert 'database "khong_co" does not exist' in said, said
    assert "Traceback" not in result.stderr


def test_a_batch_held_past_the_poll_interval_keeps_the_member_through_a_rebalance(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store away for longer than the consumer's `max_poll_interval` (here 4 s; 10
    minutes in a worker) while a batch is retried: the member polls with its partitions
    paused, so it stays in the group, under the member id it joined with. Before, aiokafka
    left the group, and the rejoin (a new member id) rebalanced the whole group once the
    store was back. Another member joins meanwhile: the rebalance waits for the batch in
    hand, and so does the held member's poll, which waits for the assignment. That poll
    is never cancelled (aiokafka would keep counting it in progress, and the member's idle
    time stayed 0 for good): the next batch waits for it. Every event is applied once,
    from the store's offsets."""
    import asyncio
    import threading
    import time as clock

    import consumers.loop as loop_module
    import transport.group as group_module
    from consumers.loop import ReconcilerLoop
    from schemas import message_key
    from store.failures import StoreUnavailable
    from tests.support.kafka_helpers import change_topic, join_and_leave, publisher_for
    from transport.group import GroupMember

    monkeypatch.setattr(group_module, "MAX_POLL_INTERVAL_MS", 4_000)
    settings = settings_for(sqlite_store_url, change_partitions=2)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()
    config = settings.worker_config()
    processor = BatchProcessor(config, store, Registry(), Authority())
    events = citizen_events(40, 2, seed=53)
    publisher = publisher_for(settings)
    for raw in events:
        publisher.send(
            change_topic(settings, "citizen"),
            message_key(raw["entity"], raw["key"], raw["source"]),
            json.dumps(raw, ensure_ascii=False).encode(),
        )
    publisher.flush()
    publisher.close()
    members: list[GroupMember] = []
    polls: list[float] = []  # how long each held poll took

    member_ids: list[str] = []  # the member's id at each of its assignments

    class Member(GroupMember):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            members.append(self)

        def _assigned(self, partitions: set[tuple[str, int]]) -> None:
            member_ids.append(self._consumer._coordinator.member_id)
            super()._assigned(partitions)

        async def _held_poll(self) -> None:
            began = clock.monotonic()
            await super()._held_poll()
            polls.append(clock.monotonic() - began)

    joining = threading.Thread(
        target=join_and_leave, args=(settings, lambda other: bool(other.assignment()), 90)
    )
    away_until = 0.0
    real_apply = processor.reconciler.apply

    def away(*args: Any, **kwargs: Any) -> Any:
        nonlocal away_until
        if not away_until:
            away_until = clock.monotonic() + 20  # five poll intervals; room for a join
            joining.start()
        if clock.monotonic() < away_until:
            raise StoreUnavailable("the store is away")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(loop_module, "GroupMember", Member)
    monkeypatch.setattr(processor.reconciler, "apply", away)
    loop = ReconcilerLoop(config, store, processor, until_caught_up=False)

    async def run_until_applied() -> tuple[int, int]:
        task = asyncio.ensure_future(loop.run())
        for _ in range(1200):
            if task.done() or (
                not joining.is_alive() and away_until and sum(loop.applied.values()) >= len(events)
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        loop.stop()
        code = await asyncio.wait_for(task, 60)
        # aiokafka's count of polls in progress, once the loop's own are over
        return code, members[0]._consumer._subscription._fetch_count

    try:
        code, in_progress = asyncio.run(run_until_applied())
    finally:
        processor.close()
    joining.join(10)
    assert code == 0
    # its own first join and the other's (its leave may fall in the same rebalance)
    assert members[0].rebalances >= 2
    assert len(member_ids) >= 2 and len(set(member_ids)) == 1, member_ids  # never left
    assert in_progress == 0  # no poll left counted as in progress
    # one poll waited for the rebalance (without one, a paused poll returns at once)
    assert any(took > 2.0 for took in polls), polls
    assert sum(store.all_offsets().values()) == len(events)
    store.close()
    assert exported(settings) == expected_export(events, Authority())


def test_a_batch_beyond_postgresql_s_lock_table_is_applied_in_halves(
    settings_for: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that needs more advisory locks than PostgreSQL's lock table holds (one a
    record; a table sized below a full batch, or filled by other workers and a purge)
    failed as transient for ever, retried whole: the worker stalled on it. After a few
    failures in a row it is applied in halves, each its own transaction, and halved again
    while they do not fit. Every event is applied, once. (max_locks_per_transaction 10 ×
    20 connections, on a server of its own.)"""
    import logging
    import threading

    import consumers.processor as processor_module
    from tests.support.postgres_server import PostgresUnavailable, start_postgres

    try:
        server = start_postgres(
            settings={"max_locks_per_transaction": "10", "max_connections": "20"}
        )
    except PostgresUnavailable as error:
        from tests.conftest import _unavailable

        _unavailable("PostgreSQL", error)
    monkeypatch.setattr(processor_module, "FIRST_RETRY_SECONDS", 0.05)
    try:
        settings, store, processor, events, messages = _one_partition(
            settings_for, server.url("postgres"), seed=54, count=4000
        )
        assert len(messages) > 2500  # one source's: far beyond the table
        failed: list[BaseException] = []

        def apply() -> None:
            try:
                processor.process(messages)
            except BaseException as error:
                failed.append(error)

        with caplog.at_level(logging.WARNING, logger="consumers.processor"):
            applying = threading.Thread(target=apply)
            applying.start()
            applying.join(120)
            if applying.is_alive():  # retried whole for ever: stop it
                processor.stopping.set()
                applying.join(30)
        halved = [r for r in caplog.records if "applied in halves" in r.getMessage()]
        offsets = store.all_offsets()
        processor.close()
        store.close()
        assert not failed, failed
        assert halved  # the batch did not fit whole
        assert offsets == {messages[0].tp: len(messages)}
        assert exported(settings) == expected_export(events, Authority())
    finally:
        server.stop()
