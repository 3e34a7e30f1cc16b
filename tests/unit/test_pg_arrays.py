"""The batch's arrays built by `store.pg_arrays` are, byte for byte, what psycopg's own
dumpers send for the same values and types (the server's `array_recv` reads them)."""

from __future__ import annotations

import struct

import orjson
from hypothesis import given
from hypothesis import strategies as st
from psycopg.adapt import PyFormat, Transformer
from psycopg.types.numeric import Int4, Int8

from store.pg_arrays import bigint_array, bool_array, int_array, text_array, utf8_array

# PostgreSQL text: any code point but NUL and the surrogates (not UTF-8)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


def psycopg_dump(values: list[object]) -> bytes:
    transformer = Transformer()
    dumper = transformer.get_dumper(values, PyFormat.BINARY)
    return bytes(dumper.dump(values))


@given(st.lists(TEXT, min_size=1, max_size=40))
def test_text_arrays_as_psycopg_dumps_them(values: list[str]) -> None:
    assert text_array(values) == psycopg_dump(values)


@given(st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=40).filter(lambda v: any(v)))
def test_utf8_arrays_with_nulls_as_psycopg_dumps_their_text(values: list[str | None]) -> None:
    encoded = [None if v is None else v.encode() for v in values]
    assert utf8_array(encoded) == psycopg_dump(values)


@given(st.lists(st.dictionaries(TEXT, st.integers(-(2**63), 2**63 - 1) | TEXT), max_size=20))
def test_json_documents_go_as_their_text(documents: list[dict[str, object]]) -> None:
    encoded = [orjson.dumps(d) for d in documents]
    texts: list[object] = [e.decode() for e in encoded]
    assert utf8_array(encoded) == (psycopg_dump(texts) if texts else text_array([]))


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=40))
def test_bigint_arrays_as_psycopg_dumps_int8(values: list[int]) -> None:
    assert bigint_array(values) == psycopg_dump([Int8(v) for v in values])


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=40))
def test_int_arrays_as_psycopg_dumps_int4(values: list[int]) -> None:
    assert int_array(values) == psycopg_dump([Int4(v) for v in values])


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_bool_arrays_as_psycopg_dumps_them(values: list[bool]) -> None:
    assert bool_array(values) == psycopg_dump(values)


def test_empty_arrays_name_their_element_type() -> None:
    # PostgreSQL's empty array in binary (psycopg sends an untyped empty list as '{}')
    assert text_array([]) == utf8_array([]) == struct.pack("!iii", 0, 0, 25)
    assert bigint_array([]) == struct.pack("!iii", 0, 0, 20)  # no dimension, int8
    assert int_array([]) == struct.pack("!iii", 0, 0, 23)
    assert bool_array([]) == struct.pack("!iii", 0, 0, 16)
