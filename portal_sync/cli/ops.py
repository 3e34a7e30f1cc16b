"""Engineers' commands after an incident or a fix: replay, rebuild, dead letters, offsets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from observability.terminal import markup, plain
from portal_sync.cli.options import (
    BootstrapOpt,
    CaughtUpWaitOpt,
    ReaderOpt,
    ReasonOpt,
    StoreOpt,
    parse_time,
    settings_from,
)
from portal_sync.settings import Settings, url_from
from schemas.errors import ConfigurationError, Refused
from schemas.identifiers import ReferenceKey, key_reference

if TYPE_CHECKING:  # imported by the commands that use them: `--help` and the rest start sooner
    from consumers.registry import Registry
    from portal_sync.ops.replay import ReplaySummary

console = Console()
progress_console = Console(stderr=True)  # progress never mixes with the report on stdout
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list, show, re-drive.")
offsets_app = typer.Typer(no_args_is_help=True, help="The live consumer group's offsets.")

RulesOkOpt = Annotated[
    bool,
    typer.Option(
        "--rules-mismatch-ok",
        help="Run even if the registry/authority differ from the worker's",
    ),
]
TimeOpt = Annotated[
    str | None, typer.Option(help="RFC 3339 time, or an age like 30m, 6h, 2d (before now)")
]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]} ev/s"), TimeRemainingColumn(),
        console=progress_console,
    )  # fmt: skip


# -- replay and rebuild -------------------------------------------------------------------
def replay(
    since: TimeOpt = None,
    until: TimeOpt = None,
    from_offset: Annotated[int | None, typer.Option("--from-offset")] = None,
    to_offset: Annotated[int | None, typer.Option("--to-offset", help="exclusive")] = None,
    topic: Annotated[list[str] | None, typer.Option("--topic")] = None,
    partition: Annotated[list[int] | None, typer.Option("--partition")] = None,
    source: Annotated[str | None, typer.Option("--source")] = None,
    entity: Annotated[str | None, typer.Option("--entity")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Report, write nothing (each batch judged against the store as it is, not "
            "against the batches before it: an upper bound of the real run)",
        ),
    ] = False,
    show_values: Annotated[
        bool, typer.Option("--show-values", help="Show old and new values in the sample")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout")] = False,
    reason: ReasonOpt = None,
    operator: ReaderOpt = None,
    rules_mismatch_ok: RulesOkOpt = False,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Re-apply a range of the change topics through the reconciler (idempotent); never
    moves the live worker's offsets. Runs only with the worker's registry and authority.
    --show-values needs --reason (recorded in the access log)."""
    from portal_sync.ops.access import record_access, record_key, require_reason
    from portal_sync.ops.purge import purge_warning, purges_after
    from portal_sync.ops.replay import replay as run_replay
    from portal_sync.ops.rules import guard_rules
    from schemas.events import ENTITIES
    from store import Store
    from transport.reader import Selection

    why = require_reason("replay --show-values", reason) if show_values else None
    settings = settings_from(bootstrap, store)
    reference_key = settings.reference_key()
    _warn_of_an_odd_source(settings, source)
    names = settings.topics()
    others = sorted(set(topic or ()) - set(names.change_topics()))
    if others:  # a misspelt one read nothing, and said so with exit 0
        raise Refused(
            f"not a change topic: {', '.join(others)}; the change topics are "
            f"{', '.join(names.change_topics())}"
        )
    # Likewise a misspelt entity, a partition the topics lack, or an empty range.
    if entity is not None and entity not in ENTITIES:
        raise Refused(f"--entity {entity}: not one of {', '.join(ENTITIES)}")
    beyond = sorted(p for p in partition or () if not 0 <= p < names.change_partitions)
    if beyond:
        raise Refused(
            f"--partition {', '.join(map(str, beyond))}: the change topics have partitions "
            f"0 to {names.change_partitions - 1}"
        )
    if from_offset is not None and to_offset is not None and from_offset >= to_offset:
        raise Refused("--from-offset must be below --to-offset (which is exclusive)")
    # One start and one end: with both, the offset won and the time was not a limit (the
    # range read was not the one asked for, and a purge's warning judged by the time).
    if since is not None and from_offset is not None:
        raise Refused("--since and --from-offset both set the start: give one")
    if until is not None and to_offset is not None:
        raise Refused("--until and --to-offset both set the end: give one")
    if entity is not None and topic and names.change_topic(entity) not in topic:
        raise Refused(f"--entity {entity}: its topic {names.change_topic(entity)} is not a --topic")
    topics = topic or ([names.change_topic(entity)] if entity else names.change_topics())
    selection = Selection(topics, partition, parse_time(since), parse_time(until),
                          from_offset, to_offset)  # fmt: skip
    if selection.since and selection.until and selection.since >= selection.until:
        raise Refused("--since must be before --until")
    target = Store(settings.store_url)
    target.require_schema()  # the live store: one without it is another database
    guard_rules(target, settings, rules_mismatch_ok, applies_events=True)
    replayed = {e for e in ENTITIES if names.change_topic(e) in topics}
    # The events' times are their hosts' clocks: one sent a little after a purge's start
    # may still be from before it (as `offsets reset` and `dlq redrive` allow).
    skew = timedelta(seconds=settings.max_clock_skew_seconds)
    after = None if selection.since is None else selection.since - skew
    undone = purge_warning(purges_after(target, after, source, replayed))
    if undone:  # on stderr: --json keeps stdout for the summary
        progress_console.print(markup("[yellow]warning:[/yellow] {}", undone))
    with _progress() as progress:
        task = progress.add_task("dry run" if dry_run else "replay", total=None, rate="–")
        summary = run_replay(settings, selection, target, source, entity, dry_run,
                             _on_progress(progress, task))  # fmt: skip
    target.close()
    if why is not None:  # recorded before any value is shown
        shown = dict.fromkeys(
            record_key(i["entity"], i["key"], reference_key) for i in summary.sample
        )
        record_access(settings.store_url, "replay --show-values", why, operator, shown)
    _print_summary(summary, dry_run, show_values, as_json, reference_key)


