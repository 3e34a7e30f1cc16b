"""A publisher goes on after the broker refused a message for good."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from tests.support.kafka_helpers import change_topic, ensure_topics, publisher_for
from transport import clients
from transport.publisher import PublishError

pytestmark = pytest.mark.kafka


def _limit(settings: Any, topic: str, max_bytes: int, **more: str) -> None:
    """Set the topic's `max.message.bytes` (and `more` configs, dots as underscores), and
    wait until the broker reports them (a topic just created, or changed, is not at once).
    The others go back to the cluster's defaults (AlterConfigs sets the whole set)."""
    admin = clients.admin(settings.connection())
    configs = {"max.message.bytes": str(max_bytes)}
    configs |= {name.replace("_", "."): value for name, value in more.items()}
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
        asked = [ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(configs))]
        deadline = time.monotonic() + 30
        while True:
            said = admin.describe_configs(asked)["topic"].get(topic, {})
            if all(said.get(k, {}).get("value") == v for k, v in configs.items()):
                return
            assert time.monotonic() < deadline, said
            time.sleep(0.2)
    finally:
        admin.close()


def test_a_message_too_large_for_its_topic_does_not_break_later_sends(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """kafka-python's idempotent producer takes an error the broker says not to retry as
    fatal and cancels every later send, of every topic: the source stayed stuck after the
    topic was fixed, until the process restarted (and /healthz said all was well)."""
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    citizens, dossiers = change_topic(settings, "citizen"), change_topic(settings, "dossier")
    _limit(settings, citizens, 1_000)
    publisher = publisher_for(settings)
    too_large = os.urandom(5_000)  # lz4 would make 5,000 equal bytes about 40
    try:
        publisher.send(citizens, b"citizen:001090000001:province-01", too_large)
        with pytest.raises(PublishError):
            publisher.flush(timeout=30)
        publisher.send(dossiers, b"dossier:000.00.01.H29-240115-0001:province-01", b"{}")
        assert publisher.flush(timeout=30) == 1  # another topic
        _limit(settings, citizens, 2_097_152)  # the topic fixed
        publisher.send(citizens, b"citizen:001090000001:province-01", too_large)
        assert publisher.flush(timeout=30) == 1
    finally:
        publisher.close()


def test_a_topic_that_takes_smaller_messages_than_the_project_sends_is_refused(
    settings_for: Any, sqlite_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Made by an administrator with the cluster's 1 MB default: an event near the
    contract's limit was refused at every retry, and its source never got past it."""
    from kafka.admin import NewTopic

    from schemas.errors import ConfigurationError
    from transport.topics import CHANGE_MAX_MESSAGE_BYTES

    settings = settings_for(sqlite_store_url)
    citizens = change_topic(settings, "citizen")
    admin = clients.admin(settings.connection())
    try:  # as an administrator makes it: no setting of its own, the cluster's default
        admin.create_topics([NewTopic(citizens, settings.change_partitions, 1)])
    finally:
        admin.close()
    with pytest.raises(ConfigurationError, match=f"{citizens} takes messages of at most 1048588"):
        ensure_topics(settings)
    _limit(settings, citizens, CHANGE_MAX_MESSAGE_BYTES)
    # The cluster's default cleanup: the cleaner would delete the records a rebuild needs.
    with pytest.raises(ConfigurationError, match=f"{citizens} has cleanup.policy=delete, "):
        ensure_topics(settings)
    _limit(settings, citizens, CHANGE_MAX_MESSAGE_BYTES, cleanup_policy="compact")
    # What the worker goes on without is named, with the command that sets it.
    with caplog.at_level(logging.WARNING, logger="transport.admin"):
        ensure_topics(settings)
    said = caplog.text
    assert f"the topic {citizens} has message.timestamp.type=CreateTime" in said
    assert "max.compaction.lag.ms=9223372036854775807" in said
    assert f"--entity-name {citizens} --add-config message.timestamp.type=LogAppendTime" in said
