"""A long-running producer for the Prometheus integration test: a SQLite source table that
changes every 0.2 s (and an outbox table), run by the real `portal-sync produce` from a
deployment file, with /metrics, /healthz and /readyz.
Run: `python -m tests.support.producer_process DB_PATH STATE_DIR PORT` (Kafka settings from env)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, insert

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
cong_dan = Table(
    "cong_dan",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("so_dinh_danh", String(12), nullable=False),
    Column("ho_ten", String(100)),
    Column("updated_at", DateTime, nullable=False),
)
outbox = Table(  # empty: its adapter's metrics are exported all the same
    "portal_sync_outbox",
    cong_dan.metadata,
    Column("id", Integer, primary_key=True),
    Column("entity", String(20), nullable=False),
    Column("record_key", String(64), nullable=False),
    Column("op", String(10), nullable=False),
    Column("occurred_at", DateTime, nullable=False),
    Column("payload", String),
)

DEPLOYMENT = """\
[producer]
state_dir = "{state_dir}"
metrics_port = {port}

[[sources]]
id = "province-01-citizens"
source = "province-01"
adapter = "sql"
interval_seconds = 0.3

[sources.connection]
url = "sqlite:///{db}"

[sources.mapping]
entity = "citizen"
table = "cong_dan"
key_column = "so_dinh_danh"
pk_column = "id"
updated_at_column = "updated_at"
lookback_seconds = 5
fields = {{ full_name = "ho_ten" }}

[[sources]]
id = "province-01-outbox"
source = "province-01"
adapter = "outbox"
interval_seconds = 0.3

[sources.connection]
url = "sqlite:///{db}"
"""


def main(db: Path, state_dir: Path, port: int) -> None:
    engine = create_engine(f"sqlite:///{db}")
    cong_dan.metadata.create_all(engine)
    config = db.with_suffix(".toml")
    config.write_text(DEPLOYMENT.format(state_dir=state_dir, port=port, db=db), encoding="utf-8")
    produce = subprocess.Popen(
        [sys.executable, "-m", "portal_sync", "produce", "--config", str(config)], env=os.environ
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    number = 0
    while not stop.wait(0.2) and produce.poll() is None:
        number += 1
        with engine.begin() as conn:
            now = datetime.now(ZONE).replace(tzinfo=None)
            row = {"so_dinh_danh": f"0010900{number:05d}", "ho_ten": "Nguyễn Văn An"}
            conn.execute(insert(cong_dan).values(updated_at=now, **row))
    produce.terminate()
    produce.wait(timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
