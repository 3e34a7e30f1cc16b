"""One exit-code map (`portal_sync.cli.EXIT_CODES`): a command raises an error of its
family and the entry point ends the process with that family's code and a one-line
message. Before, commands chose codes themselves: a wrong `lag --offsets-from` exited 1
like a refusal, an existing scaffold directory 2 like a wrong setting, `kafka up`'s
broker that did not start 1 and `kafka down`'s missing cluster 2, and `rebuild --compare`
exited 2, a configuration error's code, when the stores differed."""

from __future__ import annotations

import ast
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal_sync.cli import main_entry

CLI = Path(__file__).resolve().parents[2] / "portal_sync" / "cli"


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    """The entry point sets the process's umask (0077): this process's is kept."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["portal-sync", *args])
    with pytest.raises(SystemExit) as ended:
        main_entry()
    code = ended.value.code
    return (code if isinstance(code, int) else 1), " ".join(capsys.readouterr().err.split())


def test_a_wrong_flag_value_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = run(monkeypatch, capsys, "lag", "--offsets-from", "nowhere")
    assert code == 2 and "error: --offsets-from must be 'store' or 'kafka'" in said, said


def test_a_redrive_that_selects_nothing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = run(monkeypatch, capsys, "dlq", "redrive")
    assert code == 2 and "error: select dead letters" in said, said


def test_a_wrong_scaffold_name_is_a_configuration_error_and_an_existing_one_a_refusal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, said = run(monkeypatch, capsys, "adapters", "new", "Hue", "--dir", str(tmp_path))
    assert code == 2 and said.startswith("error: name: lowercase"), said
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "portal-sync-adapter-hue-vendor").mkdir()
    code, said = run(monkeypatch, capsys, "adapters", "new", "hue-vendor", "--dir", str(tmp_path))
    assert code == 1 and said.startswith("refused:") and "already exists" in said, said


def test_kafka_down_of_a_node_where_no_cluster_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, said = run(
        monkeypatch, capsys, "kafka", "down", "--node", "2", "--data-dir", str(tmp_path)
    )
    assert code == 2 and "holds no local cluster" in said, said


def test_no_command_picks_an_error_code_of_its_own() -> None:
    """`typer.Exit` ends a command with its result (0, or 1 for a check that found
    something, 128 + a signal); an error's code comes from the map."""
    chosen = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Exit"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value not in (0, 1)
            ):
                chosen.append(f"{path.name}:{node.lineno}")
    assert chosen == []


def test_what_did_not_start_is_no_configuration_error() -> None:
    """A broker that exited or never answered, jars Maven could not fetch, a demo whose
    worker died: exit 1 and "error:", apart from a wrong setting (2) or a refusal."""
    from portal_sync.cli import exit_code
    from portal_sync.demo.model import DemoError, DemoFailed
    from schemas.errors import Refused
    from transport.local import KafkaSetupError, KafkaStartFailed

    assert exit_code(KafkaSetupError("port 9092 is taken by another process")) == 2
    assert exit_code(KafkaStartFailed("the broker exited during start")) == 1
    assert not isinstance(KafkaStartFailed("x"), Refused)
    assert exit_code(DemoError("pass --reset")) == 1 and isinstance(DemoError("x"), Refused)
    assert exit_code(DemoFailed("the worker exited (3)")) == 1
    assert not isinstance(DemoFailed("x"), Refused)


def test_sigterm_and_sighup_end_a_command_through_its_clean_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """They killed a command without its `finally` blocks: an export interrupted by a
    closed SSH session left its partial file of personal data beside the target. A signal
    the parent ignored (`nohup`) stays ignored."""
    import signal

    import portal_sync.cli as cli

    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    cleaned: list[int] = []

    def command(**_: object) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM):
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the signal arrives here
            except SystemExit as ended:
                cleaned.append(int(str(ended.code)))
                signal.signal(sig, cli._exit_on_signal)  # as the entry point left it
        raise SystemExit(0)

    try:
        for sig in kept:
            signal.signal(sig, signal.SIG_DFL)
        monkeypatch.setattr(cli, "app", command)
        with pytest.raises(SystemExit):
            main_entry()
        assert cleaned == [128 + signal.SIGHUP, 128 + signal.SIGTERM]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup portal-sync …`
        with pytest.raises(SystemExit):
            main_entry()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
