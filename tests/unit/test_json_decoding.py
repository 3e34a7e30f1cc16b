"""`parse_event`'s JSON reading: orjson for compact JSON it writes back byte for byte, the
checking decoder (duplicate keys, NaN) for everything else. Both must judge alike."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.json_text import loads_exact
from schemas.validation import _DECODER, InvalidEvent, _decode_json

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def checked(raw: bytes) -> tuple[str, Any]:
    """What the checking decoder alone makes of `raw`: ("ok", value) or ("refused", code)."""
    try:
        return ("ok", _DECODER.decode(raw.decode("utf-8")))
    except InvalidEvent as error:
        return ("refused", error.code)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ("refused", "not_utf8" if _not_utf8(raw) else "invalid_json")


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def decoded(raw: bytes) -> tuple[str, Any]:
    try:
        return ("ok", _decode_json(raw))
    except InvalidEvent as error:
        return ("refused", error.code)


def same(a: Any, b: Any) -> bool:
    """Equal, with types (1 is not 1.0 nor True) and float signs (-0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=400)
@given(values, st.booleans(), st.booleans())
def test_every_json_text_is_read_as_the_checking_decoder_reads_it(
    value: Any, compact: bool, ascii_only: bool
) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    raw = json.dumps(value, ensure_ascii=ascii_only, separators=separators).encode()
    want, got = checked(raw), decoded(raw)
    assert want[0] == got[0] == "ok"
    assert same(got[1], want[1])


@given(st.dictionaries(texts, scalars, min_size=1, max_size=4), st.data())
def test_a_duplicate_key_is_refused_in_every_form(members: dict[str, Any], data: Any) -> None:
    name = data.draw(st.sampled_from(sorted(members)))
    body = ",".join(
        f"{json.dumps(k, ensure_ascii=False)}:{json.dumps(v, ensure_ascii=False)}"
        for k, v in [*members.items(), (name, data.draw(scalars))]
    )
    for raw in (f"{{{body}}}".encode(), f'{{"outer":{{{body}}}}}'.encode()):
        assert decoded(raw) == ("refused", "invalid_json")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1}x',
        b'{"a":"\xff"}',
        b"[" * 100_000,
        b'{"a":1,"a":1}',
        b'{"a":184467440737095516160}',
        b'{"a":-0}',
        b'{"a":1E5}',
    ],
)
def test_odd_texts_are_judged_as_the_checking_decoder_judges_them(raw: bytes) -> None:
    want, got = checked(raw), decoded(raw)
    assert got[0] == want[0]
    assert same(got[1], want[1]) if got[0] == "ok" else got == want


@settings(max_examples=300)
@given(values, st.booleans())
def test_loads_exact_reads_what_the_standard_library_reads(value: Any, as_bytes: bool) -> None:
    # integers beyond 64 bits included, which orjson alone would read as floats
    text = json.dumps(value, ensure_ascii=False)
    got = loads_exact(text.encode() if as_bytes else text)
    assert same(got, json.loads(text))


def test_loads_exact_keeps_every_integer_exact() -> None:
    for number in (2**64, -(2**63) - 1, 10**30, 2**64 - 1, -(2**63)):
        assert same(loads_exact(f'{{"n": {number}}}'), {"n": number})


@pytest.mark.parametrize("depth", [33, 40, 200, 300])
@pytest.mark.parametrize("where", ["data", "envelope", "envelope of schema_version 2"])
def test_a_message_nested_too_deep_is_refused_alike_whatever_its_whitespace(
    depth: int, where: str
) -> None:
    """Compact JSON (read by orjson, which skips the decoder's depth check), spaced JSON and
    JSON with an escape (NFC-normalised before validation) all give `invalid_json`."""
    from schemas.builder import build_event
    from schemas.validation import parse_event

    event = build_event("tinh-h29", "citizen", "079185123456", 3, "2026-01-01T00:00:00+07:00",
                        {"full_name": "Nguyễn Văn An"})  # fmt: skip
    nested = json.loads("[" * depth + "]" * depth)
    if where == "data":
        event["data"]["x"] = nested
    else:
        event["x"] = nested
    if where.endswith("2"):
        event["schema_version"] = 2
    compact = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    spaced = json.dumps(event, ensure_ascii=False).encode()
    escaped = json.dumps(event).encode()  # "\u1ec5": not validated as sent
    for raw in (compact, spaced, escaped):
        with pytest.raises(InvalidEvent) as refused:
            parse_event(raw)
        assert refused.value.code == "invalid_json", (raw[:40], refused.value.args)
