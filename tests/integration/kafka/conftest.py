"""Tests of this folder need a real Kafka: all of them carry the `kafka` marker.

`make test` runs this folder in three processes, a file's tests in one, the files in the
order collected (`--no-loadscope-reorder`): the slowest first, as a list scheduler does,
or a long file handed out last ran on alone at the end (CI's durations; a file not listed
keeps its place after them)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
SLOWEST_FIRST = (
    "test_replay_dlq.py",
    "test_benches.py",
    "test_worker_faults.py",
    "test_pipeline_kafka.py",
    "test_local_cluster.py",
    "test_demo.py",
    "test_worker_errors.py",
    "test_multi_worker.py",
    "test_compaction.py",
    "test_lag_command.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kafka)
    rank = {name: n for n, name in enumerate(SLOWEST_FIRST)}
    ours = [item for item in items if HERE in Path(str(item.fspath)).parents]
    ours.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))
    # In place, where this folder's tests were: the other folders' order is theirs.
    spots = [n for n, item in enumerate(items) if HERE in Path(str(item.fspath)).parents]
    for spot, item in zip(spots, ours, strict=True):
        items[spot] = item
