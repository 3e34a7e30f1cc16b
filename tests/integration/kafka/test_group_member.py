"""The reconciler's group member on a real broker: while an assignment waits for the store's
offsets, nothing is fetched from Kafka's positions; once sought, the batches start there."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kafka import KafkaProducer

from tests.support.kafka_helpers import ensure_topics
from transport.group import GroupMember

pytestmark = pytest.mark.kafka


def test_nothing_is_fetched_while_an_assignment_waits_for_the_store(settings_for: Any) -> None:
    settings = settings_for("sqlite://", change_partitions=1)
    ensure_topics(settings)
    topic = settings.topics().change_topic("citizen")
    producer = KafkaProducer(bootstrap_servers=settings.connection().bootstrap)
    for n in range(200):
        producer.send(topic, key=b"k", value=b"%d" % n, partition=0)
    producer.flush(30)
    producer.close()

    fetched_while_waiting: list[int] = []
    answered = asyncio.Event()
    waiting = True

    async def join() -> list[int]:
        nonlocal waiting

        async def assigned(partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
            nonlocal waiting
            assert partitions == {(topic, 0)}
            await asyncio.sleep(4)  # the store away: the worker retries with backoff
            waiting = False
            answered.set()
            return {(topic, 0): 150}

        async def revoked(_: Any) -> None:
            return None

        member = GroupMember(settings.connection(), [topic], settings.group_id, assigned, revoked)
        real_getmany = member._consumer.getmany

        async def counted(*args: Any, **kwargs: Any) -> Any:
            found = await real_getmany(*args, **kwargs)
            if waiting:
                fetched_while_waiting.append(sum(len(rs) for rs in found.values()))
            return found

        member._consumer.getmany = counted  # type: ignore[method-assign]
        await member.start()
        try:
            offsets: list[int] = []
            for _ in range(200):
                messages = await member.batch(50, 0.1)
                offsets += [m.offset for m in messages]
                if answered.is_set() and len(offsets) >= 50:
                    break
            return offsets
        finally:
            await member.stop()

    offsets = asyncio.run(join())
    assert fetched_while_waiting and sum(fetched_while_waiting) == 0  # polled, never fetched
    assert offsets == list(range(150, 200))  # from the store's offset, whole
