"""The conformance checks as a pytest plugin (entry point `pytest11`).

In an adapter's repository, one line in a test module runs every check on every source of
its example configuration, one test per (source, check):

    test_conformance = conformance_tests("../example.toml")  # path relative to this file

The plugin also provides the `adapter_conformance` fixture: a function (config path,
source id) -> ConformanceReport, for tests that want the report itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from producers.conformance import CHECKS, ConformanceReport, check_adapter
from producers.deployment import load_deployment


@cache
def _report(config: Path, source_id: str, limit: int | None) -> ConformanceReport:
    deployment = load_deployment(config)
    (entry,) = deployment.enabled(source_id)
    adapter = deployment.adapter(entry)
    try:
        return check_adapter(adapter, entry.id, entry.adapter, limit)
    finally:
        adapter.close()


def run_conformance(
    config: str | Path, source_id: str, limit: int | None = None
) -> ConformanceReport:
    """The (cached) conformance report of one configured source."""
    return _report(Path(config).resolve(), source_id, limit)


def conformance_tests(
    config: str | Path, source: str | None = None, limit: int | None = None
) -> Callable[[str, str], None]:
    """A test function parametrized over the configuration's sources and the checks."""
    path = Path(config)
    if not path.is_absolute():
        caller = inspect.stack()[1].filename
        path = Path(caller).parent / path
    sources = [entry.id for entry in load_deployment(path).enabled(source)]

    @pytest.mark.parametrize("check", CHECKS)
    @pytest.mark.parametrize("source_id", sources)
    def test_adapter_conformance(source_id: str, check: str) -> None:
        result = run_conformance(path, source_id, limit).result(check)
        examples = "".join(f"\n  {example}" for example in result.examples)
        assert result.passed, f"{source_id}: {check}: {result.detail}{examples}"

    return test_adapter_conformance


@pytest.fixture
def adapter_conformance() -> Callable[..., ConformanceReport]:
    return run_conformance
