"""A stop ends the worker's waits for an away store at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest

from consumers.loop import Liveness, ReconcilerLoop
from consumers.metrics import WorkerHealth
from store import Store
from transport.local import free_port


async def _no_poll() -> None:
    """A member's `keep_polling` (`GroupMember`): nothing to keep here."""


def test_a_stop_ends_the_wait_for_the_stores_offsets_at_an_assignment_at_once() -> None:
    """The wait (with backoff to 30 s) runs inside the group's rebalance, which a member's
    stop waits for: the stop was seen only after the next sleep and read, up to about 40 s
    late. The store here is a PostgreSQL address nobody listens on: every read fails."""
    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.store = Store(f"postgresql+psycopg://portal@127.0.0.1:{free_port()}/none")
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    health = WorkerHealth()
    loop.processor = SimpleNamespace(health=health)  # type: ignore[assignment]

    async def wait() -> tuple[object, float]:
        asyncio.get_running_loop().call_later(0.6, loop.stop_event.set)  # in the 2nd wait
        began = time.monotonic()
        stored = await loop._stored_offsets({("portal.changes.citizen", 0)})
        return stored, time.monotonic() - began

    try:
        stored, took = asyncio.run(wait())
    finally:
        loop.store.close()
    assert stored is None
    assert took < 1.3, took  # the wait before: about 1.5 s
    # the wait counted as a batch's retries (not ready; the stall alert's gauge runs)
    assert not health.ready() and health.reason == "StoreUnavailable"


def test_a_wait_for_the_stores_offsets_cancelled_by_a_rebalance_leaves_the_worker_ready() -> None:
    """The group member asks the store outside the rebalance and cancels the ask when the
    next rebalance takes the partitions. Its retries were left set: the next assignment's
    read passed at once and cleared nothing, /readyz stayed 503 and /healthz failed."""
    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.store = Store(f"postgresql+psycopg://portal@127.0.0.1:{free_port()}/none")
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    health = WorkerHealth(stall_after_seconds=0.05)
    loop.processor = SimpleNamespace(health=health)  # type: ignore[assignment]

    async def wait() -> None:
        task = asyncio.ensure_future(loop._stored_offsets({("portal.changes.citizen", 0)}))
        while health.ready():
            await asyncio.sleep(0.05)  # the first read failed: retrying
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(wait())
    finally:
        loop.store.close()
    time.sleep(0.1)  # past the stall limit
    assert health.ready() and not health.stalled()


def test_a_batch_that_retried_and_then_met_a_gap_leaves_the_worker_ready() -> None:
    """A batch retried (the store away), then found another member had applied it
    (OffsetGap): it is over, and its retries with it. Left set, /readyz stayed 503 until a
    later batch, and /healthz failed on a quiet partition. A partition revoked while the
    store's offsets were read is not sought (the consumer refused, and the worker crashed)."""
    from store.failures import OffsetGap

    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    health = WorkerHealth(stall_after_seconds=0.05)
    noted: list[tuple[object, object]] = []
    reconciler = SimpleNamespace(note_offsets=lambda tps, stored: noted.append((set(tps), stored)))
    loop.processor = SimpleNamespace(health=health, reconciler=reconciler)  # type: ignore[assignment]
    stored = {("t", 0): 7, ("t", 1): 3}
    loop.store = SimpleNamespace(stored_offsets=lambda partitions: stored)  # type: ignore[assignment]
    loop.applied = {("t", 0): 9}

    async def check_topics(topics: object, stored: object) -> None:
        return None

    loop._check_topics = check_topics  # type: ignore[method-assign]
    seeks: list[object] = []

    async def seek(offsets: object, partitions: object = None) -> None:
        seeks.append((offsets, partitions))

    held = [{("t", 0), ("t", 1)}, {("t", 0)}]  # t:1 revoked while the store was read
    member = SimpleNamespace(
        assignment=lambda: held.pop(0) if len(held) > 1 else held[0],
        seek=seek,
        keep_polling=_no_poll,
    )

    async def batch() -> None:
        health.busy()
        health.retrying("StoreUnavailable")
        health.free()
        raise OffsetGap("t:0 starts at 9, the store is at 7")

    async def run() -> str:
        loop.idle = asyncio.Event()
        task = asyncio.ensure_future(batch())
        outcome, _ = await loop._finished(member, task, [])  # type: ignore[arg-type]
        return outcome

    assert asyncio.run(run()) == "reseek"
    assert seeks == [(stored, {("t", 0)})]
    # the store's offsets are what the worker has applied again, and what the store must keep
    assert loop.applied == {("t", 0): 7} and noted == [({("t", 0)}, stored)]
    time.sleep(0.06)
    assert health.ready() and not health.stalled()


