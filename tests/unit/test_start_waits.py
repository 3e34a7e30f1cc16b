"""A long-running process started while the broker or the store is away waits for them
(`schemas.errors.until_available`); a job (`--once`, `--until-caught-up`) fails at once.
Before, `produce` and `worker` exited 1 after the first attempt, and a supervisor's restart
backoff (up to 5 minutes under Kubernetes) delayed them that much after the cluster came
back."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError
from typer.testing import CliRunner

import schemas.errors
from portal_sync.cli import app
from schemas.errors import Backoff, ConfigurationError, TransientError, until_available
from tests.unit.test_produce_overrides import CONFIG  # a deployment file of one filedrop source
from transport.clients import translate
from transport.config import KafkaConnection

log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas.errors, "FIRST_START_WAIT_SECONDS", 0.01)


def test_transient_errors_are_tried_again_until_the_action_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts: list[int] = []

    def action() -> str:
        attempts.append(1)
        if len(attempts) < 4:
            raise TransientError("no Kafka broker answered")
        return "done"

    heard: list[str] = []
    done = until_available(action, "test start", threading.Event(), log, on_retry=heard.append)
    assert done == "done"
    assert len(attempts) == 4
    assert [str(error) for error in heard] == ["no Kafka broker answered"] * 3
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "test start: no Kafka broker answered; trying again in 0 s"
    assert len(said) == 3


def test_the_wait_doubles_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schemas.errors, "FIRST_START_WAIT_SECONDS", 8.0)
    waits: list[float] = []

    def pause(stop: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        return len(waits) == 5  # a stop during the fifth wait

    monkeypatch.setattr(schemas.errors, "_pause", pause)

    def action() -> None:
        raise TransientError("away")

    assert until_available(action, "start", threading.Event(), log) is None
    assert waits == [8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_stop_set_by_a_signal_ends_a_pause_at_once() -> None:
    """The pause sleeps in short steps (a signal handler calling `set` on the thread that
    waits in `Event.wait` could deadlock on the event's own lock)."""
    import signal
    import time

    stop = threading.Event()
    previous = signal.signal(signal.SIGALRM, lambda *_: stop.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        began = time.monotonic()
        assert schemas.errors._pause(stop, 10.0)
        assert time.monotonic() - began < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("error", [ConfigurationError("bad"), ValueError("bug")])
def test_other_errors_are_not_tried_again(error: Exception) -> None:
    attempts: list[int] = []

    def action() -> None:
        attempts.append(1)
        raise error

    with pytest.raises(type(error)):
        until_available(action, "start", threading.Event(), log)
    assert attempts == [1]


def test_a_stop_ends_the_wait_without_another_attempt() -> None:
    stop = threading.Event()
    attempts: list[int] = []

    def action() -> None:
        attempts.append(1)
        stop.set()  # a SIGTERM during the attempt
        raise TransientError("away")

    assert until_available(action, "start", stop, log) is None
    assert attempts == [1]


def test_a_bootstrap_that_timed_out_names_the_servers_and_is_transient() -> None:
    connection = KafkaConnection(bootstrap="127.0.0.1:1")
    error = translate(
        KafkaTimeoutError("Unable to bootstrap"), "connect an admin client", connection
    )
    assert isinstance(error, TransientError)
    assert str(error) == (
        "no Kafka broker of 127.0.0.1:1 answered while trying to connect an admin client"
    )
    # a timeout of a request (not a connection's bootstrap) says what it was doing
    other = translate(KafkaTimeoutError("batch expired"), "send", connection)
    assert str(other) == "Kafka error while trying to send: KafkaTimeoutError"


def test_a_retry_s_kind_is_the_client_s_error_or_the_family_s_class() -> None:
    """What /readyz and `portal_sync_worker_waiting_for` say a worker waits for: every
    broker error was a plain `TransientError` there, whatever it was."""
    from aiokafka.errors import KafkaConnectionError, NotLeaderForPartitionError

    from store.failures import StoreMisconfigured

    away = translate(KafkaConnectionError("refused"), "fetch records")
    assert isinstance(away, TransientError) and away.kind == "KafkaConnectionError"
    leader = translate(NotLeaderForPartitionError(), "fetch records")
    assert isinstance(leader, TransientError) and leader.kind == "NotLeaderForPartitionError"
    assert StoreMisconfigured("a grant is missing").kind == "StoreMisconfigured"
    assert TransientError("away").kind == "TransientError"


@pytest.fixture
def produce_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """`produce` with its HTTP server and sources stubbed out, and a cluster that answers
    from the third attempt on."""
    import observability.http
    import producers.produce
    import transport.admin

    seen: dict[str, Any] = {"attempts": 0, "probes": []}

    def serve(port: int, host: str, healthy: Any = None, ready: Any = None, **_: Any) -> None:
        seen["healthy"] = healthy or (lambda: True)  # a job's: always
        seen["ready"] = ready or (lambda: True)

    def ensure_topics(*args: Any) -> list[str]:
        seen["attempts"] += 1
        seen["probes"].append((seen["healthy"](), seen["ready"]()))
        if seen["attempts"] < 3:
            raise TransientError("no Kafka broker answered")
        return []

    def run(*args: Any, **kwargs: Any) -> Any:
        seen["ran"] = True
        return kwargs["result"]

    monkeypatch.setattr(observability.http, "serve", serve)
    monkeypatch.setattr(transport.admin, "ensure_topics", ensure_topics)
    monkeypatch.setattr(producers.produce, "produce", run)
    (tmp_path / "sources.toml").write_text(CONFIG)
    seen["config"] = str(tmp_path / "sources.toml")
    return seen


def test_produce_waits_for_the_cluster_alive_and_not_ready(produce_cli: dict[str, Any]) -> None:
    from prometheus_client import REGISTRY

    labels = {"source": "province-01", "kind": "publish_error"}
    before = REGISTRY.get_sample_value("portal_sync_source_errors_total", labels) or 0
    result = CliRunner().invoke(app, ["produce", "--config", produce_cli["config"]])
    assert result.exit_code == 0, result.output
    assert produce_cli["attempts"] == 3
    assert produce_cli["probes"] == [(True, False)] * 3  # /healthz ok, /readyz not
    assert produce_cli["ran"]
    # each failed try counted as a failed publish: PortalSyncSourceErrors pages for a wait
    # that does not end (a wrong address looks like a broker away)
    after = REGISTRY.get_sample_value("portal_sync_source_errors_total", labels)
    assert after == before + 2


def test_produce_once_fails_at_once_when_the_cluster_is_away(produce_cli: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["produce", "--config", produce_cli["config"], "--once"])
    assert isinstance(result.exception, TransientError)  # exit 1 (portal_sync.cli.EXIT_CODES)
    assert produce_cli["attempts"] == 1
    assert "ran" not in produce_cli


@given(
    st.floats(min_value=0.001, max_value=10.0),
    st.floats(min_value=10.0, max_value=600.0),
    st.integers(min_value=1, max_value=10_000),
)
def test_every_backoff_doubles_up_to_its_longest(first: float, longest: float, n: int) -> None:
    backoff = Backoff(first, longest)
    waits = [backoff.next() for _ in range(min(n, 50))]
    assert waits[0] == first
    assert all(a <= b <= longest for a, b in itertools.pairwise(waits))
    assert all(b in (2 * a, longest) for a, b in itertools.pairwise(waits))
    assert backoff.nth(n) == (waits[n - 1] if n <= len(waits) else longest)
