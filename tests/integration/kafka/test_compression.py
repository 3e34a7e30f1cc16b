"""Messages compressed by a producer of another stack: Java clients and Debezium often set
lz4, zstd or snappy. The worker (aiokafka) and the replay's reader (kafka-python) read each
codec; without its library a client fails on such a batch, and the worker retried it
forever while its partition stood still."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kafka import KafkaProducer

from consumers.merge import Authority
from schemas import message_key
from schemas.partitioning import partition_for
from tests.support.kafka_helpers import change_topic, ensure_topics, publisher_for
from tests.support.pipeline_helpers import citizen_events, cli, expected_export, exported

pytestmark = pytest.mark.kafka
CODECS = ("gzip", "snappy", "lz4", "zstd")


def test_every_codec_a_producer_may_use_is_read_by_the_worker_and_the_replay(
    settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    events = citizen_events(60, 2, seed=46)
    partitions = settings.topics().change_partitions
    for index, codec in enumerate(CODECS):
        producer = KafkaProducer(
            bootstrap_servers=settings.connection().bootstrap,
            compression_type=codec,
            linger_ms=50,  # batches of several records: what a codec compresses
        )
        for event in events[index :: len(CODECS)]:
            key = message_key("citizen", event["key"], event["source"])
            value = json.dumps(event, ensure_ascii=False).encode()
            producer.send(topic, key=key, value=value, partition=partition_for(key, partitions))
        producer.flush()
        producer.close()

    worker = cli(settings, "worker", "--until-caught-up", timeout=120)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    assert exported(settings) == expected_export(events, Authority())

    replayed = cli(settings, "replay", "--since", "1h", "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert json.loads(replayed.stdout)["read"] == len(events)


def test_our_producers_send_lz4_batches_the_broker_keeps_compressed(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """The Publisher (every producer's and the worker's dead letters' way to Kafka) sends
    lz4: the topic's log on the broker holds a fraction of the values' bytes. Without
    compression the log holds more than the values themselves (record and batch headers)."""
    from kafka.admin import KafkaAdminClient

    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    topic = change_topic(settings, "citizen")
    events = citizen_events(400, 3, seed=47)
    publisher = publisher_for(settings)
    sent = 0
    try:
        for event in events:
            key = message_key("citizen", event["key"], event["source"])
            value = json.dumps(event, ensure_ascii=False).encode()
            publisher.send(topic, key, value)
            sent += len(key) + len(value)
        publisher.flush()
    finally:
        publisher.close()

    admin = KafkaAdminClient(bootstrap_servers=settings.connection().bootstrap)
    try:
        described = admin.describe_log_dirs(topic_partitions=[topic])
    finally:
        admin.close()
    kept = sum(
        partition["partition_size"]
        for broker in described
        for log_dir in broker["log_dirs"]
        for found in log_dir["topics"]
        if found["name"] == topic
        for partition in found["partitions"]
    )
    assert 0 < kept < sent / 2, (kept, sent)
