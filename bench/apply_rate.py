"""Store apply rate: events per second through Reconciler.apply on a real store.

Measures the set-based write path (version-guarded multi-row upserts, one transaction per
batch) at two store sizes, to show that the cost per event does not grow with the store:

    .venv/bin/python bench/apply_rate.py                     # throwaway PostgreSQL
    .venv/bin/python bench/apply_rate.py --store sqlite:////tmp/bench.db

Validation is done before timing; only `apply` (read views, merge, write, commit) is timed.
Report figures with the machine named: rates on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.checks import Checked
from consumers.merge import Authority
from consumers.reconciler import Message, Reconciler
from consumers.registry import Registry
from schemas import derive_event_id, parse_event
from store import Store

SOURCES = ["province-01", "province-79", "ministry-btp"]
NAMES = ["Nguyễn Văn An", "Trần Thị Bích", "Lê Hoàng Dũng", "Phạm Thu Hà", "Đặng Quốc Việt"]


def events(first_key: int, count: int, version: int, offset: int, seed: int) -> list[Checked]:
    """`count` citizen upserts, keys from `first_key`, each by a random source."""
    rng = random.Random(seed)
    base = datetime(2025, 8, 1, tzinfo=UTC)
    result = []
    for n in range(count):
        key = f"001{first_key + n:09d}"
        source = rng.choice(SOURCES)
        raw = {
            "schema_version": 1,
            "event_id": str(derive_event_id(source, "citizen", key, version)),
            "source": source, "entity": "citizen", "key": key, "op": "upsert",
            "version": version,
            "occurred_at": (base + timedelta(seconds=rng.randrange(10**6))).isoformat(),
            "data": {"full_name": rng.choice(NAMES), "phone": f"09{rng.randrange(10**8):08d}",
                     "permanent_address": {"province_code": "01", "ward_code": "00070",
                                           "line": "Số 1 Lê Lợi"}},
        }  # fmt: skip
        value = json.dumps(raw, ensure_ascii=False).encode()
        message = Message("bench.changes.citizen", 0, offset + n, value)
        result.append(Checked(message, parse_event(value).event, []))
    return result


def apply_all(reconciler: Reconciler, checked: list[Checked], batch: int) -> float:
    """Apply in batches; return events per second."""
    began = time.perf_counter()
    for start in range(0, len(checked), batch):
        part = checked[start : start + batch]
        reconciler.apply(part, [c.message for c in part])
    return len(checked) / (time.perf_counter() - began)


def measure(url: str, prefill: int, count: int, batch: int) -> None:
    store = Store(url)
    store.create_schema()
    authority = Authority.from_mapping({"citizen": {"full_name": ["ministry-btp"]}}, Registry())
    reconciler = Reconciler(store, authority)
    offset = 0
    small = events(10**6, count, 1, offset, seed=1)
    offset += count
    rate_small = apply_all(reconciler, small, batch)
    print(f"store of {count:>8} records: {rate_small:8.0f} events/s (new records)")
    fill = events(0, prefill, 1, offset, seed=2)
    offset += prefill
    rate_fill = apply_all(reconciler, fill, batch)
    print(f"prefill {prefill} records:   {rate_fill:8.0f} events/s")
    large = events(2 * 10**6, count, 1, offset, seed=3)
    offset += count
    rate_large = apply_all(reconciler, large, batch)
    updates = events(0, count, 2, offset, seed=4)
    rate_updates = apply_all(reconciler, updates, batch)
    total = sum(store.count_records().values())
    print(f"store of {total:>8} records: {rate_large:8.0f} events/s (new records)")
    print(f"store of {total:>8} records: {rate_updates:8.0f} events/s (updates)")
    print(f"ratio large/small store (new records): {rate_large / rate_small:.2f}")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="SQLAlchemy URL (default: a throwaway PostgreSQL)")
    parser.add_argument("--prefill", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    if args.store:
        measure(args.store, args.prefill, args.events, args.batch)
        return
    from sqlalchemy import create_engine, text

    from tests.support.postgres_server import start_postgres

    server = start_postgres()
    try:
        engine = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("CREATE DATABASE bench"))
        engine.dispose()
        print("PostgreSQL", server.bindir.parent.name, "(fsync off), batch", args.batch)
        measure(server.url("bench"), args.prefill, args.events, args.batch)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