class _Processor:
    """A batch that retries while the store is away: it ends only when stopped."""

    def __init__(self) -> None:
        import threading

        self.stopping = threading.Event()
        self.health = WorkerHealth(300)
        self.reconciler = SimpleNamespace(cache=None)
        self.ended = threading.Event()

    def prepare(self, messages: object) -> object:
        return object()

    def process(self, messages: object, prepared: object, starts: object) -> None:
        from consumers.processor import Stopping

        try:
            if self.stopping.wait(60):
                raise Stopping()
        finally:
            self.ended.set()


class _Member:
    """As aiokafka's: a fetch during a rebalance waits for its assignment."""

    def __init__(self, second: BaseException) -> None:
        self.rebalances = 0
        self.starts: dict[object, int] = {}
        self.failed = None
        self.calls = 0
        self.second = second
        self.rebalancing = asyncio.Event()
        self.assigned = asyncio.Event()

    def assignment(self) -> set[tuple[str, int]]:
        return {("t", 0)}

    async def keep_polling(self) -> None:
        return None

    async def batch(self, size: int, wait: float) -> list[object]:
        from transport.message import Message

        self.calls += 1
        if self.rebalancing.is_set():
            await self.assigned.wait()
        if self.calls == 1:
            return [Message("t", 0, 0, b"{}")]
        if self.calls == 2:
            await asyncio.sleep(0.1)  # a fetch's round trip: the batch in flight has begun
            raise self.second
        await asyncio.sleep(wait)
        return []


def _loop(processor: _Processor) -> ReconcilerLoop:
    config = SimpleNamespace(
        batch_max_events=10, batch_max_wait_seconds=0.05, topic_check_seconds=1e9
    )
    return ReconcilerLoop(config, None, processor, False)  # type: ignore[arg-type]


def test_an_error_that_ends_the_loop_with_a_batch_in_flight_stops_that_batch() -> None:
    """A configuration error from a fetch (an ACL refused) while a batch retried for an
    away store: the process then waited for that batch's thread, which retried for ever
    (a worker under systemd hung instead of exiting)."""
    from schemas.errors import ConfigurationError

    processor = _Processor()
    loop = _loop(processor)
    member = _Member(ConfigurationError("the topic's ACL refused the worker"))

    async def run() -> None:
        await asyncio.wait_for(loop._consume(member), 10)  # type: ignore[arg-type]

    began = time.monotonic()
    with contextlib.suppress(ConfigurationError):
        asyncio.run(run())
    assert processor.stopping.is_set() and processor.ended.wait(5)
    assert time.monotonic() - began < 5


def test_a_failed_fetch_finishes_the_batch_in_flight_before_a_rebalance_waits_for_it() -> None:
    """A fetch failed with a batch in flight; a rebalance began during the loop's pause,
    and the next fetch waited for its assignment, whose revoke waited for the batch, which
    only the loop could end: 30 s lost, /healthz failing meanwhile."""
    from schemas.errors import TransientError

    processor = _Processor()
    loop = _loop(processor)
    member = _Member(TransientError("fetch failed"))
    waited: list[float] = []

    async def rebalance() -> None:
        await asyncio.sleep(0.5)  # during the loop's pause after the failed fetch
        member.rebalancing.set()
        began = time.monotonic()
        await loop._revoked(set())
        waited.append(time.monotonic() - began)
        member.assigned.set()
        loop.stop()

    async def run() -> None:
        # the batch in flight ends as soon as the loop waits for it (a quick batch)
        asyncio.get_running_loop().call_later(0.2, processor.stopping.set)
        task = asyncio.ensure_future(rebalance())
        await asyncio.wait_for(loop._consume(member), 40)  # type: ignore[arg-type]
        await task

    asyncio.run(run())
    assert waited and waited[0] < 2, waited
    assert loop.code == 0  # the batch ended as a stop does, not as a failure


def test_fetches_that_keep_failing_are_a_stall() -> None:
    health = WorkerHealth(stall_after_seconds=0.05)
    health.fetch_failed("fetch: CorruptRecordError")
    assert not health.ready()
    time.sleep(0.06)
    assert health.stalled() and health.reason == "fetch: CorruptRecordError"
    health.fetched()
    assert health.ready() and not health.stalled()


