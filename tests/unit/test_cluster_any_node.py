"""`Cluster._any_node`: a question that meets a dead node is asked again, long enough for
kafka-python's growing reconnect backoff to exclude that node (a CI run lost the three
attempts it had before to the same dead node)."""

from __future__ import annotations

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
