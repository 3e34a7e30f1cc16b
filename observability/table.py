"""`portal-sync lag`: consumer lag like `kafka-consumer-groups --describe`, with time lag,
status and per-source freshness (stale sources marked)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from consumers.freshness import Freshness
from observability.freshness import read_freshness
from observability.kafka_lag import GroupLag, LagReader
from observability.lag import Status, format_age, stale
from observability.terminal import plain

STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.STALL: "red", Status.STOP: "bold red"}


def lag_table(groups: list[GroupLag]) -> Table:
    table = Table(title="consumer lag", title_justify="left")
    for column in ("GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG"):
        table.add_column(
            column,
            justify="right" if "OFFSET" in column or column in ("PARTITION", "LAG") else "left",
        )
    table.add_column("TIME-LAG", justify="right")
    table.add_column("STATUS")
    table.add_column("MEMBERS", justify="right")
    for group in groups:
        for p in group.partitions:
            status = Text(p.status.name, style=STYLE[p.status])
            table.add_row(
                plain(group.group),  # any text: Kafka does not restrict group names
                plain(p.topic),
                str(p.partition),
                str(p.committed),
                str(p.end),
                str(p.lag_messages),
                format_age(p.lag_seconds),
                status,
                str(group.members),
            )
    return table


def freshness_table(sources: dict[str, Freshness], now: float, stale_after: float) -> Table:
    table = Table(
        title=f"source freshness (stale after {format_age(stale_after)})", title_justify="left"
    )
    for column in ("SOURCE", "LAST CHANGE", "AGE", "LAST APPLIED", "STATE"):
        table.add_column(column)
    for source in sorted(sources.values(), key=lambda s: s.source):
        old = stale(now, source.last_change, stale_after)
        table.add_row(
            plain(source.source),
            _clock(source.last_change),
            format_age(now - source.last_change),
            format_age(now - source.last_applied) + " ago",
            Text("STALE", style="bold red") if old else Text("fresh", style="green"),
        )
    return table


def lag_view(
    groups: list[GroupLag],
    sources: dict[str, Freshness],
    now: float,
    stale_after: float,
    unread: int = 0,
    freshness_unread: str | None = None,
) -> Group:
    group_lines = [
        plain(f"group {g.group}: {g.state}, {g.members} members, status {g.status.name}")
        for g in groups
    ]
    if unread:
        group_lines.append(
            plain(
                f"{unread} partitions not shown: their leader does not answer "
                "(a node down, not yet replaced)",
                style="yellow",
            )
        )
    if freshness_unread is not None:  # a store not there yet, or one out of reach
        group_lines.append(
            plain(
                f"source freshness not read from the store ({freshness_unread}): "
                "PORTAL_SYNC_STORE_URL",
                style="yellow",
            )
        )
    return Group(lag_table(groups), *group_lines, freshness_table(sources, now, stale_after))


def _clock(unix: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def show_lag(reader: LagReader, stale_after: float, watch: bool, interval: float) -> None:
    """Print the tables once, or refresh them live every `interval` seconds."""
    import time

    from rich.console import Console
    from rich.live import Live

    console = Console()
    store = reader.store()

    def view() -> Group:
        groups = reader.read()
        unread_because = None
        try:
            sources = read_freshness(store)
        except Exception as error:  # no store yet, or a wrong URL or password: said
            sources, unread_because = {}, type(error).__name__
        return lag_view(
            groups, sources, time.time(), stale_after, len(reader.unread), unread_because
        )

    def safe_view() -> Group | Text:
        """While watching, a failed read (broker restarting, topics recreated) is shown,
        and the next refresh tries again."""
        try:
            return view()
        except Exception as error:
            return plain(f"lag unavailable: {type(error).__name__}: {error}", style="red")

    try:
        if not watch:
            console.print(view())
            return
        with Live(
            safe_view(), console=console, auto_refresh=False, vertical_overflow="visible"
        ) as live:
            while True:
                time.sleep(interval)
                live.update(safe_view(), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