def _on_progress(progress: Progress, task: TaskID) -> Callable[[int, int], None]:
    import time

    began = time.perf_counter()

    def update(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - began, 1e-6)
        progress.update(task, completed=done, total=total, rate=f"{rate:,.0f}")

    return update


def _print_summary(
    summary: ReplaySummary,
    dry_run: bool,
    show_values: bool,
    as_json: bool,
    reference_key: ReferenceKey | None = None,
) -> None:
    if as_json:
        body = summary_dict(summary, show_values, reference_key)
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return
    verb = "would be" if dry_run else "were"
    table = Table(title=f"replay summary ({'dry run: nothing written' if dry_run else 'applied'})")
    table.add_column("entity")
    for name in ("applied", "unchanged", "stale"):
        table.add_column(name, justify="right")
    table.add_column("changes", justify="right")  # to records, one per event that changed one
    for entity in sorted({e for e, _ in summary.by_entity} | set(summary.changed_records)):
        table.add_row(plain(entity), *[str(summary.by_entity[(entity, n)]) for n in
                                ("applied", "unchanged", "stale")],
                      str(summary.changed_records[entity]))  # fmt: skip
    console.print(table)
    console.print(
        f"read {summary.read} events in {summary.seconds:.1f}s ({summary.rate:,.0f} ev/s): "
        f"{summary.outcomes['applied']} applied, {summary.outcomes['unchanged']} unchanged, "
        f"{summary.outcomes['stale']} stale, {summary.outcomes['dead_lettered']} invalid "
        f"{_by_reason(summary)}and {summary.outcomes['apply_failed']} refused by the store "
        f"(not applied), {summary.outcomes['skipped']} outside the filters; "
        f"{sum(summary.changed_records.values())} record changes {verb} made"
    )
    for item in summary.sample:
        fields = (", ".join(f"{f}: {o!r} → {n!r}" for f, (o, n) in item["changes"].items())
                  if show_values else ", ".join(sorted(item["changes"])))  # fmt: skip
        key = item["key"] if show_values else key_reference(item["key"], reference_key)
        console.print(plain(f"  {item['entity']} {key} ({item['source']}): {fields}"))