def test_the_group_waits_for_a_member_longer_than_it_waits_for_its_batch() -> None:
    """A revoke lets the batch in flight finish (up to 30 s); with the client's default
    rebalance timeout (the session's, 10 s) the member was expelled meanwhile."""
    from consumers.loop import REVOKE_WAIT_SECONDS
    from transport.config import KafkaConnection
    from transport.group import GroupMember

    async def made() -> int:
        async def nothing(*_: object) -> dict[object, int]:
            return {}

        member = GroupMember(KafkaConnection(bootstrap="127.0.0.1:1"), ["t"], "g", nothing, nothing)
        return int(member._consumer._rebalance_timeout_ms)

    assert asyncio.run(made()) > REVOKE_WAIT_SECONDS * 1000 + 10_000


def test_an_error_a_held_poll_meets_is_raised_by_the_next_batch() -> None:
    """aiokafka raises a group's error once (its access refused: a Refused), from the
    next poll: the poll that keeps a member in the group while a batch is held kept it to
    itself, and the worker went on as if nothing was wrong."""
    from aiokafka import TopicPartition
    from aiokafka.errors import GroupAuthorizationFailedError

    from schemas.errors import Refused
    from transport.config import KafkaConnection
    from transport.group import GroupMember

    class Consumer:
        def __init__(self) -> None:
            self.paused_now: set[TopicPartition] = set()
            self.polls = 0

        def assignment(self) -> set[TopicPartition]:
            return {TopicPartition("t", 0)}

        def paused(self) -> set[TopicPartition]:
            return set(self.paused_now)

        def pause(self, *tps: TopicPartition) -> None:
            self.paused_now |= set(tps)

        def resume(self, *tps: TopicPartition) -> None:
            self.paused_now -= set(tps)

        async def getmany(self, **_: object) -> dict[TopicPartition, list[object]]:
            self.polls += 1
            if self.polls == 1:
                raise GroupAuthorizationFailedError("g")
            return {}

    async def held_then_next_batch() -> tuple[int, set[TopicPartition]]:
        async def nothing(*_: object) -> dict[object, int]:
            return {}

        member = GroupMember(KafkaConnection(bootstrap="127.0.0.1:1"), ["t"], "g", nothing, nothing)
        consumer = Consumer()
        member._consumer = consumer  # type: ignore[assignment]
        member._polled_at -= 3600  # the batch in hand has been held for an hour
        await member.keep_polling()
        paused = consumer.paused()
        with pytest.raises(Refused, match="GroupAuthorizationFailedError"):
            await member.batch(10, 0.0)
        await member.batch(10, 0.0)  # raised once, as aiokafka does
        return consumer.polls, paused

    polls, paused = asyncio.run(held_then_next_batch())
    assert paused == {TopicPartition("t", 0)}  # the poll fetched nothing
    assert polls == 2


def test_a_batch_whose_checks_fail_is_applied_and_judged_again_not_a_crash_loop() -> None:
    """A check that raises on some data (a bug; a validator child's own error) escaped the
    loop: the worker exited, restarted on the same batch and exited again, for ever. The
    batch goes to `process` unjudged, which checks it again and isolates what fails."""
    from schemas.errors import ConfigurationError

    processor = _Processor()
    handed: list[object] = []

    def failing(messages: object) -> object:
        raise KeyError("a field the checks did not expect")

    def process(messages: object, prepared: object, starts: object) -> None:
        handed.append(prepared)

    processor.prepare = failing  # type: ignore[method-assign]
    processor.process = process  # type: ignore[method-assign]
    loop = _loop(processor)
    member = _Member(ConfigurationError("ends the loop"))

    async def run() -> None:
        await asyncio.wait_for(loop._consume(member), 10)  # type: ignore[arg-type]

    with contextlib.suppress(ConfigurationError):
        asyncio.run(run())
    assert handed == [None]


