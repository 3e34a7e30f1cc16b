"""The contract checks in child processes (`consumers.validators`) give every message of
the hostile corpus the verdict the worker's own `classify` gives it, signatures verified;
a child killed mid-run costs nothing but a restart of the pool."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from consumers.checks import Checked, DeadLetter, classify
from consumers.config import load_rules
from consumers.merge import Authority
from consumers.reconciler import Reconciler
from consumers.registry import Registry
from consumers.runtime import GC_THRESHOLDS
from consumers.validators import CLOSE_GRACE_SECONDS, Rules, Validators
from schemas import partition_for
from store import Store, utcnow
from tests.integration.kafka.test_hostile_corpus import _headers, _lines, _signers, _value
from transport.reader import Message
from transport.topics import Topics

TOPICS = Topics(prefix="vt", change_partitions=6)
ROOT = Path(__file__).resolve().parents[2]


def corpus_messages(tmp_path: Path) -> tuple[list[Message], Path]:
    signers, registry = _signers(tmp_path)
    now_ms = int(time.time() * 1000)
    messages = []
    for offset, line in enumerate(_lines()):
        headers, value = _headers(line, _value(line), signers)
        key = None if line["key"] is None else line["key"].encode()
        partition = partition_for(key, 6) if key else 0
        topic = TOPICS.change_topic(line["entity"])
        messages.append(Message(topic, partition, offset, value, key, now_ms, tuple(headers)))
    # Records the Kafka client could not read (transport.guard): one with its value, one
    # standing for a whole batch.
    first = messages[0]
    marks = [("not_utf8", "a header name is not UTF-8"), ("unreadable_batch", "batch 9-12")]
    messages.append(replace(first, offset=len(messages), unreadable=marks[0]))
    messages.append(Message(first.topic, 0, len(messages) + 3, None, unreadable=marks[1]))
    return messages, registry


def summary(result: tuple[list[Checked], list[DeadLetter]]) -> tuple[list[Any], list[Any]]:
    """Every field of a valid event that applying it reads, its warnings and payload; the
    dead letters' reasons."""
    valid, dead = result
    return (
        [
            (
                c.message.offset,
                (e.entity, e.key, e.source, e.version, e.op, e.occurred_at, str(e.event_id)),
                c.warnings,
                c.data_dict(),
            )
            for c in valid
            for e in (c.event,)
        ],
        [(d.message.offset, d.code, d.reason) for d in dead],
    )


# What the store holds, but the times it was written at.
TABLES = {
    "source_views": "entity, key, source, version, event_id, occurred_at, deleted, data",
    "records": "entity, key, data, sources, provenance",
    "record_history": "entity, key, event_id, source, version, changes",
    "field_conflicts": "entity, key, field, sources",
}


def applied(
    path: Path, result: tuple[list[Checked], list[DeadLetter]], messages: list[Message]
) -> dict[str, list[Any]]:
    store = Store(f"sqlite:///{path}")
    store.create_schema()
    try:
        Reconciler(store, Authority()).apply(result[0], messages)
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {
            table: db.execute(f"SELECT {columns} FROM {table} ORDER BY {columns}").fetchall()
            for table, columns in TABLES.items()
        }


def test_children_judge_every_message_as_the_worker_does(tmp_path: Path) -> None:
    messages, registry_file = corpus_messages(tmp_path)
    registry, _ = load_rules(registry_file, None)
    now = utcnow()
    expected = summary(classify(messages, registry, topics=TOPICS, now=now))
    assert len(expected[0]) >= 50 and len(expected[1]) >= 200  # both kinds, signed
    assert [d[1:] for d in expected[1][-2:]] == [
        ("not_utf8", "a header name is not UTF-8"),
        ("unreadable_batch", "batch 9-12"),
    ]
    validators = Validators(2, Rules(registry, TOPICS, 300.0))
    try:
        checked_there = validators.classify(messages, now)
        assert summary(checked_there) == expected
        # Applied, they leave the store the worker's own checks leave.
        here = applied(
            tmp_path / "here.db", classify(messages, registry, topics=TOPICS, now=now), messages
        )
        assert here["source_views"] and here["records"] and here["record_history"]
        assert applied(tmp_path / "there.db", checked_there, messages) == here
        # A child killed: that batch is judged here, the next one by a new pool, with the
        # worker's rules even when the registry file changed since the worker started.
        registry_file.write_text("require_signatures = true\n", encoding="utf-8")
        broken = validators.pool
        for pid in list(broken._processes):  # the pool's children
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # the pool notices its child's death
        assert summary(validators.classify(messages, now)) == expected
        assert validators.pool is not broken
        assert summary(validators.classify(messages, now)) == expected
    finally:
        validators.close()


