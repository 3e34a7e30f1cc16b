"""The reconciler's SQLite statements look records up by key: none scans a store table.
A scan costs in proportion to the store (a plain JOIN on the batch's temporary key table
let SQLite's planner scan `source_views` and `records` once per batch)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event

from store.core import Store
from tests.support.store_helpers import CITIZEN, CITIZEN_2, DOSSIER, ORG, Feed, event

STORE_TABLES = (
    "source_views",
    "records",
    "field_conflicts",
    "applied_offsets",
    "document_owners",
    "record_history",
    "apply_journal",
)


def test_no_batch_statement_scans_a_store_table(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    statements: list[str] = []

    def trace(dbapi: Any, _record: Any) -> None:
        dbapi.set_trace_callback(statements.append)

    sa_event.listen(store.engine, "connect", trace)
    store.create_schema()
    statements.clear()  # the migrations' statements (0007 reads records in key order)
    feed = Feed(store)
    for version in (1, 2):
        feed.apply(
            event("citizen", CITIZEN, "province-79", version, {"full_name": f"Lê Văn {version}"}),
            event("citizen", CITIZEN, "province-01", version, {"full_name": "Lê Văn Ba"}),
            event("citizen", CITIZEN_2, "province-79", version),  # a delete
            event("organization", ORG, "ministry-btp", version, {"name": "Công ty A"}),
            event("document", "GKS-1", "province-79", version,
                  {"owner_kind": "citizen", "owner_id": CITIZEN, "title": "Giấy khai sinh"}),
            event("dossier", DOSSIER, "province-79", version, {"status": version}),
        )  # fmt: skip
    batch_statements = [
        s for s in statements if re.match(r"\s*(SELECT|DELETE|UPDATE)", s) and "sqlite_" not in s
    ]
    assert any("source_views" in s for s in batch_statements)
    with store.engine.connect() as conn:  # the same pooled connection: its temp tables
        dbapi = conn.connection.driver_connection
        for statement in batch_statements:
            plan = " | ".join(row[3] for row in dbapi.execute("EXPLAIN QUERY PLAN " + statement))
            scanned = re.findall(r"\bSCAN (\w+)", plan)
            aliases = dict(
                (alias, table)
                for table, alias in re.findall(rf"\b({'|'.join(STORE_TABLES)})\s+(\w+)", statement)
            )
            for name in scanned:
                assert aliases.get(name, name) not in STORE_TABLES, (plan, statement[:120])
    store.close()
