"""`show`, `history`, `conflicts` print what the store holds as text: Rich markup and bidi
overrides in the data are shown as written, never interpreted (subprocesses, SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from consumers.merge import Authority
from store.core import Store
from tests.support.store_helpers import CITIZEN, REGISTRY, Feed, event

ROOT = Path(__file__).resolve().parents[2]
LINK = "[link=https://evil.example]Nguyễn Văn An[/link]"
BROKEN = "Trần [/] Thị Bích"
BIDI = "Lê \u202egnp.exe"


def run_cli(*args: str, color: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    env.pop("FORCE_COLOR", None)
    env.update(COLUMNS="400", **({"FORCE_COLOR": "1"} if color else {}))
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip


@pytest.fixture
def hostile(tmp_path: Path) -> str:
    """A citizen whose sources disagree on a name that is markup, a hyperlink (valid under
    the contract) and a bidi override (written into the store directly)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    feed = Feed(
        store, Authority.from_mapping({"citizen": {"full_name": ["province-01"]}}, REGISTRY)
    )
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": BROKEN}))
    feed.apply(event("citizen", CITIZEN, "province-01", 2, {"full_name": LINK}))
    feed.apply(event("citizen", CITIZEN, "province-79", 1, {"full_name": "Lê XBIDIX"}))
    store.close()
    # The contract now refuses format characters; a store may still hold some from before.
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("source_views", "records", "field_conflicts"):
            column = "sources" if table == "field_conflicts" else "data"
            conn.execute(
                text(f"UPDATE {table} SET {column} = replace({column}, 'XBIDIX', :bidi)"),
                {"bidi": "\u202egnp.exe"},
            )
    engine.dispose()
    return url


@pytest.mark.parametrize("command", ["show", "history"])
def test_markup_in_data_is_shown_as_written(hostile: str, command: str) -> None:
    result = run_cli(command, "citizen", CITIZEN, "--store", hostile, "--reason", "test")

    assert result.returncode == 0, result.stderr  # was: MarkupError on "[/]"
    assert LINK in result.stdout
    assert "\u202e" not in result.stdout
    if command == "show":  # province-79's view
        assert "Lê \\u202egnp.exe" in result.stdout
    else:  # the canonical name's changes
        assert f"full_name: {BROKEN} → {LINK}" in result.stdout


@pytest.mark.parametrize("command", ["show", "history"])
def test_a_link_in_data_is_no_hyperlink(hostile: str, command: str) -> None:
    result = run_cli(
        command, "citizen", CITIZEN, "--store", hostile, "--reason", "test", color=True
    )

    assert result.returncode == 0, result.stderr
    assert "\x1b]8;" not in result.stdout  # OSC 8: a clickable link
    assert "https://evil.example" in result.stdout


def test_conflicts_print_the_fields_as_text(hostile: str) -> None:
    result = run_cli("conflicts", "--store", hostile)
    assert result.returncode == 0, result.stderr
    assert "full_name" in result.stdout and "province-01 ↔ province-79" in result.stdout
