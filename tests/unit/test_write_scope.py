"""Write scope per source, the pure rules: entities,
deletes, kinds per entity, and ownership of dossiers and documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.checks import classify
from consumers.registry import EntityRules, Registry, SourceInfo
from consumers.scope import scope_violation
from schemas import message_key, parse_event, partition_for
from transport.reader import Message
from transport.topics import Topics

H26, H29, G12 = "000.00.01.H26", "000.00.01.H29", "000.00.00.G12"
TOPICS = Topics(prefix="t")
REGISTRY = Registry(
    {
        "province-01": SourceInfo(kind="province", name="Hà Nội", agency_codes=(H26,)),
        "province-79": SourceInfo(kind="province", name="HCM", agency_codes=(H29,)),
        "ministry-btp": SourceInfo(
            kind="ministry",
            name="BTP",
            agency_codes=(G12,),
            entities=("citizen", "document", "dossier"),
        ),
        "national-population": SourceInfo(kind="national", name="Dân cư"),
        "motcua": SourceInfo(
            kind="province",
            name="Một cửa",
            agency_codes=("000.00.02.H17",),
            entities=("dossier", "document"),
            may_delete=False,
        ),
    },
    Path("registry.toml"),
    entity_rules={
        "citizen": EntityRules(kinds=("national", "ministry", "province")),
        "organization": EntityRules(kinds=("national", "province")),
    },
)


def raw(source: str, entity: str, key: str, data: dict[str, Any] | None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "0b8b2e0e-4c38-4c43-9d46-3b8a1f6c2a11",
        "source": source,
        "entity": entity,
        "key": key,
        "op": "upsert" if data is not None else "delete",
        "version": 3,
        "occurred_at": "2025-08-01T08:00:00+07:00",
    }
    if data is not None:
        event["data"] = data
    return event


def verdict(source: str, entity: str, key: str, data: dict[str, Any] | None) -> str | None:
    encoded = json.dumps(raw(source, entity, key, data), ensure_ascii=False).encode()
    return scope_violation(parse_event(encoded).event, REGISTRY)


def dossier(unit: str) -> str:
    return f"{unit}-250801-0001"


def test_a_dossier_is_written_by_the_owner_of_its_code_and_agency_code() -> None:
    assert verdict("province-79", "dossier", dossier(H29), {"agency_code": H29}) is None
    # a province taking a Hồ Chí Minh City dossier with its own agency_code
    taken = verdict("province-01", "dossier", dossier(H29), {"agency_code": H26})
    assert taken is not None and "key" in taken
    # its own code, another agency's agency_code: no
    assert "agency_code" in str(
        verdict("province-01", "dossier", dossier(H26), {"agency_code": H29})
    )
    # agency_code not given: the code decides
    assert verdict("province-01", "dossier", dossier(H26), {"status": 1}) is None
    # an inter-agency dossier continues another agency's dossier: that is allowed
    transferred = {"agency_code": H29, "original_code": dossier(H26)}
    assert verdict("province-79", "dossier", dossier(H29), transferred) is None
    # a national source writes any dossier
    assert verdict("national-population", "dossier", dossier(H29), {"agency_code": H29}) is None


def test_a_delete_is_a_write() -> None:
    assert verdict("province-79", "dossier", dossier(H29), None) is None
    assert verdict("province-01", "dossier", dossier(H29), None) is not None
    assert "may_delete" in str(verdict("motcua", "dossier", dossier("000.00.02.H17"), None))
    # a document's id does not name its issuer: a delete removes only the sender's view
    assert verdict("province-01", "document", "GKS-1", None) is None
    assert "may_delete" in str(verdict("motcua", "document", "GKS-1", None))


def test_a_document_is_written_by_the_owner_of_its_issuer_code() -> None:
    assert verdict("province-01", "document", "GKS-1", {"issuer_code": H26}) is None
    assert verdict("province-01", "document", "GKS-1", {"issuer_code": H29}) is not None
    assert verdict("province-01", "document", "GKS-1", {"title": "Giấy"}) is not None
    assert verdict("ministry-btp", "document", "GKS-1", {"issuer_code": G12}) is None
    assert verdict("national-population", "document", "GKS-1", {"issuer_code": H29}) is None


def test_entities_and_kinds_limit_who_writes_what() -> None:
    company = {"name": "Công ty A", "status": "dissolved"}
    # a ministry creating and dissolving an organisation
    assert "entities" in str(verdict("ministry-btp", "organization", "0100109106", company))
    assert verdict("province-01", "organization", "0100109106", company) is None
    assert verdict("motcua", "citizen", "001090012345", {"full_name": "An"}) is not None
    assert verdict("ministry-btp", "citizen", "001090012345", {"full_name": "An"}) is None
    ministry = Registry(
        {"m-1": SourceInfo(kind="ministry", name="Bộ")},
        Path("r.toml"),
        entity_rules={"organization": EntityRules(kinds=("national", "province"))},
    )
    event = parse_event(
        json.dumps(raw("m-1", "organization", "0100109106", company)).encode()
    ).event
    assert "kinds" in str(scope_violation(event, ministry))


def test_development_mode_and_unregistered_sources_have_no_scope() -> None:
    event = parse_event(
        json.dumps(raw("anyone", "dossier", dossier(H29), {"agency_code": H29})).encode()
    ).event
    assert scope_violation(event, Registry()) is None
    assert scope_violation(event, REGISTRY) is None  # unregistered_source says no first


def test_reasons_never_quote_a_value() -> None:
    reason = verdict("province-01", "dossier", dossier(H29), {"agency_code": H26})
    assert reason is not None and H29 not in reason and H26 not in reason


UNITS = st.sampled_from([H26, H29, G12, "000.00.02.H17", "000.00.05.H48"])


@settings(max_examples=80, deadline=None)
@given(own=st.sets(UNITS, max_size=3), unit=UNITS, agency=st.none() | UNITS)
def test_a_dossier_is_in_scope_exactly_when_the_source_owns_both_agencies(
    own: set[str], unit: str, agency: str | None
) -> None:
    rules = Registry(
        {"p-1": SourceInfo(kind="province", name="x", agency_codes=tuple(sorted(own)))},
        Path("r.toml"),
    )
    data = {"status": 1} if agency is None else {"agency_code": agency}
    event = parse_event(json.dumps(raw("p-1", "dossier", dossier(unit), data)).encode()).event
    owns = unit in own and (agency is None or agency in own)
    assert (scope_violation(event, rules) is None) == owns


@pytest.mark.parametrize(
    ("source", "entity", "key", "data", "expected"),
    [
        ("province-01", "dossier", dossier(H26), {"agency_code": H26}, "valid"),
        ("province-01", "dossier", dossier(H29), {"agency_code": H26}, "out_of_scope"),
        ("province-01", "dossier", dossier(H29), None, "out_of_scope"),
        ("province-01", "document", "GKS-1", {"issuer_code": H29}, "out_of_scope"),
        ("ministry-btp", "organization", "0100109106", {"name": "A"}, "out_of_scope"),
    ],
)
def test_the_worker_dead_letters_out_of_scope_events(
    source: str, entity: str, key: str, data: dict[str, Any] | None, expected: str
) -> None:
    value = json.dumps(raw(source, entity, key, data), ensure_ascii=False).encode()
    mkey = message_key(entity, key, source)
    part = partition_for(mkey, TOPICS.change_partitions)
    message = Message(TOPICS.change_topic(entity), part, 0, value, mkey)
    _, dead = classify([message], REGISTRY, topics=TOPICS)
    assert ([d.code for d in dead] or ["valid"]) == [expected]


def test_a_document_id_that_names_its_issuer_binds_the_document_to_it() -> None:
    """Only such an id ties a document to its issuer: with a bare id an agency could write
    its own issuer_code into another agency's document and win the merge."""
    hanoi_doc = f"{H26}:GPXD-2025-0001"
    assert verdict("province-01", "document", hanoi_doc, {"issuer_code": H26}) is None
    taken = verdict("province-79", "document", hanoi_doc, {"issuer_code": H29})
    assert taken == "key: the document id's issuer is not one of the source's agency_codes"
    assert verdict("province-79", "document", hanoi_doc, None) is not None  # a delete too
    assert verdict("national-population", "document", hanoi_doc, {"issuer_code": H29}) is None
    # a bare id: bound only by the registry's rule
    assert verdict("province-79", "document", "GPXD-2025-0001", {"issuer_code": H29}) is None
    strict = Registry(
        REGISTRY.sources,
        Path("registry.toml"),
        entity_rules={"document": EntityRules(key_names_issuer=True)},
    )
    bare = json.dumps(raw("province-79", "document", "GPXD-2025-0001", {"issuer_code": H29}))
    assert scope_violation(parse_event(bare.encode()).event, strict) == (
        "key: a document id must begin with its issuer's agency code (registry)"
    )
    national = json.dumps(raw("national-population", "document", "GPXD-1", {"title": "A"}))
    assert scope_violation(parse_event(national.encode()).event, strict) is None


def test_the_shipped_registry_requires_document_ids_that_name_their_issuer() -> None:
    shipped = Registry.load(Path(__file__).parents[2] / "deploy" / "registry.toml")
    assert shipped.key_names_issuer("document")
    assert not shipped.key_names_issuer("dossier")


def test_key_names_issuer_is_a_rule_of_documents_only(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text("[entities.dossier]\nkey_names_issuer = true\n", encoding="utf-8")
    with pytest.raises(Exception, match="key_names_issuer"):
        Registry.load(path)
