"""Publish rate of the `sql` adapter through the real broker.

    python bench/sql_publish_rate.py --rows 50000 --bootstrap 127.0.0.1:9092

Creates a SQLite source of N citizen rows, a deployment file with one `sql` source, and
runs it once (validation, publishing with acks=all, a checkpoint per page, saved at most
once a second) on fresh topics;
prints events per second and also runs `adapters check` on the source, for the record.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console
from sqlalchemy import Boolean, Column, DateTime, Integer, MetaData, String, Table, create_engine

from consumers.runtime import tune_garbage_collector
from portal_sync.settings import Settings
from producers.conformance import check_adapter, report_table
from producers.deployment import load_deployment
from producers.produce import build_groups
from transport.admin import ensure_topics

CONFIG = """[producer]
state_dir = "state"
metrics_port = 0

[[sources]]
id = "bench-citizens"
source = "province-79"
adapter = "sql"

[sources.connection]
url = "sqlite:///{db}"

[sources.mapping]
entity = "citizen"
table = "cong_dan"
key_column = "so_dinh_danh"
pk_column = "id"
updated_at_column = "cap_nhat_luc"
deleted_column = "da_xoa"
batch_size = {batch}
fields = {{ full_name = "ho_ten", sex = "gioi_tinh", "permanent_address.line" = "dia_chi" }}
value_maps = {{ sex = {{ "Nam" = "male", "Nữ" = "female" }} }}
"""


def make_source(path: Path, rows: int) -> None:
    table = Table(
        "cong_dan",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("so_dinh_danh", String(12)),
        Column("ho_ten", String(100)),
        Column("gioi_tinh", String(5)),
        Column("dia_chi", String(200)),
        Column("cap_nhat_luc", DateTime, index=True),
        Column("da_xoa", Boolean),
    )
    engine = create_engine(f"sqlite:///{path}")
    table.metadata.create_all(engine)
    start = datetime(2025, 8, 1, 8)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "id": n,
                    "so_dinh_danh": f"079{n % 2}90{n:06d}",
                    "ho_ten": "Nguyễn Văn An" if n % 2 == 0 else "Trần Thị Bình",
                    "gioi_tinh": "Nam" if n % 2 == 0 else "Nữ",
                    "dia_chi": f"Số {n % 300} Lê Lợi",
                    "cap_nhat_luc": start + timedelta(milliseconds=n),
                    "da_xoa": n % 97 == 0,
                }
                for n in range(1, rows + 1)
            ],
        )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--bootstrap", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sql-"))
    make_source(work / "source.db", args.rows)
    config = work / "sources.toml"
    config.write_text(CONFIG.format(db=work / "source.db", batch=args.batch), encoding="utf-8")
    deployment = load_deployment(config)

    console = Console(width=160)
    adapter = deployment.adapter(deployment.sources[0])
    console.print(report_table(check_adapter(adapter, "bench-citizens", "sql", limit=5000)))
    adapter.close()

    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    settings = Settings(kafka_bootstrap=args.bootstrap, topic_prefix=prefix, store_url="sqlite://")
    ensure_topics(settings.connection(), settings.topics())
    (group,), (publisher,) = build_groups(deployment, settings.connection(), settings.topics())
    (_, runner) = group.runners[0]
    tune_garbage_collector()  # as `portal-sync produce` does
    began = time.perf_counter()
    stats = runner.run_once()
    seconds = time.perf_counter() - began
    publisher.close()
    rate = stats.published / seconds
    console.print(
        f"{stats.published} events published and acknowledged in {seconds:.2f}s: "
        f"{rate:,.0f} events/s ({stats.checkpoints} checkpoints, batch {args.batch})"
    )


if __name__ == "__main__":
    main()
