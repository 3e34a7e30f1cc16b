"""The demo's scenario at the sources: updates, deletes, late changes, dossiers moving
through their lifecycle, and malformed, forged and out-of-scope events injected on
purpose."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import (
    select,
)

from portal_sync.demo.feed import PORTAL_FEED_SOURCE
from portal_sync.demo.model import DemoRun, Injected
from portal_sync.demo.signing import signer
from portal_sync.demo.systems import SampleSource
from schemas import message_key
from schemas.signing import Signer
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


# Contract violations from an authentic but broken producer (signed with province-01's
# key): the worker verifies the signature, then refuses the value. Reasons expected.
MALFORMED: list[tuple[str, bytes, str]] = [
    ("citizen", b"\xff\xfe not utf-8", "not_utf8"),
    ("citizen", b"{not json", "invalid_json"),
    ("citizen", b"[1, 2, 3]", "invalid_json"),
    ("organization", b'{"schema_version": 2}', "unsupported_schema_version"),
    ("citizen", b'{"schema_version": 1, "entity": "citizen"}', "missing_field"),
    (
        "dossier",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000000", '
        b'"source": "province-01", "entity": "dossier", "key": "HS-1", "op": "upsert", '
        b'"version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", "data": {}}',
        "invalid_key",
    ),
    (
        "citizen",
        b'{"schema_version": 1, "event_id": "00000000-0000-0000-0000-000000000001", '
        b'"source": "province-01", "entity": "citizen", "key": "001090000001", '
        b'"op": "upsert", "version": 1, "occurred_at": "2025-08-01T08:00:00+07:00", '
        b'"data": {"full_name": "X", "password": "hunter2"}}',
        "unknown_field",
    ),
]

HANOI, HCM = "province-01", "province-79"


def _event(source: str, entity: str, key: str, number: int, data: dict[str, Any] | None) -> bytes:
    """A well-formed event (the demo's forged and out-of-scope ones: versions above any the
    sources reach, ids of their own)."""
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"00000000-0000-0000-0000-{number:012d}",
        "source": source,
        "entity": entity,
        "key": key,
        "op": "upsert" if data is not None else "delete",
        "version": 900_000 + number,
        "occurred_at": "2025-08-01T08:00:00+07:00",
    }
    if data is not None:
        event["data"] = data
    return json.dumps(event, ensure_ascii=False).encode()


def injected_events(run: DemoRun) -> list[Injected]:
    """What the demo injects: malformed, forged (unsigned, or not signed by the source it
    claims) and out-of-scope events, each with the reason the worker must give."""
    hanoi, hcm = signer(run, HANOI), signer(run, HCM)
    intruder = Signer.generate(HANOI, hanoi.key_id)  # a key of its own, under Hanoi's id
    outsider = Signer.generate("province-99", "province-99-20250801-000001")  # not registered
    out: list[Injected] = []

    def add(
        what: str,
        entity: str,
        key: str,
        value: bytes,
        headers: Any,
        expected: str,
        sender: str = HANOI,
    ) -> None:
        """`sender`: whose Kafka credentials send it (on the secured broker); a forger
        holds province-01's credentials, never its signing key."""
        out.append(Injected(what, entity, key.encode(), value, tuple(headers), expected, sender))

    for entity, value, expected in MALFORMED:
        add(
            "malformed, signed by province-01",
            entity,
            "malformed",
            value,
            hanoi.headers(value),
            expected,
        )
    citizen = "001090000002"
    claim = {"full_name": "Nguyễn Văn Giả", "phone": "0900000000"}
    forged = _event(HANOI, "citizen", citizen, 1, claim)
    key = message_key("citizen", citizen, HANOI).decode()
    add("forged: claims province-01, unsigned", "citizen", key, forged, (), "unsigned")
    forged = _event(HANOI, "citizen", citizen, 2, claim)
    add("forged: own key under province-01's key id", "citizen", key, forged,
        intruder.headers(forged), "bad_signature")  # fmt: skip
    signed = _event(HANOI, "citizen", citizen, 3, claim)
    tampered = signed.replace(b"0900000000", b"0911111111")
    add("forged: province-01's signature, value changed", "citizen", key, tampered,
        hanoi.headers(signed), "bad_signature")  # fmt: skip
    forged = _event(HANOI, "citizen", citizen, 4, claim)
    add("forged: province-79 signs as province-01", "citizen", key, forged,
        hcm.headers(forged), "bad_signature", sender=HCM)  # fmt: skip
    stranger = _event("province-99", "citizen", citizen, 5, claim)
    add("unregistered province-99, own key", "citizen",
        message_key("citizen", citizen, "province-99").decode(), stranger,
        outsider.headers(stranger), "bad_signature")  # fmt: skip
    # Out of scope, signed by the real keys of the sources that overstep.
    dossier = "000.00.01.H29-250801-9001"  # a Hồ Chí Minh City dossier
    taken = _event(HANOI, "dossier", dossier, 6, {"agency_code": "000.00.01.H26", "status": 1})
    taken_key = message_key("dossier", dossier, HANOI).decode()
    add("province-01 takes a Hồ Chí Minh City dossier", "dossier", taken_key, taken,
        hanoi.headers(taken), "out_of_scope")  # fmt: skip
    btp = signer(run, "ministry-btp")
    company = _event("ministry-btp", "organization", "0101234567", 7,
                     {"name": "Công ty Giả", "status": "dissolved"})  # fmt: skip
    add("ministry-btp dissolves a company", "organization",
        message_key("organization", "0101234567", "ministry-btp").decode(),
        company, btp.headers(company), "out_of_scope", sender="ministry-btp")  # fmt: skip
    # Documents: the id names its issuer (registry: key_names_issuer), so province-01 can
    # neither write its own issuer_code into Hồ Chí Minh City's document nor use a bare id.
    paper = {"owner_kind": "citizen", "owner_id": citizen, "doc_type": "GKS",
             "title": "Giấy khai sinh", "issuer_code": "000.00.01.H26"}  # fmt: skip
    for number, (what, document) in enumerate(
        (
            ("province-01 takes a Hồ Chí Minh City document", "000.00.01.H29:GKS-2025-900001"),
            ("province-01 writes a document under a bare id", "GKS-2025-900002"),
        ),
        start=9,
    ):
        claimed = _event(HANOI, "document", document, number, paper)
        add(what, "document", message_key("document", document, HANOI).decode(), claimed,
            hanoi.headers(claimed), "out_of_scope")  # fmt: skip
    feed = signer(run, PORTAL_FEED_SOURCE)
    code = "000.00.02.H17-250801-9002"
    delete = _event(PORTAL_FEED_SOURCE, "dossier", code, 8, None)
    add("province-48-motcua deletes (may_delete = false)", "dossier",
        message_key("dossier", code, PORTAL_FEED_SOURCE).decode(),
        delete, feed.headers(delete), "out_of_scope", sender=PORTAL_FEED_SOURCE)  # fmt: skip
    return out


def inject_refused(run: DemoRun) -> None:
    """Publish the malformed, forged and out-of-scope events, each with its sender's Kafka
    credentials (the broker lets them in: only signatures and scope tell them apart);
    none may reach the store."""
    topics = run.settings.topics()
    run.refusals = injected_events(run)
    run.injected = 0
    for sender in dict.fromkeys(item.sender for item in run.refusals):
        publisher = Publisher(run.connection(sender), topics, client_id="demo-malformed")
        try:
            for item in run.refusals:
                if item.sender == sender:
                    topic = topics.change_topic(item.entity)
                    publisher.send(topic, item.key, item.value, item.headers)
            run.injected += publisher.flush()
        finally:
            publisher.close()
