"""The store over TLS with `sslmode=verify-full` against a PostgreSQL started with `ssl=on`
and a certificate from a generated CA: the right CA connects (encrypted), a wrong CA or a
host name the certificate does not list is refused with the reason and never the password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from store import Store, StoreUnavailable
from tests.conftest import _unavailable
from tests.support.certificates import issue, make_authority
from tests.support.postgres_server import PostgresServer, PostgresUnavailable, start_postgres

PASSWORD = "s3cret-pw-9d2e"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    certs = tmp_path_factory.mktemp("pg-tls")
    authority = make_authority(certs / "ca", "store CA")
    server_cert = issue(authority, certs, "postgres", dns=("localhost",))  # no IP address
    try:
        server = start_postgres(tls=(server_cert.cert, server_cert.key))
    except (PostgresUnavailable, OSError) as error:
        _unavailable("PostgreSQL", error)
    yield server, authority.path
    server.stop()


def _url(server: PostgresServer, host: str, ca: Path) -> str:
    return (
        f"postgresql+psycopg://portal:{PASSWORD}@{host}:{server.port}/postgres"
        f"?sslmode=verify-full&sslrootcert={ca}"
    )


def test_verify_full_with_the_servers_ca_connects_encrypted(
    tls_server: tuple[PostgresServer, Path],
) -> None:
    server, ca = tls_server
    store = Store(_url(server, "localhost", ca))
    store.create_schema()
    with store.engine.connect() as conn:
        encrypted = conn.execute(
            text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ).scalar_one()
    store.close()
    assert encrypted is True


def test_a_wrong_ca_is_refused_with_the_reason_and_never_the_password(
    tls_server: tuple[PostgresServer, Path], tmp_path: Path
) -> None:
    server, _ca = tls_server
    other = make_authority(tmp_path, "another CA")
    store = Store(_url(server, "localhost", other.path))
    with pytest.raises(StoreUnavailable) as refused:
        store.create_schema()
    store.close()
    message = str(refused.value)
    assert "cannot connect to the store" in message
    assert "certificate verify failed" in message
    assert PASSWORD not in message


def test_a_host_name_the_certificate_does_not_list_is_refused(
    tls_server: tuple[PostgresServer, Path],
) -> None:
    server, ca = tls_server
    store = Store(_url(server, "127.0.0.1", ca))  # the certificate names only localhost
    with pytest.raises(StoreUnavailable) as refused:
        store.create_schema()
    store.close()
    message = str(refused.value)
    assert "does not match host name" in message and PASSWORD not in message, message
