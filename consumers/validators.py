"""The contract checks of a batch in other processes: signatures, parsing, validation,
the registry, keys and partitions, the clock and the write scope (`classify`).

One worker process runs its batches under one GIL; without this, checking a batch took
about a third of its CPU, and verifying signatures more than the whole store work. Here
`classify` runs in `processes` child processes on slices of the batch, while the worker
applies the batch before it. A child answers each message with a verdict: a dead letter's
reason, or "valid" with its soft warnings and the fields applying it needs (entity, key,
source, version, op, time, id and the payload as the model dumps it). The worker takes
those as they come (`AcceptedEvent`): it neither parses nor validates the message again.
Unpickling a verdict costs about a tenth of checking the message (docs/performance-log.md).

A child that dies (killed, out of memory) breaks the pool: the batch is checked in the
worker's own process and a new pool is started for the next one. The verdicts never
depend on the process: the children load the same rule files, and `now` is the worker's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from consumers.checks import AcceptedEvent, Checked, DeadLetter, classify
from consumers.registry import Registry
from consumers.runtime import tune_garbage_collector
from transport.message import Message
from transport.topics import Topics

log = logging.getLogger(__name__)

# A verdict: (True, warnings, AcceptedEvent's fields...) or (False, code, reason).
Verdict = tuple[Any, ...]


@dataclass(frozen=True)
class Rules:
    """What a child needs to judge messages as the worker would: the worker's own registry,
    as it loaded it at start (a pool restarted later must not read a file changed since)."""

    registry: Registry
    topics: Topics
    max_clock_skew_seconds: float


_child: tuple[Registry, Rules] | None = None


def _start_child(rules: Rules, parent: int) -> None:
    global _child
    # A terminal's Ctrl-C reaches the whole process group: the worker stops its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The worker's id as it gave it: a worker killed while its children started (a second
    # or more) left them the parent they were adopted by, which never ended.
    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _child = (rules.registry, rules)
    tune_garbage_collector()  # a slice of a batch is as many containers as the worker's


def _exit_with_parent(parent: int) -> None:
    """A worker killed outright (SIGKILL, the OOM killer) cannot stop its children, and a
    child waits for work forever: it ends itself once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


PARENT_CHECK_SECONDS = 1.0
CLOSE_GRACE_SECONDS = 5.0  # a worker's stop waits this long for its idle children
# A batch's checks take a tenth of a second in a child: one that has not answered in a
# minute is stopped (SIGSTOP) or thrashing, and the batch waited for it, stops included.
CHILD_TIMEOUT_SECONDS = 60.0


def _ready() -> bool:
    return _child is not None


# A message as it travels to a child: a plain tuple in `Message`'s field order. Pickling
# the dataclass cost the worker 3.2 µs per message, the tuple (built and pickled) 1.1.
Row = tuple[
    str,
    int,
    int,
    bytes | None,
    bytes | None,
    int | None,
    tuple[tuple[str, bytes], ...],
    bool,
    tuple[str, str] | None,
]


def _row(m: Message) -> Row:
    return (m.topic, m.partition, m.offset, m.value, m.key, m.timestamp_ms, m.headers, m.appended,
            m.unreadable)  # fmt: skip


def _verdicts(rows: Sequence[Row], now: datetime) -> list[Verdict]:
    assert _child is not None, "the pool's initializer did not run"
    registry, rules = _child
    messages = [Message(*row) for row in rows]
    valid, dead = classify(
        messages,
        registry,
        topics=rules.topics,
        now=now,
        max_clock_skew_seconds=rules.max_clock_skew_seconds,
    )
    verdicts: dict[int, Verdict] = {}
    for checked in valid:
        event = checked.event
        verdicts[id(checked.message)] = (
            True,
            checked.warnings,
            event.entity,
            event.key,
            event.source,
            event.version,
            event.op,
            event.occurred_at,  # in UTC (the contract holds it so)
            str(event.event_id),
            checked.data_dict(),
        )
    for letter in dead:
        verdicts[id(letter.message)] = (False, letter.code, letter.reason)
    return [verdicts[id(message)] for message in messages]


class Validators:
    """A pool of `processes` child processes that check batches (`classify`)."""

    def __init__(self, processes: int, rules: Rules) -> None:
        self.processes = processes
        self.rules = rules
        self.pool = self._pool()
        # Started (and their rules loaded) now, not in the middle of the first batch that
        # needs them: a child's start-up takes a second or more, a stall of the pipeline.
        # A child that does not start within the timeout (stopped, thrashing) is no reason
        # to wait for ever: the worker then checks its batches itself.
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_SECONDS
            for started in [self.pool.submit(_ready) for _ in range(processes)]:
                started.result(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            self._stop_pool(0.0)
            raise

    def _pool(self) -> ProcessPoolExecutor:
        # spawn: the worker has threads (the consumer's, the dead letters' producer), and
        # forking a process with threads can copy a lock that is held.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            self.processes,
            mp_context=context,
            initializer=_start_child,
            initargs=(self.rules, os.getpid()),
        )

    def classify(
        self, messages: Sequence[Message], now: datetime | None = None
    ) -> tuple[list[Checked], list[DeadLetter]]:
        """`classify`'s answer for these messages, the checks done in the children."""
        now = now or datetime.now(UTC)
        size = -(-len(messages) // self.processes) or 1
        slices = [messages[i : i + size] for i in range(0, len(messages), size)]
        try:
            futures = [self.pool.submit(_verdicts, list(map(_row, part)), now) for part in slices]
            deadline = time.monotonic() + CHILD_TIMEOUT_SECONDS
            verdicts = [
                v
                for future in futures
                for v in future.result(timeout=max(0.0, deadline - time.monotonic()))
            ]
        except (BrokenProcessPool, TimeoutError) as error:
            why = "died" if isinstance(error, BrokenProcessPool) else "hung"
            log.error("a validator process %s: this batch is checked here, the pool restarts", why)
            self._restart()
            return classify(
                messages,
                self.rules.registry,
                topics=self.rules.topics,
                now=now,
                max_clock_skew_seconds=self.rules.max_clock_skew_seconds,
            )
        valid: list[Checked] = []
        dead: list[DeadLetter] = []
        for message, verdict in zip(messages, verdicts, strict=True):
            if not verdict[0]:
                dead.append(DeadLetter(message, verdict[1], verdict[2]))
                continue
            event = AcceptedEvent(*verdict[2:])
            valid.append(Checked(message, event, verdict[1], event.data))
        return valid, dead

    def _restart(self) -> None:
        """A new pool; the old one's children killed (a hung one never ends its task,
        and the executor has no way to stop it but its process)."""
        self._stop_pool(0.0)
        self.pool = self._pool()

    def _stop_pool(self, grace_seconds: float) -> None:
        """Shut the pool down; children not gone within `grace_seconds` are killed. The
        executor's own wait has no limit: a stopped (SIGSTOP) or hung child held the
        worker's stop, and then only SIGKILL ended it."""
        children = list((self.pool._processes or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace_seconds
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(1.0)

    def close(self) -> None:
        self._stop_pool(CLOSE_GRACE_SECONDS)
