"""Factories of every Kafka client the project uses; the only place that constructs them.

Each takes the one `KafkaConnection` and adds what its role needs. Driver errors met while
connecting are translated here into the project's taxonomy: a cluster that does not answer
is transient, a refused authentication or certificate is a configuration error, an
operation the cluster's ACLs do not allow is refused (each names the principal, never a
secret).

Neither driver says why a secured connection failed (kafka-python retries its bootstrap
until it times out, aiokafka reports "unable to bootstrap"), so a secured connection is
checked once per process before its first client (`verify`): TLS handshake, the broker's
answer to the client certificate, SASL authentication; a failure says which setting.

The clients' DEBUG lines print whole requests and records (keys, values, headers: personal
data); every factory keeps them out of the logs (`quiet_client_debug`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError

from schemas.errors import ConfigurationError, Refused, TransientError
from transport.config import KafkaConnection
from transport.guard import install as guard_records


def translate(
    error: Exception, action: str, connection: KafkaConnection | None = None
) -> Exception:
    """A kafka-python or aiokafka error as one of the project's families."""
    name = type(error).__name__
    who = connection.principal() if connection is not None else "this client"
    if "Authorization" in name:
        return Refused(
            f"Kafka: {who} is not allowed to {action} ({name}{_resources(error)}): "
            "the cluster's ACLs refuse it"
        )
    if "Authentication" in name or "SSL" in name:
        return ConfigurationError(f"Kafka refused {who} while trying to {action}: {name}")
    if name == "UnsupportedCodecError":  # retrying cannot help: the partition would stall
        return ConfigurationError(
            f"Kafka: a record batch is compressed with a codec this install cannot read "
            f"while trying to {action}: install the client's codec libraries"
        )
    if "Connection" in name and connection is not None:
        reason = diagnose(connection)
        if reason is not None:
            return ConfigurationError(f"Kafka refused {who} while trying to {action}: {reason}")
    if isinstance(error, KafkaConnectionError) or "Connection" in name:
        return _transient(f"no Kafka broker answered while trying to {action}", name)
    if name == "KafkaTimeoutError" and action.startswith("connect") and connection is not None:
        # the client's bootstrap gave up: no listed server answered it in time
        reason = diagnose(connection)
        if reason is not None:
            return ConfigurationError(f"Kafka refused {who} while trying to {action}: {reason}")
        return _transient(
            f"no Kafka broker of {connection.bootstrap} answered while trying to {action}", name
        )
    return _transient(f"Kafka error while trying to {action}: {name}", name)


def _transient(message: str, cause: str) -> TransientError:
    error = TransientError(message)
    error.cause = cause  # the client's error class: what a retry waits for
    return error


def _resources(error: Exception) -> str:
    """The topics or group an authorization error names (never data)."""
    for arg in error.args:
        if isinstance(arg, set | frozenset | list | tuple):
            return ": " + ", ".join(sorted(str(name) for name in arg))
        if isinstance(arg, str) and arg:
            return f": {arg}"
    return ""


CLIENT_LOGGERS = ("kafka", "aiokafka")


def quiet_client_debug() -> None:
    """Cap the Kafka clients' loggers at INFO, whatever the root logger's level: at DEBUG
    kafka-python logs every record it sends (`Sending (key=… value=… headers=…)`) and every
    request's bytes. Never below the root's level (a WARNING root stays quiet about the
    clients' INFO lines). A level someone set on these loggers on purpose is left alone."""
    level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


