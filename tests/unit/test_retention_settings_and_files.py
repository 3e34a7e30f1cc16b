"""Retention settings (documented in the README and docs/privacy.md) and the file adapters'
done/ files, which are removed once past their retention (no broker: the checkpoints'
clean-up is run by hand, as the engine runs it after the broker acknowledged)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from consumers.retention import Retention
from portal_sync.settings import Settings
from producers.adapters.directory import DirectoryAdapter
from producers.deployment import Deployment, load_deployment
from producers.metrics import DONE_FILES_REMOVED
from producers.sdk import Checkpoint
from schemas.errors import ConfigurationError

DAY = 86_400

CONFIG = """
[producer]
metrics_port = 0

[[sources]]
id = "dn-exports"
source = "province-48"
adapter = "filedrop"

[sources.connection]
directory = "inbox"
{extra}

[sources.mapping]
entity = "citizen"
key_field = "SoDinhDanh"
occurred_at_field = "NgayCapNhat"
occurred_at_format = "yyyyMMddHHmmss"
fields = {{ full_name = "HoTen" }}
"""
CSV = "SoDinhDanh,HoTen,NgayCapNhat\n048090000001,Nguyễn Văn An,20250801080000\n"


def test_retention_defaults_reach_the_worker() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:9")
    assert settings.worker_config().retention() == Retention(730, 180, 730)
    assert settings.done_files_retention_days == 30
    custom = Settings(
        kafka_bootstrap="127.0.0.1:9",
        history_retention_days=365,
        deleted_retention_days=120,
        access_log_retention_days=1825,
    )
    assert custom.worker_config().retention() == Retention(365, 120, 1825)


def test_the_deleted_retention_must_cover_what_can_still_be_replayed() -> None:
    # dead letters are kept 90 days: a tombstone forgotten sooner could be undone by a redrive
    with pytest.raises(ConfigurationError, match="PORTAL_SYNC_DELETED_RETENTION_DAYS"):
        Settings(kafka_bootstrap="127.0.0.1:9", deleted_retention_days=60).worker_config()
    with pytest.raises(ConfigurationError, match="bring the record back"):
        Settings(
            kafka_bootstrap="127.0.0.1:9",
            deleted_retention_days=100,
            change_retention_hours=24 * 120,
        ).worker_config()
    # a change topic's superseded events may stay a day past its retention (the cleaner's)
    with pytest.raises(ConfigurationError, match="31 days"):
        Settings(
            kafka_bootstrap="127.0.0.1:9",
            deleted_retention_days=30,
            dead_letter_retention_hours=720,
        ).worker_config()
    Settings(
        kafka_bootstrap="127.0.0.1:9", deleted_retention_days=31, dead_letter_retention_hours=720
    ).worker_config()


def test_a_superseded_event_leaves_a_change_topic_within_a_day_of_its_retention() -> None:
    """Without `max.compaction.lag.ms` the cleaner waits for half of a log to be dirty:
    in a national topic that keeps every record's latest event, an old full record could
    outlive the deleted-record retention and bring a forgotten record back on a replay."""
    from transport.topics import Topics

    topics = Topics(change_retention_hours=720)
    specs = topics.specs()
    for name in topics.change_topics():  # each compacted only: a delete policy drops records
        configs = specs[name]["configs"]
        assert configs["cleanup.policy"] == "compact"
        assert configs["min.compaction.lag.ms"] == str(720 * 3_600_000)
        assert configs["max.compaction.lag.ms"] == str(744 * 3_600_000)
    assert len(topics.change_topics()) == 4


@pytest.mark.parametrize(
    "name, value",
    [
        ("ACCESS_LOG_RETENTION_DAYS", "-1"),  # Kafka's "forever": here it wiped the log
        ("HISTORY_RETENTION_DAYS", "0"),
        ("BATCH_MAX_EVENTS", "0"),
        ("BATCH_MAX_WAIT_SECONDS", "-1"),
        ("WORKER_STALL_AFTER_SECONDS", "-1"),
        ("FRESHNESS_OBJECTIVE_SECONDS", "nan"),
        ("METRICS_PORT", "70000"),
        ("CHANGE_PARTITIONS", "0"),
        ("CHANGE_RETENTION_HOURS", "-1"),
        ("METRICS_PORT", "abc"),
        ("KAFKA_SECURITY", '{"sasl_password": "s3cret-pw" bad'),  # not JSON
    ],
)
def test_a_setting_out_of_its_range_is_a_configuration_error_naming_it(
    name: str, value: str
) -> None:
    """Exit 2 with the setting's name and what is wrong, never a traceback nor the value
    (another setting's value may be a URL with a password)."""
    import subprocess
    import sys

    env = os.environ | {"PORTAL_SYNC_KAFKA_BOOTSTRAP": "127.0.0.1:9", f"PORTAL_SYNC_{name}": value}
    env["PORTAL_SYNC_STORE_URL"] = "postgresql://portal:s3cret-pw@127.0.0.1:9/portal"
    done = subprocess.run(
        [sys.executable, "-m", "portal_sync", "worker", "--until-caught-up"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"PORTAL_SYNC_{name}" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "args, env, option",
    [
        (["lag-exporter", "--port", "70000"], {}, "--port"),
        (
            ["lag-exporter"],
            {"PORTAL_SYNC_LAG_EXPORTER_PORT": "70000"},
            "PORTAL_SYNC_LAG_EXPORTER_PORT",
        ),
        (["lag-exporter", "--interval", "nan"], {}, "--interval"),
        (["lag", "--interval", "0"], {}, "--interval"),
        (["lag", "--window", "-1"], {}, "--window"),
        (["lag"], {"PORTAL_SYNC_SOURCE_STALE_AFTER_SECONDS": "nan"}, "--stale-after"),
        (["worker", "--metrics-port", "70000"], {}, "--metrics-port"),
        (["produce", "--config", "x.toml", "--metrics-port", "-1"], {}, "--metrics-port"),
        (["kafka", "up", "--port", "0"], {}, "--port"),
        (["kafka", "up", "--nodes", "3", "--port", "65535"], {}, "--port 65535 leaves no port"),
    ],
)
def test_an_option_out_of_its_range_is_refused_before_anything_runs(
    args: list[str], env: dict[str, str], option: str
) -> None:
    """A port above 65535 or a time of `nan` is a usage error (exit 2) naming the option,
    not a traceback of the bind or a loop that never waits."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        env=os.environ | {"PORTAL_SYNC_KAFKA_BOOTSTRAP": "127.0.0.1:9", "COLUMNS": "200", **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert option in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_deployment_files_metrics_port_out_of_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(CONFIG.format(extra="").replace("metrics_port = 0", "metrics_port = 70000"))
    with pytest.raises(ConfigurationError, match="metrics_port"):
        load_deployment(path)


def test_a_stall_threshold_below_the_alert_s_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker restarted before its wait reaches the alert's 240 s never fires it."""
    Settings(kafka_bootstrap="127.0.0.1:9").worker_config()
    assert "PortalSyncWorkerStalled" not in caplog.text
    Settings(kafka_bootstrap="127.0.0.1:9", worker_stall_after_seconds=120).worker_config()
    assert "PortalSyncWorkerStalled can fire" in caplog.text


def _deployment(tmp_path: Path, extra: str = "") -> Deployment:
    path = tmp_path / "sources.toml"
    path.write_text(CONFIG.format(extra=extra), encoding="utf-8")
    return load_deployment(path)


def _put(path: Path, text: str, age_days: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    moment = time.time() - age_days * DAY
    os.utime(path, (moment, moment))


def _run(adapter: DirectoryAdapter, commit: bool = True) -> None:
    """One run: every checkpoint's clean-up, as after the broker's acknowledgement."""
    for item in adapter.read({}):
        if commit and isinstance(item, Checkpoint) and item.commit is not None:
            item.commit()


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    """An inbox with a new file; done/ with files processed 40 and 10 days ago."""
    inbox = tmp_path / "inbox"
    _put(inbox / "new.csv", CSV, age_days=50)  # written long ago, processed now
    _put(inbox / "done" / "old.csv", CSV, age_days=40)
    _put(inbox / "done" / "old.csv.rejected.jsonl", '{"line": 2}\n', age_days=40)
    _put(inbox / "done" / "recent.csv", CSV, age_days=10)
    _put(inbox / "done" / "notes.txt", "operator's notes", age_days=40)  # not the adapter's
    _put(inbox / "error" / "broken.csv", "\xff", age_days=400)  # waits for someone
    return inbox


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_done_files_past_the_retention_are_removed(tmp_path: Path, drop: Path) -> None:
    deployment = _deployment(tmp_path)
    deployment.use_defaults(done_retention_days=30)  # PORTAL_SYNC_DONE_FILES_RETENTION_DAYS
    adapter = deployment.adapter(deployment.sources[0])
    assert isinstance(adapter, DirectoryAdapter)
    removed = DONE_FILES_REMOVED.labels("province-48")._value.get()

    _run(adapter, commit=False)  # a check run: reads, removes nothing
    assert _names(drop / "done") == ["notes.txt", "old.csv", "old.csv.rejected.jsonl",
                                     "recent.csv"]  # fmt: skip

    _run(adapter)
    assert _names(drop / "done") == ["new.csv", "notes.txt", "recent.csv"]
    assert _names(drop / "error") == ["broken.csv"]
    # the retention of a file counts from when it was processed, not from when it was written
    assert time.time() - (drop / "done" / "new.csv").stat().st_mtime < 60
    assert DONE_FILES_REMOVED.labels("province-48")._value.get() == removed + 2

    later = time.time() + 31 * DAY
    assert [p.name for p in adapter.expired_done_files(now=later)] == ["new.csv", "recent.csv"]


def test_a_source_sets_its_own_done_retention(tmp_path: Path, drop: Path) -> None:
    deployment = _deployment(tmp_path, "done_retention_days = 5")
    deployment.use_defaults(done_retention_days=30)  # the source's own value wins
    _run(deployment.adapter(deployment.sources[0]))
    assert _names(drop / "done") == ["new.csv", "notes.txt"]


def test_without_a_retention_done_files_stay(tmp_path: Path, drop: Path) -> None:
    deployment = _deployment(tmp_path)
    _run(deployment.adapter(deployment.sources[0]))
    assert _names(drop / "done") == ["new.csv", "notes.txt", "old.csv",
                                     "old.csv.rejected.jsonl", "recent.csv"]  # fmt: skip


def test_the_journal_s_least_retention_is_its_purge_s_floor() -> None:
    """The setting's bound is written out (settings would import the whole store for it,
    at every command's start); it must be the purge function's floor."""
    from portal_sync.settings import Settings
    from store.roles import JOURNAL_FLOOR_DAYS

    bound = Settings.model_fields["journal_retention_days"].metadata
    assert any(getattr(rule, "ge", None) == JOURNAL_FLOOR_DAYS for rule in bound)