def _by_reason(summary: ReplaySummary) -> str:
    """The invalid events' reason codes, e.g. `(invalid_field 3, unsigned 1) `."""
    counts = ", ".join(f"{code} {n}" for code, n in sorted(summary.invalid.items()))
    return f"({counts}) " if counts else ""


REPLAY_OUTCOMES = ("applied", "unchanged", "stale", "dead_lettered", "apply_failed", "skipped")


def summary_dict(
    summary: ReplaySummary, show_values: bool = False, reference_key: ReferenceKey | None = None
) -> dict[str, object]:
    """The summary as JSON; keys as keyed references unless values are shown."""
    return {
        "read": summary.read,
        # every outcome, 0 included: `.outcomes.dead_lettered` reads in any run
        "outcomes": {name: summary.outcomes[name] for name in REPLAY_OUTCOMES}
        | dict(summary.outcomes),
        "by_entity": {f"{e}:{o}": n for (e, o), n in sorted(summary.by_entity.items())},
        "changed_records": dict(summary.changed_records),
        "invalid": dict(sorted(summary.invalid.items())),  # by reason code
        "seconds": round(summary.seconds, 3),
        "sample": [
            item
            if show_values
            else {
                **item,
                "key": key_reference(item["key"], reference_key),
                "changes": sorted(item["changes"]),
            }
            for item in summary.sample
        ],
    }