def test_the_loop_beats_while_a_batch_is_checked() -> None:
    """A validator child that hangs is waited for up to its timeout (60 s), then the batch
    is checked in the worker. The loop did not beat meanwhile: /healthz failed after 15 s,
    and the chart's liveness probe restarted the worker before the fallback ran."""
    import threading

    class Hanging(_Processor):
        def prepare(self, messages: object) -> object:
            time.sleep(3.0)  # the child's timeout, shortened
            return object()

        def process(self, messages: object, prepared: object, starts: object) -> None:
            self.ended.set()

        def purge_if_due(self) -> None:
            return None

    class Quiet(_Member):
        async def batch(self, size: int, wait: float) -> list[object]:
            if self.calls:  # one batch, then nothing more
                await asyncio.sleep(wait)
                return []
            return await super().batch(size, wait)

    processor = Hanging()
    loop = _loop(processor)
    loop.liveness = Liveness(beat_timeout=1.6)  # the loop waits 1 s between beats
    member = Quiet(RuntimeError("not raised"))
    unhealthy: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        began = time.monotonic()
        while not sampling.is_set():
            if not loop.liveness.healthy():
                unhealthy.append(time.monotonic() - began)
            time.sleep(0.05)

    async def run() -> None:
        probe = threading.Thread(target=sample)
        probe.start()
        try:
            consuming = asyncio.ensure_future(loop._consume(member))  # type: ignore[arg-type]
            await asyncio.to_thread(processor.ended.wait, 10)
            loop.stop()
            await asyncio.wait_for(consuming, 10)
        finally:
            sampling.set()
            probe.join()

    asyncio.run(run())
    assert processor.ended.is_set()
    assert not unhealthy, unhealthy
    assert loop.code == 0


def test_a_check_that_hangs_past_the_child_s_timeout_is_no_more_beaten_for() -> None:
    """Beaten for ever, a check that hung in the worker itself (after the child's timeout)
    left /healthz green for good."""
    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.liveness = Liveness(beat_timeout=0.5)

    async def run() -> bool:
        task = asyncio.ensure_future(asyncio.to_thread(time.sleep, 2.5))
        await loop._beating(task, beat_for=0.5)
        return loop.liveness.healthy()

    assert asyncio.run(run()) is False


def test_a_partition_past_the_configured_count_stops_the_worker_at_its_assignment() -> None:
    """Partitions added to a change topic while workers run are handed out at the next
    rebalance: their valid events were dead-lettered as `key_mismatch`, and a record
    placed on two partitions (producers before and after the change) defeated the record
    cache. The assignment is refused before the store is asked anything."""
    from schemas.errors import ConfigurationError
    from transport.topics import Topics

    config = SimpleNamespace(topics=Topics(prefix="p", change_partitions=6))
    loop = ReconcilerLoop(config, None, _Processor(), False)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"p\.changes\.citizen\[7\], past"):
        asyncio.run(loop._assigned({("p.changes.citizen", 7), ("p.changes.citizen", 2)}))


def test_a_batch_the_store_had_applied_moves_no_offset_back() -> None:
    """A batch found applied already (another member's, after a revoke's wait ran out) is
    skipped; its ends, copied to the group's offsets in Kafka, took them back below what
    the store holds (`kafka-consumer-groups` and the lag exporter's Kafka reading)."""
    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.stop_event = asyncio.Event()
    loop.liveness = Liveness()
    loop.applied = {("t", 0): 10, ("t", 1): 2}
    messages = [SimpleNamespace(tp=("t", 0), offset=offset) for offset in (3, 4, 5)] + [
        SimpleNamespace(tp=("t", 1), offset=6)
    ]

    async def run() -> tuple[str, dict[tuple[str, int], int]]:
        loop.idle = asyncio.Event()
        task = asyncio.ensure_future(asyncio.sleep(0))
        member = SimpleNamespace(keep_polling=_no_poll)
        return await loop._finished(member, task, messages)  # type: ignore[arg-type]

    assert asyncio.run(run()) == ("ok", {("t", 0): 10, ("t", 1): 7})
    assert loop.applied == {("t", 0): 10, ("t", 1): 7}


def test_a_worker_without_a_registry_is_refused_on_a_store_whose_workers_have_one(
    tmp_path: object,
) -> None:
    """Development mode (the setting missing: a second deployment, an operator's shell)
    accepted every event on a production store, and recorded "no registry" as its rules,
    which then let `replay` and `rebuild` run without one."""
    from pathlib import Path

    from consumers.config import RULES_FILES, rules_files
    from consumers.processor import WorkerConfig
    from portal_sync.ops.worker import _refuse_development_mode
    from schemas.errors import ConfigurationError
    from transport.config import KafkaConnection
    from transport.topics import Topics

    assert isinstance(tmp_path, Path)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()

    def config(registry: Path | None) -> WorkerConfig:
        return WorkerConfig(
            KafkaConnection(bootstrap="127.0.0.1:1"), Topics(), "g", "x", registry_file=registry
        )

    try:
        _refuse_development_mode(store, config(None))  # a store no worker ran on
        store.set_meta(RULES_FILES, rules_files(None, None))
        _refuse_development_mode(store, config(None))  # one in development mode already
        registry = tmp_path / "registry.toml"
        store.set_meta(RULES_FILES, rules_files(registry, None))
        _refuse_development_mode(store, config(registry))
        with pytest.raises(ConfigurationError, match="PORTAL_SYNC_REGISTRY is not set"):
            _refuse_development_mode(store, config(None))
    finally:
        store.close()


