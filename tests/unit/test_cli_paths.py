"""A path a command cannot use is a one-line error with exit 2 (the usage's), never a
traceback (FileNotFoundError, IsADirectoryError before)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from portal_sync.cli import app
from schemas.errors import ConfigurationError


def _export(tmp_path: Path, output: str) -> Result:
    """`export --output OUTPUT` of an empty store in `tmp_path`."""
    from store import Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).create_schema()
    return CliRunner().invoke(
        app, ["export", "--reason", "audit", "--output", output, "--store", url]
    )


def _linked(tmp_path: Path, directory: str, name: str, text: str) -> tuple[Path, Path]:
    """A file `directory/name` holding `text`, and a symlink to it in `tmp_path`."""
    (tmp_path / directory).mkdir()
    target = tmp_path / directory / name
    target.write_text(text)
    link = tmp_path / f"link-{name}"
    link.symlink_to(target)
    return target, link


def test_an_export_that_cannot_be_written_reads_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    result = CliRunner().invoke(
        app,
        ["export", "--reason", "audit", "--output", str(tmp_path / "no" / "such" / "dir.jsonl"),
         "--store", f"sqlite:///{store}"],
    )  # fmt: skip
    assert isinstance(result.exception, ConfigurationError)  # exit 2 (cli.EXIT_CODES)
    said = str(result.exception)
    assert "--output" in said and "No such file or directory" in said
    assert not store.exists()  # nor the access log written: nothing was read


def test_dlq_import_of_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    for given in (tmp_path / "missing.jsonl", tmp_path):
        result = CliRunner().invoke(app, ["dlq", "import", str(given)])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_misspelt_entity_is_refused_by_conflicts_and_remerge(tmp_path: Path) -> None:
    """They printed an empty report (exit 0), where show, export and replay refuse."""
    from schemas.errors import Refused

    store = f"sqlite:///{tmp_path / 'store.db'}"
    for command in (["conflicts"], ["remerge", "--dry-run"]):
        result = CliRunner().invoke(app, [*command, "--entity", "citzen", "--store", store])
        assert isinstance(result.exception, Refused), result.output
        assert "--entity citzen: not one of citizen" in str(result.exception)
    assert not (tmp_path / "store.db").exists()


def test_an_export_that_fails_leaves_the_earlier_file_as_it_was(tmp_path: Path) -> None:
    """It emptied the output first: a store away left yesterday's export empty."""
    earlier = tmp_path / "records.jsonl"
    earlier.write_text('{"entity": "citizen"}\n')
    result = CliRunner().invoke(
        app,
        ["export", "--reason", "audit", "--output", str(earlier),
         "--store", f"sqlite:///{tmp_path / 'none' / 'store.db'}"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert earlier.read_text() == '{"entity": "citizen"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_a_reading_command_given_a_store_in_a_missing_directory_makes_nothing(
    tmp_path: Path,
) -> None:
    """The engine made the file's directory for every command: a mistyped path left an
    empty directory behind. Only the commands that create a store make it."""
    from store import Store

    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'store.db'}"
    for command in (["conflicts"], ["export", "--reason", "audit"]):
        result = CliRunner().invoke(app, [*command, "--store", url])
        assert isinstance(result.exception, ConfigurationError), result.output
        assert "holds no portal-sync schema" in str(result.exception)
    assert list(tmp_path.iterdir()) == []
    Store(url).create_schema()  # a worker's start: the directory made, private
    assert (tmp_path / "no" / "such" / "store.db").exists()
    assert (tmp_path / "no" / "such").stat().st_mode & 0o777 == 0o700


def test_an_export_replaces_the_file_once_written(tmp_path: Path) -> None:
    output = tmp_path / "records.jsonl"
    output.write_text("stale\n")
    result = _export(tmp_path, str(output))
    assert result.exit_code == 0, result.output
    assert output.read_text() == ""  # an empty store: no records, the stale line gone
    assert not (tmp_path / ".records.jsonl.partial").exists()


def test_an_export_into_a_named_pipe_writes_into_it_and_leaves_it_a_pipe(tmp_path: Path) -> None:
    """Written beside and renamed over, a pipe was replaced by a regular file of personal
    data, and `--output /dev/null` as root replaced /dev/null itself."""
    import os
    import stat
    import threading

    pipe = tmp_path / "records.pipe"
    os.mkfifo(pipe)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()))
    reader.start()
    result = _export(tmp_path, str(pipe))
    reader.join(10)
    assert result.exit_code == 0, result.output
    assert read == [b""]  # an empty store: the pipe read to its end
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_an_export_through_a_symlink_replaces_the_file_and_keeps_the_link(tmp_path: Path) -> None:
    target, link = _linked(tmp_path, "exports", "records.jsonl", "stale\n")
    result = _export(tmp_path, str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == ""
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["records.jsonl"]


def test_an_export_into_a_proc_or_dev_path_writes_into_it(tmp_path: Path) -> None:
    """`--output /dev/stdout` with the shell's `>> all.jsonl` resolved to that file and
    was renamed over it (what it held lost); a path under /dev or /proc is a stream."""
    import os
    import threading

    read_end, write_end = os.pipe()
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(os.read(read_end, 1 << 16)))
    reader.start()
    try:
        result = _export(tmp_path, f"/proc/self/fd/{write_end}")
    finally:
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert result.exit_code == 0, result.output
    assert read == [b""]  # an empty store; the pipe's end reached


def test_a_symlink_another_user_owns_is_refused(tmp_path: Path) -> None:
    """Followed and renamed over, a symlink planted by another user replaced the file it
    names (its owner's `authorized_keys`) with personal data."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to give the symlink another owner")
    target, link = _linked(tmp_path, "home", "authorized_keys", "ssh-ed25519 AAAA\n")
    os.lchown(link, 65534, 65534)
    result = _export(tmp_path, str(link))
    assert isinstance(result.exception, ConfigurationError), result.output
    assert "a symlink another user owns" in str(result.exception)
    assert link.is_symlink() and target.read_text() == "ssh-ed25519 AAAA\n"
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["authorized_keys"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
