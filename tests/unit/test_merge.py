"""Merge rules of the national store (consumers/merge.py): pure functions."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.merge import (
    Authority,
    CanonicalRecord,
    SourceView,
    decide,
    field_conflicts,
    merge,
    record_changes,
    tone_folded,
)
from schemas.views import compact_provenance, expand_provenance

T0 = datetime(2024, 1, 15, 3, 0, tzinfo=UTC)
DEPLOY_AUTHORITY = Path(__file__).resolve().parents[2] / "deploy" / "authority.toml"


def view(
    source: str,
    data: dict[str, Any] | None,
    *,
    version: int = 1,
    minutes: int = 0,
    deleted: bool = False,
) -> SourceView:
    return SourceView(
        source=source,
        version=version,
        event_id=f"{source}-{version}",
        occurred_at=T0 + timedelta(minutes=minutes),
        deleted=deleted,
        data=None if deleted else data,
    )


def rank(
    authority: Authority, entity: str, field: str, source: str, data: dict[str, Any] | None = None
) -> int:
    """The rank of a source's (live) view of a record for one field."""
    return authority.rank(entity, field, view(source, data or {}))


def origin(source: str, version: int = 1) -> dict[str, Any]:
    return {"source": source, "version": version}


def canonical(
    data: dict[str, Any], sources: dict[str, int], provenance: dict[str, dict[str, Any]]
) -> CanonicalRecord:
    """A record from its provenance as readers see it (field -> source, version)."""
    return CanonicalRecord(data, sources, compact_provenance(provenance))


# -- decide: the version rule -------------------------------------------------------------


def test_decide_applies_the_first_view() -> None:
    assert decide(None, 1) == "applied"


@pytest.mark.parametrize(
    ("current", "incoming", "outcome"),
    [
        (5, 6, "applied"),
        (5, 10**12, "applied"),
        (5, 5, "duplicate"),
        (5, 4, "stale"),
        (5, 1, "stale"),
    ],
)
def test_decide_versions(current: int, incoming: int, outcome: str) -> None:
    assert decide(view("s-a", {}, version=current), incoming) == outcome


def test_decide_against_a_tombstone() -> None:
    tombstone = view("s-a", None, version=5, deleted=True)
    assert decide(tombstone, 4) == "stale"
    assert decide(tombstone, 5) == "duplicate"
    assert decide(tombstone, 6) == "applied"


# -- merge --------------------------------------------------------------------------------


def test_single_source_is_the_record() -> None:
    record = merge(
        "citizen", [view("s-a", {"full_name": "An", "sex": "male"}, version=3)], Authority()
    )
    assert record == canonical(
        {"full_name": "An", "sex": "male"},
        {"s-a": 3},
        {"full_name": origin("s-a", 3), "sex": origin("s-a", 3)},
    )
    assert record is not None
    assert record.origins == {"s-a": ["full_name", "sex"]}  # as the store keeps it
    assert record.provenance == {"full_name": origin("s-a", 3), "sex": origin("s-a", 3)}


def test_authority_rank_wins_over_recency_and_source_id() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-a", "s-b"]}})
    views = [
        view("s-a", {"full_name": "From A"}, minutes=0),
        view("s-b", {"full_name": "From B"}, minutes=10),
        view("s-z", {"full_name": "From Z"}, minutes=20),
    ]
    assert merge("citizen", views, authority).data == {"full_name": "From A"}  # type: ignore[union-attr]
    without_a = views[1:]
    assert merge("citizen", without_a, authority).data == {"full_name": "From B"}  # type: ignore[union-attr]


def test_authority_is_per_entity_and_field() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-a"]}})
    views = [
        view("s-a", {"full_name": "A", "sex": "male"}, minutes=0),
        view("s-b", {"full_name": "B", "sex": "female"}, minutes=5),
    ]
    assert merge("citizen", views, authority).data == {"full_name": "A", "sex": "female"}  # type: ignore[union-attr]
    # the same rule does not apply to another entity
    org_views = [view("s-a", {"full_name": "A"}), view("s-b", {"full_name": "B"}, minutes=5)]
    assert merge("organization", org_views, authority).data == {"full_name": "B"}  # type: ignore[union-attr]


