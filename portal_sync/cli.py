"""The `portal-sync` command line (Typer)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import typer
from rich.console import Console

from portal_sync.adapters_cli import adapters_app, produce
from portal_sync.cli_ops import register as register_ops_commands
from portal_sync.cli_options import BootstrapOpt, StoreOpt
from portal_sync.cli_store import register as register_store_commands
from portal_sync.settings import Settings

if TYPE_CHECKING:
    from observability.kafka_lag import LagReader

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="portal-sync: record changes of provinces and ministries into the national store.",
)
kafka_app = typer.Typer(no_args_is_help=True, help="The local Apache Kafka broker (KRaft).")
app.add_typer(kafka_app, name="kafka")
app.add_typer(adapters_app, name="adapters")
app.command("produce")(produce)
console = Console(stderr=True)
register_store_commands(app)
register_ops_commands(app)

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Broker data dir (default: user data dir)")
]


settings_from = Settings.from_flags


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """portal-sync: record changes of provinces and ministries into the national store."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- kafka --------------------------------------------------------------------------------
@kafka_app.command("up")
def kafka_up(
    port: Annotated[int | None, typer.Option("--port", help="Client port (default 9092)")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Start the local broker (fetching its jars once) and wait until it answers."""
    import time

    from portal_sync.local_kafka import KafkaSetupError, LocalKafka

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
    from portal_sync.local_kafka import LocalKafka

    broker = LocalKafka(data_dir or Settings().kafka_data_dir)
    console.print("Kafka stopped" if broker.down() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status(data_dir: DataDirOpt = None) -> None:
    """Show whether the local broker runs; exit 1 when it does not."""
    from portal_sync.local_kafka import LocalKafka

    status = LocalKafka(data_dir or Settings().kafka_data_dir).status()
    memory = f", RSS {status.rss_bytes / 2**20:.0f} MiB" if status.rss_bytes else ""
    if status.running:
        console.print(f"running on 127.0.0.1:{status.port}, pid {status.pid}{memory}")
    else:
        console.print(f"not running (data dir {status.data_dir})")
        raise typer.Exit(1)


# -- pipeline -----------------------------------------------------------------------------
@app.command()
def topics(bootstrap: BootstrapOpt = None) -> None:
    """Create the change and dead-letter topics that are missing."""
    from portal_sync.topics import ensure_topics

    created = ensure_topics(settings_from(bootstrap))
    console.print(f"created {', '.join(created)}" if created else "all topics exist")


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one event per line ('-': stdin)")],
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish events from JSON Lines; invalid lines are reported by number and not sent."""
    from portal_sync.publish import publish_lines

    settings = settings_from(bootstrap)
    handle = sys.stdin.buffer if str(file) == "-" else file.open("rb")
    with handle:
        result = publish_lines(settings, handle)
    for number, code, message in result.invalid:
        console.print(f"line {number}: {code}: {message}")
    console.print(f"published {result.sent}, invalid {len(result.invalid)}")
    if result.invalid:
        raise typer.Exit(1)


@app.command()
def worker(
    until_caught_up: Annotated[
        bool,
        typer.Option(
            "--until-caught-up", help="Exit 0 once caught up with the end offsets seen at start"
        ),
    ] = False,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port")] = None,
) -> None:
    """Run the reconciler: change topics to the national store."""
    from consumers.worker import run_worker

    settings = settings_from(bootstrap, store)
    if metrics_port is not None:
        settings.metrics_port = metrics_port
    raise typer.Exit(run_worker(settings, until_caught_up=until_caught_up))


@app.command()
def export(
    entity: Annotated[str | None, typer.Option("--entity")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    provenance: Annotated[
        bool, typer.Option("--provenance", help="Add each field's source and version")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Dump canonical records as sorted JSON Lines (a stable, diffable snapshot)."""
    from consumers.export import export_records

    settings = settings_from(store=store)
    handle = output.open("w", encoding="utf-8") if output else sys.stdout
    try:
        count = export_records(settings.store_url, handle, entity, provenance=provenance)
    finally:
        if output:
            handle.close()
    console.print(f"exported {count} records")


@app.command()
def demo(
    people: Annotated[int, typer.Option(help="Citizens in the sample population")] = 3000,
    reset: Annotated[
        bool, typer.Option("--reset", help="Allow resetting a non-default store or cluster")
    ] = False,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run the whole pipeline on sample provinces and a ministry, then check the store."""
    from portal_sync.demo import DemoError, run_demo

    try:
        ok = run_demo(settings_from(bootstrap, store), people=people, allow_reset=reset)
    except DemoError as error:
        raise fail(str(error)) from None
    raise typer.Exit(0 if ok else 1)


# -- observability ------------------------------------------------------------------------
GroupFilterOpt = Annotated[
    str | None, typer.Option("--group", help="Only groups matching this regular expression")
]
TopicFilterOpt = Annotated[
    str | None, typer.Option("--topic", help="Only topics matching this regular expression")
]
OffsetsFromOpt = Annotated[
    str,
    typer.Option(
        "--offsets-from",
        help="The reconciler group's offsets: 'store' (applied, the truth) or 'kafka'",
    ),
]
WindowOpt = Annotated[
    float, typer.Option("--window", help="Status window in seconds (OK/WARN/STALL/STOP)")
]


@app.command("lag-exporter")
def lag_exporter(
    port: Annotated[int, typer.Option("--port", envvar="PORTAL_SYNC_LAG_EXPORTER_PORT")] = 9311,
    host: Annotated[str, typer.Option("--host", envvar="PORTAL_SYNC_METRICS_HOST")] = "127.0.0.1",
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls")] = 10.0,
    window: WindowOpt = 120.0,
    group: GroupFilterOpt = None,
    topic: TopicFilterOpt = None,
    offsets_from: OffsetsFromOpt = "store",
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Export consumer lag of all groups and partitions (/metrics, /healthz, /readyz)."""
    from observability.exporter import run_exporter

    reader = _lag_reader(bootstrap, store, group, topic, offsets_from, window)
    console.print(f"lag exporter on http://{host}:{port}/metrics, polling every {interval:g}s")
    run_exporter(reader, port, host, interval)


@app.command("lag")
def lag(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Refresh seconds")] = 2.0,
    stale_after: Annotated[
        float,
        typer.Option("--stale-after", envvar="PORTAL_SYNC_SOURCE_STALE_AFTER_SECONDS"),
    ] = 1800.0,
    window: WindowOpt = 60.0,
    group: GroupFilterOpt = None,
    topic: TopicFilterOpt = None,
    offsets_from: OffsetsFromOpt = "store",
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Consumer lag per partition (offsets, time lag, status) and per-source freshness."""
    from observability.table import show_lag

    reader = _lag_reader(bootstrap, store, group, topic, offsets_from, window)
    show_lag(reader, stale_after, watch, interval)


def _lag_reader(
    bootstrap: str | None,
    store: str | None,
    group: str | None,
    topic: str | None,
    offsets_from: str,
    window: float,
) -> LagReader:
    from observability.kafka_lag import Filters, LagReader

    if offsets_from not in ("store", "kafka"):
        raise fail("--offsets-from must be 'store' or 'kafka'")
    settings = settings_from(bootstrap, store)
    source = cast(Literal["kafka", "store"], offsets_from)
    return LagReader(settings, Filters(group, topic), source, window)


def main_entry() -> None:
    """The console script: configuration errors end with their message, not a traceback."""
    from consumers.config import RulesError

    try:
        app(prog_name="portal-sync")
    except RulesError as error:
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2) from None
