"""A Kafka Connect standalone worker with the Debezium PostgreSQL connector, for tests.

The jars come from `transport.connect.ensure_connect_jars` (fetched once through Maven);
the worker keeps its source offsets in a file of its own folder and is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from transport.connect import CONNECT_CLASS, POSTGRES_CONNECTOR, ensure_connect_jars
from transport.local import REPO_ROOT, ensure_java, free_port

LOG4J = REPO_ROOT / "deploy" / "debezium" / "connect-log4j.properties"


def postgres_connector(
    name: str, port: int, database: str, prefix: str, tables: list[str], **extra: str
) -> dict[str, str]:
    """A Debezium PostgreSQL connector (pgoutput) with its own slot and publication."""
    slot = name.replace("-", "_")
    return {
        "name": name,
        "connector.class": POSTGRES_CONNECTOR,
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": "127.0.0.1",
        "database.port": str(port),
        "database.user": "portal",
        "database.password": "unused",  # trust authentication
        "database.dbname": database,
        "topic.prefix": prefix,
        "table.include.list": ",".join(tables),
        "slot.name": slot,
        "publication.name": f"{slot}_pub",
        "publication.autocreate.mode": "filtered",
        "snapshot.mode": "initial",
        "topic.creation.default.replication.factor": "1",
        "topic.creation.default.partitions": "1",
        **extra,
    }


class ConnectWorker:
    """`connect-standalone` with the given connectors; use as a context manager."""

    def __init__(self, root: Path, bootstrap: str, connectors: list[dict[str, str]]) -> None:
        self.root = root
        self.bootstrap = bootstrap
        self.connectors = connectors
        self.rest_port = free_port()
        self.log = root / "connect.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ConnectWorker:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        jars = ensure_connect_jars()
        self.root.mkdir(parents=True, exist_ok=True)
        worker = self.root / "worker.properties"
        worker.write_text(
            "\n".join(
                [
                    f"bootstrap.servers={self.bootstrap}",
                    "key.converter=org.apache.kafka.connect.json.JsonConverter",
                    "key.converter.schemas.enable=false",
                    "value.converter=org.apache.kafka.connect.json.JsonConverter",
                    "value.converter.schemas.enable=true",
                    f"offset.storage.file.filename={self.root / 'connect.offsets'}",
                    "offset.flush.interval.ms=1000",
                    f"plugin.path={jars / 'plugins'}",
                    "plugin.discovery=service_load",
                    f"listeners=http://127.0.0.1:{self.rest_port}",
                    "",
                ]
            )
        )
        files = []
        for connector in self.connectors:
            path = self.root / f"{connector['name']}.properties"
            path.write_text("".join(f"{k}={v}\n" for k, v in connector.items()))
            files.append(str(path))
        command = [
            ensure_java(),
            "-Xms64m",
            "-Xmx384m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{LOG4J}",
            f"-Dconnect.log.file={self.log}",
            "-cp",
            f"{jars / 'lib'}/*",
            CONNECT_CLASS,
            str(worker),
            *files,
        ]
        with (self.root / "connect.out").open("ab") as out:
            self._process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        self.wait_running(timeout)

    def status(self, name: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.rest_port}/connectors/{name}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            status: dict[str, Any] = json.loads(response.read())
            return status

    def wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {c["name"] for c in self.connectors}
        while pending and time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"Kafka Connect exited; see {self.log}")
            for name in sorted(pending):
                try:
                    tasks = self.status(name).get("tasks") or []
                except (OSError, urllib.error.URLError, ValueError):
                    break
                states = {task.get("state") for task in tasks}
                if "FAILED" in states:
                    trace = str(tasks[0].get("trace", ""))[:2000]
                    raise RuntimeError(f"connector {name} failed:\n{trace}")
                if states == {"RUNNING"}:
                    pending.discard(name)
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"connectors {sorted(pending)} not running; see {self.log}")

    def stop(self, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
