"""Commands about one source system's data in the store: `source purge`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from observability.terminal import plain
from portal_sync.cli.options import StoreOpt
from portal_sync.ops import PURGE_CHUNK
from portal_sync.settings import Settings

console = Console()
progress_console = Console(stderr=True)  # progress never mixes with the report on stdout
source_app = typer.Typer(no_args_is_help=True, help="One source system's data in the store.")


@source_app.command("purge")
def purge(
    source: Annotated[str, typer.Argument(help="The source id, e.g. province-01")],
    reason: Annotated[str, typer.Option("--reason", help="Why (required; recorded)")],
    entity: Annotated[str | None, typer.Option("--entity", help="Only this entity's views")] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Only this record's view (with --entity)")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Do the work in transactions that are rolled back"),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Carry out the purge")] = False,
    rules_mismatch_ok: Annotated[
        bool,
        typer.Option(
            "--rules-mismatch-ok",
            help="Run even if the registry/authority differ from the worker's",
        ),
    ] = False,
    operator: Annotated[
        str | None, typer.Option("--operator", help="Who acts (default: the OS user)")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, help="Records per transaction")
    ] = PURGE_CHUNK,
    store: StoreOpt = None,
) -> None:
    """Remove a source's views and tombstones (all, of one entity, or of one record) and
    re-merge every touched record from the other sources' views; a record no source
    contributes to any more is removed. Prints the plan and acts only with --yes;
    --dry-run reports exactly what would change and writes nothing. Recorded in the store
    (who, when, source, scope, reason, counts). Refuses rules other than the worker's."""
    from consumers.config import load_rules
    from portal_sync.ops import purge as purging
    from portal_sync.ops.rules import guard_rules
    from store import Store

    settings = Settings.from_flags(store=store)
    _, authority = load_rules(settings.registry, settings.authority_file)
    audit = purging.new_purge(source, entity, key, reason, operator, settings.reference_key())
    scope = audit.entity or "every entity"
    if audit.reference is not None:
        scope += f" {audit.reference}"
    target = Store(settings.store_url)
    try:
        # Creating nothing: a mistyped URL would otherwise get a new, empty store (an older
        # one is refused too: `portal-sync store upgrade`).
        target.require_schema()
        guard_rules(target, settings, rules_mismatch_ok)
        # only a purge carried out: a plan or a dry run counts what is left, as its own
        interrupted = purging.carried_on(target, audit) if yes and not dry_run else audit
        if interrupted is not audit:
            started = interrupted.started_at.isoformat(timespec="seconds")
            console.print(
                plain(
                    f"carrying on purge {interrupted.id}, interrupted after it began at "
                    f"{started} (by {interrupted.operator}): it is finished under its record"
                )
            )
            audit = interrupted
        plan = purging.plan(target, audit, key)
        console.print(
            plain(
                f"purge of {source} ({scope}): {plan.views} views, {plan.tombstones} "
                f"tombstones; {plan.records_remerged} records to re-merge from other "
                f"sources, {plan.records_removed} to remove"
            )
        )
        if not (yes or dry_run):
            console.print(
                "plan only: pass --yes to carry it out, or --dry-run to see exactly what "
                "would change"
            )
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=progress_console) as progress:
            task = progress.add_task("purging", total=plan.keys)
            done = purging.run(
                target,
                authority,
                audit,
                key,
                dry_run=dry_run,
                chunk=chunk_size,
                on_progress=lambda n: progress.advance(task, n),
            )
    finally:
        target.close()
    counts = done.counts
    what = (
        f"{counts.views} views and {counts.tombstones} tombstones; {counts.records_remerged} "
        f"records re-merged from other sources ({counts.records_changed} of them changed), "
        f"{counts.records_removed} removed"
    )
    if dry_run:
        console.print(plain(f"dry run, nothing written: would remove {what}"))
    else:
        console.print(plain(f"purged {source}: removed {what}; recorded as purge {done.id}"))


def register(app: typer.Typer) -> None:
    app.add_typer(source_app, name="source")
