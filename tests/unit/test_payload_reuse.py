"""A parsed event may carry its payload as decoded from the message, used instead of a
dump of the validated model: it must be exactly the dump, for every valid event."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.e2e import make_events
from schemas.validation import parse_event

EVENT = {
    "schema_version": 1,
    "event_id": "8d0f6a52-0e5e-5b8c-9a53-06d1a0c0de06",
    "source": "province-79",
    "op": "upsert",
    "version": 3,
    "occurred_at": "2024-01-15T10:00:00+07:00",
}
TEXT = st.text(st.characters(categories=["L", "N", "Zs", "P"]), min_size=1, max_size=30)
DATES = st.dates().map(lambda d: d.isoformat())
TIMES = st.sampled_from(
    ["2024-01-15T10:00:00+07:00", "2024-01-15T03:00:00Z", "2024-01-15T03:00:00.000+00:00",
     "2024-01-15T10:00:00.123456+07:00", "2024-01-15 10:00:00+07:00"]
)  # fmt: skip
ADDRESS = st.fixed_dictionaries(
    {},
    optional={
        "province_code": st.sampled_from(["01", "79", "48", "02"]),
        "ward_code": st.sampled_from(["26734", "00001"]),
        "line": st.one_of(st.none(), TEXT),
    },
)
DATA = {
    ("citizen", "079305012345"): {
        "full_name": st.one_of(st.none(), TEXT),
        "date_of_birth": st.one_of(st.none(), DATES),
        "sex": st.sampled_from(["male", "female", None]),
        "permanent_address": st.one_of(st.none(), ADDRESS),
        "phone": st.sampled_from(["0912345678", "+84912345678", None]),
        "email": st.sampled_from(["an@example.vn", None]),
    },
    ("organization", "0301234567"): {
        "name": TEXT,
        "status": st.sampled_from(["active", "dissolved"]),
        "address": ADDRESS,
        "legal_representative_id": st.sampled_from(["079305012345", None]),
        "established_on": DATES,
    },
    ("document", "GKS-2024-000123"): {
        "owner_kind": st.just("citizen"),
        "owner_id": st.just("079305012345"),
        "title": TEXT,
        "issued_on": DATES,
        "file_sha256": st.just("ab" * 32),
    },
    ("dossier", "000.00.01.H29-240115-0001"): {
        "procedure_code": st.just("1.000001"),
        "agency_code": st.just("000.00.01.H29"),
        "status": st.integers(1, 10),
        "received_at": TIMES,
        "due_at": st.one_of(st.none(), TIMES),
    },
}


@st.composite
def events(draw: st.DrawFn) -> bytes:
    entity, key = draw(st.sampled_from(sorted(DATA)))
    data = draw(st.fixed_dictionaries({}, optional=DATA[(entity, key)]))
    event = {**EVENT, "entity": entity, "key": key, "data": data}
    return json.dumps(event, ensure_ascii=draw(st.booleans())).encode()


def assert_reused_payload_is_the_dump(raw: bytes) -> dict[str, Any] | None:
    parsed = parse_event(raw)
    assert parsed.event.data is not None
    assert parsed.data_dict() == parsed.event.data.model_dump(mode="json", exclude_unset=True)
    return parsed.data


@settings(max_examples=300, deadline=None)
@given(raw=events())
def test_the_payload_as_decoded_is_the_dump(raw: bytes) -> None:
    assert_reused_payload_is_the_dump(raw)


def test_the_bench_mix_reuses_the_payload_and_equals_the_dump() -> None:
    reused = 0
    for event in make_events(3000, 5):
        raw = json.dumps(event, ensure_ascii=False).encode()
        try:
            parsed = parse_event(raw).event
        except Exception:  # the mix's invalid events
            continue
        if parsed.data is not None:  # an upsert
            reused += assert_reused_payload_is_the_dump(raw) is not None
    assert reused > 1500  # the fast path is taken: a test that can tell
