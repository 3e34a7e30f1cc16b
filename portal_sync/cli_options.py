"""Command-line options shared by the portal-sync commands."""

from __future__ import annotations

from typing import Annotated

import typer

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
