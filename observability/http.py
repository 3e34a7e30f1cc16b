"""The small HTTP server of every long-running process: /metrics, /healthz, /readyz.

/healthz answers 200 while the process does its work (its loop is alive), 503 otherwise;
/readyz answers 200 once it is ready to do it (joined its group, first poll done).

The server is bounded: at most `MAX_CONNECTIONS` requests are handled at once (a further
connection is closed at once), and a connection that sends nothing for `READ_TIMEOUT`
seconds is dropped, so half-open connections cannot pile up threads. Clients that go away
mid-request are not logged.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

Probe = Callable[[], bool]
MAX_CONNECTIONS = 16
READ_TIMEOUT = 5.0
GONE = (ConnectionError, TimeoutError)  # socket.timeout is TimeoutError


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per request, at most `MAX_CONNECTIONS` of them."""

    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits in the backlog, not in threads

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: refuse rather than queue a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that disconnects or stalls is not an error worth a traceback."""


def always() -> bool:
    return True


def serve(
    port: int,
    host: str = "127.0.0.1",
    healthy: Probe = always,
    ready: Probe = always,
    registry: CollectorRegistry = REGISTRY,
    ready_note: str = "",
) -> BoundedHTTPServer:
    """Serve in a daemon thread; port 0 picks a free port (see `server_address`).
    `ready_note` is added to the /readyz answer (e.g. that the worker runs in
    development mode)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT  # per connection: a silent client is dropped

        def handle(self) -> None:
            with contextlib.suppress(*GONE):  # the client went away or never spoke
                super().handle()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok = (healthy if path == "/healthz" else ready)()
                body = "ok\n" if ok else "not ok\n"
                if path == "/readyz" and ready_note:
                    body += ready_note + "\n"
                self._reply(200 if ok else 503, body.encode())
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: scrapes every few seconds would flood the logs."""

    server = BoundedHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


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
