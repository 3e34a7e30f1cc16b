"""Compacted change topics: after the log cleaner removed old versions, `rebuild --compare`
still reproduces the live store from Kafka alone."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

import pytest
from kafka.admin import ConfigResource, ConfigResourceType

from consumers.merge import Authority
from store.core import Store
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    write_jsonl,
)
from transport import clients
from transport.reader import RangeReader, Selection

pytestmark = pytest.mark.kafka

# The cleaner may work at once on every closed segment, and a segment closes 100 ms after
# it opened (at the next append). Compaction is held back (min.compaction.lag.ms) while the
# live worker reads, then let go.
QUICK = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"}
HOLD = {"min.compaction.lag.ms": "3600000"}


def _create_topics(settings: Any, overrides: dict[str, str]) -> None:
    specs = settings.topics().specs()
    admin = clients.admin(settings.connection())
    try:
        for name in settings.topics().change_topics():
            specs[name]["configs"] = specs[name]["configs"] | overrides
        admin.create_topics(specs, timeout_ms=30_000)
        admin.wait_for_topics(list(specs), timeout_ms=30_000)
    finally:
        admin.close()


def _alter(settings: Any, configs: dict[str, str]) -> None:
    admin = clients.admin(settings.connection())
    try:
        admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs)
             for name in settings.topics().change_topics()]
        )  # fmt: skip
    finally:
        admin.close()


def _records_in_topics(settings: Any) -> int:
    with RangeReader(settings.connection()) as reader:
        ranges = reader.resolve(Selection(settings.topics().change_topics()))
        return sum(len(batch) for batch in reader.read(ranges))


def _publish(settings: Any, path: Path, events: list[dict[str, Any]]) -> None:
    result = cli(settings, "publish", str(write_jsonl(path, events)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rebuild_is_exact_after_compaction_removed_old_versions(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    spec = settings.topics().specs()[settings.topics().change_topic("citizen")]["configs"]
    assert spec["cleanup.policy"] == "compact"  # the shipped topics, not the test's choice
    _create_topics(settings, QUICK | HOLD)
    # Several sources, several versions each, deletes among the last ones; each version
    # in its own round, so that the earlier rounds sit in closed segments.
    events = citizen_events(15, 4, seed=21)
    for version in range(1, 5):
        _publish(settings, tmp_path / f"v{version}.jsonl",
                 [e for e in events if e["version"] == version])  # fmt: skip
        time.sleep(0.3)
    assert cli(settings, "worker", "--until-caught-up").returncode == 0

    _alter(settings, {"min.compaction.lag.ms": "0"})
    # A last event closes the active segment of its partition; the worker applies it too.
    last = citizen_events(1, 1, seed=99)
    _publish(settings, tmp_path / "last.jsonl", last)
    assert cli(settings, "worker", "--until-caught-up").returncode == 0

    published = len(events) + len(last)
    deadline = time.monotonic() + 120
    while (kept := _records_in_topics(settings)) >= published:
        assert time.monotonic() < deadline, "the log cleaner removed nothing in 120 s"
        time.sleep(2)
    assert kept < published

    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    (tmp_path / "rebuilt-url").write_text(rebuilt + "\n")
    result = cli(settings, "rebuild", "--store-file", str(tmp_path / "rebuilt-url"), "--compare")

    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("only_live: 0", "only_rebuilt: 0", "different: 0"):
        assert line in result.stdout
    # The cleaner may go on (partition after partition) while the rebuild reads: it read
    # at most what was counted, and fewer than were published.
    read = re.search(r"from (\d+) events", result.stdout)
    assert read is not None and int(read[1]) <= kept < published, result.stdout
    copy = settings.model_copy(update={"store_url": rebuilt})
    # both equal the merge of what was published, not only each other
    assert exported(settings) == expected_export(events + last, Authority())
    assert exported(copy) == exported(settings)
    assert Store(rebuilt).all_offsets() == Store(settings.store_url).all_offsets()


def test_a_worker_behind_the_log_cleaner_applies_what_compaction_kept(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """A worker that stopped for longer than the change retention (or a store restored
    from an old backup): the log cleaner removed versions it had not applied, so the log
    has no record at the store's next offset. The worker reads on from where its fetch
    began (it took the gap for a lost position and read again, forever) and reaches the
    same records as a worker that saw every version; its journal's ranges may skip what
    the cleaner removed, never overlap."""
    settings = settings_for(sqlite_store_url)
    _create_topics(settings, QUICK | HOLD)
    events = citizen_events(15, 4, seed=22)
    _publish(settings, tmp_path / "v1.jsonl", [e for e in events if e["version"] == 1])
    assert cli(settings, "worker", "--until-caught-up").returncode == 0
    applied_before = sum(Store(settings.store_url).all_offsets().values())

    for version in range(2, 5):  # the worker is stopped meanwhile
        time.sleep(0.3)
        _publish(settings, tmp_path / f"v{version}.jsonl",
                 [e for e in events if e["version"] == version])  # fmt: skip
    _alter(settings, {"min.compaction.lag.ms": "0"})
    time.sleep(0.3)
    last = citizen_events(1, 1, seed=98)  # closes the active segments' partition
    _publish(settings, tmp_path / "last.jsonl", last)
    published = len(events) + len(last)
    deadline = time.monotonic() + 120
    while _records_in_topics(settings) >= published:
        assert time.monotonic() < deadline, "the log cleaner removed nothing in 120 s"
        time.sleep(2)

    worker = cli(settings, "worker", "--until-caught-up", timeout=120)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    store = Store(settings.store_url)
    assert sum(store.all_offsets().values()) == published > applied_before
    assert exported(settings) == expected_export(events + last, Authority())
    for tp, ranges in store.journal().items():
        for (_, end), (first, _) in itertools.pairwise(ranges):
            assert first >= end, f"journal of {tp} overlaps: {ranges}"
    store.close()