def test_latest_occurred_at_breaks_equal_rank() -> None:
    views = [view("s-z", {"name": "old"}, minutes=0), view("s-a", {"name": "new"}, minutes=1)]
    assert merge("organization", views, Authority()).data == {"name": "new"}  # type: ignore[union-attr]


def test_greatest_source_id_breaks_equal_rank_and_time() -> None:
    views = [view("s-b", {"name": "B"}), view("s-c", {"name": "C"}), view("s-a", {"name": "A"})]
    assert merge("organization", views, Authority()).data == {"name": "C"}  # type: ignore[union-attr]


def test_occurred_at_compares_instants_across_offsets() -> None:
    plus7 = datetime(2024, 1, 15, 17, 0, tzinfo=timezone(timedelta(hours=7)))  # 10:00 UTC
    a = SourceView("s-a", 1, "e", plus7, False, {"name": "A"})
    b = SourceView("s-b", 1, "e", datetime(2024, 1, 15, 9, 59, tzinfo=UTC), False, {"name": "B"})
    assert merge("organization", [a, b], Authority()).data == {"name": "A"}  # type: ignore[union-attr]


def test_unnamed_sources_rank_equal_below_named_ones() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-m"]}})
    assert rank(authority, "citizen", "full_name", "s-m") == 1
    assert rank(authority, "citizen", "full_name", "s-x") == 0
    assert rank(authority, "citizen", "full_name", "s-y") == 0
    views = [
        view("s-m", {"full_name": "Named"}, minutes=0),
        view("s-x", {"full_name": "X"}, minutes=30),
        view("s-y", {"full_name": "Y"}, minutes=20),
    ]
    assert merge("citizen", views, authority).data == {"full_name": "Named"}  # type: ignore[union-attr]
    # between the two unnamed sources, recency decides (not their id)
    assert merge("citizen", views[1:], authority).data == {"full_name": "X"}  # type: ignore[union-attr]


def test_rank_order_of_named_sources() -> None:
    authority = Authority.from_mapping({"citizen": {"sex": ["s-1", "s-2", "s-3"]}})
    ranks = [rank(authority, "citizen", "sex", s) for s in ("s-1", "s-2", "s-3", "s-4")]
    assert ranks == [3, 2, 1, 0]


def test_star_rule_applies_to_fields_without_their_own_rule() -> None:
    authority = Authority.from_mapping({"organization": {"*": ["s-a"], "name": ["s-b"]}})
    views = [
        view("s-a", {"name": "A name", "status": "active", "legal_form": "A form"}, minutes=0),
        view("s-b", {"name": "B name", "status": "dissolved", "legal_form": "B form"}, minutes=9),
    ]
    record = merge("organization", views, authority)
    assert record is not None
    assert record.data == {"name": "B name", "status": "active", "legal_form": "A form"}
    assert rank(authority, "organization", "anything", "s-a") == 1
    assert rank(authority, "organization", "name", "s-a") == 0
    assert rank(authority, "citizen", "anything", "s-a") == 0


def test_tombstone_removes_the_source_contribution() -> None:
    views = [
        view("s-a", {"full_name": "A", "phone": "0912345678"}, version=1, minutes=50),
        view("s-b", {"full_name": "B"}, version=2, minutes=0),
    ]
    authority = Authority.from_mapping({"citizen": {"*": ["s-a"]}})
    assert merge("citizen", views, authority) == canonical(
        {"full_name": "A", "phone": "0912345678"},
        {"s-a": 1, "s-b": 2},
        {"full_name": origin("s-a", 1), "phone": origin("s-a", 1)},
    )
    views[0] = view("s-a", None, version=2, deleted=True)
    assert merge("citizen", views, authority) == canonical(
        {"full_name": "B"}, {"s-b": 2}, {"full_name": origin("s-b", 2)}
    )


def test_deleted_view_with_stray_data_contributes_nothing() -> None:
    stray = SourceView("s-a", 3, "e", T0, True, {"full_name": "ghost"})
    assert merge("citizen", [stray], Authority()) is None
    assert merge("citizen", [stray, view("s-b", {"sex": "male"})], Authority()) == canonical(
        {"sex": "male"}, {"s-b": 1}, {"sex": origin("s-b", 1)}
    )


