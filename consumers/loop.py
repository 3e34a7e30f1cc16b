"""The reconciler worker's main loop (`ReconcilerLoop`): a consumer-group member
(transport.group) whose batches the processor (consumers.processor) applies in a thread,
one after the other, while the next batch is fetched and checked. On every assignment the
partitions move to the store's offsets; after each batch the store's offsets are copied to
Kafka's group offsets. It answers the worker's /healthz and /readyz (`healthy`, `ready`;
portal_sync.ops.worker serves them), hears the stop signals, and with `--until-caught-up` ends
once every partition reached its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from consumers.processor import (
    FIRST_RETRY_SECONDS,
    MAX_RETRY_SECONDS,
    BatchProcessor,
    Prepared,
    Stopping,
    WorkerConfig,
)
from consumers.validators import CHILD_TIMEOUT_SECONDS
from schemas.errors import (
    Backoff,
    ConfigurationError,
    PortalSyncError,
    TransientError,
)
from store import OffsetGap, Store, TopicPartition
from transport import admin
from transport.group import GroupMember, check_topic_ids, check_within_logs
from transport.reader import Message, OpenTransaction, nothing_before

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long the loop beats while a batch is checked: a hung validator child's timeout, and
# the batch's check in the worker after it, with room to spare.
CHECK_BEATS_SECONDS = CHILD_TIMEOUT_SECONDS + 60
# `worker --until-caught-up`: how often one partition whose offset stays put is asked whether
# anything is left before its target (a read of the topic each time).
SETTLE_EVERY_SECONDS = 10.0
# While batches keep coming, a partition is asked only once its offset stayed put this long:
# the client hands out one partition's fetched records after another, and one not yet
# reached is no partition at its end. Asked after every batch, those reads (a client and a
# fetch each) cost the drain about a sixth of its rate and 25 MB (docs/performance-log.md,
# thirty-seventh round).
SETTLE_WHILE_BUSY_SECONDS = 10.0
EXIT_BATCH_FAILED = 3  # a batch failed in an unexpected way: restart from the store
EXIT_CONFIGURATION = 2  # a setting the next start would meet again (the taxonomy's code)


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT, and SIGHUP unless ignored (`nohup`): a worker run from a terminal or
    SSH session that closes stops as on SIGTERM (the entry point's own handler raised out
    of the loop, and a batch retrying for a store away held the process)."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


class StopAsked(threading.Event):
    """A stop a signal asked for while the worker started, and which signal it was."""

    signum = 0

    def ask(self, signum: int) -> None:
        self.signum = signum
        self.set()


# How long a revoke waits for the batch in flight; the group waits longer for this member's
# rejoin (`transport.group.REBALANCE_TIMEOUT_MS`), else it would be expelled meanwhile.
REVOKE_WAIT_SECONDS = 30.0


class Liveness:
    """Probes of a process with a main loop: healthy while the loop beats, ready once set."""

    def __init__(self, beat_timeout: float = 15.0) -> None:
        self.beat_timeout = beat_timeout
        self._ready = threading.Event()
        self._beat = time.monotonic()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def set_ready(self) -> None:
        self._ready.set()

    def healthy(self) -> bool:
        return time.monotonic() - self._beat < self.beat_timeout

    def ready(self) -> bool:
        return self._ready.is_set() and self.healthy()


class ReconcilerLoop:
    """The worker's main loop: a consumer-group member feeding the batch processor.

    On every assignment the partitions are moved to the store's offsets (never Kafka's);
    each batch is applied in a worker thread while the consumer keeps fetching; after each
    batch the store's offsets are copied to Kafka's group offsets for the usual tools.
    """

    def __init__(
        self,
        config: WorkerConfig,
        store: Store,
        processor: BatchProcessor,
        until_caught_up: bool,
        early_stop: StopAsked | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.processor = processor
        self.until_caught_up = until_caught_up
        self.early_stop = early_stop  # set by a signal received before the loop ran
        self.signals: list[int] = []  # the stop signals received
        self.liveness = Liveness()
        self.stop_event = asyncio.Event()
        self.code = 0
        self.idle = asyncio.Event()  # no batch in flight
        self.idle.set()
        self.targets: dict[TopicPartition, int] = {}
        self.applied: dict[TopicPartition, int] = {}
        self.checked_store_at = 0.0  # monotonic time of the last progress read from the store
        self.stalled_at: dict[TopicPartition, int] = {}  # offsets unmoved over a check
        self.still_since: dict[TopicPartition, tuple[int, float]] = {}  # offset, since when
        self.settle_asked: dict[TopicPartition, float] = {}  # `_settle_one`'s last question
        self.to_copy: dict[TopicPartition, int] = {}  # for Kafka's group offsets (`_copy`)
        self.topics_checked_at = 0.0  # monotonic time of the last `_check_topics`
        self.copying: asyncio.Future[None] | None = None

    def healthy(self) -> bool:
        """/healthz: the loop beats, and no batch has failed past the stall limit."""
        return self.liveness.healthy() and not self.processor.health.stalled()

    def ready(self) -> bool:
        """/readyz: the loop runs, and its batches are not retrying."""
        return self.liveness.ready() and self.processor.health.ready()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, self.signalled, sig)
        if self.early_stop is not None and self.early_stop.is_set():
            self.signalled(self.early_stop.signum)  # asked for while starting
        topic_names = self.config.topics.change_topics()
        if self.until_caught_up:
            # The store first: other workers may commit meanwhile, up to the log ends
            # read after it, never past them.
            self.applied = await asyncio.to_thread(self.store.all_offsets)
            self.targets = await asyncio.to_thread(
                admin.end_offsets, self.config.connection, topic_names
            )
            check_within_logs(self.applied, self.targets)
        member = GroupMember(
            self.config.connection,
            topic_names,
            self.config.group_id,
            on_assigned=self._assigned,
            on_revoked=self._revoked,
        )
        await member.start()
        try:
            await self._consume(member)
        finally:
            await self._copied()
            await member.stop()
        return self.code

    def signalled(self, signum: int) -> None:
        """SIGTERM, SIGINT or SIGHUP: stop soon. A job (`--until-caught-up`) cut short exits 128 +
        the signal, as a shell reports it: exit 0 told a Kubernetes Job, or `&&`, that it
        had caught up. A second signal exits at once, without waiting for the batch in
        hand or the group's leave: the store keeps what it committed, and the group's
        offsets are only a copy of it."""
        if self.signals:
            log.warning("a second stop signal: exiting now, the batch in hand not applied")
            os._exit(128 + signum)
        self.signals.append(signum)  # a stop of its own (caught up, failed) is no signal
        self.stop(128 + signum if self.until_caught_up else 0)

    def stop(self, code: int = 0) -> None:
        """Stop soon: the batch in hand gives up waiting (its transaction rolls back)."""
        if not self.stop_event.is_set():
            self.code = code
            self.processor.stopping.set()
            self.stop_event.set()

    async def _assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The store's offsets of newly assigned partitions, their topics checked. A
        partition past the configured count (partitions added to the change topics while
        workers ran: a rebalance hands them out) stops the worker before it applies an
        event: it would dead-letter their valid events as `key_mismatch`, and a record
        placed on two partitions by producers before and after the change defeats the
        record cache, which holds each record on one partition."""
        count = self.config.topics.change_partitions
        beyond = sorted(f"{topic}[{partition}]" for topic, partition in partitions
                        if partition >= count)  # fmt: skip
        if beyond:
            raise ConfigurationError(
                f"assigned {', '.join(beyond)}, past PORTAL_SYNC_CHANGE_PARTITIONS ({count}): "
                "partitions were added to the change topics, which moves records to other "
                "partitions: raise the count with a new topic prefix instead "
                '(docs/operations.md, "Topics")'
            )
        stored = await self._stored_offsets(partitions)
        if stored is None:
            return {}
        self._sought(partitions, stored)
        self.liveness.set_ready()
        return stored

    def _sought(
        self, partitions: Iterable[TopicPartition], stored: dict[TopicPartition, int]
    ) -> None:
        """Partitions sought from the store's offsets (or their log's start, those it has
        none for): what the worker has applied of them, and what the store must keep."""
        partitions = list(partitions)
        self.processor.reconciler.note_offsets(partitions, stored)
        for tp in partitions:
            self.applied[tp] = stored.get(tp, 0)

    async def _stored_offsets(
        self, partitions: set[TopicPartition]
    ) -> dict[TopicPartition, int] | None:
        """The store's offsets of these partitions, their topics checked; a store that is
        away is waited for (with backoff), never guessed. None: asked to stop meanwhile."""
        backoff = Backoff(FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS)
        retried = False  # this wait's own: a batch retrying meanwhile keeps its state
        try:
            while True:
                try:
                    stored = await asyncio.to_thread(self.store.stored_offsets, partitions)
                    await self._check_topics({topic for topic, _ in partitions}, stored)
                    if retried:
                        self.processor.health.recovered()
                    return stored
                except TransientError as error:
                    if self.stop_event.is_set():
                        return None
                    # as a batch's retries: /readyz false, then /healthz and the stall alert
                    self.processor.health.retrying(error.kind)
                    retried = True
                    log.error("store offsets unreadable (%s), retrying", type(error).__name__)
                    with contextlib.suppress(TimeoutError):  # a stop ends the wait at once
                        await asyncio.wait_for(self.stop_event.wait(), backoff.next())
                    if self.stop_event.is_set():
                        return None
                    self.liveness.beat()  # waiting for the store, as a batch does: not stuck
        except asyncio.CancelledError:
            # A rebalance took the partitions meanwhile (`GroupMember`): the next
            # assignment's read may pass at once, and /readyz stayed 503, then /healthz.
            if retried:
                self.processor.health.recovered()
            raise

    async def _check_topics_again(self, member: GroupMember) -> None:
        """`_check_topics` between rebalances: a topic deleted and created again with as
        many partitions starts no rebalance, and a member that fetches at the store's
        offset in a new log already that long sees no gap either. Refused within
        `topic_check_seconds` (60 by default; the events of the new log below the
        store's offsets are then not applied: the reset that follows applies them)."""
        self.topics_checked_at = time.monotonic()  # tried again a minute on, whatever comes
        assigned = member.assignment()
        if not assigned:
            return
        try:
            stored = await asyncio.to_thread(self.store.stored_offsets, assigned)
            await self._check_topics({topic for topic, _ in assigned}, stored)
        except TransientError as error:
            log.warning("topic ids not checked (%s)", type(error).__name__)

    async def _check_topics(self, topics: set[str], stored: dict[TopicPartition, int]) -> None:
        """Refuse a topic created again since the store applied events of it
        (`check_topic_ids`); record the cluster's id of a topic the store has none of.
        A cluster that cannot say now is not checked this time, as the log ends are not."""
        try:
            current = await asyncio.to_thread(admin.topic_ids, self.config.connection, topics)
        except TransientError as error:
            log.warning("topic ids not read (%s): not checked this time", type(error).__name__)
            return
        saved = await asyncio.to_thread(self.store.topic_ids)
        check_topic_ids(stored, saved, current)
        new = {topic: found for topic, found in current.items() if saved.get(topic) != found}
        if new:  # first seen, or created again before any event of it was applied
            await asyncio.to_thread(self.store.record_topic_ids, new)
        self.topics_checked_at = time.monotonic()

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        """Let the batch in flight finish before the partitions move to another member;
        the records kept of them are dropped before the next batch."""
        if self.processor.reconciler.cache is not None:
            self.processor.reconciler.cache.invalidate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout=REVOKE_WAIT_SECONDS)

    async def _consume(self, member: GroupMember) -> None:
        """Two stages: while batch N is applied (its thread mostly waits for the database),
        batch N+1 is fetched and parsed in another thread. Batches are applied one after
        the other, in order. Whatever ends the loop with a batch in flight stops that
        batch (its transaction rolls back): the process would wait for its thread, which
        retries while the store is away, for ever."""
        try:
            await self._batches(member)
        except BaseException:
            self.processor.stopping.set()
            raise

    async def _batches(self, member: GroupMember) -> None:
        config = self.config
        health = self.processor.health
        applying: tuple[asyncio.Future[None], list[Message]] | None = None
        while not self.stop_event.is_set():
            self.liveness.beat()
            if applying is None and self.until_caught_up and await self._caught_up():
                return
            try:
                messages = await member.batch(
                    config.batch_max_events, 0.0 if applying else config.batch_max_wait_seconds
                )
            except TransientError as error:
                log.error("fetch failed (%s), retrying", type(error).__name__)
                health.fetch_failed(f"fetch: {error.kind}")  # a stall if it lasts
                if applying is not None:
                    # Its end first: the next fetch may wait out a rebalance, whose revoke
                    # waits for this batch (`_revoked`), which only this loop ends.
                    outcome, ended = await self._finished(member, *applying)
                    applying = None
                    self._copy(member, ended)
                    if outcome == "stop":
                        return
                await asyncio.sleep(1.0)
                continue
            health.fetched()
            if member.failed is not None:
                raise member.failed
            fetched_in = member.rebalances
            if time.monotonic() - self.topics_checked_at > config.topic_check_seconds:
                await self._check_topics_again(member)
            starts = member.starts  # where this batch's fetches began
            prepared: Prepared | None = None
            fetched = bool(messages) and not self.stop_event.is_set()
            if fetched:
                try:
                    # The loop beats meanwhile: a validator child that hangs is waited for
                    # up to its timeout (`Validators`), longer than /healthz allows a loop
                    # without a beat, and the batch is then checked here. A check that
                    # hangs beyond that is no more beaten for: /healthz fails.
                    checking = asyncio.ensure_future(
                        asyncio.to_thread(self.processor.prepare, messages)
                    )
                    prepared = await self._beating(checking, CHECK_BEATS_SECONDS)
                except Exception as error:  # a bug met by some data: isolated when applied
                    log.error("the batch's checks failed (%s): checked again as it is "
                              "applied", type(error).__name__)  # fmt: skip
            done: dict[TopicPartition, int] = {}
            if applying is not None:
                outcome, done = await self._finished(member, *applying)
                applying = None
                if outcome == "stop":
                    return
                if outcome == "reseek":
                    continue  # the batch in hand was read from the wrong position
                if self.until_caught_up and await self._caught_up(busy=True):
                    # Under a steady flow every fetch brings a batch, and the check at the
                    # loop's top (between batches) never came: the job ran for ever. What
                    # was fetched meanwhile lies past the targets and is not applied.
                    self._copy(member, done)
                    return
            if fetched and member.rebalances != fetched_in:
                # A rebalance began since the fetch: its partitions may be another member's
                # now, and are sought again from the store's offsets if they stay ours.
                log.info("a batch fetched before a rebalance is dropped: read again")
                fetched = False
            if not messages and applying is None and not self.stop_event.is_set():
                # A quiet pipeline still forgets what is past its retention; the loop beats
                # meanwhile, and a run that hangs shows as a stall (WorkerHealth).
                await self._beating(asyncio.ensure_future(
                    asyncio.to_thread(self.processor.purge_if_due)
                ))  # fmt: skip
            if fetched and not self.stop_event.is_set():
                self.idle.clear()
                task = asyncio.ensure_future(
                    asyncio.to_thread(self.processor.process, messages, prepared, starts)
                )
                applying = (task, messages)
            self._copy(member, done)
        if applying is not None:
            outcome, done = await self._finished(member, *applying)
            self._copy(member, done)

    async def _beating(
        self,
        task: asyncio.Future[T],
        beat_for: float | None = None,
        poll: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """The result of `task`, which runs in a thread, with the loop's beat kept while it
        runs (/healthz fails after 15 s without one), for at most `beat_for` seconds;
        `poll` is awaited each second meanwhile (`GroupMember.keep_polling`)."""
        until = None if beat_for is None else time.monotonic() + beat_for
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if until is None or time.monotonic() < until:
                    self.liveness.beat()
                if poll is not None and not task.done():
                    await poll()
        except asyncio.CancelledError:
            task.cancel()  # as if awaited directly (a thread's work goes on regardless)
            raise
        return await task

    def _copy(self, member: GroupMember, offsets: dict[TopicPartition, int]) -> None:
        """Copy the store's offsets to Kafka's group offsets, in the background: the next
        batch starts without waiting for the broker's round trip (it was on every batch's
        path), and a copy that waits out a rebalance never holds up the batch in flight,
        which the rebalance waits for. One copy at a time, of the newest offsets."""
        if not offsets:
            return
        self.to_copy.update(offsets)
        if self.copying is None or self.copying.done():
            self.copying = asyncio.ensure_future(self._copy_pending(member))

    async def _copy_pending(self, member: GroupMember) -> None:
        while self.to_copy:
            offsets, self.to_copy = self.to_copy, {}
            try:
                await member.commit_copy(offsets)
            except Exception as error:  # best effort: the store's offsets are the truth
                log.info("offsets not copied to Kafka (%s)", type(error).__name__)

    async def _copied(self) -> None:
        """Before leaving the group: let the last copy finish (for a while)."""
        if self.copying is not None and not self.copying.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.copying, timeout=10)

    async def _finished(
        self, member: GroupMember, task: asyncio.Future[None], messages: list[Message]
    ) -> tuple[str, dict[TopicPartition, int]]:
        """Wait for a batch being applied: "ok", "reseek" or "stop", and the offsets the
        store now holds for its partitions ("ok" only), for Kafka's copy."""
        try:
            # A batch that takes long (retrying while the store or the broker is away, or
            # one attempt that blocks) is judged by the stall threshold (WorkerHealth), not
            # by the beat of the loop that waits for it: /healthz would fail after 15 s of
            # any outage. The member polls meanwhile, or it left the group after 10 minutes.
            await self._beating(task, poll=member.keep_polling)
        except Stopping:
            return "stop", {}
        except OffsetGap as error:
            # The consumer is not where the store is (a seek lost in a rebalance, an
            # operator's reset): nothing was committed; go back to the store's offsets.
            log.warning("%s: resuming from the store's offsets", error)
            self.processor.health.recovered()  # that batch is over, retried or not
            # A store away now is waited for, as at an assignment (raised from here, its
            # error stopped the worker with a traceback), the member polling meanwhile.
            assigned = member.assignment()
            reading = asyncio.ensure_future(self._stored_offsets(assigned))
            stored = await self._beating(reading, poll=member.keep_polling)
            if stored is None:
                return "stop", {}
            # Those still ours: a rebalance while the store was read sought the new ones
            # itself, and the consumer refuses a seek of one that went (a crash before).
            still = assigned & member.assignment()
            await member.seek(stored, still)
            self._sought(still, stored)
            return "reseek", {}
        except ConfigurationError as error:  # the broker refuses its credentials or TLS: exit 2
            log.error("batch refused by a setting: %s; stopping", error)
            self.stop(EXIT_CONFIGURATION)
            return "stop", {}
        except Exception as error:
            # Never go on from the consumer's position after a failure: stop, and let the
            # supervisor restart the worker from the store's offsets. Our own errors'
            # messages never quote values; others' may: the type only.
            detail = str(error) if isinstance(error, PortalSyncError) else ""
            log.error(
                "batch failed unexpectedly (%s%s): stopping; the next start resumes from "
                "the store's offsets",
                type(error).__name__,
                f": {detail}" if detail else "",
            )
            self.stop(EXIT_BATCH_FAILED)
            return "stop", {}
        finally:
            self.idle.set()
        ends: dict[TopicPartition, int] = {}
        for message in messages:
            ends[message.tp] = max(ends.get(message.tp, 0), message.offset + 1)
        for tp, end in ends.items():  # a batch the store had applied already moves nothing back
            ends[tp] = self.applied[tp] = max(self.applied.get(tp, 0), end)
        return "ok", ends

    async def _caught_up(self, busy: bool = False) -> bool:
        """Every partition reached the end offsets seen at start (other workers' included:
        their progress is read from the store), or holds no committed message before them:
        a log that ends in a transactional writer's marker or aborted events ends past the
        last event applied, and was waited for until the process was killed. A partition
        that a transaction still open holds back is waited for (its events, and all after
        them, are applied once it ends), with a warning each time it is asked. `busy`: asked
        as a batch ends, batches still coming (`SETTLE_WHILE_BUSY_SECONDS`)."""
        behind = [tp for tp, end in self.targets.items() if self.applied.get(tp, 0) < end]
        if not behind:
            return True
        now = time.monotonic()
        if now - self.checked_store_at > 1.0:
            self.checked_store_at = now
            before = {tp: self.applied.get(tp, 0) for tp in behind}
            try:
                stored = await asyncio.to_thread(self.store.stored_offsets, behind)
            except TransientError as error:  # the store away: asked again at the next check
                log.warning("progress not read (%s)", type(error).__name__)
                return False
            for tp, offset in stored.items():
                self.applied[tp] = max(self.applied.get(tp, 0), offset)
            unmoved = []
            for tp in behind:
                at = self.applied.get(tp, 0)
                if self.still_since.get(tp, (-1, now))[0] != at:
                    self.still_since[tp] = (at, now)
                still = now - self.still_since[tp][1]
                settles = not busy or still >= SETTLE_WHILE_BUSY_SECONDS
                if at == self.stalled_at.get(tp) and at < self.targets[tp] and settles:
                    unmoved.append(tp)
                self.stalled_at[tp] = at if at == before[tp] else -1
            await self._settle_one(unmoved, now)
        return all(self.applied.get(tp, 0) >= end for tp, end in self.targets.items())

    async def _settle_one(self, unmoved: list[TopicPartition], now: float) -> None:
        """Ask of one partition whose store offset did not move since the last check
        whether anything is left before its target; each partition at most every
        `SETTLE_EVERY_SECONDS` (a read of the topic each time)."""
        for tp in unmoved:
            if now - self.settle_asked.get(tp, -SETTLE_EVERY_SECONDS) < SETTLE_EVERY_SECONDS:
                continue
            self.settle_asked[tp] = now
            at, target = self.applied.get(tp, 0), self.targets[tp]
            try:
                empty = await asyncio.to_thread(
                    nothing_before, self.config.connection, tp, at, target
                )
            except OpenTransaction as error:  # its events, and all after them, wait for it
                log.warning("%s: waiting for it to end", error)
                empty = False
            except Exception as error:  # asked again later; never stops the worker
                log.info("%s:%d not read to its end (%s)", *tp, type(error).__name__)
                empty = False
            if empty:
                self.targets[tp] = at
            self.liveness.beat()
            return
