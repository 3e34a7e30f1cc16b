"""Where a machine's CPU goes during a run: the whole machine and each kind of process.

Samples `/proc/stat` and every process's user + system time every `--interval` seconds and
writes one line per sample: the cores busy, then the cores each kind of process used
(worker, its validator children, kafka-connect, broker, postgres, other). Run it beside a
bench, then average a window of it:

    .venv/bin/python bench/cpu_share.py record /tmp/cpu.txt &      # stop it with kill
    ../shared/bench/peer_jdbc_sink/run.sh 100000
    .venv/bin/python bench/cpu_share.py window /tmp/cpu.txt --start 16:27:22 --seconds 16

`--start` is a wall-clock time (UTC, as the harness logs) or a Unix time. On the 2-core
development machine this showed the peer's one sink task using 1.3 cores of its JVM while
one worker process, bound by its GIL, used at most one (docs/performance-log.md, tenth round).
Linux only.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
KINDS = ("worker", "validator", "kafka-connect", "broker", "postgres", "other")
# `portal-sync [global options] worker …`: the options (`--verbose`) may come between.
WORKER = re.compile(r"portal[-_]sync(?: +-[-\w=]+)* +worker ")


def kind(command: str) -> str:
    if WORKER.search(command):
        return "worker"
    if "multiprocessing.spawn" in command:  # a worker's validator child (consumers.validators)
        return "validator"
    if "ConnectStandalone" in command or "ConnectDistributed" in command:
        return "kafka-connect"
    if "kafka.Kafka" in command:
        return "broker"
    if command.startswith("postgres") or "/postgres " in command:
        return "postgres"
    return "other"


def machine() -> tuple[int, int]:
    """(all ticks, idle ticks) since boot, every core together."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def processes() -> dict[int, tuple[str, int]]:
    """pid -> (kind, user + system ticks) of every process that can be read now."""
    found: dict[int, tuple[str, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        found[int(name)] = (kind(command.decode(errors="replace")), int(stat[11]) + int(stat[12]))
    return found


def record(out: Path, interval: float) -> None:
    cores = os.cpu_count() or 1
    total, idle = machine()
    before = processes()
    with out.open("w", encoding="ascii") as sink:
        while True:
            time.sleep(interval)
            now_total, now_idle = machine()
            now = processes()
            spent = dict.fromkeys(KINDS, 0)
            for pid, (what, ticks) in now.items():
                # A process born in the interval counts from zero; one that ended is lost.
                spent[what] += ticks - before.get(pid, (what, 0))[1]
            elapsed = now_total - total
            busy = cores * (1 - (now_idle - idle) / elapsed) if elapsed else 0.0
            shares = " ".join(f"{k}={spent[k] / TICKS / interval:.2f}" for k in KINDS)
            sink.write(f"{time.time():.2f} busy={busy:.2f} {shares}\n")
            sink.flush()
            total, idle, before = now_total, now_idle, now


def moment(text: str, day: datetime) -> float:
    if ":" not in text:
        return float(text)
    clock = datetime.strptime(text, "%H:%M:%S").time()
    return datetime.combine(day.date(), clock, tzinfo=UTC).timestamp()


def window(samples: Path, start: str, seconds: float) -> dict[str, float]:
    """Mean cores per kind (and `busy`, the whole machine) over [start, start + seconds]."""
    rows = [line.split() for line in samples.read_text(encoding="ascii").splitlines() if line]
    if not rows:
        raise SystemExit(f"{samples} holds no sample")
    first = datetime.fromtimestamp(float(rows[0][0]), UTC)
    begin = moment(start, first)
    chosen = [row for row in rows if begin < float(row[0]) <= begin + seconds]
    if not chosen:
        raise SystemExit("no sample in that window")
    means: dict[str, float] = {}
    for row in chosen:
        for pair in row[1:]:
            name, value = pair.split("=")
            means[name] = means.get(name, 0.0) + float(value) / len(chosen)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recording = commands.add_parser("record", help="sample until killed")
    recording.add_argument("out", type=Path)
    recording.add_argument("--interval", type=float, default=0.5)
    averaging = commands.add_parser("window", help="mean cores per kind over a window")
    averaging.add_argument("samples", type=Path)
    averaging.add_argument("--start", required=True, help="HH:MM:SS (UTC) or a Unix time")
    averaging.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.interval)
        return
    means = window(args.samples, args.start, args.seconds)
    print("  ".join(f"{name} {value:.2f}" for name, value in means.items()))


if __name__ == "__main__":
    main()