def test_no_live_source_means_no_record() -> None:
    assert merge("citizen", [], Authority()) is None
    tombstones = [view("s-a", None, deleted=True), view("s-b", None, version=4, deleted=True)]
    assert merge("citizen", tombstones, Authority()) is None


def test_null_is_kept_and_absent_falls_back() -> None:
    authority = Authority.from_mapping({"citizen": {"*": ["s-a"]}})
    views = [
        view("s-a", {"full_name": "A", "email": None}),  # asserts there is no email; no phone
        view("s-b", {"full_name": "B", "email": "b@example.vn", "phone": "0912345678"}),
    ]
    record = merge("citizen", views, authority)
    assert record is not None
    assert record.data == {"full_name": "A", "email": None, "phone": "0912345678"}
    assert "email" in record.data


def test_empty_data_is_still_a_live_contribution() -> None:
    record = merge("dossier", [view("s-a", {}, version=9)], Authority())
    assert record == canonical({}, {"s-a": 9}, {})


def test_merge_is_independent_of_view_order() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-b"]}})
    views = [
        view("s-a", {"full_name": "A", "sex": "male", "email": None}, version=3, minutes=5),
        view("s-b", {"full_name": "B", "phone": "0912345678"}, version=1, minutes=1),
        view("s-c", {"sex": "female", "email": "c@example.vn"}, version=2, minutes=5),
        view("s-d", None, version=7, deleted=True),
    ]
    expected = merge("citizen", views, authority)
    assert expected == canonical(
        {"full_name": "B", "sex": "female", "email": "c@example.vn", "phone": "0912345678"},
        {"s-a": 3, "s-b": 1, "s-c": 2},
        {
            "full_name": origin("s-b", 1),
            # s-a and s-c are equally recent: the greater source id wins
            "sex": origin("s-c", 2),
            "email": origin("s-c", 2),
            "phone": origin("s-b", 1),
        },
    )
    for rotation in range(1, len(views)):
        assert merge("citizen", views[rotation:] + views[:rotation], authority) == expected
    assert merge("citizen", list(reversed(views)), authority) == expected


# -- Authority files ----------------------------------------------------------------------


def test_authority_load_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "authority.toml"
    path.write_text(
        '[citizen]\nfull_name = ["s-b", "s-a"]\n"*" = ["s-c"]\n\n[organization]\nname = ["s-a"]\n',
        encoding="utf-8",
    )
    authority = Authority.load(path)
    assert authority.rules == {
        ("citizen", "full_name"): ("s-b", "s-a"),
        ("citizen", "*"): ("s-c",),
        ("organization", "name"): ("s-a",),
    }
    assert rank(authority, "citizen", "full_name", "s-b") == 2
    assert rank(authority, "citizen", "full_name", "s-c") == 0
    assert rank(authority, "citizen", "sex", "s-c") == 1


def test_authority_load_none_ranks_all_equal() -> None:
    authority = Authority.load(None)
    assert authority.rules == {}
    assert rank(authority, "citizen", "full_name", "anything") == 0


def test_authority_load_rejects_invalid_toml(tmp_path: Path) -> None:
    import tomllib

    path = tmp_path / "broken.toml"
    path.write_text("[citizen\nfull_name = ", encoding="utf-8")
    with pytest.raises(tomllib.TOMLDecodeError):
        Authority.load(path)


def test_deployed_authority_file_loads() -> None:
    authority = Authority.load(DEPLOY_AUTHORITY)
    assert authority.rules
    for (entity, _field), sources in authority.rules.items():
        assert entity in {"citizen", "organization", "document", "dossier"}
        assert sources and all(isinstance(s, str) and s for s in sources)
    # the national population database is the truth for identity fields
    assert authority.rules[("citizen", "full_name")] == ("national-population", "ministry-btp")
    ranks = [
        rank(authority, "citizen", "full_name", s)
        for s in ("national-population", "ministry-btp", "province-01")
    ]
    assert ranks == [2, 1, 0]


