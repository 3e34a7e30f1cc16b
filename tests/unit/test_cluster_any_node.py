"""`Cluster._any_node`: a question that meets a dead node is asked again, long enough for
kafka-python's growing reconnect backoff to exclude that node (a CI run lost the three
attempts it had before to the same dead node)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from kafka.errors import KafkaConnectionError, NodeNotReadyError

from transport.admin import Cluster
from transport.config import KafkaConnection


def asks(failures: int) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise (NodeNotReadyError if len(calls) % 2 else KafkaConnectionError)("refused")
        return "answer"

    return calls, call


def test_a_question_is_asked_again_while_nodes_refuse() -> None:
    cluster = Cluster(KafkaConnection(bootstrap="127.0.0.1:1"))
    calls, call = asks(5)
    assert cluster._any_node(call) == "answer"
    assert len(calls) == 6


def test_the_last_refusal_is_raised() -> None:
    cluster = Cluster(KafkaConnection(bootstrap="127.0.0.1:1"))
    calls, call = asks(6)
    with pytest.raises(KafkaConnectionError):
        cluster._any_node(call)
    assert len(calls) == 6


@pytest.mark.parametrize("client", ["admin", "consumer"])
def test_a_broker_that_accepts_and_never_answers_holds_a_poll_for_its_timeout_only(
    client: str,
) -> None:
    """The lag exporter asks with a 5 s deadline; the first connection kept kafka-python's
    own 30 s, and the last snapshot went on being exported, unmarked, for a minute."""
    import socket
    import threading
    import time

    from schemas.errors import TransientError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    connection = KafkaConnection(bootstrap=f"127.0.0.1:{listener.getsockname()[1]}")
    began = time.monotonic()
    try:
        with pytest.raises(TransientError), Cluster(connection, request_timeout_ms=1_000) as asked:
            getattr(asked, client)
    finally:
        listener.close()
        for each in held:
            each.close()
    assert time.monotonic() - began < 10  # before: 30 s, whatever the deadline asked
