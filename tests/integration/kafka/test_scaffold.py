"""`portal-sync adapters new`: the scaffold installs, passes its own tests, is discovered, runs.

The plug-in is installed into a throwaway virtual environment layered on this one (a .pth
file adds this environment's site-packages), so the project's environment stays clean.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.adapter_helpers import published_events

pytestmark = pytest.mark.kafka


def run(python: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [str(python), *args],
        cwd=cwd,
        env=os.environ | {"COLUMNS": "200"} | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The scaffolded package, installed editable into a throwaway venv: (python, package)."""
    root = tmp_path_factory.mktemp("scaffold")
    made = subprocess.run(
        [sys.executable, "-m", "portal_sync", "adapters", "new", "hue-vendor", "--dir", str(root)],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    package = root / "portal-sync-adapter-hue-vendor"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    layer = f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n"
    (Path(purelib.stdout.strip()) / "portal_sync_parent.pth").write_text(layer)
    pip = ("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(package))
    installed = run(python, *pip, cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python, package


def test_scaffold_passes_its_own_tests_as_generated(plugin: tuple[Path, Path]) -> None:
    python, package = plugin
    result = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout  # one source x seven checks


def test_scaffolded_adapter_is_discovered(plugin: tuple[Path, Path]) -> None:
    python, package = plugin
    result = run(python, "-m", "portal_sync", "adapters", "list", cwd=package)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "hue-vendor" in x)
    assert "portal-sync-adapter-hue-vendor" in line and "citizen" in line
    # the project's own environment does not see it
    own = subprocess.run(
        [sys.executable, "-m", "portal_sync", "adapters", "list"], capture_output=True, text=True
    )
    assert "hue-vendor" not in own.stdout


def test_scaffolded_adapter_runs_through_the_broker(
    plugin: tuple[Path, Path], settings_for: Any, sqlite_store_url: str
) -> None:
    python, package = plugin
    settings = settings_for(sqlite_store_url)
    config = package / "example.toml"
    args = ("-m", "portal_sync", "produce", "--config", str(config), "--once")
    result = run(python, *args, cwd=package, env=settings.as_env())
    assert result.returncode == 0, result.stderr
    assert "hue-vendor-example: published 4, dead-lettered 0" in result.stderr
    events = published_events(settings, "citizen")
    assert sorted((e["key"], e["version"], e["op"]) for e in events) == [
        ("001090000001", 1, "upsert"),
        ("001090000001", 2, "upsert"),
        ("001190000002", 1, "upsert"),
        ("001190000002", 2, "delete"),
    ]
    assert {e["source"] for e in events} == {"hue-vendor"}


def test_the_plugin_tests_fail_when_the_adapter_is_broken(plugin: tuple[Path, Path]) -> None:
    python, package = plugin
    adapter = package / "portal_sync_adapter_hue_vendor" / "adapter.py"
    original = adapter.read_text()
    adapter.write_text(original.replace('int(row["version"])', "1"))
    try:
        result = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package)
    finally:
        adapter.write_text(original)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 6 passed" in result.stdout
    assert "versions rise per key" in result.stdout


def test_the_scaffold_is_clean_for_ruff_and_mypy_strict(plugin: tuple[Path, Path]) -> None:
    """Generated with unsorted imports and a line past ruff's default: the plug-in failed
    its own engineers' checks. (mypy follows no editable install's import hook: the SDK's
    source is given on MYPYPATH, as docs/adapters.md says; installed from a wheel, its
    `py.typed` lets mypy read it.)"""
    python, package = plugin
    for check in (("check", "--select", "E,F,I,UP"), ("format", "--check")):
        result = run(python, "-m", "ruff", check[0], "--isolated", *check[1:], ".", cwd=package)
        assert result.returncode == 0, result.stdout + result.stderr
    module = "portal_sync_adapter_hue_vendor"
    typed = run(python, "-m", "mypy", "--strict", "--no-incremental", module, cwd=package,
                env={"MYPYPATH": str(Path(__file__).resolve().parents[3])})  # fmt: skip
    assert typed.returncode == 0, typed.stdout + typed.stderr


def test_a_name_that_is_installed_already_is_refused(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "portal_sync", "adapters", "new", "sql", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert made.returncode != 0
    assert "an adapter named 'sql' is installed already" in made.stderr
    assert not list(tmp_path.iterdir())