def test_merge_events_keeps_each_sources_highest_version_and_tombstones() -> None:
    import json as _json

    from consumers.merge import merge_events
    from schemas import derive_event_id, parse_event

    def ev(source: str, version: int, op: str = "upsert", name: str | None = None) -> Any:
        raw: dict[str, Any] = {
            "schema_version": 1, "source": source, "entity": "citizen",
            "event_id": str(derive_event_id(source, "citizen", "001090000001", version)),
            "key": "001090000001", "op": op, "version": version,
            "occurred_at": f"2025-08-0{version}T08:00:00+07:00",
        }  # fmt: skip
        if op == "upsert":
            raw["data"] = {"full_name": name}
        return parse_event(_json.dumps(raw).encode()).event

    events = [ev("s-a", 2, name="B"), ev("s-a", 1, name="A"), ev("s-a", 2, name="B"),
              ev("s-b", 1, name="C"), ev("s-b", 3, "delete"), ev("s-b", 2, name="D")]  # fmt: skip
    merged = merge_events(events, Authority())
    record = merged[("citizen", "001090000001")]
    assert record.data == {"full_name": "B"}
    assert record.sources == {"s-a": 2}
    assert merge_events([ev("s-b", 3, "delete"), ev("s-b", 2, name="D")], Authority()) == {}


# -- merge equals the rule as written, for any views and rules ------------------------------

_SOURCES = ["province-01", "province-79", "ministry-tax", "national-population"]
_FIELDS = ["full_name", "sex", "phone", "email"]


def _by_the_rule(
    entity: str, views: list[SourceView], authority: Authority
) -> CanonicalRecord | None:
    """Rule 3 spelled out: per field, the best of the views holding it by (rank, time,
    source id); the merge computes the same with one ordering per rule list."""
    live = [v for v in views if not v.deleted and v.data is not None]
    if not live:
        return None
    data: dict[str, Any] = {}
    provenance: dict[str, dict[str, Any]] = {}
    for name in sorted({n for v in live for n in v.data or {}}):
        best = max(
            (v for v in live if name in (v.data or {})),
            key=lambda v: (authority.rank(entity, name, v), v.occurred_at, v.source),
        )
        data[name] = (best.data or {})[name]
        provenance[name] = origin(best.source, best.version)
    return canonical(data, {v.source: v.version for v in live}, provenance)


@given(
    views=st.lists(
        st.tuples(
            st.sampled_from(_SOURCES),
            st.dictionaries(st.sampled_from(_FIELDS), st.integers(0, 3), max_size=4),
            st.integers(0, 3),  # minutes: equal times are likely
            st.booleans(),
        ),
        max_size=4,
        unique_by=lambda item: item[0],
    ),
    rules=st.dictionaries(
        st.sampled_from([*_FIELDS, "*"]),
        st.lists(st.sampled_from(_SOURCES), unique=True, max_size=3),
        max_size=3,
    ),
)
def test_merge_follows_the_rule_for_any_views_and_rules(
    views: list[tuple[str, dict[str, Any], int, bool]], rules: dict[str, list[str]]
) -> None:
    authority = Authority.from_mapping({"citizen": rules})
    built = [view(s, d, minutes=m, deleted=gone) for s, d, m, gone in views]
    assert merge("citizen", built, authority) == _by_the_rule("citizen", built, authority)


_scalars = st.sampled_from(["1", "Hà Nội", "Hoà", "Hòa", "Hoá", "", 1, 1.0, True, False, 0, None])
_values = _scalars | st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2)
    ),
    max_leaves=4,
)


@given(st.dictionaries(st.sampled_from(["s-a", "s-b", "s-c", "s-d"]), _values, min_size=1))
def test_conflicts_group_sources_by_equal_json(values: dict[str, Any]) -> None:
    # Sources agree when their values are the same JSON: "1", 1, 1.0 and true all differ,
    # key order does not matter.
    views = [view(source, {"f": value}) for source, value in values.items()]
    assert field_conflicts(views) == _conflicts_by_definition(views)


def _conflicts_by_definition(views: list[SourceView]) -> dict[str, list[list[str]]]:
    """Per field given by two live views or more: the sources grouped by the field's
    canonical JSON (text and non-text never equal) with its tone marks folded, when there
    are two groups or more."""
    result: dict[str, list[list[str]]] = {}
    live = [v for v in views if not v.deleted and v.data is not None]
    for name in sorted({name for v in live for name in v.data or {}}):
        groups: dict[bytes, list[str]] = {}
        for v in sorted(live, key=lambda v: v.source):
            if name in (v.data or {}):
                value = (v.data or {})[name]
                group = tone_folded(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())
                groups.setdefault(group.encode(), []).append(v.source)
        if len(groups) > 1:
            result[name] = sorted(groups.values())
    return result


