"""The national store: authority by source, kind and owner; provenance; audit
history; field conflicts; dossier lifecycle; inter-agency dossiers; documents waiting for
their owner; the source registry. Pure logic and a real SQLite store."""

from __future__ import annotations

import io
import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from consumers.checks import classify
from consumers.merge import (
    DOSSIER_TRANSITIONS,
    Authority,
    CanonicalRecord,
    SourceView,
    field_conflicts,
    merge,
    record_changes,
    unusual_transition,
)
from consumers.reconciler import Message, Reconciler
from consumers.registry import Registry
from store import queries
from store.core import Store
from store.export import export_records
from store.tables import record_history
from tests.support.store_helpers import (
    CITIZEN,
    CITIZEN_2,
    CITIZEN_MISSING,
    DOSSIER,
    DOSSIER_2,
    DOSSIER_3,
    G12,
    H26,
    H29,
    ORG,
    REGISTRY,
    T0,
    TOPIC,
    Feed,
    anomaly_rows,
    checked_list,
    conflict_rows,
    event,
    event_id,
    fresh_store,
    history_rows,
    owner_rows,
)

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def view(
    source: str,
    data: dict[str, Any] | None,
    *,
    version: int = 1,
    minutes: int = 0,
    deleted: bool = False,
) -> SourceView:
    return SourceView(
        source, version, f"{source}-{version}", T0 + timedelta(minutes=minutes), deleted, data
    )


def origin(source: str, version: int) -> dict[str, Any]:
    return {"source": source, "version": version}


@pytest.fixture
def store(tmp_path: Path) -> Any:
    target = Store(f"sqlite:///{tmp_path}/s.db")
    target.create_schema()
    yield target
    target.close()


# -- authority ----------------------------------------------------------------------------


def test_source_id_rules_rank_in_order() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-a", "s-b"]}})
    ranks = [authority.rank("citizen", "full_name", view(s, {})) for s in ("s-a", "s-b", "s-c")]
    assert ranks == [2, 1, 0]
    assert authority.rank("citizen", "sex", view("s-a", {})) == 0


def test_kind_rules_use_the_registry() -> None:
    raw = {"citizen": {"full_name": ["kind:national", "kind:ministry"]}}
    authority = Authority.from_mapping(raw, REGISTRY)
    ranks = {
        source: authority.rank("citizen", "full_name", view(source, {}))
        for source in ("national-population", "ministry-btp", "province-01", "unknown-src")
    }
    assert ranks == {
        "national-population": 2,
        "ministry-btp": 1,
        "province-01": 0,
        "unknown-src": 0,
    }
    # without a registry (development mode) no source has a kind: every source ranks equal
    development = Authority.from_mapping(raw)
    assert development.rank("citizen", "full_name", view("national-population", {})) == 0

    views = [
        view("province-01", {"full_name": "Tỉnh"}, minutes=30),
        view("ministry-btp", {"full_name": "Bộ"}, minutes=10),
        view("national-population", {"full_name": "Quốc gia"}, minutes=0),
    ]
    record = merge("citizen", views, authority)
    assert record is not None
    assert record.data == {"full_name": "Quốc gia"}
    assert record.provenance == {"full_name": origin("national-population", 1)}
    record = merge("citizen", views[:2], authority)
    assert record is not None and record.data == {"full_name": "Bộ"}
    # development mode: the latest wins
    record = merge("citizen", views, development)
    assert record is not None and record.data == {"full_name": "Tỉnh"}


def test_owner_issuer_code_rules_documents() -> None:
    authority = Authority.from_mapping({"document": {"*": ["owner:issuer_code"]}}, REGISTRY)
    issuer = view("province-01", {"issuer_code": H26, "title": "Giấy khai sinh"}, minutes=0)
    copy = view("province-79", {"issuer_code": H26, "title": "Bản sao"}, minutes=20)
    assert authority.rank("document", "title", issuer) == 1
    # province-79 does not issue for H26: its claim gives it no rank
    assert authority.rank("document", "title", copy) == 0
    assert authority.rank("document", "title", view("province-79", {"issuer_code": H29})) == 1
    assert authority.rank("document", "title", view("province-01", {"title": "x"})) == 0
    record = merge("document", [copy, issuer], authority)
    assert record is not None
    assert record.data == {"issuer_code": H26, "title": "Giấy khai sinh"}
    assert record.provenance == {
        "issuer_code": origin("province-01", 1),
        "title": origin("province-01", 1),
    }


