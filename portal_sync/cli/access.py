"""`portal-sync access-log`: who read personal data out of the store, when, how and why."""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from portal_sync.cli.options import StoreOpt, parse_time
from portal_sync.settings import Settings

console = Console()


def access_log(
    since: Annotated[
        str | None,
        typer.Option(help="RFC 3339 time with offset, or an age like 30m, 6h, 2d (before now)"),
    ] = None,
    operator: Annotated[str | None, typer.Option("--operator", help="Only this operator")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    store: StoreOpt = None,
) -> None:
    """The access log: every `show`, `history`, `export`, `dlq show --reveal` and
    `replay --show-values` (time, operator, command, entity, key reference, reason),
    oldest first."""
    from store import Store

    target = Store(Settings.from_flags(store=store).store_url)
    try:
        target.require_schema()
        # Recorded in NFC; earlier releases recorded a name as typed (NFD from some terminals).
        names = (
            {operator, *(unicodedata.normalize(form, operator) for form in ("NFC", "NFD"))}
            if operator
            else None
        )
        rows = target.access_entries(parse_time(since), names)
    finally:
        target.close()
    if as_json:
        for row in rows:
            line = {**row, "accessed_at": row["accessed_at"].isoformat()}
            print(json.dumps(line, ensure_ascii=False, sort_keys=True))
        return
    table = Table(title=f"access log ({len(rows)})")
    for column in ("time (UTC)", "operator", "command", "entity", "reference", "reason"):
        table.add_column(column)
    for row in rows:
        cells = (row["operator"], row["command"], row["entity"] or "(all)",
                 row["reference"] or "", row["reason"])  # fmt: skip
        table.add_row(row["accessed_at"].isoformat(timespec="seconds"), *(escape(c) for c in cells))
    console.print(table, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("access-log")(access_log)
