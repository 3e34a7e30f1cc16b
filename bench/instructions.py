"""Instructions per event of the worker's own work, counted by valgrind (callgrind).

On a shared machine timings drift by a fifth within minutes; instruction counts do not
depend on the neighbours. This runs, under `valgrind --tool=callgrind`, one process that
checks (`classify`: contract, registry, key, topic and partition) and applies
(`Reconciler.apply`, batches of 2,000) the bench's mix (`bench/e2e.py`'s `make_events`,
each message on its topic and partition; or, with `--peer`, the peer harness's events) to
a fresh store (a SQLite file; with `--store postgresql`, a database on a throwaway server,
whose own work is not counted, the driver's is), once with `--small`
events and once with `--large`: the difference of the two totals, divided by the
difference of the sizes, is an event's cost without the start-up (imports, schema, rules).

    .venv/bin/python bench/instructions.py                   # 2,000 and 6,000 events
    .venv/bin/python bench/instructions.py --keep /tmp/cg    # keep callgrind.out.* there
    # the peer harness's citizen events (three in four update a record, a fifth from a
    # second source), into a throwaway PostgreSQL: only the worker's side is counted
    .venv/bin/python bench/instructions.py --peer ../shared/bench/peer_jdbc_sink \
        --store postgresql --record-cache 10000 --small 10000 --large 16000

Compare two versions of the code in the same checkout (git stash, or two worktrees with
their own venvs): hash seeds are fixed, so the same code gives the same count to within
about 0.1 %. Needs valgrind (Debian: `apt-get install valgrind`); about a minute per 2,000
events. docs/performance-log.md, eighth round. With `--peer`, the harness's generator makes
40,000 events over 10,000 keys (or `--large`, if more, over a quarter as many), and the
first 10,000 create each record once: the example above counts the 6,000 updates after
them (seventeenth round).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from schemas.partitioning import partition_for
from transport.topics import Topics

BATCH = 2000
SEED = 7
PEER_EVENTS = 40_000  # with `--peer`: 10,000 records, three updates each on average
TOPICS = Topics(prefix="bench")
Placed = tuple[str, int, int, bytes, bytes]  # topic, partition, offset, key, value


def place(pairs: list[tuple[bytes, bytes]]) -> list[Placed]:
    """Each message on its entity's topic and partition with its offset there, as a
    producer puts it: the worker's check of key, topic and partition then runs too."""
    placed: list[Placed] = []
    ends: dict[tuple[str, int], int] = {}
    for key, value in pairs:
        topic = TOPICS.change_topic(key.split(b":", 1)[0].decode())
        partition = partition_for(key, TOPICS.change_partitions)
        offset = ends.get((topic, partition), 0)
        ends[(topic, partition)] = offset + 1
        placed.append((topic, partition, offset, key, value))
    return placed


def peer_pairs(harness: Path, events: int) -> list[tuple[bytes, bytes]]:
    """The peer harness's citizen events (its `generate`), keyed by the project's rule
    (`citizen:<key>:<source>`, as `bench/peer_keys.patch` has it) and encoded as the
    harness publishes them."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("peer_bench", harness / "bench.py")
    if spec is None or spec.loader is None:
        sys.exit(f"no bench.py in {harness}")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    generated, _ = peer.generate(events, SEED)
    pairs = []
    for key, event in generated:
        if key.count(":") == 1:  # the harness unpatched: citizen:<key>
            key = f"{key}:{event['source']}"
        value = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        pairs.append((key.encode(), value.encode()))
    return pairs


def apply_events(messages_file: Path, count: int, store_url: str) -> float:
    """Check and apply the first `count` placed messages (`place`); CPU µs per event."""
    from consumers.cache import RecordCache
    from consumers.checks import classify
    from consumers.config import load_rules
    from consumers.reconciler import Reconciler
    from consumers.runtime import tune_garbage_collector
    from store import Store
    from transport.reader import Message

    with messages_file.open("rb") as source:
        placed: list[Placed] = pickle.load(source)[:count]
    registry, authority = load_rules(None, None)
    store = Store(store_url)
    store.create_schema()
    kept = int(os.environ.get("BENCH_RECORD_CACHE", "0"))
    reconciler = Reconciler(store, authority, cache=RecordCache(kept) if kept else None)
    tune_garbage_collector()
    began = time.process_time()
    for start in range(0, len(placed), BATCH):
        batch = [
            Message(topic, partition, offset, value, key)
            for topic, partition, offset, key, value in placed[start : start + BATCH]
        ]
        valid, _ = classify(batch, registry, topics=TOPICS)
        reconciler.apply(valid, batch)
    return (time.process_time() - began) / max(1, len(placed)) * 1e6


def count(
    messages_file: Path,
    events: int,
    work: Path,
    keep: Path | None,
    record_cache: int = 0,
    postgres: Any = None,
) -> int:
    """Instructions of one run of `--apply` under callgrind (the store: a fresh SQLite
    file, or a fresh database on the `postgres` server, whose own work is not counted)."""
    out = work / f"callgrind.out.{events}"
    if postgres is None:
        store_dir = work / f"store-{events}"
        store_dir.mkdir()
        store_url = f"sqlite:///{store_dir / 'store.db'}"
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(postgres.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "events_{events}"'))
        engine.dispose()
        store_url = postgres.url(f"events_{events}")
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--apply", str(messages_file), "--events", str(events),
        "--store-url", store_url,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0", BENCH_RECORD_CACHE=str(record_cache))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"valgrind run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, keep / out.name)
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=6000)
    parser.add_argument("--keep", type=Path, help="copy the callgrind output files here")
    parser.add_argument(
        "--record-cache",
        type=int,
        default=0,
        help="records the reconciler keeps (the worker's PORTAL_SYNC_RECORD_CACHE_RECORDS; "
        "0, the default, as in the figures before the sixteenth round)",
    )
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the store: a SQLite file (the default), or a throwaway PostgreSQL server "
        "(fsync off; its own work is not counted, the driver's is)",
    )
    parser.add_argument(
        "--peer",
        type=Path,
        help="the peer harness's directory (../shared/bench/peer_jdbc_sink): its citizen "
        "events instead of the bench's mix",
    )
    parser.add_argument("--apply", type=Path, help=argparse.SUPPRESS)  # the measured run
    parser.add_argument("--events", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.apply is not None:
        print(f"{apply_events(args.apply, args.events, args.store_url):.1f} µs/event CPU")
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    if not 0 < args.small < args.large:
        sys.exit("--small must be positive and below --large")
    from e2e import encode, make_events

    if args.peer is not None:
        pairs = peer_pairs(args.peer, max(args.large, PEER_EVENTS))
    else:
        pairs = [encode(event) for event in make_events(args.large, SEED)]
    postgres = None
    if args.store == "postgresql":
        from tests.support.postgres_server import start_postgres

        postgres = start_postgres(settings={"fsync": "off", "synchronous_commit": "off"})
    try:
        with tempfile.TemporaryDirectory(prefix="portal-sync-instructions-") as tmp:
            work = Path(tmp)
            messages_file = work / "messages.pickle"
            with messages_file.open("wb") as sink:
                pickle.dump(place(pairs), sink)
            counts = [
                count(messages_file, n, work, args.keep, args.record_cache, postgres)
                for n in (args.small, args.large)
            ]
    finally:
        if postgres is not None:
            postgres.stop()
    small, large = counts
    per_event = (large - small) / (args.large - args.small)
    print(f"instructions: {args.small} events {small:,}, {args.large} events {large:,}")
    print(f"per event (start-up excluded): {per_event:,.0f}")


if __name__ == "__main__":
    main()
