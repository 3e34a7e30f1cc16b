"""The reconciler's group member on a real broker: while an assignment waits for the store's
offsets, nothing is fetched from Kafka's positions; once sought, the batches start there."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from kafka import KafkaProducer

from schemas.errors import ConfigurationError, TransientError
from tests.support.kafka_helpers import ensure_topics
from transport.group import GroupMember

pytestmark = pytest.mark.kafka


def _filled(settings_for: Any, partitions: int, count: int) -> tuple[Any, str]:
    """Settings whose citizen topic has `partitions` partitions, and `count` records sent
    to them in turn (record n to partition n % partitions)."""
    settings = settings_for("sqlite://", change_partitions=partitions)
    ensure_topics(settings)
    topic = settings.topics().change_topic("citizen")
    producer = KafkaProducer(bootstrap_servers=settings.connection().bootstrap)
    for n in range(count):
        producer.send(topic, key=b"k", value=b"%d" % n, partition=n % partitions)
    producer.flush(30)
    producer.close()
    return settings, topic


async def _no_revoke(_: Any) -> None:
    return None


def test_nothing_is_fetched_while_an_assignment_waits_for_the_store(settings_for: Any) -> None:
    settings, topic = _filled(settings_for, 1, 200)

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

        member = GroupMember(
            settings.connection(), [topic], settings.group_id, assigned, _no_revoke
        )
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


def test_an_assignment_that_waits_for_the_store_past_the_session_keeps_the_member(
    settings_for: Any,
) -> None:
    """The store away for longer than the group's session timeout (10 s) when partitions
    are assigned: the member goes on beating while it waits, so the coordinator keeps it.
    Asked inside the rebalance, it sent no heartbeat: it was expelled, and its rejoin
    (another rebalance of the whole group) asked the store again."""
    settings, topic = _filled(settings_for, 1, 20)
    asked: list[float] = []

    async def join() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()

        async def assigned(partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
            asked.append(loop.time())
            if len(asked) == 1:
                await asyncio.sleep(14)  # the worker retries with backoff meanwhile
            return {}

        member = GroupMember(
            settings.connection(), [topic], settings.group_id, assigned, _no_revoke
        )
        await member.start()
        try:
            offsets: list[int] = []
            deadline = loop.time() + 60
            while len(offsets) < 20 and loop.time() < deadline:
                offsets += [m.offset for m in await member.batch(50, 0.2)]
            settled = loop.time()
            while loop.time() < settled + 8:  # an expelled member's rejoin comes by now
                offsets += [m.offset for m in await member.batch(50, 0.2)]
            return offsets, member._consumer._coordinator.generation
        finally:
            await member.stop()

    offsets, generation = asyncio.run(join())
    assert offsets == list(range(20))
    assert len(asked) == 1
    assert generation == 1  # one join


def test_a_batch_fetched_before_a_rebalance_is_read_again_not_applied(
    settings_for: Any, sqlite_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance that begins while a fetched batch is being checked: the batch is dropped
    (its partitions may be another member's by then) and read again from the store's
    offsets once they are ours; every event is applied once."""
    import json

    import consumers.loop as loop_module
    from consumers.loop import ReconcilerLoop
    from consumers.merge import Authority
    from consumers.processor import BatchProcessor
    from consumers.registry import Registry
    from schemas.partitioning import message_key
    from store.core import Store
    from tests.support.kafka_helpers import change_topic, join_and_leave, publisher_for
    from tests.support.pipeline_helpers import citizen_events, expected_export, exported

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    events = citizen_events(60, 1, seed=41)
    publisher = publisher_for(settings)
    for raw in events:
        key = message_key(raw["entity"], raw["key"], raw["source"])
        publisher.send(change_topic(settings, "citizen"), key, json.dumps(raw).encode())
    publisher.flush()
    publisher.close()
    store = Store(settings.store_url)
    store.create_schema()
    config = settings.worker_config()
    processor = BatchProcessor(config, store, Registry(), Authority())
    members: list[GroupMember] = []

    class Member(GroupMember):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            members.append(self)

    def another_member_joins_and_leaves() -> None:
        rebalances = members[0].rebalances
        join_and_leave(settings, lambda _: members[0].rebalances != rebalances, 60)

    prepared_first: list[object] = []
    applied: list[object] = []
    real_prepare, real_process = processor.prepare, processor.process

    def prepare(messages: Any) -> Any:
        if not prepared_first:
            prepared_first.append(messages)
            another_member_joins_and_leaves()
        return real_prepare(messages)

    def process(messages: Any, *args: Any, **kwargs: Any) -> None:
        applied.append(messages)
        real_process(messages, *args, **kwargs)

    monkeypatch.setattr(loop_module, "GroupMember", Member)
    monkeypatch.setattr(processor, "prepare", prepare)
    monkeypatch.setattr(processor, "process", process)
    loop = ReconcilerLoop(config, store, processor, until_caught_up=True)
    try:
        assert asyncio.run(asyncio.wait_for(loop.run(), 180)) == 0
    finally:
        processor.close()
    assert members and members[0].rebalances >= 2  # one at the join, one at least after
    assert prepared_first and not any(batch is prepared_first[0] for batch in applied)
    assert store.all_offsets() == {(settings.topics().change_topic("citizen"), 0): len(events)}
    assert exported(settings) == expected_export(events, Authority())
    store.close()


