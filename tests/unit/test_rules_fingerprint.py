"""The rules' fingerprint the worker records and replay, rebuild and remerge compare: the
rules files' bytes, the merge rules' revision as code and the Unicode version of NFC. A
toolbox on another release than the workers' (one that merges otherwise), or on another
Python (whose NFC composes characters assigned since otherwise), was let replay into their
store."""

from __future__ import annotations

from pathlib import Path

import pytest

import consumers.config
from consumers.config import rules_fingerprint


def test_the_fingerprint_follows_the_files_and_the_merge_rules_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text("require_signatures = false\n")
    first = rules_fingerprint(registry, None)
    assert rules_fingerprint(registry, None) == first  # the same rules, the same print
    registry.write_text("require_signatures = true\n")
    assert rules_fingerprint(registry, None) != first
    again = rules_fingerprint(registry, None)
    monkeypatch.setattr(
        consumers.config, "MERGE_RULES_REVISION", consumers.config.MERGE_RULES_REVISION + 1
    )  # another release's
    assert rules_fingerprint(registry, None) != again
    assert rules_fingerprint(None, None) != rules_fingerprint(registry, None)
    other = rules_fingerprint(registry, None)
    monkeypatch.setattr(consumers.config, "UNICODE_VERSION", "15.1.0")  # Python 3.13's
    assert rules_fingerprint(registry, None) != other


def test_the_rules_named_in_messages_say_the_merge_rules_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toolbox of another release than the workers' was told to set the registry it
    already had: the messages name the release's merge rules too."""
    registry = tmp_path / "registry.toml"
    assert consumers.config.rules_files(registry, None).endswith(
        f"merge rules {consumers.config.MERGE_RULES_REVISION}, Unicode 14.0.0"
    )
    monkeypatch.setattr(consumers.config, "MERGE_RULES_REVISION", 7)
    monkeypatch.setattr(consumers.config, "UNICODE_VERSION", "15.1.0")
    assert consumers.config.rules_files(None, None).endswith("merge rules 7, Unicode 15.1.0")