def test_a_child_collects_as_seldom_as_the_worker() -> None:
    """A child holds a slice of a batch as the worker holds the batch: with CPython's
    default thresholds its checks cost a quarter more (docs/performance-log.md)."""
    validators = Validators(1, Rules(Registry(), TOPICS, 300.0))
    try:
        assert validators.pool.submit(gc.get_threshold).result() == GC_THRESHOLDS
        assert validators.pool.submit(gc.get_freeze_count).result() > 0
    finally:
        validators.close()


PARENT = """
import sys, time
from consumers.registry import Registry
from consumers.validators import Rules, Validators
from transport.topics import Topics

if __name__ == "__main__":
    pool = Validators(1, Rules(Registry(), Topics(prefix="vt"), 300.0))
    print(*pool.pool._processes, flush=True)
    time.sleep(120)
"""


def test_a_child_ends_when_its_worker_is_killed_outright(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT, encoding="utf-8")
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 1 and _alive(children[0])
    finally:
        parent.kill()  # SIGKILL: the worker cannot stop its pool
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(children[0]):
        assert time.monotonic() < deadline, "the validator child outlived its worker"
        time.sleep(0.2)


def test_a_child_adopted_before_it_started_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed while its children started (a second or more): each took the
    process that adopted it for its parent, and outlived the worker for good."""
    import consumers.validators as validators

    ended: list[int] = []

    def exit_now(code: int) -> None:
        ended.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(validators.os, "_exit", exit_now)
    monkeypatch.setattr(validators.signal, "signal", lambda *_: None)
    with pytest.raises(SystemExit):
        validators._start_child(Rules(Registry(), TOPICS, 300.0), os.getppid() + 1)
    assert ended == [0] and validators._child is None


def test_closing_a_pool_with_a_stopped_child_ends_within_its_grace() -> None:
    """The executor's own shutdown waited for a stopped (SIGSTOP) or hung child without a
    limit: the worker's stop hung, and only SIGKILL ended it."""
    validators = Validators(1, Rules(Registry(), TOPICS, 300.0))
    (child,) = list(validators.pool._processes)
    os.kill(child, signal.SIGSTOP)
    began = time.monotonic()
    try:
        validators.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert time.monotonic() - began < CLOSE_GRACE_SECONDS + 5
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_pool_whose_children_cannot_start_is_refused_at_once(tmp_path: Path) -> None:
    """The worker then checks its batches itself (it logs why) instead of failing later,
    in the middle of a batch."""
    rules = Rules(Unloadable(), TOPICS, 300.0)
    with pytest.raises(BrokenProcessPool):  # the initializer (its rules) failed
        Validators(1, rules)


class Unloadable(Registry):
    """A registry a child cannot load (its initializer fails)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def _refuse() -> Registry:
    raise ValueError("no registry here")


COMMAND = """
import sys
from {module} import {attr}  # the top of the `portal-sync` script pip writes

from consumers.registry import Registry
from consumers.validators import Rules, Validators
from transport.topics import Topics


def loaded(name):
    return name in sys.modules


if __name__ == "__main__":
    pool = Validators(1, Rules(Registry(), Topics(prefix="vt"), 300.0))
    try:
        print(*(pool.pool.submit(loaded, name).result() for name in ("typer", "rich")))
    finally:
        pool.close()
"""


def test_the_children_of_the_portal_sync_command_never_import_the_command_line(
    tmp_path: Path,
) -> None:
    """A spawned child runs its parent's script again as its main module: the `portal-sync`
    script's own import must not bring Typer and Rich into every validator child (about
    10 MB each, docs/performance-log.md)."""
    (entry,) = (e for e in entry_points(group="console_scripts") if e.name == "portal-sync")
    module, attr = entry.value.split(":")
    script = tmp_path / "portal-sync"
    script.write_text(COMMAND.format(module=module, attr=attr), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


def test_a_child_that_hangs_is_replaced_and_its_batch_checked_in_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child stopped (SIGSTOP) or thrashing never answers: the worker waited for ever,
    and a stop, which waits for the batch, with it."""

    from consumers import validators as module

    monkeypatch.setattr(module, "CHILD_TIMEOUT_SECONDS", 2.0)
    pool = Validators(1, Rules(Registry(), TOPICS, 300.0))
    (hung,) = pool.pool._processes.values()
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        message = Message(TOPICS.change_topic("citizen"), 0, 0, b"{not json")
        began = time.monotonic()
        valid, dead = pool.classify([message])
        assert time.monotonic() - began < 10
        assert not valid and [d.code for d in dead] == ["invalid_json"]
        # Killed, not left stopped. The pool's own thread reaps it too: polled until this
        # handle sees its exit (one waitpid of two racing ones answers "no such child").
        deadline = time.monotonic() + 10
        while hung.is_alive() and time.monotonic() < deadline:
            hung.join(0.2)
        assert not hung.is_alive()
        assert hung not in pool.pool._processes.values()
        assert pool.classify([message])[1][0].code == "invalid_json"  # the new child's
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung.pid, signal.SIGKILL)
        pool.close()
