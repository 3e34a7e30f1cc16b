"""TLS and basic authentication of the HTTP endpoints: Prometheus's web configuration file.

`PORTAL_SYNC_METRICS_WEB_CONFIG_FILE` names a file in the format of the Prometheus
exporter-toolkit (the `--web.config.file` of node_exporter and Prometheus itself), so one
file, one tool (`promtool check web-config`) and one set of docs serve every exporter:

    tls_server_config:
      cert_file: server.crt          # paths relative to this file
      key_file: server.key
      client_ca_file: clients.pem    # optional, with client_auth_type: mutual TLS
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12             # or TLS13
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt hashes, never passwords

Only these keys are understood; any other one is refused rather than silently ignored (a
security setting that is not applied must not look applied). The file is read once, at
start: restart the process after changing it (a renewed certificate included).

Passwords are checked with bcrypt (its comparison is constant-time); an unknown user costs a
bcrypt check too, so a response time does not tell which users exist. A successful check is
remembered (a SHA-256 of user, hash and password) so that a scrape every few seconds does not
pay bcrypt's cost each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from schemas.errors import ConfigurationError

# The hash in deploy/prometheus/web-config.example.yml, of the password "change-me": a copy
# of the example left as it is would let anyone who read the repository scrape.
# (after its "$2b$": "$2a$" and "$2y$" spell the same hash)
PUBLISHED_HASHES = frozenset({"12$g3CxhwMqxv4ceJfcLix3w.CHczPjaCJQpLVaz7aPzADSJ18QqYVfO"})
BCRYPT_HASH = re.compile(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$")
TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
REMEMBERED = 64  # successful checks kept (one per user and password in use)


class Busy(Exception):
    """A bcrypt check was asked while another runs: answered at once (503), not queued."""


class BasicAuth:
    """Users and their bcrypt hashes; `allows` checks an `Authorization` header.

    One bcrypt check at a time (`Busy` for a second one meanwhile): each costs a third of a
    second of a core, and a connection waiting for one cannot be dropped for another, so
    a client sending wrong passwords on a few connections used to take every one of the
    server's connections, the probes' too, and the process's CPU. A remembered success
    (Prometheus's scrapes) needs no check."""

    def __init__(self, users: dict[str, bytes]) -> None:
        if not users:
            raise ValueError("basic auth needs at least one user")
        self.users = users
        self._remembered: set[bytes] = set()
        self._lock = threading.Lock()
        self._checking = threading.Lock()

    def allows(self, authorization: str | None) -> bool:
        """Whether the header's user and password match; `Busy` while another check runs."""
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        timing = hashed or next(iter(self.users.values()))  # an unknown user costs the same
        key = hashlib.sha256(b"\0".join([user.encode(), timing, password])).digest()
        with self._lock:
            if hashed is not None and key in self._remembered:
                return True
        if not self._checking.acquire(blocking=False):
            raise Busy()
        try:
            matched = bcrypt.checkpw(password, timing)
        except ValueError:  # longer than bcrypt's 72 bytes: no hash can match it
            return False
        finally:
            self._checking.release()
        if not (matched and hashed is not None):
            return False
        with self._lock:
            if len(self._remembered) >= REMEMBERED:
                self._remembered.clear()
            self._remembered.add(key)
        return True


def _basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user.decode("utf-8", "replace"), password


@dataclass(frozen=True)
class WebConfig:
    """What the HTTP endpoints ask of their clients; no file: plain HTTP, no auth."""

    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    source: Path | None = None
    # RequireAndVerifyClientCert: every path but the probes' needs a verified client
    # certificate. The handshake itself only verifies one when given (CERT_OPTIONAL): a
    # kubelet probes /healthz and /readyz without one, and a refused handshake would fail
    # every probe and restart the process for ever.
    client_cert_required: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def load_web_config(path: Path | None) -> WebConfig | None:
    """Read and check a web configuration file (None: none configured); every problem is a
    ConfigurationError naming the file and the key."""
    if path is None:
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigurationError(f"web config {path}: {error.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"web config {path} is not valid YAML: {error}") from None
    raw = {} if raw is None else raw  # an empty file, or every line commented out
    _mapping(raw, path, "the file")
    empty = sorted(key for key in ("tls_server_config", "basic_auth_users")
                   if key in raw and not raw[key])  # fmt: skip
    if empty:  # a section whose lines were commented out: not applied, so never looks it
        raise ConfigurationError(
            f"web config {path}: {', '.join(empty)} is empty: remove the key to serve without it"
        )
    if not raw:
        raise ConfigurationError(
            f"web config {path} names neither tls_server_config nor basic_auth_users: it "
            "would serve plain HTTP without authentication; remove "
            "PORTAL_SYNC_METRICS_WEB_CONFIG_FILE to serve so"
        )
    unknown = set(raw) - {"tls_server_config", "basic_auth_users"}
    if unknown:
        raise ConfigurationError(
            f"web config {path}: {', '.join(sorted(map(str, unknown)))} not supported "
            "(tls_server_config, basic_auth_users)"
        )
    tls = raw.get("tls_server_config")
    users = raw.get("basic_auth_users")
    context = None if tls is None else _tls_context(tls, path)
    required = context is not None and context.verify_mode == ssl.CERT_REQUIRED
    if context is not None and required:
        context.verify_mode = ssl.CERT_OPTIONAL  # the paths ask for it (WebConfig)
    return WebConfig(
        tls=context,
        auth=None if not users else BasicAuth(_users(users, path)),
        source=path,
        client_cert_required=required,
    )


def _mapping(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigurationError(f"web config {path}: {where} must be a mapping")
    return value


def _users(raw: Any, path: Path) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(raw, path, "basic_auth_users").items():
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise ConfigurationError(
                f"web config {path}: basic_auth_users.{user} must be a bcrypt hash ($2b$...)"
            )
        if "$".join(hashed.split("$")[2:]) in PUBLISHED_HASHES:  # $2a$, $2b$, $2y$ alike
            raise ConfigurationError(
                f"web config {path}: basic_auth_users.{user} is the example's hash, whose "
                "password is published: make a hash of your own (docs/operations.md)"
            )
        users[str(user)] = hashed.encode()
    return users


def _tls_context(raw: Any, path: Path) -> ssl.SSLContext:
    config = _mapping(raw, path, "tls_server_config")
    unknown = set(config) - TLS_KEYS
    if unknown:
        raise ConfigurationError(
            f"web config {path}: tls_server_config.{', '.join(sorted(map(str, unknown)))} "
            f"not supported ({', '.join(sorted(TLS_KEYS))})"
        )
    if not config.get("cert_file") or not config.get("key_file"):
        raise ConfigurationError(
            f"web config {path}: tls_server_config needs cert_file and key_file"
        )
    auth_type = config.get("client_auth_type") or "NoClientCert"
    version = config.get("min_version") or "TLS12"
    if auth_type not in CLIENT_AUTH or version not in VERSIONS:
        raise ConfigurationError(
            f"web config {path}: tls_server_config: client_auth_type one of "
            f"{', '.join(CLIENT_AUTH)}; min_version one of {', '.join(VERSIONS)}"
        )
    if bool(config.get("client_ca_file")) != (auth_type != "NoClientCert"):
        raise ConfigurationError(
            f"web config {path}: tls_server_config: client_ca_file and a client_auth_type "
            "that verifies go together"
        )

    def relative(key: str) -> str:
        return str(path.parent / Path(str(config[key])).expanduser())

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[version]
    files = ["cert_file", "key_file"]
    try:
        context.load_cert_chain(relative("cert_file"), relative("key_file"))
        if config.get("client_ca_file"):
            files = ["client_ca_file"]
            context.load_verify_locations(cafile=relative("client_ca_file"))
    except (OSError, ssl.SSLError) as error:
        named = " and ".join(f"{key} {relative(key)}" for key in files)
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigurationError(
            f"web config {path}: tls_server_config: cannot load {named}: {reason}"
        ) from None
    context.verify_mode = CLIENT_AUTH[auth_type]
    return context
