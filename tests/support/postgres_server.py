"""A throwaway PostgreSQL server from Debian's package, for integration tests.

Started with initdb/pg_ctl on a free loopback port in a temp dir; as root, the server runs
as the `postgres` system user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transport.local import free_port


class PostgresUnavailable(RuntimeError):
    pass


@dataclass
class PostgresServer:
    root: Path
    port: int
    prefix: list[str]
    bindir: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://portal@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://portal@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run(
            [
                *self.prefix,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.root / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(
    tls: tuple[Path, Path] | None = None,
    logical_replication: bool = False,
    settings: dict[str, str] | None = None,
) -> PostgresServer:
    """A fresh server; with `tls` (certificate and key files) it also accepts TLS (ssl=on);
    with `logical_replication` it writes a logical WAL (`wal_level=logical`) that log-based
    capture (Debezium's pgoutput) reads through a replication slot; `settings` are more
    server settings (`-c name=value`)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise PostgresUnavailable("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(candidates[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="portal-sync-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    run = [
        *prefix,
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "portal",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-locale",
    ]
    subprocess.run(run, check=True, capture_output=True)
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    )
    for name, value in (settings or {}).items():  # e.g. a bench's profiling extension
        options += f" -c {name}={value}"
    if logical_replication:
        options += " -c wal_level=logical -c max_wal_senders=4 -c max_replication_slots=4"
    if tls is not None:
        cert, key = root / "server.crt", root / "server.key"
        shutil.copyfile(tls[0], cert)
        shutil.copyfile(tls[1], key)
        key.chmod(0o600)  # the server refuses a key others can read
        if prefix:
            for path in (cert, key):
                shutil.chown(path, "postgres", "postgres")
        options += f" -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
    start = [
        *prefix,
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-w",
        "-l",
        str(root / "server.log"),
        "start",
    ]
    subprocess.run(start, check=True, capture_output=True)
    return PostgresServer(root, port, prefix, bindir)
