"""One exit-code map (`portal_sync.cli.EXIT_CODES`): a command raises an error of its
family and the entry point ends the process with that family's code and a one-line
message. Before, commands chose codes themselves: a wrong `lag --offsets-from` exited 1
like a refusal, a refused scaffold name 2 like a wrong setting, and `rebuild --compare`
exited 2, a configuration error's code, when the stores differed."""

from __future__ import annotations

import ast
import os
import sys
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


def test_a_refused_scaffold_name_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, said = run(monkeypatch, capsys, "adapters", "new", "Hue", "--dir", str(tmp_path))
    assert code == 1 and said.startswith("refused:"), said
    assert list(tmp_path.iterdir()) == []


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