@given(
    st.dictionaries(
        st.sampled_from(["s-a", "s-b", "s-c", "s-d"]),
        st.tuples(st.dictionaries(st.sampled_from(["f", "g", "h"]), _values), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
def test_conflicts_of_any_views_are_the_definition(
    views: dict[str, tuple[dict[str, Any], bool]],
) -> None:
    # Two live views take a path of their own: it must agree with every other count.
    built = [view(source, data, deleted=gone) for source, (data, gone) in views.items()]
    assert field_conflicts(built) == _conflicts_by_definition(built)
    assert field_conflicts(list(reversed(built))) == _conflicts_by_definition(built)


@pytest.mark.parametrize(
    ("left", "right", "apart"),
    [
        (1, True, True),
        (1, 1.0, True),
        (0, False, True),
        (None, "", True),
        ("1", 1, True),
        ({"a": 1, "b": [1]}, {"b": [1], "a": 1}, False),
        ([1, {"a": True}], [1, {"a": 1}], True),
        ("Hà Nội", "Hà Nội", False),
        (None, None, False),
        ("Nguyễn Thị Thanh Hoà", "Nguyễn Thị Thanh Hòa", False),
        ("Hoà", "Hoá", True),
        ("Hoà", "Hoa", True),
        ({"line": "Thuỷ Nguyên"}, {"line": "Thủy Nguyên"}, False),
        (["Khoẻ"], ["Khỏe"], False),
        ("1", 1, True),
    ],
)
def test_two_sources_disagree_exactly_when_their_json_differs(
    left: Any, right: Any, apart: bool
) -> None:
    views = [view("s-b", {"f": left, "g": "x"}), view("s-a", {"f": right, "h": 1})]
    assert field_conflicts(views) == ({"f": [["s-a"], ["s-b"]]} if apart else {})
    assert field_conflicts(views) == _conflicts_by_definition(views)


# Vietnamese letters as NFD writes them: base letters, the vowels' own marks (circumflex,
# breve, horn) and the five tone marks.
_BASES = "aeiouyAEIOUYnghtđĐ"
_VOWEL_MARKS = "\u0302\u0306\u031b"
_TONES = "\u0300\u0301\u0303\u0309\u0323"
_words = st.lists(
    st.tuples(
        st.text(st.sampled_from(_BASES + _VOWEL_MARKS), min_size=1, max_size=6).filter(
            lambda letters: letters[0] in _BASES
        ),
        st.sampled_from(["", *_TONES]),
        st.integers(0, 6),
    ),
    min_size=1,
    max_size=4,
)


def _typed(words: list[tuple[str, str, int]], shift: int) -> str:
    """The words separated by spaces, each tone mark put after letter (place + shift)."""
    typed = []
    for letters, tone, place in words:
        at = 1 + (place + shift) % len(letters)
        typed.append(letters[:at] + tone + letters[at:])
    return unicodedata.normalize("NFC", " ".join(typed))


@given(_words, st.integers(0, 6))
def test_a_tone_mark_anywhere_in_its_word_is_the_same_spelling(
    words: list[tuple[str, str, int]], shift: int
) -> None:
    assert tone_folded(_typed(words, 0)) == tone_folded(_typed(words, shift))


@given(_words, _words)
def test_other_letters_or_other_tones_are_other_spellings(
    one: list[tuple[str, str, int]], other: list[tuple[str, str, int]]
) -> None:
    # letters compared as NFD orders their marks ("a" with horn then circumflex is "a"
    # with circumflex then horn: NFC makes them one)
    same = [(unicodedata.normalize("NFD", letters), tone) for letters, tone, _ in one] == [
        (unicodedata.normalize("NFD", letters), tone) for letters, tone, _ in other
    ]
    assert (tone_folded(_typed(one, 0)) == tone_folded(_typed(other, 0))) == same


# -- provenance: kept per source, read per field -------------------------------------------


@given(
    given_by=st.dictionaries(
        st.text(min_size=1, max_size=8), st.sampled_from(_SOURCES), max_size=12
    ),
    versions=st.lists(st.integers(1, 2**62), min_size=len(_SOURCES), max_size=len(_SOURCES)),
)
def test_compact_provenance_round_trips(given_by: dict[str, str], versions: list[int]) -> None:
    sources = dict(zip(_SOURCES, versions, strict=True))
    provenance = {name: origin(source, sources[source]) for name, source in given_by.items()}
    origins = compact_provenance(provenance)
    assert sum(map(len, origins.values())) == len(provenance)
    assert all(fields == sorted(fields) for fields in origins.values())
    assert expand_provenance(origins, sources) == provenance
    assert list(expand_provenance(origins, sources)) == sorted(provenance)
    assert compact_provenance(expand_provenance(origins, sources)) == origins
    assert compact_provenance(origins) == origins  # already compact: as it is


def test_the_merge_keeps_each_field_under_the_source_that_gave_it() -> None:
    authority = Authority.from_mapping({"citizen": {"full_name": ["s-b"], "*": ["s-a"]}})
    views = [
        view("s-a", {"full_name": "A", "sex": "male", "phone": "0912345678"}, version=4),
        view("s-b", {"full_name": "B", "email": "b@example.vn"}, version=2),
    ]
    record = merge("citizen", views, authority)
    assert record is not None
    assert record.origins == {"s-a": ["phone", "sex"], "s-b": ["email", "full_name"]}
    assert record.provenance["email"] == origin("s-b", 2)
    assert record.provenance["sex"] == origin("s-a", 4)


def test_provenance_still_per_field_is_read_as_it_is() -> None:
    """A row not yet rewritten by migration 0007 (read during an upgrade)."""
    old = {"full_name": origin("s-a", 3), "sex": origin("s-b", 1)}
    assert expand_provenance(old, {"s-a": 3, "s-b": 1}) == old


_FIELDS = st.dictionaries(
    st.sampled_from(["full_name", "phone", "email", "sex", "date_of_birth", "status"]),
    st.none() | st.integers(0, 3) | st.sampled_from(["", "Lê Thị Hoa", "0912345678"]),
)


@given(st.none() | _FIELDS, st.none() | _FIELDS)
def test_record_changes_is_every_differing_field_in_field_order(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """The fast paths (a new record, a removed one, the same fields) give what the general
    rule gives."""
    old, new = before or {}, after or {}
    expected = {
        name: [old.get(name), new.get(name)]
        for name in sorted(set(old) | set(new))
        if name not in old or name not in new or old[name] != new[name]
    }
    changes = record_changes(before, after)
    assert changes == expected
    assert list(changes) == sorted(changes)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["province-01", "province-79", "ministry-tax"]),
            st.dictionaries(
                st.sampled_from(["full_name", "sex", "phone", "status"]),
                st.integers(0, 3),
                max_size=4,
            ),
            st.integers(0, 3),  # minutes: equal times are likely
        ),
        min_size=2,
        max_size=2,
        unique_by=lambda item: item[0],
    )
)
def test_two_views_merge_as_the_general_path_in_every_order(
    views: list[tuple[str, dict[str, Any], int]],
) -> None:
    # Two live views of an entity without rules take a shorter path; a rule for a field
    # no view has sends the same views through the general one, which ranks them alike.
    # The dicts' order counts too: the store writes them as JSON text.
    built = [view(s, d, minutes=m) for s, d, m in views]
    short = merge("citizen", built, Authority())
    general = merge(
        "citizen", built, Authority.from_mapping({"citizen": {"permanent_address": ["nobody"]}})
    )
    assert short is not None and general is not None
    for part in ("data", "sources", "origins"):
        assert list(getattr(short, part).items()) == list(getattr(general, part).items())


