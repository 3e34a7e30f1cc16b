"""The probe server of every process stays bounded and quiet under misbehaving clients."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import pytest

from observability import http


def _get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return int(reply.status)


def test_half_open_connections_cannot_pile_up_threads_and_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.5)
    server = http.serve(0)
    port = server.server_address[1]
    before = threading.active_count()
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
    time.sleep(0.3)
    try:
        assert threading.active_count() - before <= http.MAX_CONNECTIONS + 2
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(1.0)  # the silent ones time out, the refused ones are gone
    assert _get(port, "/healthz") == 200
    assert threading.active_count() - before <= 2
    server.shutdown()


def test_a_client_that_disconnects_or_stalls_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.3)
    server = http.serve(0)
    port = server.server_address[1]
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET /metr")  # then silence: the read times out
    reset = socket.create_connection(("127.0.0.1", port))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    reset.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    reset.close()  # RST while the answer is being written
    time.sleep(1.0)
    half.close()
    assert _get(port, "/readyz") == 200
    server.shutdown()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Exception" not in captured.err


def test_slow_connections_filling_every_place_cannot_hold_the_probes_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection trickles a byte more often than the read timeout, so none is ever
    dropped for silence: a new connection takes the place of the oldest still sending,
    and /healthz answers beside them (it was closed at once: a liveness probe failing,
    the process restarted, by anyone who could reach the port)."""
    monkeypatch.setattr(http, "READ_TIMEOUT", 1.0)
    server = http.serve(0)
    port = server.server_address[1]
    stop = threading.Event()

    def trickle() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        with contextlib.suppress(OSError):
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x" * 10:
                sock.sendall(bytes([byte]))
                if stop.wait(0.3):
                    break
        sock.close()

    slow = [threading.Thread(target=trickle) for _ in range(http.MAX_CONNECTIONS * 2)]
    for thread in slow:
        thread.start()
    time.sleep(1.5)
    try:
        for _ in range(5):
            assert _get(port, "/healthz") == 200
            assert _get(port, "/metrics") == 200
    finally:
        stop.set()
        for thread in slow:
            thread.join()
        server.shutdown()


def test_a_port_in_use_is_a_configuration_error_naming_it() -> None:
    """Two workers on one host with the default port: one line and exit 2, not a
    traceback."""
    from schemas.errors import ConfigurationError

    taken = http.serve(0)
    port = taken.server_address[1]
    try:
        with pytest.raises(ConfigurationError, match=f"cannot serve /metrics on 127.0.0.1:{port}"):
            http.serve(port)
    finally:
        taken.shutdown()
        taken.server_close()


def test_readyz_says_what_the_workers_retries_wait_for() -> None:
    """A missing grant and a store that is down both made /readyz 503 `not ok` and
    nothing more: the one paged had to find the worker's log to tell them apart."""
    from consumers.metrics import WorkerHealth
    from portal_sync.ops.worker import _ready_note

    health = WorkerHealth()
    server = http.serve(0, ready=health.ready, ready_note=lambda: _ready_note("", health))
    url = f"http://127.0.0.1:{server.server_address[1]}/readyz"

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    try:
        assert readyz() == (200, "ok\n")
        health.retrying("StoreMisconfigured")
        assert readyz() == (503, "not ok\nretrying: StoreMisconfigured\n")
        health.recovered()
        assert readyz() == (200, "ok\n")
    finally:
        server.shutdown()
        server.server_close()
    assert _ready_note("development mode", health) == "development mode"


def test_the_reason_shown_is_of_the_failure_still_going_on() -> None:
    """A fetch that failed and passed again left its reason while a batch retried; a batch
    that recovered while fetches still failed cleared theirs."""
    from consumers.metrics import WorkerHealth
    from portal_sync.ops.worker import _ready_note

    health = WorkerHealth()
    health.retrying("StoreUnavailable")
    health.fetch_failed("fetch: KafkaConnectionError")
    health.fetched()
    assert _ready_note("", health) == "retrying: StoreUnavailable"
    health.fetch_failed("fetch: KafkaConnectionError")
    health.recovered()
    assert _ready_note("", health) == "retrying: fetch: KafkaConnectionError"
    health.fetched()
    assert health.ready() and _ready_note("", health) == ""
