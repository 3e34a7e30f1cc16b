"""Optional TLS and basic authentication of the HTTP endpoints (Prometheus's web config
file): 401 without the right credentials, the probes open, TLS that a client trusting the
CA can use and a plain-HTTP client cannot, mutual TLS, and files that are refused."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from observability import http
from observability.web_config import load_web_config
from schemas.errors import ConfigurationError
from tests.support.certificates import Authority, Issued, issue, make_authority

PASSWORD = "scrape-pw-5c1e"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _get(
    url: str, auth: tuple[str, str] | None = None, context: ssl.SSLContext | None = None
) -> Answer:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return Answer(reply.status, dict(reply.headers), reply.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


@dataclass
class Certificates:
    authority: Authority
    server: Issued
    directory: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.authority.path))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("http-tls")
    authority = make_authority(directory, "metrics CA")
    server = issue(authority, directory, "metrics", dns=("localhost",), ips=("127.0.0.1",))
    return Certificates(authority, server, directory)


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def _web_config(directory: Path, config: dict[str, object]) -> Path:
    path = directory / "web-config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _tls(certs: Certificates) -> dict[str, object]:
    # Relative to the file: cert and key lie beside it.
    return {"cert_file": certs.server.cert.name, "key_file": certs.server.key.name}


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("portal_sync_test_gauge", "a gauge", registry=registry).set(7)
    return registry


@pytest.fixture
def serving(registry: CollectorRegistry) -> Iterator[list[http.BoundedHTTPServer]]:
    servers: list[http.BoundedHTTPServer] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def _serve(servers: list[http.BoundedHTTPServer], registry: CollectorRegistry, config: Path) -> int:
    server = http.serve(0, registry=registry, web=load_web_config(config))
    servers.append(server)
    return int(server.server_address[1])


def test_metrics_ask_for_basic_auth_and_the_probes_stay_open(
    tmp_path: Path, registry: CollectorRegistry, serving: list[http.BoundedHTTPServer]
) -> None:
    config = _web_config(tmp_path, {"basic_auth_users": {"prometheus": _hash(PASSWORD)}})
    base = f"http://127.0.0.1:{_serve(serving, registry, config)}"

    for auth in (None, ("prometheus", "wrong"), ("nobody", PASSWORD), ("prometheus", "x" * 100)):
        answer = _get(f"{base}/metrics", auth)
        assert answer.status == 401, auth
        assert answer.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert b"portal_sync_test_gauge" not in answer.body
    for header in ("Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": header})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
    assert _get(f"{base}/other").status == 401  # nothing is told without credentials

    answer = _get(f"{base}/metrics", ("prometheus", PASSWORD))
    assert answer.status == 200 and b"portal_sync_test_gauge 7.0" in answer.body
    assert _get(f"{base}/metrics", ("prometheus", PASSWORD)).status == 200  # remembered
    assert _get(f"{base}/metrics", ("prometheus", "wrong")).status == 401  # still checked
    assert _get(f"{base}/healthz").status == 200 and _get(f"{base}/readyz").status == 200


def test_wrong_passwords_on_many_connections_hold_neither_the_probes_nor_a_queue(
    tmp_path: Path,
    registry: CollectorRegistry,
    serving: list[http.BoundedHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each bcrypt check costs a third of a second, during which its connection could not
    be dropped: twenty connections sending wrong passwords took every one of the
    server's places, and the kubelet's probes were closed at accept (1 of 20 answered).
    One check runs at a time; the others are answered 503 at once."""
    from observability import web_config

    config = _web_config(tmp_path, {"basic_auth_users": {"prometheus": _hash(PASSWORD)}})
    base = f"http://127.0.0.1:{_serve(serving, registry, config)}"

    def slow_check(password: bytes, hashed: bytes) -> bool:
        time.sleep(0.3)  # bcrypt's cost, without its CPU
        return False

    monkeypatch.setattr(web_config.bcrypt, "checkpw", slow_check)
    stop = threading.Event()
    answers: list[int] = []

    def attack() -> None:
        while not stop.is_set():
            try:
                answers.append(_get(f"{base}/metrics", ("nobody", "guess")).status)
            except OSError:
                answers.append(0)

    attackers = [threading.Thread(target=attack) for _ in range(20)]
    for thread in attackers:
        thread.start()
    probes = []
    try:
        time.sleep(0.5)
        for _ in range(20):
            try:
                probes.append(_get(f"{base}/healthz").status)
            except OSError:
                probes.append(0)
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(10)
    assert probes.count(200) >= 19, probes
    assert 503 in answers and 200 not in answers


