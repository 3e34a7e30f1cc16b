"""Helpers of the adapter tests: source databases on both backends, reading topics back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from portal_sync.settings import Settings
from producers.deployment import Deployment, load_deployment
from schemas.dead_letter import read_headers
from tests.conftest import _fresh_postgres_database
from tests.support.kafka_helpers import change_topic, dead_letter_topic


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh source database: a SQLite file, or a new database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'source.db'}"
    return _fresh_postgres_database(request)


def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of a topic, from the beginning to the end offsets seen now."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.connection().bootstrap, enable_auto_commit=False
    )
    try:
        found = consumer.partitions_for_topic(topic)
        # a missing topic is no empty one: "no dead letters" must not pass without the topic
        assert found, f"topic {topic} does not exist"
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        ends = consumer.end_offsets(partitions)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def published_events(settings: Settings, entity: str) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in read_topic(settings, change_topic(settings, entity))]


def dead_letters(settings: Settings) -> list[dict[str, str]]:
    return [read_headers(r.headers) for r in read_topic(settings, dead_letter_topic(settings))]


def write_config(directory: Path, body: str, state_dir: str = "state") -> Path:
    """A deployment file with metrics off, `body` holding its [[sources]]."""
    path = directory / "sources.toml"
    header = f'[producer]\nstate_dir = "{state_dir}"\nmetrics_port = 0\n\n'
    path.write_text(header + body, encoding="utf-8")
    return path


def deployment(directory: Path, body: str) -> Deployment:
    return load_deployment(write_config(directory, body))
