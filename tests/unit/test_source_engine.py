"""The engine the SQL adapters open a source database with."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from producers.sdk import SOURCE_CONNECT_TIMEOUT_SECONDS, source_engine


def _connect_params(url: str) -> dict[str, Any]:
    engine = source_engine(url)
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "do_connect")
    def capture(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
        seen.update(params)
        raise ConnectionAbortedError("captured, not connected")

    with pytest.raises(Exception, match="captured"):
        engine.connect()
    return seen


def test_a_postgresql_source_gives_up_connecting_after_ten_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without it, a source host that drops packets held a run (and its stop) for the
    kernel's two minutes or more."""
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    params = _connect_params("postgresql+psycopg://portal@127.0.0.1:5432/source")
    assert params["connect_timeout"] == SOURCE_CONNECT_TIMEOUT_SECONDS == 10


def test_the_urls_or_libpqs_own_connect_timeout_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    url = "postgresql+psycopg://portal@127.0.0.1:5432/source?connect_timeout=3"
    assert _connect_params(url)["connect_timeout"] == "3"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")
    params = _connect_params("postgresql+psycopg://portal@127.0.0.1:5432/source")
    assert "connect_timeout" not in params


def test_a_sqlite_source_has_no_connect_timeout(tmp_path: Any) -> None:
    assert "connect_timeout" not in _connect_params(f"sqlite:///{tmp_path / 'source.db'}")
