"""Tests of this folder need Helm (built by `deploy/install-system.sh --postgres`): all of
them carry the `helm` marker. A missing Helm fails them, in CI and out of it."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.helm)
