"""A producer's message value (`schemas.builder.event_bytes`) and the event id: orjson and
the id computed without `uuid`, held to what `json` and `uuid.uuid5` give for every input."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import InvalidEvent, derive_event_id, parse_event
from schemas.builder import build_event, event_bytes
from schemas.validation import EVENT_ID_NAMESPACE, derive_event_id_text

OCCURRED = datetime(2025, 8, 1, 8, 30, tzinfo=UTC)


def json_bytes(event: dict[str, Any]) -> bytes:
    """What producers sent before: the standard library's compact UTF-8 JSON."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def verdict(raw: bytes) -> Any:
    try:
        return parse_event(raw).event.model_dump(mode="json")
    except InvalidEvent as error:
        return error.code


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(data=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6), key=st.text())
def test_the_bytes_read_as_the_standard_librarys_and_get_the_same_verdict(
    data: dict[str, Any], key: str
) -> None:
    event = build_event("province-79", "citizen", key, 3, OCCURRED, data)
    try:
        before = json_bytes(event)
    except UnicodeEncodeError:  # a lone surrogate: refused, to the dead letters
        assert verdict(event_bytes(event)) == "not_utf8"
        return
    raw = event_bytes(event)
    assert verdict(raw) == verdict(before)
    if raw != before:  # orjson's: the same JSON value (floats written shortest either way)
        assert orjson.loads(raw) == json.loads(before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_is_written_as_json_writes_it_and_refused(bad: float) -> None:
    event = build_event(
        "province-79", "citizen", "079090000123", 1, OCCURRED, {"x": [1, {"y": bad}]}
    )
    raw = event_bytes(event)
    assert raw == json_bytes(event)  # NaN / Infinity, not orjson's null
    assert verdict(raw) == "invalid_json"


def test_a_lone_surrogate_is_refused_as_not_utf8() -> None:
    """An adapter's text with a lone surrogate (a file read with `surrogateescape`) is
    refused by the validation, so the record is dead-lettered, not its source stopped."""
    event = build_event("province-79", "citizen", "079090000123", 1, OCCURRED, {"x": "a\udc80"})
    assert verdict(event_bytes(event)) == "not_utf8"


def test_what_json_refuses_is_still_refused() -> None:
    event = build_event(
        "province-79", "citizen", "079090000123", 1, OCCURRED, {"d": date(2025, 1, 2)}
    )
    with pytest.raises(TypeError):
        event_bytes(event)  # a mapping left a date unconverted: a bug, not silently sent


@given(source=st.text(), entity=st.text(), key=st.text(), version=st.integers(0, 2**63 - 1))
def test_the_event_id_text_is_the_uuid5s(source: str, entity: str, key: str, version: int) -> None:
    name = f"{source}\x1f{entity}\x1f{key}\x1f{version}"
    try:
        expected = uuid.uuid5(EVENT_ID_NAMESPACE, name)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            derive_event_id_text(source, entity, key, version)
        return
    assert derive_event_id_text(source, entity, key, version) == str(expected)
    assert derive_event_id(source, entity, key, version) == expected
