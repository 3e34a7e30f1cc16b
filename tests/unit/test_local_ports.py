"""Ports for local brokers and servers, and the cause a broker that failed to start gives."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from transport import local
from transport.local import LocalKafka, free_port, free_ports


def test_chosen_ports_are_free_and_below_the_ephemeral_range() -> None:
    start = local._ephemeral_start()
    for count in (1, 3):
        first = free_ports(count)
        if start is not None:
            assert first >= local.LOWEST_CHOSEN_PORT and first + count <= start
        assert local._bindable(range(first, first + count))


def test_a_taken_port_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        port = taken.getsockname()[1]
        other = free_ports(3)
        while other - 3 < port < other + 3:
            other = free_ports(3)
        choices = iter([port - 1, other])  # port-1..port+1 holds the taken one
        monkeypatch.setattr(local.random, "randrange", lambda *_: next(choices))
        monkeypatch.setattr(local, "_ephemeral_start", lambda: 60_000)
        assert free_ports(3) == other


def test_without_a_known_ephemeral_range_the_kernel_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local, "_ephemeral_start", lambda: None)
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_broker_that_exited_names_its_first_error(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "server.log").write_text(
        "[2026-12-02 01:01:31,500] INFO starting (kafka.server.KafkaRaftServer)\n"
        "[2026-12-02 01:01:31,587] ERROR Unable to start acceptor for"
        " ListenerName(CONTROLLER) (kafka.network.DataPlaneAcceptor)\n"
        "org.apache.kafka.common.KafkaException: Socket server failed to bind to"
        " 127.0.0.1:26641: Address already in use.\n"
        "\tat kafka.network.Acceptor.openServerSocket(SocketServer.scala:736)\n"
        "[2026-12-02 01:01:31,687] ERROR Encountered fatal fault: caught exception\n"
    )
    cause = LocalKafka(tmp_path)._last_error()
    assert "Unable to start acceptor" in cause
    assert "Address already in use" in cause
    assert "fatal fault" not in cause


def test_a_broker_without_logs_gives_no_cause(tmp_path: Path) -> None:
    assert LocalKafka(tmp_path)._last_error() == ""


def test_a_broker_runs_with_kafka_s_performance_options_when_they_are_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`KAFKA_JVM_PERFORMANCE_OPTS`, as Kafka's own scripts read it, replaces the collector
    settings and nothing else: the heap and the broker's class stay."""
    started: list[list[str]] = []

    class Started:
        pid = 4242

        def __init__(self, command: list[str], **_: object) -> None:
            started.append(command)

    monkeypatch.setattr(local.subprocess, "Popen", Started)
    broker = LocalKafka(tmp_path)
    monkeypatch.delenv("KAFKA_JVM_PERFORMANCE_OPTS", raising=False)
    broker._start("java", tmp_path, tmp_path / "server.properties")
    monkeypatch.setenv("KAFKA_JVM_PERFORMANCE_OPTS", " -XX:TieredStopAtLevel=1  -XX:+UseSerialGC ")
    broker._start("java", tmp_path, tmp_path / "server.properties")
    monkeypatch.setenv("KAFKA_JVM_PERFORMANCE_OPTS", "  ")
    broker._start("java", tmp_path, tmp_path / "server.properties")
    default, given, blank = started
    assert default[1:5] == [local.HEAP, "-Xms128m", *local.PERFORMANCE_OPTIONS]
    assert given[1:5] == [local.HEAP, "-Xms128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
    assert blank == default
    assert all(c[-2] == "kafka.Kafka" for c in started)
    monkeypatch.setenv("KAFKA_JVM_PERFORMANCE_OPTS", '-XX:+UseG1GC "-Dx=unclosed')
    with pytest.raises(local.KafkaSetupError, match="KAFKA_JVM_PERFORMANCE_OPTS"):
        broker._start("java", tmp_path, tmp_path / "server.properties")
    assert len(started) == 3