# -- checking a secured connection -----------------------------------------------------
_verified: set[str] = set()
_verified_lock = threading.Lock()
_TLS_REFUSALS = ("CERTIFICATE_UNKNOWN", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA")


def verify(connection: KafkaConnection) -> None:
    """Raise ConfigurationError when the cluster refuses this connection's TLS or SASL
    settings; once per process and settings. A broker that does not answer is left to the
    client (transient)."""
    if connection.security_protocol == "PLAINTEXT":
        return
    fingerprint = _fingerprint(connection)
    with _verified_lock:
        if fingerprint in _verified:
            return
    reason = diagnose(connection)
    if reason is not None:
        raise ConfigurationError(f"Kafka refused {connection.principal()}: {reason}")
    with _verified_lock:
        _verified.add(fingerprint)


def _fingerprint(connection: KafkaConnection) -> str:
    parts = [
        connection.bootstrap,
        connection.security_protocol,
        str(connection.sasl_mechanism),
        str(connection.sasl_username),
        str(connection.password() if connection.uses_sasl else None),
        str(connection.ssl_cafile),
        str(connection.ssl_certfile),
        str(connection.ssl_keyfile),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def diagnose(connection: KafkaConnection, timeout: float = 10.0) -> str | None:
    """Why the first answering broker refuses this connection, or None (accepted, not
    secured, or no broker answered)."""
    if connection.security_protocol == "PLAINTEXT":
        return None
    for server in connection.servers():
        host, _, port = server.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
        except (OSError, ValueError):
            continue
        with sock:
            if connection.uses_ssl:
                reason = _tls_refusal(connection, sock, host)
                if reason is not None:
                    return reason
        if connection.uses_sasl:
            return _sasl_refusal(connection, host, int(port), timeout)
        return None
    return None


def _api_versions_request() -> bytes:
    client_id = b"portal-sync-check"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id  # ApiVersions v0
    return struct.pack(">i", len(body)) + body


def _tls_refusal(connection: KafkaConnection, sock: socket.socket, host: str) -> str | None:
    """The TLS handshake and one request: a client certificate the broker refuses shows
    only after the handshake (TLS 1.3)."""
    context = connection.ssl_context()
    assert context is not None
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(_api_versions_request())
            if not tls.recv(4):
                return (
                    "the broker closed the TLS connection after the handshake: it requires "
                    "a client certificate it trusts (PORTAL_SYNC_KAFKA_SSL_CERTFILE, _SSL_KEYFILE)"
                )
    except ssl.SSLCertVerificationError as error:
        return (
            f"the broker's certificate is not trusted ({error.verify_message}): "
            "PORTAL_SYNC_KAFKA_SSL_CAFILE must hold the CA that signed it"
        )
    except ssl.SSLError as error:
        reason = str(error.reason or error)
        if any(alert in reason for alert in _TLS_REFUSALS):
            if connection.ssl_certfile is None:
                return (
                    f"the broker requires a client certificate ({reason}): set "
                    "PORTAL_SYNC_KAFKA_SSL_CERTFILE and _SSL_KEYFILE"
                )
            return (
                f"the broker does not trust the client certificate {connection.ssl_certfile} "
                f"({reason}): it must be signed by a CA the broker trusts"
            )
        return f"TLS with the broker failed ({reason}): is the port a TLS listener?"
    except OSError:
        return None
    return None


def _sasl_refusal(connection: KafkaConnection, host: str, port: int, timeout: float) -> str | None:
    """SASL authentication through aiokafka's connection (kafka-python does not report a
    refused authentication), in a thread of its own: callers may run an event loop."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError as AioKafkaError

    async def attempt() -> None:
        conn = await create_conn(
            host,
            port,
            client_id="portal-sync-check",
            request_timeout_ms=int(timeout * 1000),
            ssl_context=connection.ssl_context(),
            security_protocol=connection.security_protocol,
            sasl_mechanism=connection.sasl_mechanism,
            sasl_plain_username=connection.sasl_username,
            sasl_plain_password=connection.password(),
        )
        conn.close()

    outcome: list[str | None] = [None]

    def run() -> None:
        try:
            asyncio.run(asyncio.wait_for(attempt(), timeout))
        except AioKafkaError as error:
            name = type(error).__name__
            if "Authentication" in name:
                outcome[0] = (
                    f"SASL {connection.sasl_mechanism} authentication failed for user "
                    f"{connection.sasl_username!r}: wrong user name or password "
                    "(PORTAL_SYNC_KAFKA_SASL_USERNAME, _SASL_PASSWORD or _SASL_PASSWORD_FILE)"
                )
            elif "SaslMechanism" in name:
                outcome[0] = f"the broker does not offer SASL {connection.sasl_mechanism}"
        except (OSError, TimeoutError):
            pass

    thread = threading.Thread(target=run, name="kafka-sasl-check", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0]


# What a consumer fetches ahead of its reads, at most, for each partition it is assigned: a
# backlog fills every partition's buffer, so a worker's memory grows by this much for each
# partition (Kafka's own default; a larger record batch still comes whole). With 4 MiB, a
# worker on the bench's 24 partitions (4 change topics) held 84 MB of fetched bytes in a
# backlog, a third of its memory (docs/performance-log.md, twenty-third round). The
# worker's fetches ask 4 of these at most in all (`transport.group`).
MAX_PARTITION_FETCH_BYTES = 1_048_576


def _options(connection: KafkaConnection) -> dict[str, Any]:
    """The driver options of a connection the cluster accepts (`verify`)."""
    verify(connection)
    return connection.client_options()


# No client of ours asks the broker to create a topic it names: one made so takes the
# cluster's defaults (one partition count, `delete` cleanup, 1 MB messages), not the
# project's (`portal-sync topics`). Brokers should refuse it too (auto.create.topics.enable).
NO_AUTO_CREATE = {"allow_auto_create_topics": False}


def producer(connection: KafkaConnection, client_id: str, **options: Any) -> Any:
    quiet_client_debug()
    try:
        return KafkaProducer(
            **_options(connection), client_id=client_id, **(NO_AUTO_CREATE | options)
        )
    except KafkaError as error:
        raise translate(error, "connect a producer", connection) from error


def consumer(connection: KafkaConnection, client_id: str, **options: Any) -> Any:
    quiet_client_debug()
    guard_records()
    try:
        return KafkaConsumer(
            **_options(connection), client_id=client_id, **(NO_AUTO_CREATE | options)
        )
    except KafkaError as error:
        raise translate(error, "connect a consumer", connection) from error


def admin(connection: KafkaConnection, client_id: str = "portal-sync-admin", **options: Any) -> Any:
    quiet_client_debug()
    try:
        return KafkaAdminClient(**_options(connection), client_id=client_id, **options)
    except KafkaError as error:
        raise translate(error, "connect an admin client", connection) from error


NO_TOPIC_ID = "00000000-0000-0000-0000-000000000000"  # Kafka's "no id" (Uuid.ZERO_UUID)


def described_topic_ids(described: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The id the cluster gave each described topic that exists (KIP-516, Kafka 2.8 on):
    a topic deleted and created again gets a new one, whatever its offsets look like. A
    topic of a cluster that gives no ids is left out."""
    ids: dict[str, str] = {}
    for topic in described:
        found = topic.get("topic_id")
        if topic.get("error_code") == 0 and found and str(found) != NO_TOPIC_ID:
            ids[str(topic["name"])] = str(found)
    return ids
