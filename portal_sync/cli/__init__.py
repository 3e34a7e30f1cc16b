"""The `portal-sync` command line (Typer): one module per command group.

A command parses its options, makes one call into the layer below and renders the result.
Command modules never import each other; shared options live in `options`. Every expected
error reaches the user as one line and an exit code (`EXIT_CODES`), never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from observability.terminal import markup
from portal_sync.cli import (
    access,
    adapters,
    kafka,
    keys,
    observability,
    ops,
    pipeline,
    source,
    store,
)
from portal_sync.cli.options import err_console
from portal_sync.settings import setting_problems
from schemas.errors import ConfigurationError, PortalSyncError, Refused, TransientError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="portal-sync: record changes of provinces and ministries into the national store.",
)
app.add_typer(kafka.kafka_app, name="kafka")
app.add_typer(adapters.adapters_app, name="adapters")
app.add_typer(keys.keys_app, name="keys")
app.command("produce")(adapters.produce)
pipeline.register(app)
store.register(app)
ops.register(app)
observability.register(app)
access.register(app)
source.register(app)

# How each family of the error taxonomy ends a command.
EXIT_CODES: dict[type[PortalSyncError], int] = {
    ConfigurationError: 2,
    Refused: 1,
    TransientError: 1,
    PortalSyncError: 1,
}


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """portal-sync: record changes of provinces and ministries into the national store."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def exit_code(error: PortalSyncError) -> int:
    for family, code in EXIT_CODES.items():
        if isinstance(error, family):
            return code
    return 1


# Files this process creates (store, exports, state files, keys, logs, a local broker's
# data) are the user's alone: 0600, directories 0700.
PRIVATE_UMASK = 0o077


def settings_error(error: ValidationError) -> ConfigurationError:
    """Which settings are wrong and why, never the values given (a URL may hold a
    password)."""
    problems = setting_problems(error, lambda field: f"PORTAL_SYNC_{field.upper()}")
    return ConfigurationError(f"settings: {problems}")


def _exit_on_signal(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise SystemExit(128 + signum)


def _refuse_undecodable(arguments: list[str]) -> None:
    """An argument that is not UTF-8 (a key typed in another encoding, bytes pasted) ended
    in a traceback where a command first wrote it to the store or the access log. Refused
    here, by its position: the argument itself may be a personal id."""
    for position, argument in enumerate(arguments, 1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            said = f"argument {position} is not UTF-8 text (the terminal's or script's encoding)"
            raise Refused(said) from None


def main_entry() -> None:
    """The console script: expected errors end with their message and exit code."""
    os.umask(PRIVATE_UMASK)
    # SIGTERM and SIGHUP (a closed SSH session) killed a command without its clean-up: an
    # export left its partial file of personal data beside the target. They now end it as
    # an exit does, 128 + the signal, its `finally` blocks and transactions' rollbacks run.
    # Long-running commands (worker, produce, lag-exporter) install their own.
    # A signal the parent had ignored (`nohup`) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)
    try:
        _refuse_undecodable(sys.argv[1:])
        try:
            app(prog_name="portal-sync", standalone_mode=True)
        except ValidationError as error:  # a setting from the environment
            raise settings_error(error) from None
        except SettingsError as error:  # one that is not even JSON (a table's): no value
            field = re.search(r'field "(\w+)"', str(error))
            name = f"PORTAL_SYNC_{field.group(1).upper()}" if field else "a setting"
            raise ConfigurationError(f"settings: {name}: not valid JSON") from None
    except PortalSyncError as error:
        label = "refused" if isinstance(error, Refused) else "error"
        err_console.print(markup("[red]{}:[/red] {}", label, error), highlight=False)
        raise SystemExit(exit_code(error)) from None
