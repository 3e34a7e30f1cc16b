"""The small HTTP server of every long-running process: /metrics, /healthz, /readyz.

/healthz answers 200 while the process does its work (its loop is alive), 503 otherwise;
/readyz answers 200 once it is ready to do it (joined its group, first poll done).

The server is bounded: at most `MAX_CONNECTIONS` connections are handled at once, and a
connection that sends nothing for `READ_TIMEOUT` seconds is dropped, so half-open
connections cannot pile up threads. When all are taken, a new connection takes the place
of the oldest one still sending its request (one that trickles a byte every few seconds
or stays silent); only when every connection is being answered is the new one closed. So
no one who can reach the port, credentials or not, can hold the probes and the scrapes
out with a few slow connections. Clients that go away mid-request are not logged.

With a web configuration (`observability.web_config`, `PORTAL_SYNC_METRICS_WEB_CONFIG_FILE`)
the server speaks TLS only (the handshake runs in the connection's thread, under the same
read timeout; a plain-HTTP request is answered 400) and every path but /healthz and /readyz
asks for basic authentication (401 with `WWW-Authenticate`) and, with mutual TLS
(`RequireAndVerifyClientCert`), for a client certificate the client CA verified (403). The
probes stay open so that a kubelet or a load balancer can call them without credentials;
they tell only "ok" or "not ok".
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import typing
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

from observability.web_config import Busy, WebConfig
from schemas.errors import ConfigurationError

Probe = Callable[[], bool]
MAX_CONNECTIONS = 16
READ_TIMEOUT = 5.0
GONE = (ConnectionError, TimeoutError, ssl.SSLError)  # socket.timeout is TimeoutError
OPEN_PATHS = ("/healthz", "/readyz")  # never behind basic auth: kubelet probes
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per request, at most `MAX_CONNECTIONS` of them."""

    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits in the backlog, not in threads

    def __init__(self, *args: Any, tls: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls
        self._lock = threading.Lock()
        self._taken = 0  # connections with a thread
        # Connections still sending their request: socket, by the thread that reads it,
        # in the order they came (dicts keep it): the first is the oldest.
        self._sending: dict[int, Any] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self._taken >= MAX_CONNECTIONS and not self._evict_oldest():
                self.shutdown_request(request)  # every one is being answered: refuse
                return
            self._taken += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._free()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self.sending(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._free()

    def _evict_oldest(self) -> bool:
        """Shut the oldest still-sending connection down (its thread's read or handshake
        then ends, and frees its place); False when none could be (it is taken as a
        refusal: a place is never given twice). The plain socket's own shutdown, on a TLS
        socket too: `SSLSocket.shutdown` would drop the TLS state under the handshake's
        thread."""
        while self._sending:
            oldest = next(iter(self._sending))
            try:
                socket.socket.shutdown(self._sending.pop(oldest), socket.SHUT_RDWR)
            except OSError:  # closed meanwhile: its thread is ending; try the next
                continue
            return True
        return False

    def sending(self, connection: Any) -> None:
        """This thread's connection is (still) sending its request: it may be evicted."""
        with self._lock:
            self._sending[threading.get_ident()] = connection

    def answering(self) -> None:
        """This thread's request has arrived: its connection is no longer evictable."""
        with self._lock:
            self._sending.pop(threading.get_ident(), None)

    def _free(self) -> None:
        with self._lock:
            self._taken -= 1
            self._sending.pop(threading.get_ident(), None)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(READ_TIMEOUT)  # the handshake too: a silent client is dropped
        with contextlib.suppress(OSError):  # a failed handshake, a client that went away
            if request.recv(1, socket.MSG_PEEK) != b"\x16":  # not a TLS handshake record
                request.recv(65536)  # the request, read so that closing does not reset
                request.sendall(PLAIN_HTTP_ANSWER)
                return
            # The handshake after the wrap, so that its socket can be evicted meanwhile
            # (the wrap detaches the plain one).
            secure = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            self.sending(secure)
            try:
                secure.do_handshake()
                super().finish_request(secure, client_address)
            finally:
                self.shutdown_request(secure)

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
    ready_note: str | Callable[[], str] = "",
    web: WebConfig | None = None,
) -> BoundedHTTPServer:
    """Serve in a daemon thread; port 0 picks a free port (see `server_address`).
    `ready_note` (or what it returns at each request) is added to the /readyz answer
    (e.g. that the worker runs in development mode, or what its retries wait for; never
    personal data: the probe is open); `web`: TLS and basic authentication (module
    docstring)."""
    auth = web.auth if web is not None else None
    cert_required = web is not None and web.client_cert_required

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT  # per connection: a silent client is dropped

        def handle(self) -> None:
            with contextlib.suppress(*GONE):  # the client went away or never spoke
                super().handle()

        def do_GET(self) -> None:
            typing.cast(BoundedHTTPServer, self.server).answering()
            path = self.path.split("?", 1)[0]
            credentials = self.headers.get("Authorization")
            if cert_required and path not in OPEN_PATHS and not self._verified_client():
                self._reply(403, b"client certificate required\n")
                return
            try:
                allowed = auth is None or path in OPEN_PATHS or auth.allows(credentials)
            except Busy:  # another password is being checked: try again (never queued)
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self._reply_body(b"busy checking a password: try again\n")
                return
            if not allowed:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="portal-sync"')
                self._reply_body(b"unauthorized\n")
                return
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok = (healthy if path == "/healthz" else ready)()
                body = "ok\n" if ok else "not ok\n"
                if path == "/readyz":
                    note = ready_note() if callable(ready_note) else ready_note
                    body += note + "\n" if note else ""
                self._reply(200 if ok else 503, body.encode())
            else:
                self._reply(404, b"not found\n")

        def _verified_client(self) -> bool:
            """Whether the client gave a certificate the client CA verified (a TLS
            connection under CERT_OPTIONAL returns None without one)."""
            peer = getattr(self.connection, "getpeercert", None)
            return bool(peer is not None and peer())

        def _reply(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self._reply_body(body, kind)

        def _reply_body(self, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: scrapes every few seconds would flood the logs."""

    try:
        server = BoundedHTTPServer((host, port), Handler, tls=web.tls if web is not None else None)
    except OSError as error:  # in use, not this host's address, below 1024 unprivileged
        raise ConfigurationError(
            f"cannot serve /metrics on {host}:{port}: {error.strerror or type(error).__name__} "
            "(the metrics port and host settings or flags)"
        ) from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