def test_a_position_past_the_logs_end_stops_the_member_instead_of_falling_back(
    settings_for: Any,
) -> None:
    """The store applied up to 300 and the log now ends at 200 (truncated by an unclean
    leader election, a broker that lost its tail): the client falls back to the log's start
    on its own (auto_offset_reset), and every record below 300, new ones at 200-299 among
    them, would have been taken as applied."""
    settings, topic = _filled(settings_for, 1, 200)

    async def join() -> str:
        async def assigned(_: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
            return {(topic, 0): 150}

        member = GroupMember(
            settings.connection(), [topic], settings.group_id, assigned, _no_revoke
        )
        await member.start()
        try:
            while member.assignments == 0:
                await member.batch(50, 0.1)
            member._consumer.seek(TopicPartition(topic, 0), 300)  # where the store is
            member._next[(topic, 0)] = 300
            with pytest.raises(ConfigurationError) as refused:
                for _ in range(100):
                    await member.batch(50, 0.1)
            return str(refused.value)
        finally:
            await member.stop()

    said = asyncio.run(join())
    assert f"{topic}:0: the log ends before the store's next offset 300" in said
    assert "fell back to 0" in said


def test_records_a_failed_fetch_drained_are_fetched_again(settings_for: Any) -> None:
    """aiokafka moves each partition's position as it drains it; a fetch that then fails
    on another partition drops what it drained. On a partition the store never held, the
    records after them were taken as the partition's start: those were never applied."""
    settings, topic = _filled(settings_for, 2, 300)

    async def join() -> dict[int, list[int]]:
        async def assigned(_: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
            return {}  # never held: each partition from its log's start

        member = GroupMember(
            settings.connection(), [topic], settings.group_id, assigned, _no_revoke
        )
        real_getmany = member._consumer.getmany
        failures = [3]  # the third fetch with records drains them, then fails

        async def failing(*args: Any, **kwargs: Any) -> Any:
            found = await real_getmany(*args, **kwargs)
            if any(found.values()) and member.assignments:
                failures[0] -= 1
                if failures[0] == 0:
                    raise KafkaConnectionError("the node went away")
            return found

        member._consumer.getmany = failing  # type: ignore[method-assign]
        await member.start()
        offsets: dict[int, list[int]] = {0: [], 1: []}
        try:
            for _ in range(400):
                try:
                    messages = await member.batch(40, 0.1)
                except TransientError:
                    continue
                for message in messages:
                    offsets[message.partition].append(message.offset)
                if sum(map(len, offsets.values())) >= 300:
                    break
            return offsets
        finally:
            await member.stop()

    offsets = asyncio.run(join())
    assert offsets == {0: list(range(150)), 1: list(range(150))}
