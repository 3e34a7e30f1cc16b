"""`portal-sync keys`: signing keys of the sources."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from observability.terminal import plain
from portal_sync.cli.options import err_console as console

keys_app = typer.Typer(no_args_is_help=True, help="Signing keys of the sources (Ed25519).")


@keys_app.command("new")
def keys_new(
    source: Annotated[str, typer.Argument(help="The source id the key signs for")],
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where to write SOURCE.key (default: ~/.config/portal-sync/keys)"
        ),
    ] = None,
) -> None:
    """Make a signing key: the private key to DIR/SOURCE.key (0600); prints, alone on
    stdout, the entry to add to the source's `public_keys` in the registry."""
    from portal_sync.ops.keys import new_key

    made = new_key(source, directory)
    console.print(plain(f"private key written to {made.path} (mode 0600): keep it secret"))
    if made.shared_directory:
        console.print(plain(f"warning: others can enter {made.path.parent}: make it 0700"))
    console.print(plain(f"add to [sources.{source}] public_keys in the registry:"))
    typer.echo(made.signer.registry_entry())