def test_over_tls_a_client_trusting_the_ca_gets_the_metrics_and_plain_http_fails(
    certs: Certificates, registry: CollectorRegistry, serving: list[http.BoundedHTTPServer]
) -> None:
    users = {"prometheus": _hash(PASSWORD)}
    config = _web_config(
        certs.directory, {"tls_server_config": _tls(certs), "basic_auth_users": users}
    )
    port = _serve(serving, registry, config)

    for host in ("localhost", "127.0.0.1"):  # both are in the certificate
        answer = _get(
            f"https://{host}:{port}/metrics", ("prometheus", PASSWORD), certs.client_context()
        )
        assert answer.status == 200 and b"portal_sync_test_gauge 7.0" in answer.body
    assert _get(f"https://localhost:{port}/metrics", None, certs.client_context()).status == 401
    assert _get(f"https://localhost:{port}/healthz", None, certs.client_context()).status == 200

    with pytest.raises(urllib.error.URLError) as untrusted:  # the system's CAs only
        _get(
            f"https://localhost:{port}/metrics",
            ("prometheus", PASSWORD),
            ssl.create_default_context(),
        )
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)

    plain = _get(f"http://127.0.0.1:{port}/metrics", ("prometheus", PASSWORD))
    assert plain.status == 400 and b"HTTPS" in plain.body
    assert b"portal_sync_test_gauge" not in plain.body


