"""Command-line options and helpers shared by the command modules.

`settings_from` is the one place where "no bootstrap servers configured" becomes "the
local development broker" (its address read from the broker's state file).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console

from portal_sync.settings import Settings
from schemas.errors import ConfigurationError

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

# `dlq redrive` and `publish --check-store`: how long a run waits for the worker.
CaughtUpWaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        metavar="SECONDS",
        min=0,
        max=3600,
        help="How long to wait, in all, for the worker to apply the events' partitions up "
        "to their logs' ends before those events are held back (default 30)",
    ),
]

# The commands that reveal personal data (recorded in the store's access log).
ReasonOpt = Annotated[
    str | None,
    typer.Option("--reason", help="Why you need the personal data (required; access log)"),
]
ReaderOpt = Annotated[
    str | None, typer.Option("--operator", help="Who reads (default: the OS user); access log")
]

err_console = Console(stderr=True)

# A TCP port of a metrics endpoint (0: off) and of a listener that must have one.
PORT = {"min": 0, "max": 65535}
LISTEN_PORT = {"min": 1, "max": 65535}


def positive_seconds(value: float | None) -> float | None:
    """A time in seconds: finite and above 0 (click's ranges let `nan` through)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter("must be a finite number of seconds above 0")
    return value


def settings_from(bootstrap: str | None = None, store: str | None = None) -> Settings:
    """Settings from the environment with --bootstrap and --store on top; without any
    bootstrap servers, the local broker of `PORTAL_SYNC_KAFKA_DATA_DIR`."""
    settings = Settings.from_flags(bootstrap, store)
    if not settings.kafka_bootstrap:
        from transport.local import LocalKafka
        from transport.local_cluster import LocalCluster, is_cluster

        if is_cluster(settings.kafka_data_dir):  # the local cluster: every node, 3 replicas
            cluster = LocalCluster(settings.kafka_data_dir)
            settings.kafka_bootstrap = cluster.bootstrap()
            if "replication_factor" not in settings.model_fields_set:
                settings.replication_factor = min(3, cluster.size())
            return settings
        broker = LocalKafka(settings.kafka_data_dir)
        settings.kafka_bootstrap = broker.bootstrap()
        if broker.secure and settings.connection().security_protocol == "PLAINTEXT":
            raise ConfigurationError(
                f"the local broker runs secured: load a principal's settings first, e.g. "
                f"`set -a; . {broker.secure_files.env_file('admin')}; set +a` "
                "(`portal-sync kafka status` lists them)"
            )
    return settings


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time with its offset (`2025-08-01T08:00:00+07:00`) or an age like `90s`,
    `30m`, `6h`, `2d`. A time without an offset is refused: read as UTC it would be seven
    hours off for an operator in Vietnam."""
    if text is None:
        return None
    age = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[age[2]]
        try:
            return _within_kafka(datetime.now(UTC) - timedelta(**{unit: int(age[1])}), text)
        except OverflowError:
            raise typer.BadParameter(f"{text!r} reaches before {KAFKA_EPOCH_TEXT}") from None
    text = text.strip()
    # Python's own reading takes any character between the date and the time, so that
    # `2025-08-01+07:00` read as 07:00 without an offset: only RFC 3339's forms here.
    form = RFC3339.fullmatch(text)
    try:  # RFC 3339 allows a `t` and a `z`, which Python does not read
        moment = datetime.fromisoformat(text.upper()) if form else None
    except ValueError:
        moment = None
    if moment is None:
        raise typer.BadParameter(f"not a time: {text!r} (e.g. 2025-08-01T08:00:00+07:00)")
    if moment.tzinfo is None:
        at = text if form and form["time"] else f"{text}T00:00:00"
        raise typer.BadParameter(
            f"{text!r} has no UTC offset: write e.g. {at}+07:00 (Vietnam) or {at}Z"
        )
    return _within_kafka(moment, text)


KAFKA_EPOCH_TEXT = "1970-01-01T00:00:00Z, where Kafka's times begin"


def _within_kafka(moment: datetime, text: str) -> datetime:
    """Refuse a time Kafka cannot look up (its timestamps count ms from 1970; the client
    refused a negative one with a traceback) or the clocks' skew would carry past the
    calendar's end."""
    try:
        year = moment.astimezone(UTC).year
    except OverflowError:  # its offset carries it past the calendar's end
        year = 1 if moment.year < 1970 else 9999
    if year < 1970:
        raise typer.BadParameter(f"{text!r} is before {KAFKA_EPOCH_TEXT}")
    if year >= 9999:
        raise typer.BadParameter(f"{text!r} is past the year 9998")
    return moment


RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"(?P<time>[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}:\d{2})?)?"
)
