"""The transport's calls with the tests' `Settings`: topics, end offsets, a publisher."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from portal_sync.settings import Settings
from schemas.partitioning import message_key
from transport import admin
from transport.publisher import Publisher


def ensure_topics(settings: Settings) -> list[str]:
    return admin.ensure_topics(settings.connection(), settings.topics())


def end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    return admin.end_offsets(settings.connection(), settings.topics().change_topics())


def change_topic(settings: Settings, entity: str) -> str:
    return settings.topics().change_topic(entity)


def dead_letter_topic(settings: Settings) -> str:
    return settings.topics().dead_letters


def dead_letters_written(settings: Settings) -> int:
    """How many letters the dead-letter topic has ever had (its log-end offsets; the topic
    must exist, so that none is never taken for zero)."""
    topic = dead_letter_topic(settings)
    ends = admin.end_offsets(settings.connection(), [topic])
    assert ends and {t for t, _ in ends} == {topic}, f"{topic} not found"
    return sum(ends.values())


def publisher_for(settings: Settings, client_id: str = "portal-sync-test") -> Publisher:
    return Publisher(settings.connection(), settings.topics(), client_id=client_id)


def wait_group_stable(settings: Settings, group: str, timeout: float = 60.0) -> bool:
    with admin.cluster(settings.connection()) as cluster:
        return cluster.wait_group_stable(group, timeout)


def commit_group_offsets(
    settings: Settings, group: str, offsets: dict[tuple[str, int], int]
) -> None:
    """Committed offsets of a group that never ran, once the broker lists the group
    (retried while a fresh broker has no group coordinator yet)."""
    deadline = time.monotonic() + 60
    with admin.cluster(settings.connection()) as cluster:
        while True:
            try:
                cluster.alter_group_offsets(group, offsets)
                if group in cluster.consumer_groups():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            assert time.monotonic() < deadline, f"group {group} not listed"
            time.sleep(0.5)


def send_in_transactions(
    settings: Settings, topic: str, events: list[tuple[dict[str, Any], bool]]
) -> None:
    """Each event in a transaction of its own on partition 0, committed (True) or aborted:
    a transactional writer, whose every transaction ends with a marker."""
    producer = KafkaProducer(
        bootstrap_servers=settings.connection().bootstrap, transactional_id=f"{topic}-tx"
    )
    try:
        producer.init_transactions()
        for raw, keep in events:
            producer.begin_transaction()
            key = message_key(raw["entity"], raw["key"], raw["source"])
            producer.send(topic, key=key, value=json.dumps(raw).encode(), partition=0)
            producer.flush()
            (producer.commit_transaction if keep else producer.abort_transaction)()
    finally:
        producer.close()


def join_and_leave(
    settings: Settings, joined: Callable[[KafkaConsumer], bool], timeout: float
) -> None:
    """Another member of the settings' group on the citizen topic: it polls until
    `joined(it)` (or `timeout` seconds), then leaves, and its partitions go back."""
    other = KafkaConsumer(
        bootstrap_servers=settings.connection().bootstrap,
        group_id=settings.group_id,
        enable_auto_commit=False,
        session_timeout_ms=10_000,
    )
    other.subscribe([settings.topics().change_topic("citizen")])
    deadline = time.monotonic() + timeout
    while not joined(other) and time.monotonic() < deadline:
        other.poll(200)
    other.close()
