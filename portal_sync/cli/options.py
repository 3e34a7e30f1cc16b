"""Command-line options and helpers shared by the command modules.

`settings_from` is the one place where "no bootstrap servers configured" becomes "the
local development broker" (its address read from the broker's state file).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from observability.terminal import markup
from portal_sync.settings import Settings

BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        envvar="PORTAL_SYNC_KAFKA_BOOTSTRAP",
        help="Existing Kafka cluster; default: the local broker",
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="PORTAL_SYNC_STORE_URL", help="SQLAlchemy URL of the store"),
]

err_console = Console(stderr=True)


def settings_from(bootstrap: str | None = None, store: str | None = None) -> Settings:
    """Settings from the environment with --bootstrap and --store on top; without any
    bootstrap servers, the local broker of `PORTAL_SYNC_KAFKA_DATA_DIR`."""
    settings = Settings.from_flags(bootstrap, store)
    if not settings.kafka_bootstrap:
        from transport.local import LocalKafka

        settings.kafka_bootstrap = LocalKafka(settings.kafka_data_dir).bootstrap()
    return settings


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(markup("[red]error:[/red] {}", message), highlight=False)
    return typer.Exit(code)
