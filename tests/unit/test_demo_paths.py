"""The demo's own store survives the next run, which empties the run's work dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from portal_sync.demo.run import demo_kafka_dir, demo_store_url, demo_workdir
from portal_sync.settings import Settings, default_store_url


def test_the_demo_store_is_neither_the_default_store_nor_inside_the_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = Path(demo_store_url().removeprefix("sqlite:///"))
    assert demo_store_url() != default_store_url()
    assert demo_workdir() not in store.parents


def test_the_demo_broker_is_neither_the_default_broker_nor_inside_the_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its secured broker keeps running between runs: never in the emptied work dir, never
    the data dir of `portal-sync kafka up` (a data dir is secured or plaintext for good)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("PORTAL_SYNC_KAFKA_DATA_DIR", raising=False)
    assert demo_kafka_dir() != Settings().kafka_data_dir
    assert demo_workdir() not in demo_kafka_dir().parents
