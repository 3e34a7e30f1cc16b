"""`portal-sync kafka up --nodes 3`: a local three-node KRaft cluster on real processes.
Topics with three replicas and min.insync.replicas=2; a node killed (SIGKILL) while a
producer publishes with acks=all loses no acknowledged event; `kafka up --data-dir`
restarts it; `kafka down` stops every node."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from observability.kafka_lag import LagReader
from portal_sync.settings import Settings
from schemas import parse_event
from tests.support.pipeline_helpers import citizen_events
from transport import clients
from transport.admin import Cluster
from transport.local import ensure_java, free_ports
from transport.publisher import Publisher, PublishError
from transport.reader import RangeReader, Selection

pytestmark = pytest.mark.kafka


def kafka(data_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PORTAL_SYNC_KAFKA_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    env.pop("PORTAL_SYNC_KAFKA_BOOTSTRAP", None)
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", "kafka", *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_lines(output: str) -> dict[int, str]:
    return {
        int(line.split()[1].rstrip(":")): line.strip()
        for line in output.splitlines()
        if line.strip().startswith("node ")
    }


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "cluster"
    yield data_dir
    kafka(data_dir, "down", "--kill")


def publish_in_batches(
    publisher: Publisher, events: list[dict[str, object]], acked: list[int], retries: list[str]
) -> None:
    """Like a producer with a checkpoint: a batch counts once the broker acknowledged it;
    a batch whose flush failed is sent again (duplicates are harmless)."""
    for start in range(0, len(events), 100):
        batch = events[start : start + 100]
        for _ in range(10):
            try:
                for raw in batch:
                    publisher.send_event(parse_event(json.dumps(raw).encode()).event)
                publisher.flush(timeout=90)
                break
            except PublishError as error:
                retries.append(str(error))
                time.sleep(1)
        else:
            return
        acked.append(start + len(batch))
        time.sleep(0.05)  # spread the run over the node's death


def test_three_nodes_keep_every_acknowledged_event_when_one_is_killed(cluster_dir: Path) -> None:
    port = free_ports(3)
    up = kafka(cluster_dir, "up", "--nodes", "3", "--port", str(port))
    assert up.returncode == 0, up.stdout + up.stderr
    bootstrap = ",".join(f"127.0.0.1:{port + k}" for k in range(3))
    assert bootstrap in up.stderr

    status = kafka(cluster_dir, "status")
    assert status.returncode == 0, status.stderr
    nodes = node_lines(status.stderr)
    assert sorted(nodes) == [1, 2, 3], status.stderr
    for k, line in nodes.items():
        assert f"port {port + k - 1}," in line and "running" in line, line
        assert "pid -" not in line, line

    # Topics through the settings of the local cluster: three replicas, two in sync.
    env = os.environ | {"PORTAL_SYNC_KAFKA_DATA_DIR": str(cluster_dir)}
    env.pop("PORTAL_SYNC_KAFKA_BOOTSTRAP", None)
    env.pop("PORTAL_SYNC_REPLICATION_FACTOR", None)
    env["PORTAL_SYNC_TOPIC_PREFIX"] = "nodes"
    env["PORTAL_SYNC_CHANGE_PARTITIONS"] = "6"
    topics = subprocess.run(
        [sys.executable, "-m", "portal_sync", "topics"], env=env, capture_output=True, text=True
    )
    assert topics.returncode == 0, topics.stdout + topics.stderr
    settings = Settings(
        kafka_bootstrap=bootstrap, topic_prefix="nodes", change_partitions=6, replication_factor=3
    )
    names = [*settings.topics().change_topics(), settings.topics().dead_letters]
    _assert_replicated(settings, names, replicas=3, in_sync=2)
    # The clients' settings `kafka up` prints give the same (the bootstrap alone, which it
    # printed before, gave topics of one replica).
    said = up.stderr.split("clients:")[1].split(";")[0]
    printed = dict(re.findall(r"(PORTAL_SYNC_\w+)=(\S+)", said))
    assert printed["PORTAL_SYNC_KAFKA_BOOTSTRAP"] == bootstrap, said
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")} | printed
    env |= {"PORTAL_SYNC_TOPIC_PREFIX": "printed", "PORTAL_SYNC_CHANGE_PARTITIONS": "2"}
    topics = subprocess.run(
        [sys.executable, "-m", "portal_sync", "topics"], env=env, capture_output=True, text=True
    )
    assert topics.returncode == 0, topics.stdout + topics.stderr
    printed_settings = Settings(
        kafka_bootstrap=bootstrap, topic_prefix="printed", change_partitions=2
    )
    _assert_replicated(
        printed_settings, printed_settings.topics().change_topics(), replicas=3, in_sync=2
    )

    # Publish with acks=all while node 2 dies (SIGKILL).
    events = citizen_events(keys=1000, versions=3, seed=15)
    publisher = Publisher(settings.connection(), settings.topics(), client_id="nodes-test")
    acked: list[int] = []
    retries: list[str] = []
    thread = threading.Thread(
        target=publish_in_batches, args=(publisher, events, acked, retries), daemon=True
    )
    thread.start()
    while not acked or acked[-1] < len(events) // 4:
        assert thread.is_alive(), retries
        time.sleep(0.05)
    at_kill = acked[-1]
    with Cluster(settings.connection()) as cluster:
        leaders = cluster.leaders(names)
    led_by_live_nodes = {tp for tp, leader in leaders.items() if leader != 2}
    down = kafka(cluster_dir, "down", "--node", "2", "--kill")
    assert down.returncode == 0 and "node 2 killed: 2" in down.stderr, down.stderr
    # The lag exporter's reader still reads every partition whose leader lives, at once:
    # node 2 stays the leader of its partitions until the controller fences it, and in
    # the metadata, where a fresh client may pick it for its first question.
    change = set(settings.topics().change_topics())

    def read_lag() -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        reader = LagReader(
            settings.connection(),
            settings.topics(),
            settings.group_id,
            f"sqlite:///{cluster_dir.parent / 'store.db'}",
        )
        try:
            own = {g.group: g for g in reader.read()}[settings.group_id]
        finally:
            reader.close()
        return {(p.topic, p.partition) for p in own.partitions}, set(reader.unread)

    # Four readers at once, each with fresh clients (each its own chance of a first
    # question to the dead node), in the time of one.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: read_lag(), range(4)))
    for read, unread in results:
        assert {tp for tp in led_by_live_nodes if tp[0] in change} <= read, read
        # What it could not read it says (`portal-sync lag` shows the count).
        assert read.isdisjoint(unread)
        assert read | unread == {tp for tp in leaders if tp[0] in change}
    degraded = kafka(cluster_dir, "status")
    assert degraded.returncode == 1
    assert "stopped" in node_lines(degraded.stderr)[2], degraded.stderr
    assert "running" in node_lines(degraded.stderr)[1], degraded.stderr
    thread.join(timeout=300)
    publisher.close()
    assert acked and acked[-1] == len(events), (acked[-1:], retries)
    assert at_kill < len(events) // 2, "the kill came after most of the run"
    # Every acknowledged event is in the topics (two nodes hold them).
    assert _event_ids(settings) == {e["event_id"] for e in events}

    # Node 2 comes back with `up --data-dir` and catches up; nothing is lost either.
    restart = kafka(cluster_dir, "up")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert "nodes 2 started" in restart.stderr, restart.stderr
    assert kafka(cluster_dir, "status").returncode == 0
    _wait_in_sync(settings, names, replicas=3)
    assert _event_ids(settings) == {e["event_id"] for e in events}

    # Every node keeps most of its heap free: a node restarted after a crash recovers its
    # logs in it (Kafka's default 128 MiB dedupe map left too little: OutOfMemoryError).
    for k, line in node_lines(kafka(cluster_dir, "status").stderr).items():
        pid = re.search(r"pid (\d+)", line)
        assert pid, line
        live, most = _live_heap(int(pid.group(1)))
        assert live < most / 2, f"node {k}: {live >> 20} MiB live of {most >> 20} MiB"

    stop = kafka(cluster_dir, "down")
    assert stop.returncode == 0 and "stopped: 1, 2, 3" in stop.stderr, stop.stderr
    after = kafka(cluster_dir, "status")
    assert after.returncode == 1
    assert all("stopped" in line for line in node_lines(after.stderr).values()), after.stderr


def test_node_options_need_a_cluster(tmp_path: Path) -> None:
    result = kafka(tmp_path / "none", "down", "--node", "2")
    assert result.returncode == 2 and "no local cluster" in result.stderr, result.stderr


def _live_heap(pid: int) -> tuple[int, int]:
    """A JVM's heap in use after a full collection, and its maximum heap (bytes)."""
    jcmd = Path(os.path.realpath(ensure_java())).with_name("jcmd")

    def ask(*command: str) -> str:
        result = subprocess.run(
            [str(jcmd), str(pid), *command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    ask("GC.run")
    used = re.search(r"heap +total \d+K, used (\d+)K", ask("GC.heap_info"))
    most = re.search(r"MaxHeapSize=(\d+)", ask("VM.flags"))
    assert used and most
    return int(used.group(1)) << 10, int(most.group(1))


def _assert_replicated(settings: Settings, names: list[str], replicas: int, in_sync: int) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType

    client = clients.admin(settings.connection())
    try:
        described = client.describe_topics(names)
        assert sorted(t["name"] for t in described) == sorted(names)
        for topic in described:
            for partition in topic["partitions"]:
                assert len(partition["replica_nodes"]) == replicas, topic
        # A topic just created may not report its configs from every node yet: asked
        # again until each one does, then its value is checked.
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        deadline = time.monotonic() + 30
        while True:
            configs = client.describe_configs(resources)["topic"]
            if all("min.insync.replicas" in configs.get(name, {}) for name in names):
                break
            assert time.monotonic() < deadline, f"topic configs not reported: {configs}"
            time.sleep(0.5)
        specs = settings.topics().specs()
        for name in names:
            assert configs[name]["min.insync.replicas"]["value"] == str(in_sync), configs[name]
            if name in settings.topics().change_topics():  # superseded events go in time
                lag = specs[name]["configs"]["max.compaction.lag.ms"]
                assert configs[name]["max.compaction.lag.ms"]["value"] == lag, configs[name]
    finally:
        client.close()


def _wait_in_sync(settings: Settings, names: list[str], replicas: int, timeout: float = 90) -> None:
    client = clients.admin(settings.connection())
    deadline = time.monotonic() + timeout
    try:
        while True:
            short = [
                (topic["name"], partition["partition_index"])
                for topic in client.describe_topics(names)
                for partition in topic["partitions"]
                if len(partition["isr_nodes"]) < replicas
            ]
            if not short:
                return
            assert time.monotonic() < deadline, f"under-replicated after {timeout}s: {short}"
            time.sleep(1)
    finally:
        client.close()


def _event_ids(settings: Settings) -> set[str]:
    ids = set()
    with RangeReader(settings.connection()) as reader:
        ranges = reader.resolve(Selection(topics=settings.topics().change_topics()))
        for batch in reader.read(ranges):
            ids.update(json.loads(message.value or b"{}")["event_id"] for message in batch)
    return ids