def test_a_silent_client_cannot_hold_the_tls_handshake_of_others(
    certs: Certificates,
    registry: CollectorRegistry,
    serving: list[http.BoundedHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.5)
    port = _serve(
        serving, registry, _web_config(certs.directory, {"tls_server_config": _tls(certs)})
    )
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    began = time.monotonic()
    assert _get(f"https://localhost:{port}/metrics", None, certs.client_context()).status == 200
    assert time.monotonic() - began < 0.5  # served beside them, not after them
    time.sleep(1.0)
    for sock in silent:
        assert sock.recv(1) == b""  # dropped after the read timeout
        sock.close()
    assert "Traceback" not in capfd.readouterr().err


def test_silent_connections_taking_every_place_cannot_hold_tls_clients_out(
    certs: Certificates,
    registry: CollectorRegistry,
    serving: list[http.BoundedHTTPServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twice as many silent connections as places, kept open: a TLS client still gets in
    (the oldest silent one gives up its place), within the read timeout's 5 s."""
    port = _serve(
        serving, registry, _web_config(certs.directory, {"tls_server_config": _tls(certs)})
    )
    silent = [
        socket.create_connection(("127.0.0.1", port)) for _ in range(2 * http.MAX_CONNECTIONS)
    ]
    time.sleep(0.3)
    try:
        for _ in range(3):
            began = time.monotonic()
            reply = _get(f"https://localhost:{port}/metrics", None, certs.client_context())
            assert reply.status == 200 and time.monotonic() - began < 2.0
    finally:
        for sock in silent:
            sock.close()


def test_handshakes_begun_and_left_hanging_cannot_pile_up_threads(
    certs: Certificates,
    registry: CollectorRegistry,
    serving: list[http.BoundedHTTPServer],
) -> None:
    """A TLS record's first byte, then nothing: the connection waits in its handshake. A
    place given to a new connection must take one from such a handshake: the wrap had
    detached the socket the eviction shut down, so nothing ended and every connection got
    a thread (400 clients, 400 threads)."""
    port = _serve(
        serving, registry, _web_config(certs.directory, {"tls_server_config": _tls(certs)})
    )
    before = threading.active_count()
    hanging = []
    for _ in range(6 * http.MAX_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"\x16")
        hanging.append(sock)
    time.sleep(0.5)
    try:
        assert threading.active_count() - before <= http.MAX_CONNECTIONS + 4
        reply = _get(f"https://localhost:{port}/metrics", None, certs.client_context())
        assert reply.status == 200
    finally:
        for sock in hanging:
            sock.close()


def test_mutual_tls_asks_for_a_client_certificate_of_the_clients_ca(
    certs: Certificates, registry: CollectorRegistry, serving: list[http.BoundedHTTPServer]
) -> None:
    clients = make_authority(certs.directory / "clients", "clients CA")
    client = issue(clients, certs.directory / "clients", "prometheus", dns=(), client=True)
    tls = _tls(certs) | {
        "client_ca_file": str(clients.path),
        "client_auth_type": "RequireAndVerifyClientCert",
        "min_version": "TLS13",
    }
    port = _serve(serving, registry, _web_config(certs.directory, {"tls_server_config": tls}))
    url = f"https://localhost:{port}/metrics"

    refused = _get(url, None, certs.client_context())  # no client certificate
    assert (refused.status, refused.body) == (403, b"client certificate required\n")
    context = certs.client_context()
    context.load_cert_chain(str(client.cert), str(client.key))
    assert _get(url, None, context).status == 200
    # The probes stay open: a kubelet has no client certificate, and a handshake that
    # demanded one failed every probe and restarted the process for ever.
    for probe in ("/healthz", "/readyz"):
        assert _get(f"https://localhost:{port}{probe}", None, certs.client_context()).status == 200
    # A certificate of another CA is refused in the handshake, for every path.
    other = make_authority(certs.directory / "other", "other CA")
    stranger = issue(other, certs.directory / "other", "prometheus", dns=(), client=True)
    context = certs.client_context()
    context.load_cert_chain(str(stranger.cert), str(stranger.key))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        _get(f"https://localhost:{port}/healthz", None, context)


TLS_AB = {"cert_file": "a", "key_file": "b"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"basic_auth_users": {"prometheus": PASSWORD}}, "must be a bcrypt hash"),
        (  # the example's published hash, spelt $2y$
            {
                "basic_auth_users": {
                    "p": "$2y$12$g3CxhwMqxv4ceJfcLix3w.CHczPjaCJQpLVaz7aPzADSJ18QqYVfO"
                }
            },
            "the example's hash",
        ),
        ({"http_server_config": {"http2": False}}, "http_server_config not supported"),
        ({"tls_server_config": {"cert_file": "x.crt"}}, "needs cert_file and key_file"),
        ({"tls_server_config": TLS_AB}, "cannot load cert_file .*a and key_file .*b: No such"),
        ({"tls_server_config": TLS_AB | {"cipher_suites": []}}, "cipher_suites not supported"),
        ({"tls_server_config": TLS_AB | {"client_ca_file": "c"}}, "go together"),
        (
            {"tls_server_config": TLS_AB | {"client_auth_type": "RequireAnyClientCert"}},
            "client_auth_type one of",
        ),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_a_web_config_that_cannot_be_applied_as_written_is_refused(
    tmp_path: Path, config: object, message: str
) -> None:
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigurationError, match=message) as refused:
        load_web_config(path)
    assert str(path) in str(refused.value) and PASSWORD not in str(refused.value)


def test_no_web_config_serves_plain_http_and_an_empty_one_or_section_is_refused(
    tmp_path: Path,
) -> None:
    """A file, or a section, whose lines were commented out (the example's user line,
    until a hash is made) served plain HTTP, or without authentication, and looked
    applied: Prometheus kept sending its credentials and kept getting the metrics."""
    assert load_web_config(None) is None
    with pytest.raises(ConfigurationError, match="No such file"):
        load_web_config(tmp_path / "missing.yml")
    for text, said in (
        ("", "names neither"),
        ("# basic_auth_users:\n#   prometheus: $2b$12$...\n", "names neither"),
        ("{}\n", "names neither"),
        ("basic_auth_users:\n#  prometheus: $2b$12$...\n", "basic_auth_users is empty"),
        ("basic_auth_users: {}\n", "basic_auth_users is empty"),
        ("tls_server_config:\n", "tls_server_config is empty"),
    ):
        path = tmp_path / "web-config.yml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigurationError, match=said):
            load_web_config(path)


@pytest.mark.parametrize(
    "command",
    [("worker",), ("lag-exporter",), ("produce", "--config", "{deployment}")],
    ids=lambda command: command[0],
)
def test_every_process_with_endpoints_reads_the_web_config_and_refuses_a_wrong_one(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    deployment = tmp_path / "sources.toml"
    deployment.write_text('[[sources]]\nid = "src-1"\nadapter = "filedrop"\n', encoding="utf-8")
    config = _web_config(tmp_path, {"basic_auth_users": {"prometheus": "not-a-hash"}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    env |= {
        "PORTAL_SYNC_METRICS_WEB_CONFIG_FILE": str(config),
        "PORTAL_SYNC_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached: refused before
        "PORTAL_SYNC_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
    }
    args = [arg.format(deployment=deployment) for arg in command]
    result = subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "must be a bcrypt hash" in result.stderr and "Traceback" not in result.stderr
