"""One-dimensional PostgreSQL arrays in their binary wire form, built by C loops.

The batch statements send their rows as arrays (`unnest(%b::text[], …)`, `store.batch`).
psycopg dumps a Python list element by element in a Python loop, after two passes over it
to find its elements' type (once to pick the dumper, once to upgrade it): about 10 % of
the worker's batch thread on the peer's events (docs/performance-log.md, nineteenth round).
Here the type is known, so an array is built in one pass of `map` and `bytes.join`, and a
JSON document (orjson's bytes) goes in without being decoded to text and encoded again.

The wire form (PostgreSQL's `array_recv`): the number of dimensions, a has-null flag, the
element type's oid, then per dimension its length and lower bound (1), then per element
its length (-1 for NULL) and its bytes. PostgreSQL checks what it receives: text that is
not UTF-8 or holds a NUL byte is refused (`CharacterNotInRepertoire`, a `DataError`), as
psycopg's own dumper refuses a NUL before sending.

`register_dumpers` tells psycopg to send these objects as they are, typed; it runs when
the store's PostgreSQL engine is made, before its first connection copies the adapters.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from typing import Any, ClassVar

_HEAD = struct.Struct("!iiiii").pack  # dimensions, has null, element oid, length, lower bound
_EMPTY = struct.Struct("!iii").pack  # no dimension, no null, element oid (psycopg's empty form)
_LENGTH = struct.Struct("!i").pack
_NULL = _LENGTH(-1)
_BIGINT = struct.Struct("!iq").pack  # an element's length (8) and value
_INT = struct.Struct("!ii").pack
_BOOL = struct.Struct("!i?").pack

TEXT_OID, BIGINT_OID, INT_OID, BOOL_OID = 25, 20, 23, 16


class PgArray(bytes):
    """An array's binary form; `array_oid` names its type for the server."""

    array_oid: ClassVar[int]


class TextArray(PgArray):
    array_oid = 1009  # text[]


class BigintArray(PgArray):
    array_oid = 1016  # bigint[]


class IntArray(PgArray):
    array_oid = 1007  # int[]


class BoolArray(PgArray):
    array_oid = 1000  # bool[]


def _elements(parts: Sequence[bytes | None]) -> tuple[int, bytes]:
    """(has null, the elements' bytes): each element's length, then its bytes."""
    if None in parts:
        return 1, b"".join(_NULL if p is None else _LENGTH(len(p)) + p for p in parts)
    return 0, b"".join(map(bytes.__add__, map(_LENGTH, map(len, parts)), parts))  # type: ignore[arg-type]


def text_array(items: Sequence[str]) -> TextArray:
    """Text values (none NULL) as `text[]`."""
    return utf8_array(list(map(str.encode, items)))


def utf8_array(parts: Sequence[bytes | None]) -> TextArray:
    """Text already encoded as UTF-8 (JSON documents from orjson), None as NULL, as `text[]`."""
    if not parts:
        return TextArray(_EMPTY(0, 0, TEXT_OID))
    has_null, body = _elements(parts)
    return TextArray(_HEAD(1, has_null, TEXT_OID, len(parts), 1) + body)


def bigint_array(items: Sequence[int]) -> BigintArray:
    """64-bit integers (none NULL) as `bigint[]`; `struct.error` beyond 64 bits."""
    if not items:
        return BigintArray(_EMPTY(0, 0, BIGINT_OID))
    body = b"".join(map(_BIGINT, repeat(8, len(items)), items))
    return BigintArray(_HEAD(1, 0, BIGINT_OID, len(items), 1) + body)


def int_array(items: Sequence[int]) -> IntArray:
    """32-bit integers (none NULL) as `int[]`."""
    if not items:
        return IntArray(_EMPTY(0, 0, INT_OID))
    body = b"".join(map(_INT, repeat(4, len(items)), items))
    return IntArray(_HEAD(1, 0, INT_OID, len(items), 1) + body)


def bool_array(items: Sequence[bool]) -> BoolArray:
    """Booleans (none NULL) as `bool[]`."""
    if not items:
        return BoolArray(_EMPTY(0, 0, BOOL_OID))
    body = b"".join(map(_BOOL, repeat(1, len(items)), items))
    return BoolArray(_HEAD(1, 0, BOOL_OID, len(items), 1) + body)


def register_dumpers() -> None:
    """psycopg sends each array class as it is, in binary, with its array type's oid
    (for every connection made after this; idempotent)."""
    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    for cls in (TextArray, BigintArray, IntArray, BoolArray):

        class _Dumper(Dumper):
            format = Format.BINARY
            oid = cls.array_oid

            def dump(self, obj: Any) -> bytes:
                return obj  # type: ignore[no-any-return]

        psycopg.adapters.register_dumper(cls, _Dumper)