def rebuild(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            envvar="PORTAL_SYNC_REBUILD_STORE_URL",
            help="URL of the NEW store to build (with a password: use --store-file)",
        ),
    ] = None,
    store_file: Annotated[
        Path | None,
        typer.Option(
            "--store-file",
            envvar="PORTAL_SYNC_REBUILD_STORE_URL_FILE",
            help="File holding the URL of the NEW store (keeps its password out of `ps`)",
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Diff the rebuilt store against the live one")
    ] = False,
    rules_mismatch_ok: RulesOkOpt = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why the copy is made (access log)")
    ] = None,
    operator: ReaderOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Build a fresh store from everything the change topics retain, with the live
    worker's registry and authority. The copy of every record is recorded in the live
    store's access log (who, when, where to, --reason) before it begins."""
    from portal_sync.ops.access import copy_target, record_access, require_reason
    from portal_sync.ops.purge import purges_after, rebuild_warning
    from portal_sync.ops.replay import compare_stores, rebuild_until
    from portal_sync.ops.replay import replay as run_replay
    from portal_sync.ops.rules import guard_rules
    from store import Store, same_database
    from transport.reader import Selection

    began = datetime.now(UTC)  # before the live store's offsets are read (`rebuild_until`)
    names = ("--store (PORTAL_SYNC_REBUILD_STORE_URL)", "--store-file")
    store = url_from(store, store_file, names)
    if store is None:
        raise ConfigurationError("rebuild needs the new store: --store-file FILE or --store URL")
    live_settings = settings_from(bootstrap, None)
    if same_database(store, live_settings.store_url):
        raise Refused(
            "--store names the live store (PORTAL_SYNC_STORE_URL): a rebuild writes a new, "
            "empty store; give another database or SQLite file"
        )
    reference_key = live_settings.reference_key()
    live = Store(live_settings.store_url)
    try:
        live.require_schema()  # a mistyped live store: said so, and no empty file made
        guard_rules(live, live_settings, rules_mismatch_ok, applies_events=True)
        purged = purges_after(live, None)
        until = rebuild_until(live)
    finally:
        live.close()
    if purged:  # on stderr, before the work: the new store is not the live one's equal
        progress_console.print(markup("[yellow]warning:[/yellow] {}", rebuild_warning(purged)))
    why = require_reason("rebuild", reason) if reason else "(no reason given)"
    target = Store(store)
    target.create_schema()
    if target.holds_data():
        console.print(
            "[red]error:[/red] the target store is not empty (an earlier rebuild, finished "
            "or interrupted, or another store: a rebuild starts from an empty one; drop "
            "that database, or remove the SQLite file, and run the rebuild again)"
        )
        raise typer.Exit(1)
    # Every record is copied out of the live store's reach: recorded there first, as the
    # commands that show records are (nothing is copied if the row cannot be written).
    record_access(live_settings.store_url, "rebuild", why, operator, [copy_target(store)])
    settings = live_settings.model_copy(update={"store_url": store})
    with _progress() as progress:
        task = progress.add_task("rebuild", total=None, rate="–")
        summary = run_replay(
            settings, Selection(settings.topics().change_topics()), target,
            on_progress=_on_progress(progress, task), track_offsets=True, until=until,
        )  # fmt: skip
    console.print(f"rebuilt {sum(target.count_records().values())} records from "
                  f"{summary.read} events in {summary.seconds:.1f}s, up to the live store's "
                  "offsets (a worker on the new store applies what follows)")  # fmt: skip
    refused = summary.outcomes["dead_lettered"]
    if refused:  # on stderr: a record only such events held is not in the new store
        progress_console.print(markup(
            "[yellow]warning:[/yellow] {} events refused {}(the live worker dead-lettered "
            "them, or the rules refuse now what they once took): a record only they held is "
            "not in the new store; --compare shows the difference",
            refused, _by_reason(summary),
        ))  # fmt: skip
    failed = summary.outcomes["apply_failed"]
    if failed:  # as the worker, which dead-lettered them as `apply_failed`; the log has where
        progress_console.print(markup(
            "[yellow]warning:[/yellow] {} events the store refused alone were passed over "
            "(the live worker dead-lettered them as apply_failed; the log names each one's "
            "place): a record only they held is not in the new store",
            failed,
        ))  # fmt: skip
    if compare:
        live = Store(live_settings.store_url)
        try:  # the workers' clocks may run ahead of this host's: what they applied
            # within the skew before the start is set apart too
            diff = compare_stores(live, target, changed_since=began - COMPARE_SKEW)
        finally:
            live.close()
        for name, count in diff.counts.items():
            keys = diff.samples[name]
            shown = [f"{entity} {key_reference(key, reference_key)}" for entity, key in keys]
            console.print(plain(f"{name}: {count}" + (f" e.g. {shown}" if keys else "")))
        if diff.meanwhile:
            console.print(
                f"changed in the live store while the rebuild ran, by newer views than the "
                f"rebuild read (a worker's; not compared): {diff.meanwhile}"
            )
        if diff.any():  # a check that found a difference, as `adapters check` fails one
            target.close()
            raise typer.Exit(1)
    target.close()


# How far a live worker's clock may run ahead of this host's (`rebuild --compare`).
COMPARE_SKEW = timedelta(minutes=5)


