"""The pipeline's commands: topics, publish, worker, export, demo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from observability.terminal import plain
from portal_sync.cli.options import (
    PORT,
    BootstrapOpt,
    CaughtUpWaitOpt,
    ReaderOpt,
    ReasonOpt,
    StoreOpt,
    settings_from,
)
from portal_sync.cli.options import err_console as console
from portal_sync.settings import Settings
from schemas.errors import ConfigurationError

if TYPE_CHECKING:
    from consumers.registry import Registry


def register(app: typer.Typer) -> None:
    app.command()(topics)
    app.command()(publish)
    app.command()(worker)
    app.command()(export)
    app.command()(demo)


def topics(bootstrap: BootstrapOpt = None) -> None:
    """Create the change and dead-letter topics that are missing."""
    from transport.admin import check_partition_counts, ensure_topics

    settings = settings_from(bootstrap)
    created = ensure_topics(settings.connection(), settings.topics())
    check_partition_counts(settings.connection(), settings.topics())
    console.print(f"created {', '.join(created)}" if created else "all topics exist")


def publish(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one event per line ('-': stdin)")],
    bootstrap: BootstrapOpt = None,
    sign_key: Annotated[
        Path | None,
        typer.Option("--sign-key", help="Sign every event with this source's key file"),
    ] = None,
    check_store: Annotated[
        bool,
        typer.Option(
            "--check-store",
            help="Refuse a version older than the store holds of its source's view, or than "
            "an earlier line's (sent, it would outlive the newer one in the compacted "
            "topic), skip an equal one, and hold back one whose partition the worker has "
            "not applied",
        ),
    ] = False,
    wait: CaughtUpWaitOpt = 30.0,
    store: StoreOpt = None,
) -> None:
    """Publish events from JSON Lines; invalid lines are reported by number and not sent.
    With --sign-key, every event is signed (lines of another source are refused); without
    it, a line the source registry (PORTAL_SYNC_REGISTRY) wants signed is refused. With
    --check-store (an operator's corrections), as `dlq redrive`: a version older than the
    store's (--store) or an earlier line's is refused, and so is one whose partition the
    worker has not applied to the log's end (held back: publish it again); one equal to
    them is not sent."""
    from portal_sync.ops.publish import HELD_BACK, publish_lines
    from producers.signing import load_signer
    from store import Store

    try:
        handle = sys.stdin.buffer if str(file) == "-" else file.open("rb")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigurationError(f"cannot read {file}: {reason}") from None
    with handle:
        settings = settings_from(bootstrap, store)
        signer = load_signer(sign_key) if sign_key is not None else None
        registry = None if signer is not None else _registry(settings)
        against = Store(settings.store_url) if check_store else None
        try:
            if against is not None:
                against.require_schema()
            result = publish_lines(settings, handle, signer, against, wait, registry)
        finally:
            if against is not None:
                against.close()
    for number, code, message in result.invalid:
        console.print(plain(f"line {number}: {code}: {message}"))
    held = sum(code == HELD_BACK for _, code, _ in result.invalid)
    present = f", already in the store or the file {result.present}" if check_store else ""
    waiting = f", held back {held} (publish them again)" if held else ""
    console.print(
        f"published {result.sent}, invalid {len(result.invalid) - held}{present}{waiting}"
    )
    if result.invalid:
        raise typer.Exit(1)


def worker(
    until_caught_up: Annotated[
        bool,
        typer.Option(
            "--until-caught-up", help="Exit 0 once caught up with the end offsets seen at start"
        ),
    ] = False,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", **PORT)] = None,
) -> None:
    """Run the reconciler: change topics to the national store."""
    from portal_sync.ops.worker import run_worker

    settings = settings_from(bootstrap, store)
    if metrics_port is not None:
        settings.metrics_port = metrics_port
    raise typer.Exit(run_worker(settings.worker_config(), until_caught_up=until_caught_up))


def export(
    entity: Annotated[str | None, typer.Option("--entity")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    provenance: Annotated[
        bool, typer.Option("--provenance", help="Add each field's source and version")
    ] = False,
    reason: ReasonOpt = None,
    operator: ReaderOpt = None,
    store: StoreOpt = None,
) -> None:
    """Dump canonical records as sorted JSON Lines (a stable, diffable snapshot).
    Needs --reason (recorded in the access log)."""
    from portal_sync.ops.access import record_access, record_key, require_reason
    from store.export import export_records

    why = require_reason("export", reason)
    settings = Settings.from_flags(store=store)
    # Opened before the access log: an export that cannot be written reads nothing.
    partial = target = None
    try:
        if output is not None:
            target, partial = _written_beside(output)
        handle = sys.stdout if target is None else (partial or target).open("w", encoding="utf-8")
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        cause = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigurationError(f"--output {output}: {cause}") from None
    done = False
    try:
        record_access(settings.store_url, "export", why, operator, [record_key(entity, None)])
        count = export_records(settings.store_url, handle, entity, provenance=provenance)
        done = True
    finally:
        if target is not None:
            handle.close()
        if partial is not None and target is not None:
            if done:
                partial.replace(target)
            else:
                partial.unlink(missing_ok=True)
    console.print(f"exported {count} records")


def _registry(settings: Settings) -> Registry | None:
    """The source registry publish checks unsigned lines against (None: development mode)."""
    from consumers.config import load_registry

    if settings.registry is None:
        return None
    return load_registry(settings.registry)


def _written_beside(output: Path) -> tuple[Path, Path | None]:
    """Where an export to `output` goes: (the file, where it is written before it is renamed
    over it). Written beside, an export that fails (the store away, the access log refused)
    leaves an earlier file as it was. Written into as it is (None beside it): a file that is
    not a regular one, or a path under /dev or /proc (/dev/null, a named pipe, /dev/stdout
    even when the shell sent it to a file: renamed over, a pipe became a regular file of
    personal data, `>>` lost what the file held, and as root /dev/null itself was
    replaced). Our own symlink's file is replaced, not the link; a symlink another user
    owns is refused: followed, one planted in a shared directory had the export replace
    the file it names (its owner's `authorized_keys`) with personal data."""
    absolute = output.absolute()
    if absolute.parts[1:2] in (("dev",), ("proc",)):
        return output, None
    if output.is_symlink():
        if output.lstat().st_uid != os.geteuid():
            raise PermissionError(0, "a symlink another user owns: give the file itself")
        output = output.resolve(strict=False)
    if output.exists() and not output.is_file():
        return output, None
    return output, output.with_name(f".{output.name}.partial")


def demo(
    people: Annotated[int, typer.Option(help="Citizens in the sample population")] = 3000,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help="On a configured cluster: allow deleting and recreating the demo's own topics "
            "and group (a store holding other data is refused whatever this says)",
        ),
    ] = False,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure/--plain",
            help="The demo's own local broker secured (SASL_SSL, ACLs, a principal per "
            "source; the default), or plaintext; a configured cluster is used as it is",
        ),
    ] = True,
    bootstrap: BootstrapOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run the whole pipeline on sample provinces and a ministry, then check the store."""
    from portal_sync.demo import run_demo

    settings = Settings.from_flags(bootstrap, store)
    # DemoError (refused here) and DemoFailed (its pipeline) end it through the map
    ok = run_demo(settings, people=people, allow_reset=reset, secure=secure)
    raise typer.Exit(0 if ok else 1)
