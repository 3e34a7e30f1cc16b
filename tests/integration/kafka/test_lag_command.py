"""`portal-sync lag` against the real broker and store: offsets, lag, status, freshness."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from consumers.merge import Authority
from observability.kafka_lag import STORE_READ_SECONDS, Filters, LagReader
from observability.lag import Status
from store import Store
from tests.support.kafka_helpers import commit_group_offsets, ensure_topics
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    write_jsonl,
)
from transport import clients
from transport.admin import Cluster

pytestmark = pytest.mark.kafka


def rows(output: str, topic: str) -> list[list[str]]:
    """The table rows of one topic, as cells."""
    found = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 9 and cells[1] == topic:
            found.append(cells)
    return found


def test_lag_shows_offsets_time_lag_status_and_stale_sources(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    events = citizen_events(keys=30, versions=2)  # changes made in 2025: stale sources
    assert cli(settings, "publish", str(write_jsonl(tmp_path / "e.jsonl", events))).returncode == 0
    topic = f"{settings.topic_prefix}.changes.citizen"

    before = cli(settings, "lag", "--topic", ".*citizen", COLUMNS="220")

    assert before.returncode == 0, before.stderr
    table = rows(before.stdout, topic)
    assert [int(r[2]) for r in table] == [0, 1, 2]
    assert sum(int(r[5]) for r in table) == len(events)
    assert all(r[3] == "0" and r[7] == "STOP" for r in table if int(r[5]) > 0)
    # Time lag from the Kafka timestamp of the oldest unapplied message: published just now.
    assert all(re.fullmatch(r"\d+(ms|s)", r[6]) for r in table if int(r[5]) > 0), before.stdout
    assert ".changes.dossier" not in before.stdout

    assert cli(settings, "worker", "--until-caught-up").returncode == 0
    after = cli(settings, "lag", COLUMNS="220")

    table = rows(after.stdout, topic)
    assert [int(r[2]) for r in table] == [0, 1, 2], after.stdout
    assert all(r[3] == r[4] and r[5] == "0" and r[7] == "OK" for r in table), after.stdout
    for source in ("province-01", "province-79", "ministry-btp"):
        line = next(line for line in after.stdout.splitlines() if f" {source} " in line)
        assert "STALE" in line


def test_the_exporter_reads_kafkas_copy_of_the_offsets_when_the_store_cannot_be_read(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """The store's offsets are the truth; when the store cannot be read (unreachable,
    credentials refused, here a file that is no database), the worker's copy in Kafka stands
    in. Zeros instead would show the whole log as lag and page STALL at every partition. A
    store without a schema yet has applied nothing: the whole log is lag."""
    settings = settings_for(sqlite_store_url)
    events = citizen_events(keys=30, versions=2)
    assert cli(settings, "publish", str(write_jsonl(tmp_path / "e.jsonl", events))).returncode == 0
    assert cli(settings, "worker", "--until-caught-up").returncode == 0

    def lag(store_url: str) -> int:
        reader = LagReader(
            settings.connection(),
            settings.topics(),
            settings.group_id,
            store_url,
            filters=Filters(topic=".*citizen"),
        )
        try:
            own = {g.group: g for g in reader.read()}[settings.group_id]
        finally:
            reader.close()
        return sum(p.lag_messages for p in own.partitions)

    assert lag(sqlite_store_url) == 0
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"no database here " * 512)
    assert lag(f"sqlite:///{broken}") == 0
    assert lag(f"sqlite:///{tmp_path / 'new.db'}") == len(events)


def test_a_store_that_never_answers_does_not_hold_the_lag_of_any_group(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A database that accepts the connection and never answers (a hung server or proxy)
    held every poll: the lag of every group froze at its last values while the real lag
    grew, and the exporter's health check then restarted it into the same hang. The
    store's offsets are read with a deadline, Kafka's copy standing in past it; a read
    still hanging is not started again by the next poll."""
    settings = settings_for(sqlite_store_url)
    events = citizen_events(keys=20, versions=2)
    assert cli(settings, "publish", str(write_jsonl(tmp_path / "e.jsonl", events))).returncode == 0
    assert cli(settings, "worker", "--until-caught-up").returncode == 0
    silent = socket.create_server(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:  # each connection held open, never answered
        try:
            while True:
                accepted.append(silent.accept()[0])
        except OSError:  # closed at the end of the test
            return

    threading.Thread(target=accept, daemon=True).start()
    port = silent.getsockname()[1]
    reader = LagReader(
        settings.connection(),
        settings.topics(),
        settings.group_id,
        f"postgresql+psycopg://u:p@127.0.0.1:{port}/db?connect_timeout=120",
        filters=Filters(topic=".*citizen"),
    )
    try:
        for _poll in range(2):
            began = time.monotonic()
            own = {g.group: g for g in reader.read()}[settings.group_id]
            assert time.monotonic() - began < STORE_READ_SECONDS + 10
            assert sum(p.lag_messages for p in own.partitions) == 0  # Kafka's copy
        assert len(accepted) == 1  # the second poll did not start another read
    finally:
        reader.close()
        silent.close()


def test_a_log_ending_in_a_transaction_marker_is_no_lag(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """A transactional writer's commit marker ends the log one past the last event: the
    store's offset (and any consumer's) stops before it. That was one message of lag for
    ever, with no time lag (each poll waited out its timeout for a message that does not
    exist), and STALL once the window filled: a page for a caught-up worker."""
    from tests.support.kafka_helpers import change_topic, ensure_topics, send_in_transactions

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    first, second = citizen_events(2, 1, seed=45)[:2]
    # offsets 0 and 2, markers 1 and 3
    send_in_transactions(settings, topic, [(first, False), (second, True)])
    assert cli(settings, "worker", "--until-caught-up").returncode == 0
    reader = LagReader(
        settings.connection(),
        settings.topics(),
        settings.group_id,
        settings.store_url,
        filters=Filters(topic=".*citizen"),
        window_seconds=0.5,
    )
    try:
        for _poll in range(3):
            began = time.monotonic()
            (own,) = [g for g in reader.read() if g.group == settings.group_id]
            assert time.monotonic() - began < 4  # not the timestamps' 5 s timeout
            (partition,) = own.partitions
            assert (partition.committed, partition.lag_messages) == (3, 0)
            assert partition.lag_seconds == 0
            time.sleep(0.3)
        assert own.status == Status.OK
    finally:
        reader.close()


def test_an_open_transaction_shows_as_lag_of_the_reconciler_and_no_other_group_is_stop(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """An open transaction holds back the worker (read_committed) and everything after it:
    that is lag, paged as ever, not 0 (lag measured to the last stable offset hid it), and
    `worker --until-caught-up` waits for it, then applies all. A group reading uncommitted
    records at the log's end is caught up, not STOP (past the last stable offset, taken as
    a log's end, read as a topic created again)."""
    import json

    from kafka import KafkaProducer

    from schemas.partitioning import message_key
    from tests.support.kafka_helpers import change_topic, ensure_topics
    from tests.support.pipeline_helpers import start_worker

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    before, held, after = citizen_events(3, 1, seed=46)[:3]

    def sent(raw: dict[str, Any]) -> tuple[bytes, bytes]:
        return message_key(raw["entity"], raw["key"], raw["source"]), json.dumps(raw).encode()

    plain = KafkaProducer(bootstrap_servers=settings.connection().bootstrap)
    writer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap, transactional_id=f"{topic}-open"
    )
    worker = None
    try:
        plain.send(topic, *reversed(sent(before)), partition=0).get(30)  # offset 0
        writer.init_transactions()
        writer.begin_transaction()
        key, value = sent(held)
        writer.send(topic, key=key, value=value, partition=0)  # offset 1, left open
        writer.flush()
        plain.send(topic, *reversed(sent(after)), partition=0).get(30)  # offset 2
        worker = start_worker(settings, "--until-caught-up")
        store = Store(settings.store_url)

        def applied() -> dict[tuple[str, int], int] | None:
            try:
                return store.all_offsets()
            except Exception:  # the worker is creating the store
                return None

        deadline = time.monotonic() + 60
        while applied() != {(topic, 0): 1} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert applied() == {(topic, 0): 1}
        other = f"{settings.group_id}-uncommitted"
        commit_group_offsets(settings, other, {(topic, 0): 3})
        reader = LagReader(
            settings.connection(),
            settings.topics(),
            settings.group_id,
            settings.store_url,
            filters=Filters(group=f"{settings.group_id}.*", topic=".*citizen"),
        )
        try:
            groups = {g.group: g for g in reader.read()}
        finally:
            reader.close()
        (own,) = groups[settings.group_id].partitions
        assert (own.committed, own.end, own.lag_messages) == (1, 3, 2)
        (theirs,) = groups[other].partitions
        assert theirs.lag_messages == 0 and groups[other].status != Status.STOP
        time.sleep(12)  # past the worker's next question of the partition
        assert worker.poll() is None  # still waiting for the transaction
        writer.commit_transaction()
        out, _ = worker.communicate(timeout=90)
        assert worker.returncode == 0, out
        assert "an open transaction holds back offsets 1 to 3" in out, out
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        writer.close()
        plain.close()
    assert exported(settings) == expected_export([before, held, after], Authority())
    assert Store(settings.store_url).all_offsets() == {(topic, 0): 3}  # the marker at 3


def test_a_partition_never_applied_lags_by_what_its_log_holds_from_its_start(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Retention (or `kafka-delete-records`) moved the log's start past 0 (a change topic
    an operator set to `compact,delete`): a partition the store never applied showed its
    whole offset range as lag, more than the log holds."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType

    settings = settings_for(sqlite_store_url)
    events = citizen_events(keys=30, versions=2)
    assert cli(settings, "publish", str(write_jsonl(tmp_path / "e.jsonl", events))).returncode == 0
    topic = f"{settings.topic_prefix}.changes.citizen"
    before = {int(r[2]): int(r[5]) for r in rows(cli(settings, "lag", COLUMNS="220").stdout, topic)}
    partition = max(before, key=lambda p: before[p])
    assert before[partition] >= 3
    admin = KafkaAdminClient(bootstrap_servers=settings.connection().bootstrap)
    try:
        policy = {"cleanup.policy": "compact,delete"}
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=policy)])
        admin.delete_records({TopicPartition(topic, partition): 2})
    finally:
        admin.close()

    after = {int(r[2]): int(r[5]) for r in rows(cli(settings, "lag", COLUMNS="220").stdout, topic)}
    assert after == before | {partition: before[partition] - 2}