# -- dead letters -------------------------------------------------------------------------
@dlq_app.command("list")
def dlq_list(
    reason: Annotated[list[str] | None, typer.Option("--reason")] = None,
    source: Annotated[str | None, typer.Option("--source")] = None,
    since: TimeOpt = None,
    until: TimeOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Letters listed, newest last (0: counts only)")
    ] = 50,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Dead letters (newest last) and their counts by reason."""
    from collections import Counter, deque

    from portal_sync.ops.dlq import DeadLetterRecord, Filters, iter_dead_letters

    _warn_of_odd_reasons(reason)
    settings = settings_from(bootstrap, None)
    _warn_of_an_odd_source(settings, source)
    shown_source = _source_shown(_readable_registry(settings))
    filters = Filters(reason, source, parse_time(since), parse_time(until))
    # Counted as they are read; only the last `limit` are kept (a topic can hold millions).
    shown: deque[DeadLetterRecord] = deque(maxlen=limit)
    by_reason: Counter[str] = Counter()
    damaged = 0
    for letter in iter_dead_letters(settings, filters):
        shown.append(letter)
        by_reason[letter.reason_code] += 1
        damaged += bool(letter.unreadable)
    unreadable = any(letter.unreadable for letter in shown)
    table = Table(title=f"dead letters ({by_reason.total()})")
    for column in ("id", "failed at", "reason", "origin", "source", "attempt"):
        table.add_column(column)
    if unreadable:  # what could not be read of a letter (headers, value)
        table.add_column("unreadable", style="yellow")
    for letter in shown:
        when = letter.failed_at.isoformat(timespec="seconds") if letter.failed_at else ""
        origin = f"{letter.origin_topic}:{letter.origin_partition}:{letter.origin_offset}"
        cells = [letter.id, when, letter.reason_code, origin, shown_source(letter.source, ""),
                 str(letter.attempt)]  # fmt: skip
        if unreadable:
            cells.append("; ".join(letter.unreadable))
        table.add_row(*map(plain, cells))
    # --limit 0: the counts only, not an empty table's header
    console.print(table if limit else f"dead letters ({by_reason.total()})")
    for code, count in by_reason.most_common():
        console.print(markup("{}: {}", code, count))
    if damaged:
        console.print(f"{damaged} with parts that could not be read (dlq show ID tells which)")


@dlq_app.command("show")
def dlq_show(
    letter_id: Annotated[str, typer.Argument(metavar="ID", help="<partition>:<offset>")],
    reveal: Annotated[bool, typer.Option("--reveal", help="Print the event bytes")] = False,
    reason: ReasonOpt = None,
    operator: ReaderOpt = None,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """One dead letter: reason, origin, time, attempts; the event itself with --reveal
    (and --reason: recorded in the store's access log)."""
    from portal_sync.ops.access import dead_letter_targets, record_access, require_reason
    from portal_sync.ops.dlq import Filters, read_dead_letters

    why = require_reason("dlq show --reveal", reason) if reveal else None
    settings = settings_from(bootstrap, store)
    found = read_dead_letters(settings, Filters(ids=[letter_id]))
    if not found:
        console.print(plain(f"no dead letter {letter_id}"))
        raise typer.Exit(1)
    letter = found[0]
    if why is not None:  # recorded before anything is shown
        targets = dead_letter_targets(letter.id, letter.key, letter.value, settings.reference_key())
        record_access(settings.store_url, "dlq show --reveal", why, operator, targets)
    registry = _readable_registry(settings)
    for name, value in [
        ("id", letter.id), ("reason", f"{letter.reason_code}: {letter.reason}"),
        ("origin", f"{letter.origin_topic} partition {letter.origin_partition} "
                   f"offset {letter.origin_offset}"),
        ("failed at", letter.failed_at.isoformat() if letter.failed_at else ""),
        ("attempt", str(letter.attempt)),
        ("source", _source_shown(registry)(letter.source, "(unreadable)")),
        ("signed by key", _key_shown(registry, letter.signed_by)),
        ("size", f"{len(letter.value or b'')} bytes"),
        *([("unreadable", "; ".join(letter.unreadable))] if letter.unreadable else []),
    ]:  # fmt: skip
        console.print(markup("[bold]{}[/bold]: {}", name, value))
    if reveal:  # controls and bidi overrides as visible escapes, bytes not UTF-8 as \xNN
        console.print(plain(letter.value, newlines=True), soft_wrap=True)
    else:
        console.print("(event bytes hidden: they may hold personal data; --reveal prints them)")


OperatorOpt = Annotated[
    str | None, typer.Option("--operator", help="Who acts (default: the OS user)")
]


@dlq_app.command("redrive")
def dlq_redrive(
    letter_ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...")] = None,
    reason: Annotated[list[str] | None, typer.Option("--reason")] = None,
    source: Annotated[str | None, typer.Option("--source")] = None,
    since: TimeOpt = None,
    until: TimeOpt = None,
    wait: CaughtUpWaitOpt = 30.0,
    despite_purge: Annotated[
        bool,
        typer.Option(
            "--despite-purge",
            help="Also send letters of a source purged after they failed (once the source "
            "was snapshotted again; else they bring back what the purge removed)",
        ),
    ] = False,
    operator: OperatorOpt = None,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Re-publish selected dead letters to their original topic, each once, recorded (with
    who re-drove it: --operator, else the OS user); never
    one older than the store's or than one this run sent of the same key, nor while the
    worker has not applied its partition up to the log's end (held back: run it again),
    nor one of a source purged after it failed (without --despite-purge)."""

    from portal_sync.ops.dlq import Filters, iter_dead_letters
    from portal_sync.ops.dlq import redrive as run_redrive
    from portal_sync.ops.purge import redrive_warning
    from store import Store

    if not (letter_ids or reason or source or since or until):
        raise ConfigurationError("select dead letters: IDs, --reason, --source or a time")
    _warn_of_odd_reasons(reason)
    settings = settings_from(bootstrap, store)
    _warn_of_an_odd_source(settings, source)
    filters = Filters(reason, source, parse_time(since), parse_time(until), letter_ids)
    letters = iter_dead_letters(settings, filters)
    left_out = [0]
    if not letter_ids and "skipped_by_operator" not in (reason or []):
        # An operator skipped these on purpose (`offsets skip`): only named ones go back.
        def not_skipped(found: Iterable[Any]) -> Iterator[Any]:
            for letter in found:
                if letter.reason_code == "skipped_by_operator":
                    left_out[0] += 1
                else:
                    yield letter

        letters = not_skipped(letters)
    target = Store(settings.store_url)
    target.require_schema()
    try:
        summary = run_redrive(settings, target, letters, wait, operator, despite_purge)
        skew = timedelta(seconds=settings.max_clock_skew_seconds)
        purged = summary.purged_since(target, skew)
    finally:
        target.close()
    if purged:  # on stderr, as the replay's and the offsets reset's warnings
        progress_console.print(markup("[yellow]warning:[/yellow] {}", redrive_warning(purged)))
    console.print(f"selected {summary.selected}: re-driven {summary.redriven}, already re-driven "
                  f"{summary.already_redriven}, not re-drivable (rejected at a source, not from "
                  f"a change topic, or not an event of its key) {summary.not_redrivable}, "
                  f"superseded (the store holds, or this run sent, "
                  f"that version or a newer one) {summary.superseded}")  # fmt: skip
    unmatched = filters.unmatched()
    if unmatched:
        console.print(f"not found or not selected: {', '.join(unmatched)}")
    if left_out[0]:
        console.print(f"left out {left_out[0]} that an operator skipped (`offsets skip`): name "
                      "them by ID, or --reason skipped_by_operator, to send them")  # fmt: skip
    if summary.held_back:
        where = ", ".join(f"{t}:{p}" for t, p in sorted(summary.behind))
        console.print(plain(
            f"held back {summary.held_back}: the worker has not applied {where} up to the "
            f"log's end within {wait:g} s (a newer event of their key may wait there); "
            "run the redrive again once it has"))  # fmt: skip
    if summary.purged:
        console.print(plain(
            f"held back {summary.purged} of sources purged after they failed "
            f"({', '.join(sorted(summary.purged_sources))}): the store cannot tell them "
            "from what the purge removed. Once the source has sent its records again (a "
            "re-snapshot: docs/operations.md, a province sent wrong data), send them with "
            "--despite-purge"))  # fmt: skip
    # A letter named by its ID that cannot go back is no success either.
    if summary.held_back or unmatched or summary.purged or (letter_ids and summary.not_redrivable):
        raise typer.Exit(1)


@dlq_app.command("import")
def dlq_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="<state_dir>/<entry id>.dead-letters.jsonl of a producer",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip (and name) lines that hold no kept letter")
    ] = False,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish the dead letters a producer kept on disk, because its cluster does not let
    a source write the dead-letter topic, into that topic (run as an operator who may read
    and write it). Take the file aside first (rename it where the producer runs: it starts
    a new one). A letter the topic holds already is not sent again: an import interrupted
    or run twice adds each letter once."""
    from portal_sync.ops.dlq import import_letters

    settings = settings_from(bootstrap, None)
    summary = import_letters(settings, file, skip_bad)
    console.print(
        plain(
            f"imported {summary.imported} dead letters from {file.name} into "
            f"{settings.topics().dead_letters} ({summary.present} already there and "
            f"{summary.repeated} repeated in the file, not sent again); remove the file now "
            "(it holds the records)"
        )
    )
    if summary.expired:
        console.print(
            plain(
                f"not sent: {summary.expired} dead letters that failed longer ago than "
                f"{settings.topics().dead_letters} keeps letters (its retention.ms)"
            )
        )
    if summary.skipped:
        lines = ", ".join(map(str, summary.skipped))
        console.print(plain(f"skipped lines that hold no kept letter: {lines}"))


# -- offsets ------------------------------------------------------------------------------
@offsets_app.command("reset")
def offsets_reset(
    group: Annotated[str, typer.Option("--group")],
    to_time: Annotated[
        str, typer.Option("--to-time", help="RFC 3339 time with offset, or an age like 2h")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Carry out the plan")] = False,
    allow_skip: Annotated[
        bool,
        typer.Option("--allow-skip", help="Allow moving past events the store has not applied"),
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded)")] = "",
    topic: Annotated[
        list[str] | None,
        typer.Option("--topic", help="Only this change topic (repeatable; default: all)"),
    ] = None,
    new_group: Annotated[
        bool,
        typer.Option(
            "--new-group",
            help="The group has no offsets yet: set them up (else refused as a likely typo)",
        ),
    ] = False,
    operator: OperatorOpt = None,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Move a group to the first offsets at or after a time. Refuses while the group has
    active members, and past unapplied events without --allow-skip; a group other than the
    reconciler's that has no offsets yet only with --new-group. Prints the plan and acts
    only with --yes. Every reset is recorded in the store (of any group)."""
    from portal_sync.ops.offsets import active_members, apply_reset, plan_reset, purges_undone

    moment = parse_time(to_time)
    assert moment is not None
    settings = settings_from(bootstrap, store)
    members = active_members(settings, group)
    if members and yes:
        console.print(
            markup("[red]refused:[/red] group {} has {} active member(s)", group, members)
        )
        raise typer.Exit(1)
    plan = plan_reset(settings, group, moment, topic or None)
    table = Table(title=plain(f"reset {group} to {moment.isoformat(timespec='seconds')}"))
    for column in ("topic", "partition", "kafka committed", "store applied", "target", "skips"):
        table.add_column(column)
    for line in plan:
        target = f"{line.target} (end)" if line.past_the_end else str(line.target)
        skips = f"[red]{line.skipped}[/red]" if line.skipped else "0"
        applied = _num(line.store_applied)
        if line.created_again and line.store_applied is not None:
            applied += " (an earlier topic)"
        table.add_row(plain(line.topic), str(line.partition), _num(line.kafka_committed),
                      applied, target, skips)  # fmt: skip
    console.print(table)
    undone = purges_undone(settings, group, plan, moment)
    if undone:
        console.print(markup("[yellow]warning:[/yellow] {}", undone))
    skipped = sum(line.skipped for line in plan)
    if skipped:
        unread = (
            "the store has not applied" if group == settings.group_id
            else f"group {group} has not consumed"
        )  # fmt: skip
        console.print(
            f"[red]this reset skips {skipped} events {unread}[/red]"
            + ("" if allow_skip else " (refused without --allow-skip)")
        )
    unknown = group != settings.group_id and all(line.kafka_committed is None for line in plan)
    if unknown and not new_group:  # a typo made a group, which then showed as stalled
        said = (f"group {group} has no offsets on these topics (a typo? the reconciler's "
                f"group is {settings.group_id})") + ("" if yes else ": --yes refused without "
                "--new-group")  # fmt: skip
        console.print(markup("[yellow]warning:[/yellow] {}", said))
        if yes:
            console.print("[red]refused:[/red] pass --new-group to set up a new group's offsets")
            raise typer.Exit(1)
    if not yes:
        if members:  # the plan may be read before the workers stop; not carried out
            console.print(markup("group {} has {} active member(s): stop its workers before "
                                 "--yes", group, members))  # fmt: skip
        console.print("plan only: pass --yes to carry it out")
        return
    apply_reset(settings, group, plan, allow_skip, operator, reason)
    console.print(plain(f"group {group} reset on {len(plan)} partitions"))


@offsets_app.command("skip")
def offsets_skip(
    topic: Annotated[str, typer.Option("--topic")],
    partition: Annotated[int, typer.Option("--partition")],
    offset: Annotated[int, typer.Option("--offset")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded)")],
    operator: OperatorOpt = None,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Skip the one message the reconciler is stuck at: copy it to the dead letters
    (reason skipped_by_operator) and move the store's offset past it. Refused while the
    group has members; recorded in the store."""
    from portal_sync.ops.offsets import skip_message

    settings = settings_from(bootstrap, store)
    skip_message(settings, topic, partition, offset, reason, operator)
    console.print(
        plain(
            f"{topic}[{partition}] offset {offset} copied to the dead letters and skipped; "
            f"the reconciler resumes at {offset + 1}"
        )
    )


def _warn_of_odd_reasons(reasons: list[str] | None) -> None:
    """A `--reason` that none of the pipeline's reason codes is selected nothing, without
    a word, when misspelt; letters that carry it (written by another tool, or forged) can
    still be selected by it, after a warning."""
    from schemas.dead_letter import DEAD_LETTER_REASONS

    # "unknown": what `dlq list` shows for a letter without a reason code
    odd = [code for code in reasons or () if code not in {*DEAD_LETTER_REASONS, "unknown"}]
    if odd:
        said = (f"--reason {', '.join(odd)}: none of the pipeline's reason codes (a typo?): "
                "only letters that carry it are selected")  # fmt: skip
        progress_console.print(markup("[yellow]warning:[/yellow] {}", said))


def _warn_of_an_odd_source(settings: Settings, source: str | None) -> None:
    """A `--source` the registry does not list selected nothing, without a word, when
    misspelt (`replay` applied nothing and exited 0); events or letters that carry it (a
    source since removed from the registry) can still be selected, after a warning."""
    if source is None:
        return
    registry = _readable_registry(settings)
    if registry is None:
        return
    if not registry.development_mode and source not in registry.sources:
        said = (f"--source {source}: not in the source registry (a typo?): only events "
                "and letters that carry it are selected")  # fmt: skip
        progress_console.print(markup("[yellow]warning:[/yellow] {}", said))


def _readable_registry(settings: Settings) -> Registry | None:
    """The registry, or None when its file cannot be read: nothing is known to be a source
    or a key (the command's own reading of the rules, if any, says what is wrong)."""
    from consumers.config import RulesError, load_registry

    try:
        return load_registry(settings.registry)
    except RulesError:
        return None


def _key_shown(registry: Registry | None, key_id: str | None) -> str:
    """A letter's signing key id (`ps.kid`, as its sender wrote it) when the registry lists
    it; any other is only said to be unlisted: the header may hold anything, a personal id
    among them."""
    if key_id is None:
        return "(unsigned)"
    if registry is not None and key_id in registry.keys:
        return key_id
    return "(a key the registry does not list)"


def _source_shown(registry: Registry | None) -> Callable[[str | None, str], str]:
    """How a letter's source is shown: as it is when the registry lists it, else
    `(unregistered)`: a refused event's `source` may be a name (`dlq._source_of` keeps
    only source ids without a long number). In development mode every source id shows;
    with no registry that could be read (`_readable_registry`), none."""

    def shown(source: str | None, unreadable: str) -> str:
        if source is None:
            return unreadable
        if registry is not None and (registry.development_mode or source in registry.sources):
            return source
        return "(unregistered)"

    return shown


def _num(value: int | None) -> str:
    return "–" if value is None else str(value)


def register(app: typer.Typer) -> None:
    app.command()(replay)
    app.command()(rebuild)
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(offsets_app, name="offsets")
