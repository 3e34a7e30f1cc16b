"""Adapters by entry point: one name, one adapter."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from producers import adapters
from producers.sdk import ConfigurationError

GROUP = adapters.GROUP


def test_two_adapters_installed_under_one_name_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in named like a built-in: which one loaded depended on the installs' order."""
    found = [
        EntryPoint("sql", "producers.adapters.sql:SqlAdapter", GROUP),
        EntryPoint("sql", "portal_sync_adapter_sql.adapter:SqlAdapter", GROUP),
        EntryPoint("outbox", "producers.adapters.outbox:OutboxAdapter", GROUP),
    ]
    monkeypatch.setattr(
        adapters, "entry_points", lambda group: [e for e in found if e.group == group]
    )
    with pytest.raises(ConfigurationError, match="two adapters are installed as 'sql'"):
        adapters.load("sql")
    assert adapters.load("outbox").__name__ == "OutboxAdapter"
