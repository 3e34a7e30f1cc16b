"""The project's topics, created explicitly (the broker never auto-creates them).

| topic                              | partitions         | retention                 |
|------------------------------------|--------------------|---------------------------|
| `<prefix>.changes.<entity>`        | `change_partitions`| `change_retention_hours`  |
| `<prefix>.dead-letters`            | 1                  | `dead_letter_retention_hours` |

Change topics are keyed by `<entity>:<key>`, so all events of one record share a partition.
Their retention bounds what a replay or rebuild can promise (docs/operations.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from portal_sync.settings import Settings
from schemas import ENTITIES


def change_topic(settings: Settings, entity: str) -> str:
    return f"{settings.topic_prefix}.changes.{entity}"


def change_topics(settings: Settings) -> list[str]:
    return [change_topic(settings, entity) for entity in ENTITIES]


def dead_letter_topic(settings: Settings) -> str:
    return f"{settings.topic_prefix}.dead-letters"


def topic_specs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Topic name to creation options (partitions, replication, configs)."""
    hour_ms = 3_600_000
    # With replicas, acks=all waits for at least two copies (one may be down).
    in_sync = str(min(2, settings.replication_factor))
    changes = {
        "cleanup.policy": "delete",
        "retention.ms": str(settings.change_retention_hours * hour_ms),
        "message.timestamp.type": "CreateTime",
        "max.message.bytes": str(2 * 1_048_576),
        "min.insync.replicas": in_sync,
    }
    dead_letters = {
        "cleanup.policy": "delete",
        "retention.ms": str(settings.dead_letter_retention_hours * hour_ms),
        "max.message.bytes": str(4 * 1_048_576),
        "min.insync.replicas": in_sync,
    }
    specs: dict[str, dict[str, Any]] = {
        topic: {
            "num_partitions": settings.change_partitions,
            "replication_factor": settings.replication_factor,
            "configs": changes,
        }
        for topic in change_topics(settings)
    }
    specs[dead_letter_topic(settings)] = {
        "num_partitions": 1,
        "replication_factor": settings.replication_factor,
        "configs": dead_letters,
    }
    return specs


def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; return the names created (existing ones are left as they are)."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap(), client_id="portal-sync-admin")
    try:
        existing = set(admin.list_topics())
        missing = {
            name: spec for name, spec in topic_specs(settings).items() if name not in existing
        }
        if missing:
            # Another process may create them concurrently.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing, timeout_ms=30_000)
            admin.wait_for_topics(list(missing), timeout_ms=30_000)
        return sorted(missing)
    finally:
        admin.close()
