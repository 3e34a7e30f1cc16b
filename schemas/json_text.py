"""Reading JSON text fast without changing a value: orjson where it reads exactly what the
standard library reads.

orjson reads an integer beyond 64 bits as a float, silently (1e30 for
1000000000000000000000000000000). Such an integer has 19 digits or more in a row; text
without such a run is read with orjson, anything else with `json`, which keeps every
integer exact. A long run of digits inside a string only costs the slower reader."""

from __future__ import annotations

import json
from typing import Any

import orjson

# Every digit as "0": a run of 19 digits is then a run of 19 zeros, which `bytes.find`
# looks for at memchr speed (a regular expression for the run cost 2 µs on a 230-byte
# record, three times orjson's reading of it).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


class DuplicateKey(ValueError):
    """A JSON object that names a key twice."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DuplicateKey("a JSON object names a key twice")
    return result


# `json` keeps the last of a key named twice, silently, and other readers the first: a row
# read so could name another record than its writer meant. Adapters read source data with
# this decoder (its `decode`, `raw_decode`) or `loads_unique`; the contract refuses such an
# event in its own words (`schemas.validation`).
UNIQUE_KEYS = json.JSONDecoder(object_pairs_hook=_unique)


def loads_unique(text: str | bytes | bytearray) -> Any:
    """`json.loads(text)`; DuplicateKey (a ValueError) for an object naming a key twice."""
    return json.loads(text, object_pairs_hook=_unique)


def loads_exact(text: str | bytes) -> Any:
    """`json.loads(text)`, with orjson's speed where it gives the same value."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if raw.translate(_DIGITS_AS_ZERO).find(_LONG_RUN) < 0:
        return orjson.loads(raw)
    return json.loads(raw)
