"""The transport's calls with the tests' `Settings`: topics, end offsets, a publisher."""

from __future__ import annotations

from portal_sync.settings import Settings
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
