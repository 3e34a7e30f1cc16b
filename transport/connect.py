"""Kafka Connect and the Debezium PostgreSQL connector, fetched once through Maven.

Provinces run their own Kafka Connect; portal-sync only reads the topics it writes (the
`debezium` adapter). These jars are for trying that on one machine and for the adapter's
integration test: Connect's standalone worker (`<dir>/lib`, the same Kafka version as the
local broker) and the connector as a Connect plug-in (`<dir>/plugins/debezium-postgres`),
from deploy/debezium/pom.xml into the user's cache dir, like the broker's jars.
"""

from __future__ import annotations

from pathlib import Path

from transport import jars
from transport.local import (
    KAFKA_VERSION,
    REPO_ROOT,
    maven_copy,
    user_cache_dir,
)

DEBEZIUM_VERSION = "3.6.1.Final"
POM = REPO_ROOT / "deploy" / "debezium" / "pom.xml"
CONNECT_CLASS = "org.apache.kafka.connect.cli.ConnectStandalone"
POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"


def connect_dir() -> Path:
    return user_cache_dir() / f"connect-{KAFKA_VERSION}-debezium-{DEBEZIUM_VERSION}"


def ensure_connect_jars() -> Path:
    """Fetch Connect's worker and the Debezium PostgreSQL plug-in once, checked against
    `deploy/debezium/jars.sha256`; later calls reuse the cache (`transport.jars`). Returns
    the folder holding `lib/` and `plugins/`."""

    def fetch(staging: Path) -> None:
        for profile, folder in (("connect", "lib"), ("postgres", "plugins/debezium-postgres")):
            maven_copy(POM, staging / folder, f"the {profile} jars", profile)

    return jars.fetch_once(connect_dir(), POM.with_name("jars.sha256"), POM, fetch)
