"""`portal-sync lag` and `lag-exporter`: consumer lag and source freshness."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer

from portal_sync.cli.options import (
    LISTEN_PORT,
    BootstrapOpt,
    StoreOpt,
    positive_seconds,
    settings_from,
)
from portal_sync.cli.options import err_console as console
from schemas.errors import ConfigurationError

if TYPE_CHECKING:
    from observability.kafka_lag import LagReader


def register(app: typer.Typer) -> None:
    app.command("lag-exporter")(lag_exporter)
    app.command("lag")(lag)


GroupFilterOpt = Annotated[
    str | None,
    typer.Option("--group", help="Only groups whose whole name matches this regular expression"),
]
TopicFilterOpt = Annotated[
    str | None,
    typer.Option(
        "--topic",
        help="Only topics whose whole name matches this regular expression ('.*citizen')",
    ),
]
OffsetsFromOpt = Annotated[
    str,
    typer.Option(
        "--offsets-from",
        help="The reconciler group's offsets: 'store' (applied, the truth) or 'kafka'",
    ),
]
WindowOpt = Annotated[
    float,
    typer.Option(
        "--window",
        callback=positive_seconds,
        help="Status window in seconds (OK/WARN/STALL/STOP)",
    ),
]


def lag_exporter(
    port: Annotated[
        int, typer.Option("--port", envvar="PORTAL_SYNC_LAG_EXPORTER_PORT", **LISTEN_PORT)
    ] = 9311,
    host: Annotated[str, typer.Option("--host", envvar="PORTAL_SYNC_METRICS_HOST")] = "127.0.0.1",
    interval: Annotated[
        float,
        typer.Option("--interval", callback=positive_seconds, help="Seconds between polls"),
    ] = 10.0,
    window: WindowOpt = 120.0,
    group: GroupFilterOpt = None,
    topic: TopicFilterOpt = None,
    offsets_from: OffsetsFromOpt = "store",
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Export consumer lag of all groups and partitions (/metrics, /healthz, /readyz)."""
    from observability.exporter import run_exporter
    from observability.web_config import load_web_config

    web = load_web_config(settings_from(bootstrap, store).metrics_web_config_file)
    reader = _lag_reader(bootstrap, store, group, topic, offsets_from, window)
    scheme = web.scheme if web is not None else "http"
    console.print(f"lag exporter on {scheme}://{host}:{port}/metrics, polling every {interval:g}s")

    # In its container the exporter is PID 1, for which the kernel drops a signal with no
    # handler: a rollout waited out the grace period and killed it. SIGTERM ends it as
    # Ctrl-C does, at once (a poll may wait for a broker away), its server and clients
    # closed, exit 0.
    def stopping(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopping)
    try:
        run_exporter(reader, port, host, interval, web=web)
    except KeyboardInterrupt:
        console.print("lag exporter stopped")


def lag(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C")] = False,
    interval: Annotated[
        float, typer.Option("--interval", callback=positive_seconds, help="Refresh seconds")
    ] = 2.0,
    stale_after: Annotated[
        float,
        typer.Option(
            "--stale-after",
            envvar="PORTAL_SYNC_SOURCE_STALE_AFTER_SECONDS",
            callback=positive_seconds,
        ),
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
        raise ConfigurationError("--offsets-from must be 'store' or 'kafka'")
    settings = settings_from(bootstrap, store)
    source = cast(Literal["kafka", "store"], offsets_from)
    if source == "store":  # read at each poll, which failed for ever on a wrong URL
        from store.engine import store_url

        store_url(settings.store_url)
    return LagReader(
        settings.connection(),
        settings.topics(),
        settings.group_id,
        settings.store_url,
        Filters(group, topic),
        source,
        window,
    )
