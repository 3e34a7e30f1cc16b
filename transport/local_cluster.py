"""A local Kafka cluster: several KRaft nodes on 127.0.0.1 (broker and controller each).

`portal-sync kafka up --nodes 3` starts three nodes in one data dir: `cluster.json` (node
count, cluster id) and `node-<k>/` per node, each a `LocalKafka` data dir (its
`server.properties`, `broker.json` with client port, controller port and pid, `data/`,
`logs/`). Node k serves clients on port P+k-1; the controller listeners are on other free
ports, chosen once and kept (they are the quorum's voters). Internal topics and topics
created without options get three replicas and `min.insync.replicas=2`: with one node
down, acknowledged writes (acks=all) go on and lose nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from transport import clients
from transport.config import KafkaConnection
from transport.local import (
    CLEANER_DEDUPE_BYTES,
    KafkaSetupError,
    KafkaStartFailed,
    LocalKafka,
    _port_answers,
    ensure_jars,
    ensure_java,
    format_command,
    free_port,
    new_cluster_id,
)

CLUSTER_FILE = "cluster.json"
NODE_HEAP = "-Xmx256m"  # three JVMs on a developer's machine
MIN_INSYNC = 2


def is_cluster(data_dir: Path) -> bool:
    """Whether a data dir holds a local cluster (else a single broker, or nothing yet)."""
    return (data_dir.expanduser() / CLUSTER_FILE).exists()


@dataclass(frozen=True)
class NodeStatus:
    node: int
    running: bool
    port: int
    pid: int | None
    rss_bytes: int | None
    data_dir: Path


class ClusterNode(LocalKafka):
    """One node of a local cluster; the voters and cluster id come from the cluster."""

    heap = NODE_HEAP

    def __init__(self, cluster: LocalCluster, node: int) -> None:
        super().__init__(cluster.data_dir / f"node-{node}")
        self.cluster = cluster
        self.node = node

    def _write_config(self) -> Path:
        state = self._state()
        port, cport = state["port"], state["controller_port"]
        replicas = self.cluster.size()
        in_sync = min(MIN_INSYNC, replicas)
        properties = self.data_dir / "server.properties"
        properties.write_text(
            "\n".join(
                [
                    f"# written by portal-sync kafka up --nodes {replicas}",
                    "process.roles=broker,controller",
                    f"node.id={self.node}",
                    f"controller.quorum.voters={self.cluster.voters()}",
                    *self._listeners(port, cport),
                    f"log.dirs={self.data_dir / 'data'}",
                    "auto.create.topics.enable=false",
                    "num.partitions=1",
                    f"default.replication.factor={replicas}",
                    f"min.insync.replicas={in_sync}",
                    "unclean.leader.election.enable=false",
                    f"offsets.topic.replication.factor={replicas}",
                    "offsets.topic.num.partitions=10",
                    f"transaction.state.log.replication.factor={replicas}",
                    f"transaction.state.log.min.isr={in_sync}",
                    "group.initial.rebalance.delay.ms=0",
                    "log.segment.bytes=67108864",
                    f"log.cleaner.dedupe.buffer.size={CLEANER_DEDUPE_BYTES}",
                    "",
                ]
            )
        )
        return properties

    def format(self, java: str, jars: Path, properties: Path) -> None:
        """kafka-storage format with the cluster's id (once)."""
        if self._formatted():
            return
        command = format_command(java, jars, properties, self.cluster.cluster_id())
        import subprocess

        output = ""
        for _ in range(3):  # a JVM start can fail on a starved machine: try again
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                return
            output = (result.stdout + result.stderr)[-2000:]
            time.sleep(1)
        raise KafkaStartFailed(f"formatting node {self.node}'s KRaft storage failed:\n{output}")

    def node_status(self) -> NodeStatus:
        status = self.status()
        return NodeStatus(
            self.node, status.running, status.port, status.pid, status.rss_bytes, self.data_dir
        )

    def kill(self, timeout: float = 30.0) -> bool:
        """SIGKILL the node's JVM (a crash); False when it was not running."""
        pid = self._pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._pid() is not None:
            time.sleep(0.1)
        return True


