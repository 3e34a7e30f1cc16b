"""`portal-sync kafka up|down|status`: the local development broker (KRaft)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from portal_sync.cli.options import LISTEN_PORT
from portal_sync.cli.options import err_console as console
from portal_sync.settings import Settings
from schemas.errors import ConfigurationError

if TYPE_CHECKING:
    from transport.local import LocalKafka
    from transport.local_cluster import LocalCluster
    from transport.local_secure import SecureSetup

kafka_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka broker (KRaft).")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Broker data dir (default: user data dir)")
]
REPO_REGISTRY = Path(__file__).resolve().parents[2] / "deploy" / "registry.toml"


@kafka_app.command("up")
def kafka_up(
    port: Annotated[
        int | None, typer.Option("--port", **LISTEN_PORT, help="Client port (default 9092)")
    ] = None,
    data_dir: DataDirOpt = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="SASL_SSL (SCRAM-SHA-512) and mutual-TLS listeners, a user per principal, ACLs",
        ),
    ] = False,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry",
            help="Sources that get a principal (--secure; default: PORTAL_SYNC_REGISTRY, "
            "else deploy/registry.toml)",
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            "--nodes",
            min=1,
            help="A local cluster of this many KRaft nodes (node k on port P+k-1); "
            "on an existing cluster's data dir: restart its stopped nodes",
        ),
    ] = None,
) -> None:
    """Start the local broker (fetching its jars once) and wait until it answers."""
    import time

    from transport.local import LocalKafka
    from transport.local_cluster import is_cluster

    settings = Settings()
    where = data_dir or settings.kafka_data_dir
    if nodes is not None and port is not None and port + nodes - 1 > LISTEN_PORT["max"]:
        raise ConfigurationError(
            f"--port {port} leaves no port for node {nodes} (node k on port P+k-1)"
        )
    if nodes is not None or is_cluster(where):
        if secure:
            raise ConfigurationError("--secure is for the single broker, not a local cluster")
        _cluster_up(where, nodes, port)
        return
    broker = LocalKafka(where)
    setup = _secure_setup(settings, registry) if secure else None
    started = time.monotonic()
    with console.status("starting Apache Kafka (KRaft)…"):
        fresh = broker.up(port, secure=setup)  # KafkaSetupError (2), KafkaStartFailed (1)
    status = broker.status()
    took = f" in {time.monotonic() - started:.1f}s" if fresh else " (already running)"
    console.print(
        f"Kafka up on {broker.bootstrap()}{took}, pid {status.pid}, data {broker.data_dir}"
    )
    if broker.secure:
        _print_clients(broker)


def _cluster_up(data_dir: Path, nodes: int | None, port: int | None) -> None:
    import time

    from transport.local_cluster import LocalCluster

    cluster = LocalCluster(data_dir)
    began = time.monotonic()
    with console.status("starting the Apache Kafka (KRaft) nodes…"):
        started = cluster.up(nodes, port)  # KafkaSetupError (2), KafkaStartFailed (1)
    took = f"nodes {', '.join(map(str, started))} started in {time.monotonic() - began:.1f}s"
    console.print(
        f"Kafka cluster of {cluster.size()} nodes up ({took if started else 'already running'}), "
        f"data {cluster.data_dir}"
    )
    _print_nodes(cluster)
    # The bootstrap alone gave topics of one replica (the setting's default): a client
    # given the nodes is given the replication factor with them.
    console.print(
        f"clients: PORTAL_SYNC_KAFKA_BOOTSTRAP={cluster.bootstrap()} "
        f"PORTAL_SYNC_REPLICATION_FACTOR={cluster.size()} (min.insync.replicas "
        f"{min(2, cluster.size())}); or PORTAL_SYNC_KAFKA_DATA_DIR={cluster.data_dir} alone",
        highlight=False,
        soft_wrap=True,
    )


def _print_nodes(cluster: LocalCluster) -> None:
    for node in cluster.status():
        state = "running" if node.running else "stopped"
        memory = f", RSS {node.rss_bytes / 2**20:.0f} MiB" if node.rss_bytes else ""
        console.print(
            f"  node {node.node}: port {node.port}, pid {node.pid or '-'}, {state}{memory}",
            highlight=False,
        )


def _secure_setup(settings: Settings, registry: Path | None) -> SecureSetup:
    from consumers.config import load_registry
    from transport.local_secure import SecureSetup

    path = registry or settings.registry or REPO_REGISTRY
    sources = tuple(load_registry(path).sources)
    return SecureSetup(sources=sources, topics=settings.topics(), group_id=settings.group_id)


def _print_clients(broker: LocalKafka) -> None:
    """Where each principal's client settings are (files; no secret is printed)."""
    console.print(
        f"secured: SASL_SSL (SCRAM-SHA-512) on {broker.bootstrap()}, "
        f"SSL with client certificates on 127.0.0.1:{broker.ssl_port()}; "
        f"CA {broker.secure_files.ca_file}"
    )
    console.print("client settings per principal (load one with `set -a; . FILE; set +a`):")
    for name, (sasl, mtls) in broker.client_configs().items():
        console.print(f"  {name}: {sasl}  (mutual TLS: {mtls})", markup=False, highlight=False)


@kafka_app.command("down")
def kafka_down(
    data_dir: DataDirOpt = None,
    node: Annotated[
        int | None, typer.Option("--node", help="Stop only this node of a local cluster")
    ] = None,
    kill: Annotated[
        bool, typer.Option("--kill", help="SIGKILL (a crash) instead of a graceful stop")
    ] = False,
) -> None:
    """Stop the local broker, or a local cluster's nodes (all, or one with --node)."""
    from transport.local import LocalKafka
    from transport.local_cluster import LocalCluster, is_cluster

    where = data_dir or Settings().kafka_data_dir
    if is_cluster(where):
        stopped = LocalCluster(where).down(node, kill=kill)
        how = "killed" if kill else "stopped"
        which = f"node {node}" if node is not None else "Kafka cluster nodes"
        console.print(f"{which} {how}: {', '.join(map(str, stopped)) or 'none was running'}")
        return
    if node is not None:
        raise ConfigurationError(f"{where} holds no local cluster (`kafka up --nodes 3`)")
    broker = LocalKafka(where)
    pid = broker.status().pid
    if kill and pid is not None:
        import os
        import signal

        os.kill(pid, signal.SIGKILL)
        console.print(f"Kafka killed (pid {pid})")
        return
    console.print("Kafka stopped" if broker.down() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status(data_dir: DataDirOpt = None) -> None:
    """Show whether the local broker runs (a cluster: every node); exit 1 when it does not
    (a cluster: when a node does not)."""
    from transport.local import LocalKafka
    from transport.local_cluster import LocalCluster, is_cluster

    where = data_dir or Settings().kafka_data_dir
    if is_cluster(where):
        cluster = LocalCluster(where)
        running = sum(node.running for node in cluster.status())
        console.print(f"cluster of {cluster.size()} nodes, {running} running, data {where}")
        _print_nodes(cluster)
        if running < cluster.size():
            raise typer.Exit(1)
        return
    broker = LocalKafka(where)
    status = broker.status()
    memory = f", RSS {status.rss_bytes / 2**20:.0f} MiB" if status.rss_bytes else ""
    if status.running:
        console.print(f"running on 127.0.0.1:{status.port}, pid {status.pid}{memory}")
        if broker.secure:
            _print_clients(broker)
    else:
        console.print(f"not running (data dir {status.data_dir})")
        raise typer.Exit(1)
