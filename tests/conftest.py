"""Shared fixtures: a real local Kafka broker and a real PostgreSQL server per session.

Tiers: `tests/unit` needs no server; `tests/integration/{kafka,postgres,prometheus,helm}`
need the real ones (and Helm), and each folder's conftest marks its tests. A test anywhere
that uses the broker or a PostgreSQL store is marked too; the fast tier is `pytest
tests/unit` (`make test` runs the tiers in turn). Servers and helpers: `tests/support`.

Set PORTAL_SYNC_TEST_KAFKA_BOOTSTRAP or PORTAL_SYNC_TEST_POSTGRES_URL to use existing ones.
In CI (env CI set) a missing broker or database fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text

from portal_sync.settings import Settings
from transport.local import PERFORMANCE_OPTIONS

# A server or tool the tests need that cannot start fails them: `make test` installs every
# one (deploy/install-system.sh --postgres), so a skip would only hide a broken one. A
# partial run on a machine without them may skip instead: PORTAL_SYNC_TEST_ALLOW_SKIP=1.
ALLOW_SKIP = os.environ.get("PORTAL_SYNC_TEST_ALLOW_SKIP") == "1"


def unavailable(message: str) -> NoReturn:
    """Fail (or, with PORTAL_SYNC_TEST_ALLOW_SKIP=1, skip) a test whose server is missing."""
    if ALLOW_SKIP:
        pytest.skip(message)
    pytest.fail(f"{message} (PORTAL_SYNC_TEST_ALLOW_SKIP=1 skips instead)")


def _unavailable(what: str, error: Exception) -> NoReturn:
    unavailable(f"{what} is unavailable: {error}")


# The brokers the tests start (and the benches' short runs, the demo's) compile Java with the
# JIT's first tier only: they live minutes and carry little, and the second tier's
# compiling was most of their CPU. A broker's start 2.9 -> 1.7 s of CPU, an idle minute 2.2
# -> 1.6 s; the Kafka tests' brokers 200 -> 117 s of CPU, all their processes 607 -> 521 s
# (docs/performance-log.md, thirty-seventh round). The collector stays the production one.
os.environ.setdefault(
    "KAFKA_JVM_PERFORMANCE_OPTS", shlex.join((*PERFORMANCE_OPTIONS, "-XX:TieredStopAtLevel=1"))
)

KAFKA_FIXTURES = {"kafka_bootstrap", "settings_for"}
POSTGRES_FIXTURES = {"postgres_server", "postgres_store_url"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by the real servers it uses."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & KAFKA_FIXTURES:
            item.add_marker(pytest.mark.kafka)
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and "postgresql" in callspec.params.values()
        if names & POSTGRES_FIXTURES or on_postgres:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("PORTAL_SYNC_TEST_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    from transport.local import KafkaSetupError, KafkaStartFailed, LocalKafka, free_port

    broker = LocalKafka(tmp_path_factory.mktemp("kafka"))
    try:
        broker.up(port=free_port())
    except (KafkaSetupError, KafkaStartFailed) as error:
        _unavailable("the local Kafka broker", error)
    yield broker.bootstrap()
    broker.down()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    from tests.support.postgres_server import PostgresUnavailable, start_postgres

    try:
        server = start_postgres()
    except (PostgresUnavailable, OSError) as error:
        _unavailable("PostgreSQL", error)
    yield server
    server.stop()


def _fresh_postgres_database(request: pytest.FixtureRequest) -> str:
    existing = os.environ.get("PORTAL_SYNC_TEST_POSTGRES_URL")
    name = f"t_{uuid.uuid4().hex[:12]}"
    if existing:
        admin_url, url = existing, existing.rsplit("/", 1)[0] + f"/{name}"
    else:
        server = request.getfixturevalue("postgres_server")
        admin_url, url = server.admin_url, server.url(name)
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return _fresh_postgres_database(request)


@pytest.fixture
def postgres_store_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty store on PostgreSQL."""
    return _fresh_postgres_database(request)


@pytest.fixture
def sqlite_store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def settings_for(kafka_bootstrap: str) -> object:
    """Settings isolated per test: own topics, own consumer group, given store."""

    def make(store_url: str, **overrides: object) -> Settings:
        run = uuid.uuid4().hex[:8]
        values: dict[str, object] = {
            "kafka_bootstrap": kafka_bootstrap,
            "store_url": store_url,
            "topic_prefix": f"test-{run}",
            "group_id": f"test-{run}",
            "change_partitions": 3,
            "metrics_port": 0,
            # Checked in the worker's process: a validator child's start costs every short
            # test worker a second; the children have their own tests (test_validators,
            # the hostile corpus) and run in the benches' workers (e2e, faults).
            "validator_processes": 0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make
