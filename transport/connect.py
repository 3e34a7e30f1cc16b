"""Kafka Connect and the Debezium PostgreSQL connector, fetched once through Maven.

Provinces run their own Kafka Connect; portal-sync only reads the topics it writes (the
`debezium` adapter). These jars are for trying that on one machine and for the adapter's
integration test: Connect's standalone worker (`<dir>/lib`, the same Kafka version as the
local broker) and the connector as a Connect plug-in (`<dir>/plugins/debezium-postgres`),
from deploy/debezium/pom.xml into the user's cache dir, like the broker's jars.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from transport import jars
from transport.local import (
    KAFKA_VERSION,
    REPO_ROOT,
    KafkaSetupError,
    KafkaStartFailed,
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
    mvn = shutil.which("mvn")

    def fetch(staging: Path) -> None:
        if mvn is None:
            raise KafkaSetupError(
                "Maven is not installed: it fetches Kafka Connect and Debezium once from "
                "Maven Central (Debian: apt-get install maven)"
            )
        for profile, folder in (("connect", "lib"), ("postgres", "plugins/debezium-postgres")):
            command = [
                mvn,
                "-q",
                "-B",
                "--strict-checksums",  # a jar whose checksum differs from the repository's fails
                "-f",
                str(POM),
                "-P",
                profile,
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging / folder}",
                "-DincludeScope=runtime",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise KafkaStartFailed(
                    f"Maven could not fetch the {profile} jars:\n{result.stdout[-2000:]}"
                )

    return jars.fetch_once(connect_dir(), POM.with_name("jars.sha256"), POM, fetch)