def test_owner_agency_code_rules_dossiers() -> None:
    authority = Authority.from_mapping({"dossier": {"*": ["owner:agency_code"]}}, REGISTRY)
    handler = view("ministry-btp", {"agency_code": G12, "status": 4}, version=3, minutes=0)
    other = view("province-01", {"agency_code": G12, "status": 9}, version=8, minutes=50)
    assert authority.rank("dossier", "status", handler) == 1
    assert authority.rank("dossier", "status", other) == 0
    record = merge("dossier", [other, handler], authority)
    assert record == CanonicalRecord(
        {"agency_code": G12, "status": 4},
        {"ministry-btp": 3, "province-01": 8},
        {"ministry-btp": ["agency_code", "status"]},
    )
    assert record.provenance == {
        "agency_code": origin("ministry-btp", 3),
        "status": origin("ministry-btp", 3),
    }


def test_unmatched_sources_rank_equal_below_matched_ones() -> None:
    authority = Authority.from_mapping(
        {"citizen": {"full_name": ["national-population", "kind:ministry"]}}, REGISTRY
    )
    views = [
        view("ministry-btp", {"full_name": "Matched"}, minutes=0),
        view("province-01", {"full_name": "Later"}, minutes=20),
        view("province-79", {"full_name": "Earlier"}, minutes=10),
        view("zz-unregistered", {"full_name": "Oldest"}, minutes=5),
    ]
    record = merge("citizen", views, authority)
    assert record is not None and record.data == {"full_name": "Matched"}
    assert [authority.rank("citizen", "full_name", v) for v in views] == [1, 0, 0, 0]
    # among unmatched sources recency decides, not the source id
    record = merge("citizen", views[1:], authority)
    assert record is not None and record.data == {"full_name": "Later"}
    assert record.provenance == {"full_name": origin("province-01", 1)}


def test_deployed_registry_and_authority_work_together() -> None:
    registry = Registry.load(DEPLOY / "registry.toml")
    assert not registry.development_mode
    assert registry.kind("national-population") == "national"
    assert registry.covers_agency("province-01", H26)
    authority = Authority.load(DEPLOY / "authority.toml", registry)
    citizen = [
        view("province-01", {"full_name": "Tỉnh", "phone": "0911111111"}, minutes=30),
        view("national-population", {"full_name": "Dân cư", "phone": "0922222222"}, minutes=0),
    ]
    record = merge("citizen", citizen, authority)
    assert record is not None
    # identity from the population database; contact fields follow recency
    assert record.data == {"full_name": "Dân cư", "phone": "0911111111"}
    document = [
        view("province-01", {"issuer_code": H26, "status": "valid"}, minutes=0),
        view("province-79", {"issuer_code": H26, "status": "revoked"}, minutes=30),
    ]
    record = merge("document", document, authority)
    assert record is not None and record.data["status"] == "valid"


# -- provenance ---------------------------------------------------------------------------


AUTHORITY = Authority.from_mapping(
    {"citizen": {"full_name": ["national-population"], "sex": ["national-population"]}},
    REGISTRY,
)