def test_two_groups_at_different_offsets_of_one_partition_both_get_their_time_lag(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """Two consumer groups reading one partition at different offsets: the oldest unapplied
    message's timestamp was asked once per partition, so only one group had a time lag
    (`portal_sync_consumer_lag_seconds`), the other's series was missing and its alert
    could not fire. Every (partition, offset) asked gets the timestamp of its own message."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    topic = f"{settings.topic_prefix}.changes.citizen"
    producer = clients.producer(settings.connection(), "lag-two-groups", acks="all")
    try:
        for burst in range(2):  # the broker's clock stamps them: two bursts 1.5 s apart
            if burst:
                time.sleep(1.5)
            for n in range(5):
                producer.send(topic, key=f"k{burst}{n}".encode(), value=b"{}", partition=0)
            producer.flush()
    finally:
        producer.close()
    behind, ahead = f"{settings.group_id}-analytics", settings.group_id
    for group, offset in ((behind, 2), (ahead, 7)):
        commit_group_offsets(settings, group, {(topic, 0): offset})
    with Cluster(settings.connection()) as cluster:
        # Offset 10 is the log's end: no message, left out (after the deadline).
        stamps = cluster.first_timestamps({(topic, 0, 2), (topic, 0, 7), (topic, 0, 10)}, 2.0)
    assert set(stamps) == {(topic, 0, 2), (topic, 0, 7)}
    assert stamps[(topic, 0, 7)] - stamps[(topic, 0, 2)] >= 1000  # each its own message

    reader = LagReader(
        settings.connection(),
        settings.topics(),
        settings.group_id,
        sqlite_store_url,
        filters=Filters(group=f"{settings.group_id}.*", topic=".*citizen"),
        offsets_from="kafka",
    )
    try:
        before = time.time()
        lags = {g.group: g.partitions for g in reader.read()}
        after = time.time()
    finally:
        reader.close()
    assert set(lags) == {behind, ahead}
    for group, offset in ((behind, 2), (ahead, 7)):
        (partition,) = lags[group]
        assert (partition.committed, partition.end) == (offset, 10)
        assert partition.lag_seconds is not None, f"{group}: no time lag"
        stamp = stamps[(topic, 0, offset)] / 1000
        assert before - stamp - 0.01 <= partition.lag_seconds <= after - stamp + 0.01
