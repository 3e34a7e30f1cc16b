"""The store's PostgreSQL connections give up on a server that has gone silent: libpq's
TCP keepalives, unless the URL sets its own.

A silent server (packets dropped) cannot be made here without a firewall, so this checks
what the connections were opened with, as libpq reports it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from store import utcnow
from store.core import BatchChanges, Store
from store.engine import KEEPALIVES
from store.failures import StoreUnavailable, translated


def parameters(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            return dict(conn.connection.driver_connection.info.get_parameters())
    finally:
        store.close()


def test_a_store_connection_gives_up_on_a_silent_server(postgres_store_url: str) -> None:
    opened = parameters(postgres_store_url)
    assert {name: opened.get(name) for name in KEEPALIVES} == {
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
    }


def test_the_urls_own_tcp_settings_win(postgres_store_url: str) -> None:
    opened = parameters(postgres_store_url + "?keepalives_idle=60")
    assert opened.get("keepalives_idle") == "60"
    assert "keepalives_count" not in opened  # none of ours beside the URL's


def test_a_session_stopped_inside_its_transaction_gives_its_locks_up(
    postgres_store_url: str,
) -> None:
    """A worker stopped in a batch (SIGSTOP, a paused VM) whose connection the kernel kept
    alive held its locks until a probe killed it; the server now ends such a session after
    `idle_in_transaction`, and another takes the lock at once."""
    stopped = Store(postgres_store_url, lock_wait=5.0, idle_in_transaction=1.0)
    other = Store(postgres_store_url, lock_wait=5.0)
    try:
        with stopped.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(4242)"))  # a batch's lock, held
            time.sleep(2.0)  # the worker stopped: no statement for longer than allowed
            with other.engine.connect() as taking:
                began = time.monotonic()
                taking.execute(text("SELECT pg_advisory_xact_lock(4242)"))
                assert time.monotonic() - began < 1.0
                taking.rollback()
            with pytest.raises(StoreUnavailable), translated():  # resumed: a retry, no commit
                conn.execute(text("SELECT 1"))
    finally:
        stopped.close()
        other.close()


@pytest.mark.parametrize("use_offsets", [True, False])  # a worker's; a replay's, a remerge's
def test_a_batch_stopped_between_its_statements_gives_its_locks_up(
    postgres_store_url: str, use_offsets: bool
) -> None:
    """The same, stopped inside `Store.batch` after its reads or its writes: psycopg
    leaves a pipeline with a Sync and, when the results have not come yet, a Flush; and
    PostgreSQL, reading a Flush, stops the session's idle timer until the next Sync. A
    worker stopped there held its locks for ever (a fault review: two workers, one
    SIGSTOPped for 330 s; the other retried its batches for all of it). Each pipeline is
    now followed by a round trip that starts the timer again."""
    stopped = Store(postgres_store_url, lock_wait=5.0, idle_in_transaction=1.0)
    other = Store(postgres_store_url, lock_wait=5.0)
    stopped.create_schema()
    partitions, keys = [("ps.citizen.changes", 0)], [("citizen", "001090000001")]

    def holding(held: threading.Event) -> None:
        with other.batch(partitions, keys, use_offsets=use_offsets):
            held.set()
            time.sleep(0.5)

    try:
        for when in ("read", "written"):
            # the batch's answers come late (the Flush is sent only then): another batch
            # holds the key a moment
            held = threading.Event()
            holder = threading.Thread(target=holding, args=(held,))
            holder.start()
            held.wait(10)
            with (
                pytest.raises(StoreUnavailable),  # resumed: a retry, no commit
                stopped.batch(partitions, keys, use_offsets=use_offsets) as tx,
            ):
                holder.join()
                if when == "written":  # a part sent in the pipeline and waited for
                    tx.send(BatchChanges(), utcnow())
                    tx.settle()
                time.sleep(2.5)  # the worker stopped: no statement for longer than allowed
                began = time.monotonic()
                try:
                    with other.batch(partitions, keys, use_offsets=use_offsets):
                        took = time.monotonic() - began
                except StoreUnavailable:  # waited out its lock_wait: the locks still held
                    took = float("inf")
                assert took < 1.0, when
    finally:
        stopped.close()
        other.close()


def test_every_session_of_the_store_gives_up_an_idle_transaction_not_only_the_workers(
    postgres_store_url: str,
) -> None:
    """An operator's `replay` or `dlq redrive` suspended with Ctrl-Z inside a transaction
    held its records' locks without limit: every worker's batch touching them retried
    until the command was resumed. Operators' commands open the store as `Store(url)`."""
    store = Store(postgres_store_url)
    try:
        with store.engine.connect() as conn:
            shown = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
        assert shown == "5min"
    finally:
        store.close()


def test_a_records_read_that_pauses_longer_than_the_idle_limit_goes_on(
    postgres_store_url: str,
) -> None:
    """`rebuild --compare` reads one store while it waits on the other, and `export`
    writes into a pipe that may stall: the reader pauses between records. When the read was
    one transaction, every store session's idle limit made the server end it mid-read; it
    now reads page by page (test_record_order.py)."""
    from tests.support.store_helpers import Feed, event

    keys = [f"0791900{n:05d}" for n in range(2_500)]  # more than one fetch of the cursor
    # Written without the limit: on a busy machine, a pause of half a second inside the
    # schema's creation or the batch's transaction ended them (CI, beside the unit tests).
    writer = Store(postgres_store_url)
    try:
        writer.create_schema()
        Feed(writer).apply(
            *(event("citizen", key, "province-79", 1, {"full_name": "Lê Văn An"}) for key in keys)
        )
    finally:
        writer.close()
    # A limit of 2 s, not less: each page's own short transaction must outlast a stall of
    # this busy machine between its read and its rollback (0.5 s ended one in CI once).
    store = Store(postgres_store_url, idle_in_transaction=2.0)
    try:
        read = store.iter_records()
        first = next(read)
        time.sleep(4.0)
        assert [first[1], *(r[1] for r in read)] == keys
    finally:
        store.close()