class LocalCluster:
    """Nodes 1..n of one data dir; clients on ports P..P+n-1."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.state_file = self.data_dir / CLUSTER_FILE

    # -- state ------------------------------------------------------------------------
    def _state(self) -> dict[str, object]:
        if not self.state_file.exists():
            return {}
        state: dict[str, object] = json.loads(self.state_file.read_text())
        return state

    def exists(self) -> bool:
        return self.state_file.exists()

    def size(self) -> int:
        return int(str(self._state().get("nodes", 0)))

    def cluster_id(self) -> str:
        return str(self._state()["cluster_id"])

    def nodes(self) -> list[ClusterNode]:
        return [ClusterNode(self, k) for k in range(1, self.size() + 1)]

    def node(self, number: int) -> ClusterNode:
        if not 1 <= number <= self.size():
            raise KafkaSetupError(
                f"the cluster of {self.data_dir} has nodes 1 to {self.size()}, not {number}"
            )
        return ClusterNode(self, number)

    def voters(self) -> str:
        return ",".join(
            f"{node.node}@127.0.0.1:{node._state()['controller_port']}" for node in self.nodes()
        )

    def port(self) -> int:
        """The first node's client port (node k: port + k - 1)."""
        return self.nodes()[0].port()

    def bootstrap(self) -> str:
        return ",".join(node.bootstrap() for node in self.nodes())

    def connection(self) -> KafkaConnection:
        return KafkaConnection(bootstrap=self.bootstrap())

    def status(self) -> list[NodeStatus]:
        return [node.node_status() for node in self.nodes()]

    # -- lifecycle --------------------------------------------------------------------
    def create(self, nodes: int, port: int) -> None:
        """Write the cluster's state: node count, cluster id, client and controller ports."""
        if nodes < 1:
            raise KafkaSetupError("a cluster needs at least one node")
        if (self.data_dir / "broker.json").exists():
            raise KafkaSetupError(
                f"{self.data_dir} holds a single broker: use another --data-dir for a cluster"
            )
        taken = [p for p in range(port, port + nodes) if _port_answers(p)]
        if taken:
            raise KafkaSetupError(f"port {taken[0]} is taken by another process")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = {"nodes": nodes, "cluster_id": new_cluster_id()}
        self.state_file.write_text(json.dumps(state, indent=2))
        for node in self.nodes():
            node._save_state(port=port + node.node - 1, controller_port=free_port())

    def up(
        self, nodes: int | None = None, port: int | None = None, timeout: float = 120.0
    ) -> list[int]:
        """Create the cluster if new, start every stopped node, wait until all answer and
        see each other; return the nodes started."""
        if not self.exists():
            self.create(nodes or 3, port or 9092)
        else:
            if nodes is not None and nodes != self.size():
                raise KafkaSetupError(
                    f"{self.data_dir} holds a cluster of {self.size()} nodes, not {nodes}"
                )
            if port is not None and port != self.port():
                raise KafkaSetupError(
                    f"the cluster of {self.data_dir} serves clients on ports from "
                    f"{self.port()}, not {port}"
                )
        java = ensure_java()
        jars = ensure_jars()
        started = []
        for node in self.nodes():
            if node._pid() is not None:
                continue
            if _port_answers(node.port()):
                raise KafkaSetupError(f"port {node.port()} is taken by another process")
            properties = node._write_config()
            node.format(java, jars, properties)
            node._start(java, jars, properties)
            started.append(node)
        # A node answers only once a quorum of controllers runs: start all, then wait.
        for node in started:
            node._wait_ready(timeout)
        self._wait_brokers(timeout)
        return [node.node for node in started]

    def _wait_brokers(self, timeout: float) -> None:
        """Until the cluster's metadata lists every running node as a broker."""
        running = {node.node for node in self.nodes() if node._pid() is not None}
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                admin = clients.admin(self.connection(), request_timeout_ms=3000)
                try:
                    brokers = admin.describe_cluster()["brokers"]
                finally:
                    admin.close()
                seen = {int(broker["broker_id"]) for broker in brokers}
                if running <= seen:
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise KafkaStartFailed(
            f"the cluster lists brokers {sorted(seen)} after {timeout:.0f}s, "
            f"not {sorted(running)}; see {self.data_dir}/node-*/logs/server.log"
        )

    def down(self, node: int | None = None, kill: bool = False, timeout: float = 60.0) -> list[int]:
        """Stop one node or all (SIGTERM, after `timeout` SIGKILL; `kill`: SIGKILL at once);
        return the nodes that were running."""
        targets = [self.node(node)] if node is not None else self.nodes()
        running = [(n, pid) for n in targets if (pid := n._pid()) is not None]
        for _, pid in running:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(n._pid() is not None for n, _ in running):
            time.sleep(0.2)
        for n, pid in running:
            if n._pid() is not None:
                os.kill(pid, signal.SIGKILL)
        while any(n._pid() is not None for n, _ in running):
            time.sleep(0.1)
        return [n.node for n, _ in running]
