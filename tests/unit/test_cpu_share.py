"""bench/cpu_share.py: which process is which, and a window's mean cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cpu_share import kind, window


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "/tmp/peer-venv/bin/python /tmp/peer-venv/bin/portal-sync worker --until-caught-up ",
            "worker",
        ),
        ("/usr/bin/python3 -m portal_sync worker ", "worker"),
        (
            "/tmp/peer-venv/bin/python3.11 /tmp/peer-venv/bin/portal-sync --verbose worker ",
            "worker",
        ),
        (
            "/tmp/peer-venv/bin/python3.11 -B -c from multiprocessing.spawn import spawn_main; "
            "spawn_main(tracker_fd=14, pipe_handle=18) --multiprocessing-fork ",
            "validator",
        ),
        ("/tmp/peer-venv/bin/portal-sync --verbose workers-guide ", "other"),
        (
            "java -Xmx1g -cp /x/* org.apache.kafka.connect.cli.ConnectStandalone a b ",
            "kafka-connect",
        ),
        ("java -Xmx512m -cp /c/* kafka.Kafka /d/server.properties ", "broker"),
        ("postgres: portal portal 127.0.0.1(5432) idle ", "postgres"),
        ("/usr/lib/postgresql/15/bin/postgres -D /d -p 35432 ", "postgres"),
        ("/tmp/peer-venv/bin/portal-sync lag ", "other"),
    ],
)
def test_processes_are_told_apart(command: str, expected: str) -> None:
    assert kind(command) == expected


def test_a_window_averages_its_samples_only(tmp_path: Path) -> None:
    samples = tmp_path / "cpu.txt"
    samples.write_text(
        "100.0 busy=2.00 worker=0.00 postgres=0.00\n"
        "100.5 busy=1.00 worker=0.80 postgres=0.20\n"
        "101.0 busy=1.50 worker=1.00 postgres=0.40\n"
        "101.5 busy=0.10 worker=0.00 postgres=0.00\n",
        encoding="ascii",
    )
    means = window(samples, "100.2", 1.0)
    assert means == pytest.approx({"busy": 1.25, "worker": 0.9, "postgres": 0.3})
    with pytest.raises(SystemExit):
        window(samples, "200", 1.0)
