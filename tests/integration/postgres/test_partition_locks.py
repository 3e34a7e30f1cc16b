"""Two writers of one partition the store has no offset for yet (a zombie worker after a
rebalance and the partition's new owner, or an operator's skip beside a worker): with no
row for `FOR UPDATE` to lock, each must still wait for the other, or both apply the same
first messages and journal overlapping ranges. The partition's advisory lock orders them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from store.core import BatchChanges, BatchTransaction, Store

TOPIC = "portal.changes.citizen"
PARTITION = (TOPIC, 0)


@pytest.fixture
def store(postgres_store_url: str) -> Iterator[Store]:
    store = Store(postgres_store_url)
    store.create_schema()
    try:
        yield store
    finally:
        store.close()


def waiting_on_a_lock(store: Store) -> bool:
    with store.engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()
    return bool(waiting)


class Writer(threading.Thread):
    """A second writer in a thread of its own; `outcome` holds its result or error."""

    def __init__(self, work: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.outcome: dict[str, object] = {}

    def run(self) -> None:
        try:
            self.outcome["result"] = self.work()
        except Exception as error:  # reported by the test
            self.outcome["error"] = error

    def wait_until_blocked_or_done(self, store: Store) -> bool:
        """True if it waits on a lock, False if it finished without waiting."""
        deadline = time.monotonic() + 30
        while not self.outcome:
            if waiting_on_a_lock(store):
                return True
            assert time.monotonic() < deadline, "the second writer neither waited nor finished"
            time.sleep(0.02)
        return False

    def result(self) -> object:
        self.join(timeout=30)
        assert not self.is_alive(), "the second writer never finished"
        if "error" in self.outcome:
            raise AssertionError(f"the second writer failed: {self.outcome['error']!r}")
        return self.outcome["result"]


def write_first_offset(tx: BatchTransaction) -> None:
    """The batch's write of messages 0-9 (their records aside)."""
    tx.write(BatchChanges(offsets={PARTITION: (0, 10, 10)}), datetime.now(UTC))


def test_a_batch_without_records_waits_for_the_partitions_first_batch(store: Store) -> None:
    def dead_letters_only() -> dict[tuple[str, int], int]:
        with store.batch([PARTITION], []) as tx:
            return dict(tx.offsets)

    with store.batch([PARTITION], [("citizen", "079190000001")]) as tx:
        assert tx.offsets == {}
        write_first_offset(tx)
        second = Writer(dead_letters_only)
        second.start()
        blocked = second.wait_until_blocked_or_done(store)
    # committed: the second batch reads the offset the first one wrote
    assert second.result() == {PARTITION: 10}
    assert blocked


def test_an_operators_skip_waits_for_the_partitions_first_batch(store: Store) -> None:
    copied: list[str] = []  # the message's copy to the dead letters, once checked

    def skip() -> None:
        store.skip_offset(PARTITION, 0, 0, "operator-1", "a message no one can read",
                          before=lambda: copied.append("letter"))  # fmt: skip

    with store.batch([PARTITION], []) as tx:
        assert tx.offsets == {}
        write_first_offset(tx)
        second = Writer(skip)
        second.start()
        blocked = second.wait_until_blocked_or_done(store)
    # The skip now sees the batch's offset (10), not the log's start it was given: refused.
    with pytest.raises(AssertionError, match="OffsetGap"):
        second.result()
    assert blocked
    assert store.stored_offsets([PARTITION]) == {PARTITION: 10}
    assert copied == []  # a message the worker applied is not copied to the dead letters
    store.skip_offset(PARTITION, 10, 0, "operator-1", "stuck", before=lambda: copied.append("x"))
    assert copied == ["x"] and store.stored_offsets([PARTITION]) == {PARTITION: 11}