def test_each_canonical_field_names_its_source_and_version(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    feed.apply(
        event("citizen", CITIZEN, "national-population", 4, {"full_name": "An", "sex": "male"}),
        event("citizen", CITIZEN, "province-01", 7, {"full_name": "Ân", "phone": "0912345678"}),
    )
    assert list(store.iter_records()) == [
        (
            "citizen",
            CITIZEN,
            {"full_name": "An", "sex": "male", "phone": "0912345678"},
            {"national-population": 4, "province-01": 7},
            {
                "full_name": origin("national-population", 4),
                "sex": origin("national-population", 4),
                "phone": origin("province-01", 7),
            },
        )
    ]
    detail = queries.record_detail(store, "citizen", CITIZEN)
    assert detail is not None
    assert detail.provenance["phone"] == origin("province-01", 7)
    assert [v["source"] for v in detail.views] == ["national-population", "province-01"]
    assert detail.conflicts == {"full_name": [["national-population"], ["province-01"]]}
    # a newer version of the winning source moves the provenance to that version
    feed.apply(
        event("citizen", CITIZEN, "province-01", 9, {"full_name": "Ân", "phone": "0987654321"})
    )
    provenance = next(store.iter_records())[4]
    assert provenance["phone"] == origin("province-01", 9)
    assert provenance["full_name"] == origin("national-population", 4)


def test_export_with_provenance(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    feed.apply(
        event("citizen", CITIZEN, "national-population", 2, {"full_name": "An"}),
        event("organization", ORG, "national-business-registry", 5, {"name": "Công ty A"}),
    )
    out = io.StringIO()
    assert export_records(store.url, out, provenance=True) == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {
            "entity": "citizen",
            "key": CITIZEN,
            "data": {"full_name": "An"},
            "sources": {"national-population": 2},
            "provenance": {"full_name": origin("national-population", 2)},
        },
        {
            "entity": "organization",
            "key": ORG,
            "data": {"name": "Công ty A"},
            "sources": {"national-business-registry": 5},
            "provenance": {"name": origin("national-business-registry", 5)},
        },
    ]
    plain = io.StringIO()
    assert export_records(store.url, plain) == 2
    assert all("provenance" not in json.loads(line) for line in plain.getvalue().splitlines())


# -- history ------------------------------------------------------------------------------


def test_each_change_appends_one_history_entry(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    v1 = event("citizen", CITIZEN, "national-population", 1, {"full_name": "An", "sex": "male"})
    v2 = event("citizen", CITIZEN, "national-population", 2, {"full_name": "An", "sex": "female"})
    feed.apply(v1)
    feed.apply(v2)
    # a lower-ranked source's different name changes no canonical field: no entry
    other = event("citizen", CITIZEN, "province-01", 1, {"full_name": "Khác"})
    feed.apply(other)
    assert history_rows(store) == [
        (
            "citizen",
            CITIZEN,
            event_id("national-population", "citizen", CITIZEN, 1),
            "national-population",
            1,
            {"full_name": [None, "An"], "sex": [None, "male"]},
        ),
        (
            "citizen",
            CITIZEN,
            event_id("national-population", "citizen", CITIZEN, 2),
            "national-population",
            2,
            {"sex": ["male", "female"]},
        ),
    ]
    rows, total = queries.history(store, "citizen", CITIZEN)
    assert [r["version"] for r in rows] == [1, 2] and total == 2
    assert all(r["applied_at"].tzinfo is not None for r in rows)


def test_history_shows_the_newest_changes_when_limited(store: Store) -> None:
    """A record with more changes than shown: the newest ones (the oldest were shown,
    and the newest changes missing from what answers a data subject's request)."""
    feed = Feed(store, AUTHORITY)
    for version in range(1, 8):
        feed.apply(
            event("citizen", CITIZEN, "province-01", version, {"phone": f"09123456{version:02d}"})
        )
    rows, total = queries.history(store, "citizen", CITIZEN, limit=3)
    assert [r["version"] for r in rows] == [5, 6, 7] and total == 7
    every, _ = queries.history(store, "citizen", CITIZEN)
    assert [r["version"] for r in every] == list(range(1, 8))


def test_redelivery_adds_no_history(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    raws = [
        event("citizen", CITIZEN, "national-population", 1, {"full_name": "An"}),
        event("citizen", CITIZEN, "province-01", 1, {"phone": "0912345678"}),
        event("citizen", CITIZEN, "province-01", 2, None),
    ]
    feed.apply(*raws)
    before = history_rows(store)
    assert len(before) == 3
    # the same offsets: skipped by the offsets guard
    again = feed.redeliver(raws, start=0)
    assert again.already_applied == 3
    # new offsets, another order: nothing is applied again
    report = feed.apply(*reversed(raws))
    assert [o.outcome for o in report.outcomes] == ["duplicate", "stale", "duplicate"]
    assert history_rows(store) == before


def test_delete_appends_a_history_entry(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An", "email": None}))
    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    assert list(store.iter_records()) == []
    assert history_rows(store)[-1] == (
        "citizen",
        CITIZEN,
        event_id("province-01", "citizen", CITIZEN, 2),
        "province-01",
        2,
        {"full_name": ["An", None], "email": [None, None]},
    )
    assert len(history_rows(store)) == 2


def test_remerge_after_an_authority_change_appends_remerge_entries(store: Store) -> None:
    old = Authority.from_mapping({"citizen": {"full_name": ["province-01"]}}, REGISTRY)
    new = Authority.from_mapping({"citizen": {"full_name": ["province-79"]}}, REGISTRY)
    feed = Feed(store, old)
    feed.apply(
        event("citizen", CITIZEN, "province-01", 3, {"full_name": "Một"}),
        event("citizen", CITIZEN, "province-79", 5, {"full_name": "Bảy chín"}),
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Không đổi"}),
    )
    assert next(store.iter_records())[2] == {"full_name": "Một"}
    entries = len(history_rows(store))
    changed = Reconciler(store, new).remerge(store.record_keys())
    assert changed.total == changed.values == 1
    rows = history_rows(store)
    assert len(rows) == entries + 1
    assert rows[-1] == (
        "citizen",
        CITIZEN,
        None,
        "remerge",
        None,
        {"full_name": ["Một", "Bảy chín"]},
    )
    first = next(store.iter_records())
    assert first[2] == {"full_name": "Bảy chín"}
    assert first[4] == {"full_name": origin("province-79", 5)}
    # nothing more to change
    assert Reconciler(store, new).remerge(store.record_keys()).total == 0
    assert len(history_rows(store)) == entries + 1


def test_prune_history_removes_old_entries(store: Store) -> None:
    feed = Feed(store)
    for version in (1, 2, 3):
        feed.apply(
            event("citizen", CITIZEN, "province-01", version, {"phone": f"091234567{version}"})
        )
    assert len(history_rows(store)) == 3
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with store.write_transaction() as conn:
        conn.execute(
            update(record_history).where(record_history.c.version < 3).values(applied_at=long_ago)
        )
    assert store.prune_history(datetime(2021, 1, 1, tzinfo=UTC)) == 2
    assert [r[4] for r in history_rows(store)] == [3]
    assert store.prune_history(datetime(2021, 1, 1, tzinfo=UTC)) == 0


def test_remerge_of_a_key_without_views_changes_nothing(store: Store) -> None:
    Feed(store).apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}))
    keys = [("citizen", CITIZEN), ("citizen", CITIZEN_2)]
    assert Reconciler(store, AUTHORITY).remerge(keys).total == 0
    assert [r[1] for r in store.iter_records()] == [CITIZEN]


# -- pure helpers -------------------------------------------------------------------------


def test_record_changes() -> None:
    assert record_changes(None, {"a": 1}) == {"a": [None, 1]}
    assert record_changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == {
        "b": [2, 3],
        "c": [None, None],
    }
    assert record_changes({"a": 1}, None) == {"a": [1, None]}
    assert record_changes({"a": {"x": 1}}, {"a": {"x": 1}}) == {}


def test_field_conflicts_pure() -> None:
    views = [
        view("s-a", {"full_name": "A", "sex": "male", "address": {"line": "1", "ward_code": None}}),
        view("s-b", {"full_name": "B", "sex": "male", "address": {"ward_code": None, "line": "1"}}),
        view("s-c", {"full_name": "A", "email": None}),
        view("s-d", None, deleted=True),
    ]
    # equal nested values in another key order agree; absent fields do not disagree
    assert field_conflicts(views) == {"full_name": [["s-a", "s-c"], ["s-b"]]}
    assert field_conflicts(views[:1]) == {}


# -- conflicts ----------------------------------------------------------------------------


def test_disagreement_is_recorded_reported_and_resolved(store: Store) -> None:
    feed = Feed(store, AUTHORITY)
    report = feed.apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "A", "sex": "male"}),
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "B", "sex": "male"}),
    )
    assert report.new_conflicts == [("citizen", "full_name")]
    assert conflict_rows(store) == [
        ("citizen", CITIZEN, "full_name", (("province-01",), ("province-79",)))
    ]
    # still open, not new
    report = feed.apply(
        event("citizen", CITIZEN, "province-01", 2, {"full_name": "A", "phone": "0912345678"})
    )
    assert report.new_conflicts == []
    assert len(conflict_rows(store)) == 1
    # a third source: a new conflict on sex (province-01 no longer says male)
    report = feed.apply(
        event("citizen", CITIZEN, "ministry-btp", 1, {"full_name": "B", "sex": "female"})
    )
    assert report.new_conflicts == [("citizen", "sex")]
    assert conflict_rows(store) == [
        ("citizen", CITIZEN, "full_name", (("ministry-btp", "province-79"), ("province-01",))),
        ("citizen", CITIZEN, "sex", (("ministry-btp",), ("province-79",))),
    ]
    # the sources agree again: the conflicts are gone
    feed.apply(
        event("citizen", CITIZEN, "province-01", 3, {"full_name": "B"}),
        event("citizen", CITIZEN, "ministry-btp", 2, None),
    )
    assert conflict_rows(store) == []
    assert queries.conflict_report(store) == []
    assert queries.open_conflicts(store) == 0


