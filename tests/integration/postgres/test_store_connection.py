"""The store's PostgreSQL connections give up on a server that has gone silent: libpq's
TCP keepalives, unless the URL sets its own.

A silent server (packets dropped) cannot be made here without a firewall, so this checks
what the connections were opened with, as libpq reports it."""

from __future__ import annotations

from typing import Any

from store.core import Store
from store.engine import KEEPALIVES


def parameters(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            return dict(conn.connection.driver_connection.info.get_parameters())
    finally:
        store.close()


def test_a_store_connection_gives_up_on_a_silent_server(postgres_store_url: str) -> None:
    opened = parameters(postgres_store_url)
    assert {name: opened.get(name) for name in KEEPALIVES} == {
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
    }


def test_the_urls_own_tcp_settings_win(postgres_store_url: str) -> None:
    opened = parameters(postgres_store_url + "?keepalives_idle=60")
    assert opened.get("keepalives_idle") == "60"
    assert "keepalives_count" not in opened  # none of ours beside the URL's
