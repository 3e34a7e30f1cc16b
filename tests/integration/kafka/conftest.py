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


def _here(item: pytest.Item) -> bool:
    return HERE in Path(str(item.fspath)).parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    spots = [n for n, item in enumerate(items) if _here(item)]
    for n in spots:
        items[n].add_marker(pytest.mark.kafka)
    rank = {name: n for n, name in enumerate(SLOWEST_FIRST)}
    ours = sorted((items[n] for n in spots), key=lambda item: rank.get(item.path.name, len(rank)))
    # In place, where this folder's tests were: the other folders' order is theirs.
    for spot, item in zip(spots, ours, strict=True):
        items[spot] = item
