"""The embedded default broker: single-node Apache Kafka 3.9 in KRaft mode on 127.0.0.1.

The official jars are fetched once by Maven from Maven Central (deploy/kafka/pom.xml) into
the user's cache dir and run on the machine's JDK. A broker is known by its data dir, which
holds its configuration, its log segments and `broker.json` (port, pid).

Secured (`up(secure=SecureSetup(...))`): SASL_SSL (SCRAM-SHA-512) on the port, SSL with
client certificates on a second port, ACLs enforced by StandardAuthorizer; the CA,
certificates, passwords and client configurations are in the data dir (`local_secure`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ConfigurationError, PortalSyncError
from transport import clients, jars
from transport.config import KafkaConnection
from transport.local_secure import (
    ADMIN,
    SecureFiles,
    SecureSetup,
    broker_properties,
    write_private,
)

KAFKA_VERSION = "3.9.2"
DEFAULT_PORT = 9092
HEAP = "-Xmx512m"
# The broker JVM's options besides the heap, as Kafka's own scripts take them: what
# `KAFKA_JVM_PERFORMANCE_OPTS` says when set, else a broker's usual collector settings.
PERFORMANCE_OPTIONS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20")
# A one-shot tool's JVM (the storage's format, under a second): the JIT's first tier and the
# serial collector, for what a run that short needs. CPU 0.84-0.90 -> 0.50-0.53 s a format.
TOOL_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


def performance_options() -> list[str]:
    """The broker JVM's options besides the heap (`PERFORMANCE_OPTIONS`)."""
    given = os.environ.get("KAFKA_JVM_PERFORMANCE_OPTS", "")
    try:
        return shlex.split(given) if given.strip() else list(PERFORMANCE_OPTIONS)
    except ValueError as error:  # an unclosed quote
        raise KafkaSetupError(f"KAFKA_JVM_PERFORMANCE_OPTS cannot be read: {error}") from None


# The log cleaner's dedupe map is one heap array, allocated at start: Kafka's default of
# 128 MiB took half a cluster node's heap and left too little for the log recovery after
# a crash (OutOfMemoryError in LogManager). 32 MiB holds about 1.3 million keys a pass.
CLEANER_DEDUPE_BYTES = 32 * 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"


class KafkaSetupError(ConfigurationError):
    """A missing prerequisite (Java, Maven), a port taken, a data dir that holds another
    kind of broker or cluster: the message says what to change (exit 2)."""


class KafkaStartFailed(PortalSyncError):
    """The jars could not be fetched, the storage not formatted, or the broker exited or
    did not answer during its start: the message points at its log (exit 1)."""