# -- a kind and its identifier come from one source -----------------------------------------

OWNER_TAX = {"issuer_code": "000.00.01.H26", "owner_kind": "organization"}
OWNER_CITIZEN = {
    "issuer_code": "000.00.01.H26",
    "owner_kind": "citizen",
    "owner_id": "001090012345",
}


@pytest.mark.parametrize("ruled", [False, True])
def test_an_owner_s_kind_comes_with_its_id_from_one_source(ruled: bool) -> None:
    """province-01 (later) gives owner_kind alone, national-population a citizen's kind
    and id: field by field the record was an organisation with a citizen's id, an owner
    that cannot exist (its document waited for it for ever)."""
    rules = {"document": {"issuer_code": ["province-01"]}} if ruled else {}
    authority = Authority.from_mapping(rules)
    views = [
        view("province-01", OWNER_TAX, minutes=5),
        view("national-population", OWNER_CITIZEN),
    ]
    record = merge("document", views, authority)
    assert record is not None
    assert (record.data["owner_kind"], record.data["owner_id"]) == ("citizen", "001090012345")
    assert record.provenance["owner_kind"]["source"] == "national-population"
    assert record.provenance["issuer_code"]["source"] == "province-01"


def test_a_kind_from_a_source_naming_the_same_owner_stays() -> None:
    """The later source gives the id alone, the other the same id with its kind: one
    owner still, and the document keeps its owner link (it lost its kind)."""
    views = [
        view("province-01", {"doc_type": "GKS", "owner_id": "001090012345"}, minutes=5),
        view("province-79", {"owner_kind": "citizen", "owner_id": "001090012345"}),
    ]
    record = merge("document", views, Authority())
    assert record is not None
    assert record.data == {"doc_type": "GKS", "owner_kind": "citizen", "owner_id": "001090012345"}
    assert record.provenance["owner_kind"]["source"] == "province-79"


