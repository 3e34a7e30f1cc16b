"""portal-sync: CLI, settings, local broker and the demo."""


def main() -> None:
    """The `portal-sync` command (pyproject's script). The command line is imported here,
    not where the script starts: a worker's validator processes are spawned, and a spawned
    child runs its parent's script again as its main module, so a script that imported
    the command line at its top made every child import Typer and Rich (about 10 MB each)
    that it never uses."""
    from portal_sync.cli import main_entry

    main_entry()
