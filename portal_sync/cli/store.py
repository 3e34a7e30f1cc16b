"""Data-steward commands of the national store: show, history, conflicts, anomalies,
remerge and schema upgrade."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from observability.terminal import markup, plain
from portal_sync.cli.options import ReaderOpt, ReasonOpt, StoreOpt, err_console
from portal_sync.settings import Settings
from schemas.errors import Refused

if TYPE_CHECKING:  # imported by the commands that use them: `--help` and the rest start sooner
    from consumers.reconciler import Remerged
    from store import Store

console = Console()
store_app = typer.Typer(no_args_is_help=True, help="The store's schema (Alembic).")

EntityArg = Annotated[str, typer.Argument(help="citizen, organization, document or dossier")]


def _known_entity(entity: str | None) -> None:
    """A misspelt --entity selected nothing and said so with exit 0: refused, as `show`,
    `export` and `replay` refuse it."""
    from schemas.events import ENTITIES

    if entity is not None and entity not in ENTITIES:
        raise Refused(f"--entity {entity}: not one of {', '.join(ENTITIES)}")


def _store(store_url: str | None) -> Store:
    """The store of a reading command: one without the schema is refused, never created."""
    from store import Store

    target = Store(Settings.from_flags(store=store_url).store_url)
    try:
        target.require_schema()
    except BaseException:
        target.close()
        raise
    return target


def _log_access(
    command: str,
    entity: str,
    key: str,
    reason: str | None,
    operator: str | None,
    store_url: str | None,
) -> None:
    """The access log row of a command that shows a record, written before it reads it."""
    from portal_sync.ops.access import record_access, record_key, require_reason

    why = require_reason(command, reason)
    settings = Settings.from_flags(store=store_url)
    target = record_key(entity, key, settings.reference_key())
    record_access(settings.store_url, command, why, operator, [target])


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


@store_app.command("upgrade")
def store_upgrade(store: StoreOpt = None) -> None:
    """Migrate the store to the newest schema; re-merge records that lack provenance
    (under the worker's rules only, where a worker recorded them)."""
    from portal_sync.ops.rules import guard_rules
    from store import Store
    from store.base import chunks

    settings = Settings.from_flags(store=store)
    target = Store(settings.store_url)
    try:
        before, after = target.upgrade()
        console.print(f"schema: {before or 'empty'} → {after}")
        # Records written before the store kept provenance (first-schema stores) are
        # looked for once: no release writes such a record since, and the look is a scan
        # of every record (an hour at national scale, at every upgrade's Job before).
        if target.meta(PROVENANCE_COMPLETE) is None:
            keys = target.keys_without_provenance()
            if keys:
                # an upgrade whose re-merge was cut short, run again after workers started:
                # the rest is merged as theirs was, or not at all
                guard_rules(target, settings)
                changed, _ = _remerge(target, settings, chunks(keys, 500), len(keys))
                console.print(  # their provenance is filled in: the values may change
                    f"re-merged {len(keys)} records written before provenance "
                    f"({changed.values} changed)"
                )
            target.set_meta(PROVENANCE_COMPLETE, "yes")
    finally:
        target.close()


PROVENANCE_COMPLETE = "records.provenance_complete"


@store_app.command("grant")
def store_grant(
    role: Annotated[str, typer.Argument(help="The PostgreSQL role the workers and commands use")],
    access_log_floor_days: Annotated[
        int | None,
        typer.Option(
            "--access-log-floor-days",
            min=0,
            help="Access log rows younger than this are never purged, whatever the role asks "
            "(default: PORTAL_SYNC_ACCESS_LOG_RETENTION_DAYS, 730)",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Give ROLE what the worker and the commands need of a PostgreSQL store and no more:
    its tables, but only SELECT and INSERT on the access log, and the log's retention purge.
    Run as the store's owner, after every `store upgrade`."""
    from store import Store

    settings = Settings.from_flags(store=store)
    floor = settings.access_log_retention_days if access_log_floor_days is None else (
        access_log_floor_days)  # fmt: skip
    target = Store(settings.store_url)
    try:
        granted = target.grant(role, floor)
    finally:
        target.close()
    console.print(plain(
        f"granted {granted.role}: {granted.tables} tables in {granted.schema} "
        f"({', '.join(granted.append_only)} append-only), {granted.sequences} sequences, "
        f"the access log's purge (never rows younger than {granted.floor_days} days)"))  # fmt: skip


def remerge(
    entity: Annotated[str | None, typer.Option("--entity")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report how many records would change")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
    rules_mismatch_ok: Annotated[
        bool,
        typer.Option("--rules-mismatch-ok", help="Run even if the rules differ from the worker's"),
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Re-merge canonical records from the stored source views under the current
    authority file, without replaying Kafka. Runs only with the worker's rules; asks for
    confirmation (or --yes); --dry-run reports and writes nothing."""
    from consumers.config import load_rules
    from portal_sync.ops.rules import guard_rules
    from store import Store

    _known_entity(entity)
    settings = Settings.from_flags(store=store)
    load_rules(settings.registry, settings.authority_file)  # a wrong file refuses first
    target = Store(settings.store_url)
    try:
        target.require_schema()  # a database without the schema: one line, nothing created
        guard_rules(target, settings, rules_mismatch_ok)
        total = target.count_record_keys(entity)
        if not dry_run and not yes:
            typer.confirm(f"re-merge {total} records under the current rules?", abort=True)
        # page by page along the views' key: bounded memory whatever the store's size
        changed, done = _remerge(
            target, settings, target.record_key_pages(entity), total, dry_run=dry_run
        )
    finally:
        target.close()
    verb = "would change" if dry_run else "changed"
    credit = f" ({changed.credit_only} in provenance only)" if changed.credit_only else ""
    conflicts = f"; {changed.conflicts} with other field conflicts" if changed.conflicts else ""
    console.print(f"re-merged {done} records, {changed.total} {verb}{credit}{conflicts}")


def _remerge(
    store: Store,
    settings: Settings,
    pages: Iterable[list[tuple[str, str]]],
    total: int,
    dry_run: bool = False,
) -> tuple[Remerged, int]:
    """Re-merge the records page by page (a transaction each); return (changed, done)."""
    from consumers.config import load_rules
    from consumers.reconciler import Reconciler, Remerged

    _, authority = load_rules(settings.registry, settings.authority_file)
    reconciler = Reconciler(store, authority)
    changed, done = Remerged(), 0
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("re-merging", total=total)
        for part in pages:
            changed = changed + reconciler.remerge(part, dry_run=dry_run)
            done += len(part)
            progress.advance(task, len(part))
    return changed, done


def show(
    entity: EntityArg,
    key: str,
    reason: ReasonOpt = None,
    operator: ReaderOpt = None,
    store: StoreOpt = None,
) -> None:
    """A record: each field with its source and version, every source's view, and the
    fields the sources disagree on (highlighted). Needs --reason (access log)."""
    from store.queries import record_detail

    _log_access("show", entity, key, reason, operator, store)
    target = _store(store)
    detail = record_detail(target, entity, key)
    target.close()
    if detail is None:
        console.print(plain(f"no {entity} {key} in the store"))
        raise typer.Exit(1)
    sources = [view["source"] for view in detail.views]
    table = Table(title=plain(f"{entity} {key}"), show_lines=False)
    table.add_column("field")
    table.add_column("canonical value")
    table.add_column("from")
    for source in sources:
        table.add_column(plain(source))
    for name in sorted(
        {n for v in detail.views for n in (v["data"] or {})} | set(detail.data or {})
    ):
        style = "bold red" if name in detail.conflicts else None
        origin = detail.provenance.get(name)
        row = [name, _text((detail.data or {}).get(name, "")),
               f"{origin['source']} v{origin['version']}" if origin else ""]  # fmt: skip
        for view in detail.views:
            data = view["data"] or {}
            row.append(
                "(deleted)" if view["deleted"] else _text(data[name]) if name in data else "—"
            )
        table.add_row(*map(plain, row), style=style)
    table.add_row("version", "", "", *[str(v["version"]) for v in detail.views], style="dim")
    console.print(table)
    if detail.data is None:
        console.print("no canonical record: every source deleted it")
    if detail.conflicts:
        disagree = ", ".join(sorted(detail.conflicts))
        console.print(markup("[bold red]disagreements[/bold red]: {}", disagree))
    if detail.waiting_for_owner:
        owner = detail.waiting_for_owner[0]
        console.print(plain(f"waiting for its owner {owner} (not in the store yet)"))


def history(
    entity: EntityArg,
    key: str,
    reason: ReasonOpt = None,
    operator: ReaderOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="the newest N changes (0: every one)")
    ] = 1000,
    store: StoreOpt = None,
) -> None:
    """Every change to a canonical record: event, source, version, fields old → new
    (the newest --limit, oldest first). Needs --reason (access log)."""
    from schemas.identifiers import key_reference
    from store.queries import history as record_history

    _log_access("history", entity, key, reason, operator, store)
    target = _store(store)
    secret = Settings.from_flags(store=store).reference_key()
    reference = None if secret is None else key_reference(key, secret)
    rows, total = record_history(target, entity, key, limit or None, reference)
    target.close()
    if len(rows) < total:  # on stderr, before the table: the oldest are not shown
        err_console.print(
            f"the newest {len(rows)} of {total} changes, oldest first (--limit 0: every one)"
        )
    table = Table(title=plain(f"history of {entity} {key}"))
    for column in ("applied at", "source", "version", "event", "changes"):
        table.add_column(column)
    for row in rows:
        changes = Text("\n").join(
            plain(f"{f}: {_text(o)} → {_text(n)}") for f, (o, n) in row["changes"].items()
        )
        if row["purged_at"] is not None:  # a deleted record's entry past its retention
            changes = plain(
                f"{', '.join(row['changes'])}: values purged {row['purged_at']:%Y-%m-%d}"
            )
        table.add_row(row["applied_at"].isoformat(timespec="seconds"), plain(row["source"]),
                      str(row["version"] or ""), plain(row["event_id"] or ""), changes)  # fmt: skip
    console.print(table)


def conflicts(
    entity: Annotated[str | None, typer.Option("--entity")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="the worst N lines")] = 50,
    store: StoreOpt = None,
) -> None:
    """Open disagreements between sources, by source pair and field, worst first."""
    from store.queries import conflict_report

    _known_entity(entity)
    target = _store(store)
    lines = conflict_report(target, entity)
    target.close()
    table = Table(title="field conflicts (open)")
    for column in ("entity", "field", "source pair", "records"):
        table.add_column(column)
    for line in lines[:limit]:
        cells = (line.entity, line.field, " ↔ ".join(line.sources), str(line.records))
        table.add_row(*map(plain, cells))
    console.print(table)
    if not lines:
        console.print("no open conflicts")


def anomalies(
    limit: Annotated[int, typer.Option("--limit", min=1, help="the newest N")] = 50,
    store: StoreOpt = None,
) -> None:
    """Dossier status changes the national lifecycle does not foresee (newest first)."""
    from store.queries import anomalies as latest

    target = _store(store)
    rows = latest(target, limit)
    target.close()
    table = Table(title="dossier lifecycle anomalies")
    for column in ("detected at", "dossier", "source", "from", "to", "event"):
        table.add_column(column)
    for row in rows:
        cells = (row["detected_at"].isoformat(timespec="seconds"), row["key"], row["source"],
                 str(row["from_status"]), str(row["to_status"]), row["event_id"])  # fmt: skip
        table.add_row(*map(plain, cells))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
    for command in (remerge, show, history, conflicts, anomalies):
        app.command()(command)