def test_an_id_without_its_kind_leaves_the_record_without_a_kind() -> None:
    views = [
        view("province-01", {"owner_kind": "organization"}, minutes=5),
        view("national-population", {"owner_id": "001090012345"}),
    ]
    record = merge("document", views, Authority())
    assert record is not None and record.data == {"owner_id": "001090012345"}
    assert record.origins == {"national-population": ["owner_id"]}


_KINDS = ["citizen", "organization"]
_IDS = ["001090012345", "0100109106"]


@given(
    views=st.lists(
        st.tuples(
            st.sampled_from(_SOURCES),
            st.fixed_dictionaries(
                {},
                optional={
                    "applicant_kind": st.sampled_from(_KINDS),
                    "applicant_id": st.sampled_from(_IDS),
                    "status": st.integers(1, 3),
                },
            ),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=4,
        unique_by=lambda item: item[0],
    ),
    rules=st.dictionaries(
        st.sampled_from(["applicant_kind", "applicant_id", "status", "*"]),
        st.lists(st.sampled_from(_SOURCES), unique=True, max_size=3),
        max_size=3,
    ),
)
def test_a_dossier_s_applicant_kind_and_id_are_one_source_s(
    views: list[tuple[str, dict[str, Any], int]], rules: dict[str, list[str]]
) -> None:
    authority = Authority.from_mapping({"dossier": rules})
    built = [view(s, d, minutes=m) for s, d, m in views]
    record = merge("dossier", built, authority)
    assert record is not None
    expected = _by_the_rule("dossier", built, authority)
    assert expected is not None
    if "applicant_id" in record.data and "applicant_kind" in record.data:
        # the kind's source names the applicant the record has: one applicant
        (kind_by,) = (v for v in built if v.source == record.provenance["applicant_kind"]["source"])
        assert (kind_by.data or {}).get("applicant_id") == record.data["applicant_id"]
    # every other field as the rule has it
    for name in record.data.keys() - {"applicant_kind"}:
        assert record.data[name] == expected.data[name]


def test_a_birth_s_year_and_date_agree_by_the_authority() -> None:
    """The national database knows a year alone (1945), the Ministry of Justice a date of
    another year (1946-03-02): field by field, the record said born in 1945 and on 2 March
    1946. The one whose giver ranks higher for its own field stays, and the sources'
    disagreement is a conflict on the year."""
    both = ["national-population", "ministry-btp"]
    authority = Authority.from_mapping({"citizen": {"date_of_birth": both, "year_of_birth": both}})
    national = view("national-population", {"year_of_birth": 1945, "full_name": "An"})
    justice = view("ministry-btp", {"date_of_birth": "1946-03-02", "year_of_birth": 1946})
    for views in ([national, justice], [justice, national]):
        record = merge("citizen", views, authority)
        assert record is not None and record.data == {"year_of_birth": 1945, "full_name": "An"}
        assert record.provenance["year_of_birth"]["source"] == "national-population"
        assert field_conflicts(views) == {
            "year_of_birth": [["ministry-btp"], ["national-population"]]
        }
    # a date alone, of another year: a conflict on the year too
    dated = view("ministry-btp", {"date_of_birth": "1946-03-02"})
    assert field_conflicts([national, dated]) == {
        "year_of_birth": [["ministry-btp"], ["national-population"]]
    }
    # the Ministry ranks first for dates: its date stays, the national year goes
    dates_first = Authority.from_mapping(
        {"citizen": {"date_of_birth": ["ministry-btp"], "year_of_birth": []}}
    )
    record = merge("citizen", [national, dated], dates_first)
    assert record is not None and record.data == {"date_of_birth": "1946-03-02", "full_name": "An"}
    # agreeing: both stay, no conflict; without rules, two views, the same rule
    agreeing = view("national-population", {"year_of_birth": 1946})
    record = merge("citizen", [agreeing, dated], authority)
    assert record is not None and record.data == {
        "date_of_birth": "1946-03-02",
        "year_of_birth": 1946,
    }
    assert field_conflicts([agreeing, dated]) == {}
    # a table's empty year column beside a date: the date's year, no disagreement
    nulled = view("ministry-btp", {"date_of_birth": "1946-03-02", "year_of_birth": None})
    assert field_conflicts([agreeing, nulled]) == {}
    record = merge("citizen", [national, dated], Authority())
    assert record is not None and record.data == {"year_of_birth": 1945, "full_name": "An"}


def test_an_empty_rule_list_ranks_every_source_equal_and_not_the_star_s() -> None:
    """`phone = []` under `"*" = ["national-population"]`: the latest report wins (the
    empty list fell back to "*", and a 2024 phone beat a 2025 one)."""
    authority = Authority.from_mapping({"citizen": {"*": ["national-population"], "phone": []}})
    views = [
        view("national-population", {"phone": "0911111111", "full_name": "An"}),
        view("province-01", {"phone": "0922222222", "full_name": "Ân"}, minutes=60),
    ]
    record = merge("citizen", views, authority)
    assert record is not None
    assert record.data == {"phone": "0922222222", "full_name": "An"}


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ({"citizens": {"full_name": ["national-population"]}}, "[citizens] is not an entity"),
        ({"citizen": {"fullname": ["national-population"]}}, "fullname: not a field of citizen"),
        ({"citizen": {"phone": "national-population"}}, "a list of rules"),
        ({"citizen": {"phone": ["kind:nation"]}}, "a kind is one of"),
        ({"document": {"*": ["owner:issuer"]}}, "'owner:issuer': not a field of document"),
        ({"citizen": {"phone": ["National Population"]}}, "is not a source id"),
        ({"citizen": ["national-population"]}, "must be a table of fields"),
    ],
)
def test_an_authority_file_that_would_rank_nobody_is_refused(
    raw: dict[str, Any], said: str
) -> None:
    """A typo in an entity, a field, a kind or a rule list ranked nobody, silently; a
    string for a list became one rule per character."""
    from schemas.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=re.escape(said)):
        Authority.from_mapping(raw)


def test_one_dossier_time_sent_with_two_offsets_is_no_conflict_and_no_change() -> None:
    """A local column's `+07:00` and a timestamptz's `Z` for one instant: the contract holds
    both in UTC, so two sources agree and a re-send in the other form changes nothing."""
    from schemas import parse_event

    def sent(source: str, received_at: str) -> SourceView:
        event = {
            "schema_version": 1,
            "event_id": "8a0f8c3e-4b1e-4f57-9d55-6c1f0e9a2b11",
            "source": source,
            "entity": "dossier",
            "key": "000.00.01.H29-240115-0001",
            "op": "upsert",
            "version": 1,
            "occurred_at": "2024-01-15T03:00:00Z",
            "data": {"status": 4, "received_at": received_at},
        }
        data = parse_event(orjson.dumps(event)).event.data_dict()
        return view(source, data)

    local, utc = sent("prov-a", "2024-01-15T10:00:00+07:00"), sent("prov-b", "2024-01-15T03:00:00Z")
    assert field_conflicts([local, utc]) == {}
    assert record_changes(local.data, utc.data) == {}
