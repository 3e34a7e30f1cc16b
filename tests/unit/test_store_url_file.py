"""The store URL (and `rebuild`'s target) can come from a file, so that no password has to
be given as a command-line flag, visible to every user in `ps`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from portal_sync.settings import Settings
from schemas.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "pw-7f3a@x"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    base.update(COLUMNS="200", **env)
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True, text=True, env=base, cwd=ROOT, timeout=120,
    )  # fmt: skip


def _url_file(tmp_path: Path, url: str, name: str = "store-url") -> Path:
    path = tmp_path / name
    path.write_text(url + "\n", encoding="utf-8")
    return path


def test_the_store_url_is_read_from_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("PORTAL_SYNC_STORE_URL_FILE", str(_url_file(tmp_path, url)))
    monkeypatch.delenv("PORTAL_SYNC_STORE_URL", raising=False)
    assert Settings().store_url == url
    assert Settings.from_flags(store=url).store_url == url  # the same URL twice is fine


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("", "must hold one line"),
        ("postgresql://u:a@h/db\npostgresql://u:b@h/db", "must hold one line"),
    ],
)
def test_an_unreadable_or_malformed_url_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, message: str
) -> None:
    path = tmp_path / "store-url"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("PORTAL_SYNC_STORE_URL_FILE", str(path))
    with pytest.raises(ConfigurationError, match=message) as raised:
        Settings()
    assert "PORTAL_SYNC_STORE_URL_FILE" in str(raised.value) and str(path) in str(raised.value)


def test_a_url_and_a_url_file_that_differ_are_refused_without_showing_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _url_file(tmp_path, f"postgresql+psycopg://sync:{SECRET}@db/portal")
    monkeypatch.setenv("PORTAL_SYNC_STORE_URL_FILE", str(path))
    monkeypatch.setenv("PORTAL_SYNC_STORE_URL", "postgresql+psycopg://sync:other@db/portal")
    with pytest.raises(ConfigurationError, match="both given and differ") as raised:
        Settings()
    assert SECRET not in str(raised.value) and "other" not in str(raised.value)


def test_a_command_uses_the_store_of_the_url_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'from-file.db'}"
    result = run_cli("store", "upgrade", PORTAL_SYNC_STORE_URL_FILE=str(_url_file(tmp_path, url)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-file.db").exists()

    conflict = run_cli(
        "store", "upgrade", "--store", f"sqlite:///{tmp_path / 'other.db'}",
        PORTAL_SYNC_STORE_URL_FILE=str(_url_file(tmp_path, url)),
    )  # fmt: skip
    assert conflict.returncode == 2 and "differ" in conflict.stderr
    assert not (tmp_path / "other.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "rebuild needs the new store"),
        (("--store-file", "/nonexistent/url"), "cannot read /nonexistent/url"),
        (("--store", f"postgresql://u:{SECRET}@h/new", "--store-file", "{file}"), "differ"),
    ],
)
def test_rebuild_takes_its_target_from_a_file_and_refuses_a_missing_or_conflicting_one(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    file = _url_file(tmp_path, f"sqlite:///{tmp_path / 'new.db'}")
    result = run_cli("rebuild", *(arg.format(file=file) for arg in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())
    assert SECRET not in result.stdout + result.stderr
