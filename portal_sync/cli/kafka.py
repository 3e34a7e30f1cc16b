"""`portal-sync kafka up|down|status`: the local development broker (KRaft)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from portal_sync.cli.options import err_console as console
from portal_sync.cli.options import fail
from portal_sync.settings import Settings

kafka_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka broker (KRaft).")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Broker data dir (default: user data dir)")
]


@kafka_app.command("up")
def kafka_up(
    port: Annotated[int | None, typer.Option("--port", help="Client port (default 9092)")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the local broker (fetching its jars once) and wait until it answers."""
    import time

    from transport.local import KafkaSetupError, LocalKafka

    broker = LocalKafka(data_dir or Settings().kafka_data_dir)
    started = time.monotonic()
    try:
        with console.status("starting Apache Kafka (KRaft)…"):
            fresh = broker.up(port)
    except KafkaSetupError as error:
        raise fail(str(error)) from None
    status = broker.status()
    took = f" in {time.monotonic() - started:.1f}s" if fresh else " (already running)"
    console.print(
        f"Kafka up on {broker.bootstrap()}{took}, pid {status.pid}, data {broker.data_dir}"
    )


@kafka_app.command("down")
def kafka_down(data_dir: DataDirOpt = None) -> None:
    """Stop the local broker."""
    from transport.local import LocalKafka

    broker = LocalKafka(data_dir or Settings().kafka_data_dir)
    console.print("Kafka stopped" if broker.down() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status(data_dir: DataDirOpt = None) -> None:
    """Show whether the local broker runs; exit 1 when it does not."""
    from transport.local import LocalKafka

    status = LocalKafka(data_dir or Settings().kafka_data_dir).status()
    memory = f", RSS {status.rss_bytes / 2**20:.0f} MiB" if status.rss_bytes else ""
    if status.running:
        console.print(f"running on 127.0.0.1:{status.port}, pid {status.pid}{memory}")
    else:
        console.print(f"not running (data dir {status.data_dir})")
        raise typer.Exit(1)