def user_cache_dir() -> Path:
    """The user's cache dir (XDG), where the Kafka jars are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "portal-sync"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    port: int
    pid: int | None
    rss_bytes: int | None
    data_dir: Path


def jar_dir() -> Path:
    return user_cache_dir() / f"kafka-{KAFKA_VERSION}" / "lib"


def ensure_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaSetupError(
            "Java is not installed: the local Kafka broker needs JDK 17 "
            "(Debian: apt-get install openjdk-17-jdk-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if match is None or int(match.group(1)) < 17:
        raise KafkaSetupError(f"Java 17 or newer is needed for Kafka {KAFKA_VERSION}: {out[:80]}")
    return java


def ensure_jars() -> Path:
    """Fetch the broker jars once through Maven, checked against `deploy/kafka/jars.sha256`;
    later calls reuse the cache (`transport.jars`)."""
    pom = DEPLOY_DIR / "pom.xml"

    def fetch(staging: Path) -> None:
        maven_copy(pom, staging, "the Kafka jars")

    return jars.fetch_once(jar_dir(), DEPLOY_DIR / "jars.sha256", pom, fetch)


def maven_copy(pom: Path, output: Path, what: str, profile: str | None = None) -> None:
    """Copy the runtime jars `pom` (with `profile`) names into `output`, through Maven."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaSetupError(
            f"Maven is not installed: it fetches {what} once from Maven Central "
            "(Debian: apt-get install maven)"
        )
    command = [
        mvn,
        "-q",
        "-B",
        "--strict-checksums",  # a jar whose checksum differs from the repository's fails
        "-f",
        str(pom),
        *(("-P", profile) if profile else ()),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={output}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaStartFailed(f"Maven could not fetch {what}:\n{result.stdout[-2000:]}")


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 20_000


def _ephemeral_start() -> int | None:
    """The first port the kernel hands to outgoing connections (Linux), if known."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(ports: range) -> bool:
    sockets = [socket.socket() for _ in ports]
    try:
        for sock, port in zip(sockets, ports, strict=True):
            sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


def free_ports(count: int) -> int:
    """A first port P with P..P+count-1 free on 127.0.0.1.

    Chosen below the kernel's ephemeral range when it is known: a port in that range is
    free now but may be the local end of any outgoing connection a moment later (a node
    of a local cluster dialling its voters can take the port the next node is to listen
    on). Random, so that two callers at once rarely pick the same one."""
    start = _ephemeral_start()
    if start is not None and start - LOWEST_CHOSEN_PORT > 1_000:
        for _ in range(200):
            first = random.randrange(LOWEST_CHOSEN_PORT, start - count)
            if _bindable(range(first, first + count)):
                return first
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        if first + count <= 65_000 and _bindable(range(first, first + count)):
            return first
    raise KafkaSetupError(f"no {count} consecutive free ports on 127.0.0.1")


def free_port() -> int:
    """A free port on 127.0.0.1, outside the ephemeral range when known (`free_ports`)."""
    return free_ports(1)


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url (it may start with '-')."""
    return urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def format_command(
    java: str, jars: Path, properties: Path, cluster_id: str, scram: tuple[str, ...] = ()
) -> list[str]:
    """kafka-storage's format step. The id is glued to its option (`--cluster-id=<id>`): an
    id starting with '-' given as a separate argument would be read as an option. `scram`:
    `--add-scram` values (SCRAM users of a secured broker)."""
    users = [f"--add-scram={user}" for user in scram]
    return [java, *TOOL_OPTIONS, "-cp", f"{jars}/*", "kafka.tools.StorageTool", "format",
            f"--cluster-id={cluster_id}", "--config", str(properties),
            *users, "--ignore-formatted"]  # fmt: skip


def _argfile_quoted(arg: str) -> str:
    """One argument of a `java @file` argument file (quoted: paths may hold spaces)."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalKafka:
    heap = HEAP  # the JVM's maximum heap (a node of the local cluster takes less)

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.state_file = self.data_dir / "broker.json"
        self._process: subprocess.Popen[bytes] | None = None

    # -- state ------------------------------------------------------------------------
    def _state(self) -> dict[str, int]:
        if not self.state_file.exists():
            return {}
        state: dict[str, int] = json.loads(self.state_file.read_text())
        return state

    def _save_state(self, **values: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._state() | values
        self.state_file.write_text(json.dumps(state, indent=2))

    def port(self) -> int:
        return self._state().get("port", DEFAULT_PORT)

    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port()}"

    def _pid(self) -> int | None:
        pid = self._state().get("pid")
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"kafka.Kafka" in cmdline and str(self.data_dir).encode() in cmdline else None

    def status(self) -> BrokerStatus:
        pid = self._pid()
        rss = None
        if pid is not None:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        running = pid is not None and _port_answers(self.port())
        return BrokerStatus(running, self.port(), pid, rss, self.data_dir)

    # -- lifecycle --------------------------------------------------------------------
    def up(
        self, port: int | None = None, timeout: float = 90.0, secure: SecureSetup | None = None
    ) -> bool:
        """Start the broker and wait until it answers; False when it was already running.
        `secure`: SASL_SSL and mutual-TLS listeners, SCRAM users and ACLs (a data dir is
        either secured or not, for good)."""
        self._check_mode(secure is not None)
        if self._pid() is not None:
            if port is not None and port != self.port():
                raise KafkaSetupError(
                    f"the broker of {self.data_dir} already runs on port {self.port()}"
                )
            self._wait_ready(timeout)
            if secure is not None:
                self._secure_after_start(secure)
            return False
        java = ensure_java()
        jars = ensure_jars()
        port = port or self.port()
        if _port_answers(port):
            raise KafkaSetupError(f"port {port} is taken by another process")
        self._save_state(port=port, controller_port=free_port(), secure=int(secure is not None))
        users: dict[str, str] = {}
        if secure is not None:
            self._save_state(ssl_port=self._state().get("ssl_port") or free_port())
            self.secure_files.ensure_tls()
            if not self._formatted():
                users = self.secure_files.new_principals(secure.principals())
        properties = self._write_config()
        self._format_storage(java, jars, properties, users)
        self._start(java, jars, properties)
        self._wait_ready(timeout)
        if secure is not None:
            self._secure_after_start(secure)
        return True

    # -- secured broker ---------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return bool(self._state().get("secure"))

    @property
    def secure_files(self) -> SecureFiles:
        return SecureFiles(self.data_dir)

    def ssl_port(self) -> int | None:
        return self._state().get("ssl_port")

    def _formatted(self) -> bool:
        return (self.data_dir / "data" / "meta.properties").exists()

    def _check_mode(self, secure: bool) -> None:
        if self._formatted() and secure != self.secure:
            held = "a secured" if self.secure else "a plaintext"
            raise KafkaSetupError(
                f"{self.data_dir} holds {held} broker: start it "
                f"{'with' if self.secure else 'without'} --secure, or use another data dir"
            )

    def _secure_after_start(self, setup: SecureSetup) -> None:
        """SCRAM users of principals new since the format (a source added to the
        registry), the ACLs and the setup's topics, as the admin; client configurations."""
        files = self.secure_files
        names = setup.principals()
        new = files.new_principals(names)
        port, ssl_port = self.port(), self.ssl_port() or 0
        files.write_env_files(names, port, ssl_port)
        from transport import admin

        with admin.cluster(self.connection()) as cluster:
            if new:
                cluster.add_scram_users(new)
            cluster.create_acls(setup)
            cluster.ensure_topics(setup.topics)

    def client_configs(self) -> dict[str, tuple[Path, Path]]:
        """The client configuration files (SASL_SSL, mutual TLS) per principal."""
        files = self.secure_files
        names = sorted(p.name.removesuffix(".password") for p in files.clients.glob("*.password"))
        return {name: (files.env_file(name), files.env_file(name, mtls=True)) for name in names}

    def _write_config(self) -> Path:
        state = self._state()
        port, cport = state["port"], state["controller_port"]
        properties = self.data_dir / "server.properties"
        properties.write_text(
            "\n".join(
                [
                    "# written by portal-sync kafka up",
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{cport}",
                    *(self._listeners(port, cport)),
                    f"log.dirs={self.data_dir / 'data'}",
                    # Topics are created by portal-sync with explicit partitions and retention.
                    "auto.create.topics.enable=false",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.segment.bytes=67108864",
                    f"log.cleaner.dedupe.buffer.size={CLEANER_DEDUPE_BYTES}",
                    "",
                ]
            )
        )
        return properties

    def _listeners(self, port: int, cport: int) -> list[str]:
        if self.secure:
            files = self.secure_files
            return broker_properties(files, port, self._state()["ssl_port"], cport)
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ]

    def _format_storage(
        self, java: str, jars: Path, properties: Path, users: dict[str, str] | None = None
    ) -> None:
        """Format once; `users`: SCRAM-SHA-512 users (name: password) to create. The
        command goes through a private argument file (`java @file`): passwords never
        appear in the process list."""
        if self._formatted():
            return
        scram = tuple(
            f"SCRAM-SHA-512=[name={name},password={password}]"
            for name, password in (users or {}).items()
        )
        command = format_command(java, jars, properties, new_cluster_id(), scram)
        argfile = self.data_dir / "format.args"
        write_private(argfile, "\n".join(_argfile_quoted(arg) for arg in command[1:]).encode())
        output = ""
        try:
            for _ in range(3):  # a JVM start can fail on a starved machine: try again
                result = subprocess.run([java, f"@{argfile}"], capture_output=True, text=True)
                if result.returncode == 0:
                    return
                output = (result.stdout + result.stderr)[-2000:]
                time.sleep(1)
        finally:
            argfile.unlink(missing_ok=True)
        for password in (users or {}).values():
            output = output.replace(password, "***")
        raise KafkaStartFailed(f"formatting the KRaft storage failed:\n{output}")

    def connection(self, principal: str = ADMIN) -> KafkaConnection:
        """A client connection; on a secured broker the principal's, over SASL_SSL."""
        if self.secure:
            return self.secure_files.connection(principal, self.port())
        return KafkaConnection(bootstrap=self.bootstrap())

    def mtls_connection(self, principal: str) -> KafkaConnection:
        """A principal's connection with its client certificate (secured broker only)."""
        ssl_port = self.ssl_port()
        if not self.secure or ssl_port is None:
            raise KafkaSetupError(f"the broker of {self.data_dir} is not secured")
        return self.secure_files.mtls_connection(principal, ssl_port)

    def _start(self, java: str, jars: Path, properties: Path) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        command = [
            java,
            self.heap,
            "-Xms128m",
            *performance_options(),
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={logs}",
            f"-Dlog4j.configuration=file:{DEPLOY_DIR / 'log4j.properties'}",
            "-cp",
            f"{jars}/*",
            "kafka.Kafka",
            str(properties),
        ]
        with (logs / "stdout.log").open("ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.data_dir,
            )
        self._process = process
        self._save_state(pid=process.pid)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self._process.poll() is not None if self._process else self._pid() is None
            if exited:
                raise KafkaStartFailed(
                    f"the broker exited during start{self._last_error()}; see {self._log_hint()}"
                )
            if _port_answers(self.port()):
                try:
                    admin = clients.admin(self.connection(), request_timeout_ms=3000)
                    admin.describe_cluster()
                    admin.close()
                    return
                except Exception:
                    pass
            time.sleep(0.2)
        raise KafkaStartFailed(
            f"the broker did not answer within {timeout:.0f}s; see {self._log_hint()}"
        )

    def _log_hint(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def _last_error(self) -> str:
        """': <the log's first ERROR or FATAL line and the exception under it>', or ''.
        The first error is the cause (the later ones are the shutdown it led to); it is
        shown where the failure is reported, as a CI log keeps that but not the files."""
        for name in ("server.log", "stdout.log"):
            try:
                lines = (self.data_dir / "logs" / name).read_text(errors="replace").splitlines()
            except OSError:
                continue
            for at, line in enumerate(lines):
                if " ERROR " in line or " FATAL " in line:
                    cause = line.strip()
                    if at + 1 < len(lines) and not lines[at + 1].startswith(("[", "\t")):
                        cause += " | " + lines[at + 1].strip()
                    return ": " + cause[:500]
        return ""

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL); False when it was not running."""
        pid = self._pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._pid() is not None:
            time.sleep(0.2)
        if self._pid() is not None:
            os.kill(pid, signal.SIGKILL)
        return True
