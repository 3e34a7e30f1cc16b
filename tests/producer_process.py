"""A long-running producer for the Prometheus integration test: a SQLite source table
that changes every 0.2 s, polled by the SQL polling runner, with /metrics, /healthz and
/readyz. Run: `python -m tests.producer_process DB_PATH STATE_DIR PORT` (settings from env)."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, insert

from observability.http import serve
from portal_sync.settings import Settings
from producers.publisher import Publisher
from producers.runner import SourceRunner
from producers.sql_polling import SqlPollingAdapter, SqlSourceConfig

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
cong_dan = Table(
    "cong_dan",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("so_dinh_danh", String(12), nullable=False),
    Column("ho_ten", String(100)),
    Column("updated_at", DateTime, nullable=False),
)


def main(db: Path, state_dir: Path, port: int) -> None:
    url = f"sqlite:///{db}"
    engine = create_engine(url)
    cong_dan.metadata.create_all(engine)
    config = SqlSourceConfig(
        source="province-01",
        url=url,
        entity="citizen",
        table="cong_dan",
        key_column="so_dinh_danh",
        pk_column="id",
        fields={"full_name": "ho_ten"},
        lookback_seconds=5.0,
    )
    runner = SourceRunner(SqlPollingAdapter(config), Publisher(Settings()), state_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    poller = threading.Thread(target=runner.run, args=(stop, 0.3), daemon=True)
    poller.start()
    serve(port, healthy=poller.is_alive)
    number = 0
    while not stop.wait(0.2):
        number += 1
        with engine.begin() as conn:
            now = datetime.now(ZONE).replace(tzinfo=None)
            row = {"so_dinh_danh": f"0010900{number:05d}", "ho_ten": "Nguyễn Văn An"}
            conn.execute(insert(cong_dan).values(updated_at=now, **row))
    poller.join(timeout=10)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