def test_one_name_with_its_tone_mark_elsewhere_is_no_disagreement(store: Store) -> None:
    """The national database types "Hòa", a province "Hoà": one name, two conventions of
    where the tone mark sits. No conflict; the record keeps its truth's spelling."""
    feed = Feed(store, AUTHORITY)
    report = feed.apply(
        event("citizen", CITIZEN, "national-population", 1, {"full_name": "Lê Thị Hòa"}),
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "Lê Thị Hoà"}),
    )
    assert report.new_conflicts == []
    assert conflict_rows(store) == []
    assert next(store.iter_records())[2] == {"full_name": "Lê Thị Hòa"}
    # another tone is another name: a disagreement
    report = feed.apply(
        event("citizen", CITIZEN, "province-01", 2, {"full_name": "Lê Thị Hoá"}),
    )
    assert report.new_conflicts == [("citizen", "full_name")]


@pytest.fixture(params=["sqlite", "postgresql"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The SQLite store, or a PostgreSQL one: the report groups in the database."""
    url = (
        f"sqlite:///{tmp_path}/s.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_store_url")
    )
    target = Store(url)
    target.create_schema()
    yield target
    target.close()


def test_conflict_report_counts_by_source_pair_and_field_worst_first(either_store: Store) -> None:
    store = either_store
    feed = Feed(store)
    raws = []
    for i, key in enumerate([CITIZEN, CITIZEN_2, CITIZEN_MISSING]):
        raws.append(event("citizen", key, "province-01", 1, {"full_name": f"A{i}", "sex": "male"}))
        raws.append(event("citizen", key, "province-79", 1, {"full_name": f"B{i}", "sex": "male"}))
    for key in (ORG, f"{ORG}-001"):
        raws.append(event("organization", key, "province-01", 1, {"name": "X", "status": "active"}))
        raws.append(
            event("organization", key, "ministry-btp", 1, {"name": "Y", "status": "active"})
        )
    report = feed.apply(*raws)
    assert (
        sorted(report.new_conflicts)
        == [("citizen", "full_name")] * 3 + [("organization", "name")] * 2
    )
    # province-79 stops saying anything about sex; the ministry says female
    report = feed.apply(
        event("citizen", CITIZEN, "province-79", 2, {"full_name": "B0"}),
        event("citizen", CITIZEN, "ministry-btp", 1, {"sex": "female"}),
    )
    assert report.new_conflicts == [("citizen", "sex")]
    lines = queries.conflict_report(store)
    assert [(x.entity, x.field, x.sources, x.records) for x in lines] == [
        ("citizen", "full_name", ("province-01", "province-79"), 3),
        ("organization", "name", ("ministry-btp", "province-01"), 2),
        ("citizen", "sex", ("ministry-btp", "province-01"), 1),
    ]
    assert [x.records for x in queries.conflict_report(store, "organization")] == [2]
    assert queries.open_conflicts(store) == 6


def test_conflict_report_does_not_count_agreeing_sources_as_a_pair(store: Store) -> None:
    Feed(store).apply(
        event("citizen", CITIZEN, "province-01", 1, {"sex": "male"}),
        event("citizen", CITIZEN, "province-79", 1, {"sex": "male"}),
        event("citizen", CITIZEN, "ministry-btp", 1, {"sex": "female"}),
    )
    lines = queries.conflict_report(store)
    # province-01 and province-79 both say male: they do not disagree
    assert [(x.field, x.sources, x.records) for x in lines] == [
        ("sex", ("ministry-btp", "province-01"), 1),
        ("sex", ("ministry-btp", "province-79"), 1),
    ]


# -- dossier lifecycle --------------------------------------------------------------------


def dossier_event(version: int, status: int, source: str = "province-01", key: str = DOSSIER):
    return event("dossier", key, source, version, {"agency_code": H26, "status": status})


@pytest.mark.parametrize(
    ("old", "new"), [(2, 1), (10, 4), (3, 2), (9, 4), (7, 9), (8, 4), (5, 2), (10, 9)]
)
def test_unusual_transitions(old: int, new: int) -> None:
    assert unusual_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (1, 2),
        (2, 4),
        (4, 9),
        (9, 10),
        (4, 5),
        (5, 4),
        (6, 9),
        (4, 4),
        (None, 9),
        (1, 4),
        (1, 9),
        (2, 10),
        (1, 5),
        (5, 10),
    ],  # forward jumps: sources report snapshots
)
def test_usual_transitions(old: Any, new: int) -> None:
    assert not unusual_transition(old, new)


def test_lifecycle_table_covers_every_status() -> None:
    assert set(DOSSIER_TRANSITIONS) == set(range(1, 11))
    assert all(targets <= set(range(1, 11)) for targets in DOSSIER_TRANSITIONS.values())


def test_unusual_transition_is_applied_and_flagged(store: Store) -> None:
    feed = Feed(store)
    feed.apply(dossier_event(1, 2))
    report = feed.apply(dossier_event(2, 1))  # 2 -> 1: back to "submitted"
    assert report.anomalies == 1
    assert next(store.iter_records())[2]["status"] == 1
    feed.apply(dossier_event(3, 10))
    report = feed.apply(dossier_event(4, 4))  # 10 -> 4
    assert report.anomalies == 1
    assert next(store.iter_records())[2]["status"] == 4
    rows = queries.anomalies(store)
    assert [(r["key"], r["source"], r["from_status"], r["to_status"]) for r in rows] == [
        (DOSSIER, "province-01", 10, 4),
        (DOSSIER, "province-01", 2, 1),
    ]
    assert rows[0]["event_id"] == event_id("province-01", "dossier", DOSSIER, 4)
    assert queries.anomaly_count(store) == 2
    # redelivery flags nothing again
    feed.apply(dossier_event(2, 1), dossier_event(4, 4))
    assert queries.anomaly_count(store) == 2


def test_usual_transitions_are_not_flagged(store: Store) -> None:
    feed = Feed(store)
    for version, status in enumerate([1, 2, 4, 9, 10], start=1):
        assert feed.apply(dossier_event(version, status)).anomalies == 0
    # all in one batch too
    report = feed.apply(*[dossier_event(v, s, key=DOSSIER_3) for v, s in [(1, 4), (2, 5), (3, 4)]])
    assert report.anomalies == 0
    assert queries.anomaly_count(store) == 0


def test_unusual_transition_within_one_batch(store: Store) -> None:
    report = Feed(store).apply(dossier_event(1, 2), dossier_event(2, 1))
    assert report.anomalies == 1
    assert anomaly_rows(store) == [
        (DOSSIER, "province-01", 2, 1, event_id("province-01", "dossier", DOSSIER, 2))
    ]


def test_transitions_are_per_source(store: Store) -> None:
    feed = Feed(store)
    feed.apply(dossier_event(1, 1, "province-01"))
    # another source's first view with status 9: not a transition of that source
    assert feed.apply(dossier_event(1, 9, "province-79")).anomalies == 0
    # province-01 goes 1 -> 2 (usual) although another source said 9
    assert feed.apply(dossier_event(2, 2, "province-01")).anomalies == 0
    # province-79 goes 9 -> 2: unusual for that source
    assert feed.apply(dossier_event(2, 2, "province-79")).anomalies == 1
    assert anomaly_rows(store)[0][:4] == (DOSSIER, "province-79", 9, 2)


def test_transition_after_a_delete_is_not_flagged(store: Store) -> None:
    feed = Feed(store)
    feed.apply(dossier_event(1, 10))
    feed.apply(event("dossier", DOSSIER, "province-01", 2, None))
    assert feed.apply(dossier_event(3, 1)).anomalies == 0


# -- inter-agency dossiers ----------------------------------------------------------------


def test_inter_agency_dossier_counts_once_with_its_original(store: Store) -> None:
    feed = Feed(store)
    feed.apply(
        event("dossier", DOSSIER, "province-01", 1, {"agency_code": H26, "status": 4}),
        event(
            "dossier", DOSSIER_2, "province-79", 1, {"agency_code": H29, "original_code": DOSSIER}
        ),
    )
    assert queries.distinct_dossiers(store) == 1
    feed.apply(event("dossier", DOSSIER_3, "province-01", 1, {"status": 1}))
    assert queries.distinct_dossiers(store) == 2
    assert store.count_records() == {"dossier": 3}


def test_inter_agency_dossiers_without_their_original_count_once(store: Store) -> None:
    feed = Feed(store)
    feed.apply(
        event("dossier", DOSSIER_2, "province-79", 1, {"original_code": DOSSIER}),
        event("dossier", DOSSIER_3, "province-01", 1, {"original_code": DOSSIER}),
    )
    assert queries.distinct_dossiers(store) == 1


# -- documents waiting for their owner ----------------------------------------------------


def document(key: str, owner_kind: str, owner_id: str, version: int = 1, **extra: Any) -> bytes:
    data = {"owner_kind": owner_kind, "owner_id": owner_id, "issuer_code": H26, **extra}
    return event("document", key, "province-01", version, data)


def test_document_waits_for_its_owner(store: Store) -> None:
    feed = Feed(store)
    feed.apply(document("GKS-1", "citizen", CITIZEN, title="Giấy khai sinh"))
    assert [r[:2] for r in store.iter_records()] == [("document", "GKS-1")]
    assert queries.waiting_documents(store) == 1
    detail = queries.record_detail(store, "document", "GKS-1")
    assert detail is not None and detail.waiting_for_owner == ("citizen", CITIZEN)

    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}))
    assert queries.waiting_documents(store) == 0
    detail = queries.record_detail(store, "document", "GKS-1")
    assert detail is not None and detail.waiting_for_owner is None

    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    assert queries.waiting_documents(store) == 1
    detail = queries.record_detail(store, "document", "GKS-1")
    assert detail is not None and detail.waiting_for_owner == ("citizen", CITIZEN)


def test_document_of_a_present_owner_does_not_wait(store: Store) -> None:
    feed = Feed(store)
    feed.apply(event("organization", ORG, "province-01", 1, {"name": "Công ty"}))
    feed.apply(document("GP-1", "organization", ORG), document("GP-2", "citizen", CITIZEN))
    assert owner_rows(store) == [
        ("document", "GP-1", "organization", ORG, False),
        ("document", "GP-2", "citizen", CITIZEN, True),
    ]
    # the owner changes to a present one; a deleted document leaves no row
    feed.apply(document("GP-2", "organization", ORG, version=2))
    feed.apply(event("document", "GP-1", "province-01", 2, None))
    assert owner_rows(store) == [("document", "GP-2", "organization", ORG, False)]
    assert queries.waiting_documents(store) == 0


def test_a_document_and_its_owner_written_at_once_by_two_workers(postgres_store_url: str) -> None:
    """Two workers (two partitions): the owner's batch writes the citizen, and before it
    commits the other batch writes and commits the citizen's document. Neither saw the
    other's uncommitted rows; once both are in, the document does not wait. (A flag kept
    in the table was computed by each batch from what it saw: it stayed "waiting".)"""
    store = Store(postgres_store_url)
    store.create_schema()
    try:
        owner = checked_list([event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"})])
        doc = checked_list([document("GKS-9", "citizen", CITIZEN)], partition=1)
        errors: list[BaseException] = []

        def other_worker() -> None:
            try:
                Reconciler(store, Authority()).apply(doc, [c.message for c in doc])
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        def before_commit() -> None:  # the owner's batch has written, not committed
            worker = threading.Thread(target=other_worker)
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive(), "the document's batch waited for the owner's"

        Reconciler(store, Authority()).apply(
            owner, [c.message for c in owner], before_commit=before_commit
        )
        assert not errors
        assert owner_rows(store) == [("document", "GKS-9", "citizen", CITIZEN, False)]
        assert queries.waiting_documents(store) == 0
        detail = queries.record_detail(store, "document", "GKS-9")
        assert detail is not None and detail.waiting_for_owner is None
    finally:
        store.close()


OWNER_EVENTS = [
    event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
    event("citizen", CITIZEN_2, "province-79", 1, {"full_name": "Bình"}),
    event("citizen", CITIZEN_2, "province-79", 2, None),
    event("organization", ORG, "ministry-btp", 1, {"name": "Công ty"}),
    document("D-1", "citizen", CITIZEN),
    document("D-2", "citizen", CITIZEN_2),
    document("D-3", "organization", ORG),
    document("D-4", "citizen", CITIZEN_MISSING),
    document("D-5", "citizen", CITIZEN_MISSING, version=1),
    document("D-5", "organization", ORG, version=2),
]
EXPECTED_OWNERS = [
    ("document", "D-1", "citizen", CITIZEN, False),
    ("document", "D-2", "citizen", CITIZEN_2, True),
    ("document", "D-3", "organization", ORG, False),
    ("document", "D-4", "citizen", CITIZEN_MISSING, True),
    ("document", "D-5", "organization", ORG, False),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(OWNER_EVENTS), cuts=st.lists(st.integers(1, 9), max_size=4))
def test_waiting_flags_do_not_depend_on_event_order(order: list[bytes], cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(order)]
    with fresh_store() as target:
        feed = Feed(target)
        for start, end in itertools.pairwise(bounds):
            if end > start:
                feed.apply(*order[start:end])
        assert owner_rows(target) == EXPECTED_OWNERS
        assert queries.waiting_documents(target) == 2


# -- every feature on each backend -------------------------------------------------------


def test_national_store_on_each_backend(store_url: str) -> None:
    """Provenance, history, conflicts, anomalies and owner flags on SQLite and PostgreSQL."""
    store = Store(store_url)
    try:
        store.create_schema()
        feed = Feed(store, AUTHORITY)
        report = feed.apply(
            event("citizen", CITIZEN, "national-population", 2, {"full_name": "An"}),
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "Ân", "phone": "0912345678"}),
            event("citizen", CITIZEN, "province-01", 3, {"full_name": "Ấn", "phone": "0912345678"}),
            document("D-1", "citizen", CITIZEN),
            document("D-2", "citizen", CITIZEN_2),
            dossier_event(1, 2),
            dossier_event(2, 1),
        )
        assert report.new_conflicts == [("citizen", "full_name")]
        assert report.anomalies == 1
        feed.apply(event("citizen", CITIZEN_2, "province-79", 1, {"full_name": "Bình"}))
        feed.apply(event("citizen", CITIZEN, "national-population", 2, {"full_name": "An"}))
        assert list(store.iter_records("citizen")) == [
            (
                "citizen",
                CITIZEN,
                {"full_name": "An", "phone": "0912345678"},
                {"national-population": 2, "province-01": 3},
                {"full_name": origin("national-population", 2), "phone": origin("province-01", 3)},
            ),
            (
                "citizen",
                CITIZEN_2,
                {"full_name": "Bình"},
                {"province-79": 1},
                {"full_name": origin("province-79", 1)},
            ),
        ]
        assert conflict_rows(store) == [
            ("citizen", CITIZEN, "full_name", (("national-population",), ("province-01",)))
        ]
        assert owner_rows(store) == [
            ("document", "D-1", "citizen", CITIZEN, False),
            ("document", "D-2", "citizen", CITIZEN_2, False),
        ]
        assert anomaly_rows(store) == [
            (DOSSIER, "province-01", 2, 1, event_id("province-01", "dossier", DOSSIER, 2))
        ]
        assert [(r[0], r[1], r[3], r[4]) for r in history_rows(store)] == [
            ("citizen", CITIZEN, "national-population", 2),
            ("citizen", CITIZEN, "province-01", 1),
            ("document", "D-1", "province-01", 1),
            ("document", "D-2", "province-01", 1),
            ("dossier", DOSSIER, "province-01", 1),
            ("dossier", DOSSIER, "province-01", 2),
            ("citizen", CITIZEN_2, "province-79", 1),
        ]
        assert queries.distinct_dossiers(store) == 1
        assert queries.waiting_documents(store) == 0
    finally:
        store.close()


# -- registry -----------------------------------------------------------------------------


def message(raw: bytes | None, offset: int = 0) -> Message:
    return Message(TOPIC, 0, offset, raw)


def test_classify_dead_letters_unregistered_sources(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        '[sources.province-01]\nkind = "province"\nname = "Hà Nội"\nprovince_code = "01"\n'
        'agency_codes = ["000.00.01.H26"]\n',
        encoding="utf-8",
    )
    registry = Registry.load(path)
    assert not registry.development_mode
    registered = event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"})
    unregistered = event("citizen", CITIZEN, "province-99", 1, {"full_name": "An"})
    valid, dead = classify(
        [message(registered, 0), message(unregistered, 1), message(b"{", 2)], registry
    )
    assert [c.message.offset for c in valid] == [0]
    assert [(d.message.offset, d.code) for d in dead] == [
        (1, "unregistered_source"),
        (2, "invalid_json"),
    ]
    # once registered, the dead letter can be re-driven
    path.write_text(
        path.read_text(encoding="utf-8") + '\n[sources.province-99]\nkind = "province"\n'
        'name = "Mới"\n',
        encoding="utf-8",
    )
    valid, dead = classify([dead[0].message], Registry.load(path))
    assert dead == [] and [c.event.source for c in valid] == ["province-99"]


def test_development_mode_accepts_every_source() -> None:
    raws = [event("citizen", CITIZEN, s, 1, {"full_name": "An"}) for s in ("any-src", "x-99")]
    for registry in (Registry(), Registry.load(None), None):
        valid, dead = classify([message(r, i) for i, r in enumerate(raws)], registry)
        assert dead == [] and len(valid) == 2
    assert Registry().development_mode
    assert Registry().accepts("whatever")
    assert not REGISTRY.accepts("whatever")


def test_registry_rejects_an_unknown_kind(tmp_path: Path) -> None:
    from pydantic import ValidationError

    path = tmp_path / "registry.toml"
    path.write_text('[sources.s-a]\nkind = "village"\nname = "x"\n', encoding="utf-8")
    with pytest.raises(ValidationError):
        Registry.load(path)


def test_applied_events_of_the_reconciler_are_registered_ones(tmp_path: Path) -> None:
    """classify + apply: a dead-lettered event never reaches the store, but its offset
    is passed."""
    target = Store(f"sqlite:///{tmp_path}/s.db")
    target.create_schema()
    raws = [
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
        event("citizen", CITIZEN_2, "rogue-src", 1, {"full_name": "Giả"}),
    ]
    messages = [c.message for c in checked_list(raws)]
    valid, dead = classify(messages, REGISTRY)
    Reconciler(target, AUTHORITY).apply(valid, messages)
    assert [r[1] for r in target.iter_records()] == [CITIZEN]
    assert [d.code for d in dead] == ["unregistered_source"]
    assert target.all_offsets() == {(TOPIC, 0): 2}
    target.close()


def test_record_keys_come_page_by_page_along_the_views(store_url: str) -> None:
    """`remerge` reads the keys in keyset pages (bounded memory at any size): the pages
    hold every key once, in order, a record of several sources once."""
    target = Store(store_url)
    target.create_schema()
    try:
        feed = Feed(target)
        feed.apply(
            event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}),
            event("citizen", CITIZEN, "province-79", 1, {"phone": "0912345678"}),
            event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Bình"}),
            event("citizen", CITIZEN_MISSING, "province-01", 1, None),  # a tombstone only
            event("organization", ORG, "national-business-registry", 1, {"name": "Công ty A"}),
        )
        every = target.record_keys()
        assert len(every) == 4 == target.count_record_keys()
        assert [k for page in target.record_key_pages(size=2) for k in page] == every
        assert [len(page) for page in target.record_key_pages(size=2)] == [2, 2]
        assert list(target.record_key_pages("organization", size=3)) == [[("organization", ORG)]]
        assert target.count_record_keys("citizen") == 3
    finally:
        target.close()
