"""The demo's scenario at the sources: updates, deletes, late changes, dossiers moving
through their lifecycle, and malformed events injected on purpose."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    select,
)

from portal_sync.demo.model import DemoRun
from portal_sync.demo.systems import SampleSource
from transport.publisher import Publisher


def make_changes(run: DemoRun) -> None:
    """Three rounds of updates, deletes and late changes while the pipeline runs."""
    time.sleep(3)
    for round_number in range(3):
        for source in run.sources:
            rng = source.rng
            citizens = source.keys("citizen")
            for key in rng.sample(citizens, min(40, len(citizens))):
                source.change("citizen", key, {"dien_thoai": f"03{rng.randrange(10**8):08d}"})
            for key in rng.sample(citizens, min(5, len(citizens))):
                source.change("citizen", key, {"da_xoa": True})
            for key in rng.sample(source.keys("dossier"), min(60, len(source.keys("dossier")))):
                _advance_dossier(source, key)
            for key in rng.sample(source.keys("document"), min(5, len(source.keys("document")))):
                source.change("document", key, {"trang_thai": "revoked"})
            # Records created by mistake and deleted at the source (soft delete).
            for entity in ("document", "dossier", "organization"):
                if keys := source.keys(entity):
                    source.change(entity, rng.choice(keys), {"da_xoa": True})
            # A long transaction that commits now with a timestamp 20 s in the past.
            late = [source.citizen_row(source.world._person()) for _ in range(3)]
            source.insert("citizen", late, behind=20)
        if run.feed is not None:
            run.feed.advance(max(5, len(run.feed.dossiers) * 3 // 4))
        time.sleep(1.5 + round_number)


def _advance_dossier(source: SampleSource, key: str) -> None:

    table = source.tables["dossier"]
    with source.engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.ma_ho_so == key)).one()
    following = {1: 2, 2: 4, 4: 9, 9: 10, 5: 4}.get(row.trang_thai)
    if source.rng.random() < 0.1 and row.trang_thai == 4:
        following = 5
    if source.rng.random() < 0.05 and row.trang_thai in (2, 4):
        following = 1  # sent back to "submitted": applied, flagged as an anomaly
    if following is None:
        return
    values: dict[str, Any] = {"trang_thai": following}
    if following == 10:
        values["ngay_tra"] = row.ngay_hen_tra
    source.change("dossier", key, values)


MALFORMED: list[tuple[str, bytes]] = [
    ("citizen", b"\xff\xfe not utf-8"),
    ("citizen", b"{not json"),
    ("citizen", b"[1, 2, 3]"),
    ("organization", b'{"schema_version": 2}'),
    ("citizen", b'{"schema_version": 1, "entity": "citizen"}'),
    (
        "dossier",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000000", '
        b'"source": "province-01", "entity": "dossier", "key": "HS-1", "op": "upsert", '
        b'"version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", "data": {}}',
    ),
    (
        "citizen",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000001", '
        b'"source": "province-01", "entity": "citizen", "key": "001090000001", '
        b'"op": "upsert", "version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", '
        b'"data": {"full_name": "X", "password": "hunter2"}}',
    ),
    (  # well-formed, but from a system that is not in the source registry
        "citizen",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000002", '
        b'"source": "province-99", "entity": "citizen", "key": "001090000001", '
        b'"op": "upsert", "version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", '
        b'"data": {"full_name": "Nguy\\u1ec5n V\\u0103n A"}}',
    ),
]


def inject_malformed(run: DemoRun) -> None:
    topics = run.settings.topics()
    publisher = Publisher(run.settings.connection(), topics, client_id="demo-malformed")
    for entity, value in MALFORMED:
        publisher.send(topics.change_topic(entity), b"malformed", value)
    run.injected = publisher.flush()
    publisher.close()
