"""The deployment file, entry-point discovery, the pytest plugin's fixture, scaffold names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portal_sync.settings import Settings, deployment_settings
from producers.adapters import installed, load
from producers.adapters.sql import SqlAdapter
from producers.deployment import load_deployment
from producers.scaffold import scaffold
from producers.sdk import ConfigurationError
from schemas import errors
from tests.support.adapter_helpers import write_config

FILES = """
[[sources]]
id = "exports"
source = "province-02"
adapter = "filedrop"

[sources.connection]
directory = "${{INBOX}}"

[sources.mapping]
entity = "citizen"
key_field = "pid"
occurred_at_field = "at"
fields = {{ full_name = "name" }}
{extra}
"""


def test_built_in_adapters_are_registered_entry_points() -> None:
    assert {"sql", "outbox", "filedrop", "portal"} <= set(installed())
    assert load("sql") is SqlAdapter


def test_references_resolve_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, FILES.format(extra=""))
    deployment = load_deployment(config, environ={"INBOX": "drop/in"})
    adapter = deployment.adapter(deployment.sources[0])
    assert adapter.directory == tmp_path / "drop" / "in"  # type: ignore[attr-defined]
    assert deployment.state_dir == tmp_path / "state"
    assert "${INBOX}" in deployment.redacted()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[sources]]\nid = 'A b'\nadapter = 'sql'\n", "sources.0.id: String should match"),
        (FILES.format(extra="") * 2, "duplicate source ids: exports"),
        ("[[sources]]\nid = 'x1'\nadapter = 'sql'\ninterval = 5\n", "interval: Extra inputs"),
        ("[producer\n", "is not valid TOML"),
    ],
)
def test_invalid_files_are_refused_with_the_reason(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(body)
    with pytest.raises(ConfigurationError, match=message):
        load_deployment(path, environ={"INBOX": "in"})


def test_adapter_options_are_validated_per_source(tmp_path: Path) -> None:
    config = write_config(tmp_path, FILES.format(extra='format = "xml"'))
    deployment = load_deployment(config, environ={"INBOX": "in"})
    expected = r"source exports \(filedrop\): format: Input should be"
    with pytest.raises(ConfigurationError, match=expected):
        deployment.adapter(deployment.sources[0])


def test_kafka_section_overrides_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "sources.toml"
    config.write_text('sources = []\n[kafka]\nbootstrap = "k1:9092"\ntopic_prefix = "hn"\n')
    deployment = load_deployment(config)
    settings = deployment_settings(deployment, Settings(kafka_bootstrap="other:1"))
    assert (settings.kafka_bootstrap, settings.topic_prefix) == ("k1:9092", "hn")


def test_the_plugin_fixture_reports_on_a_configured_source(
    tmp_path: Path, adapter_conformance: Callable[..., Any]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"pid": "001090000001", "at": "2025-08-01"}\n')
    os.utime(tmp_path / "in" / "a.jsonl", (1_000, 1_000))  # complete: past the settle time
    config = write_config(tmp_path, FILES.replace("${{INBOX}}", "in").format(extra=""))
    report = adapter_conformance(config, "exports")
    assert report.passed and len(report.first.emitted) == 1


@pytest.mark.parametrize("name", ["Hue", "x", "hue_vendor", "-hue"])
def test_scaffold_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="name: lowercase"):
        scaffold(name, tmp_path)
    assert list(tmp_path.iterdir()) == []