@pytest.mark.parametrize(("until_caught_up", "code"), [(True, 143), (False, 0)])
def test_a_job_stopped_by_a_signal_says_so_and_a_second_signal_exits_at_once(
    monkeypatch: pytest.MonkeyPatch, until_caught_up: bool, code: int
) -> None:
    """`worker --until-caught-up` stopped by SIGTERM exited 0: a Kubernetes Job evicted
    halfway was Complete, and `worker --until-caught-up && next` went on. A long-running
    worker stopped so is no failure. A second signal waited like the first."""
    import signal

    import consumers.loop

    loop = ReconcilerLoop.__new__(ReconcilerLoop)
    loop.stop_event = asyncio.Event()
    loop.until_caught_up = until_caught_up
    loop.code = 0
    loop.signals = []
    loop.processor = SimpleNamespace(stopping=asyncio.Event())  # type: ignore[assignment]
    exits: list[int] = []
    monkeypatch.setattr(consumers.loop.os, "_exit", exits.append)
    loop.signalled(signal.SIGTERM)
    assert loop.stop_event.is_set() and loop.code == code and exits == []
    loop.signalled(signal.SIGINT)
    assert exits == [130]
    assert loop.code == code  # the first stop's
    # A stop of the worker's own (caught up) is no first signal: the next is.
    loop.stop_event, loop.signals, loop.code = asyncio.Event(), [], 0
    loop.stop(0)
    loop.signalled(signal.SIGTERM)
    assert exits == [130] and loop.code == 0  # stopping already: the code stays
    loop.signalled(signal.SIGTERM)
    assert exits == [130, 143]


def test_sighup_stops_the_worker_unless_nohup_ignores_it() -> None:
    """A worker run from an SSH session that closed: the entry point's handler raised out
    of the loop, and a batch retrying for a store away held the process for ever."""
    import signal

    from consumers.loop import stop_signals

    kept = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signal.SIGHUP in stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup portal-sync worker`
        assert stop_signals() == (signal.SIGTERM, signal.SIGINT)
    finally:
        signal.signal(signal.SIGHUP, kept)


def test_while_batches_come_a_partition_is_read_to_its_end_only_once_it_stayed_put(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`worker --until-caught-up` asked after every batch whether a partition whose offset
    had not moved for a second was at its end: a new client and a fetch each time, for
    partitions the client had simply not reached yet (a sixth of the rate, 25 MB).
    While batches come it now asks only of a partition still for 10 s; idle, at once."""
    import consumers.loop as loop_module

    clock = [1000.0]
    asked: list[tuple[str, int]] = []

    def nothing_before(connection: object, tp: tuple[str, int], at: int, end: int) -> bool:
        asked.append(tp)
        return False

    class Store:
        def stored_offsets(self, partitions: object) -> dict[object, int]:
            return {}

    monkeypatch.setattr(loop_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(loop_module, "nothing_before", nothing_before)

    def checks(busy: bool, seconds: list[float]) -> list[tuple[str, int]]:
        asked.clear()
        config = SimpleNamespace(connection=None)
        loop = ReconcilerLoop(config, Store(), _Processor(), True)  # type: ignore[arg-type]
        loop.targets, loop.applied = {("t", 0): 10, ("t", 1): 10}, {("t", 0): 3, ("t", 1): 3}
        for at in seconds:
            clock[0] = 1000.0 + at
            loop.applied[("t", 1)] += 1  # the other partition moves: batches come
            assert asyncio.run(loop._caught_up(busy=busy)) is False
        return asked

    assert checks(busy=False, seconds=[0, 1.5]) == [("t", 0)]
    assert checks(busy=True, seconds=[0, 1.5, 3, 6, 9]) == []
    assert checks(busy=True, seconds=[0, 1.5, 3, 6, 9, 10.5]) == [("t", 0)]
