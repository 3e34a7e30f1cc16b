"""A dead letter always fits the dead-letter topic: a value, key or copied header too large
for it goes as a reference (size, SHA-256, origin), never its content."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from schemas.dead_letter import (
    LETTER_OVERHEAD,
    dead_letter_headers,
    fit_letter,
    kept_headers,
)
from transport.topics import CHANGE_MAX_MESSAGE_BYTES, DEAD_LETTER_MAX_MESSAGE_BYTES

ORIGIN = ("p.changes.citizen", 3, 41)


def own() -> list[tuple[str, bytes]]:
    return dead_letter_headers("too_large", "message too large", *ORIGIN)


def test_anything_a_change_topic_takes_fits_the_dead_letter_topic_whole() -> None:
    mine = own()  # once: its ps.failed_at is the time of the call
    value = b"v" * CHANGE_MAX_MESSAGE_BYTES
    signed = [("ps.sig", b"s" * 88), ("ps.kid", b"province-01-2026")]
    key, fitted, headers = fit_letter(b"citizen:001090012345", value, mine,
                                      kept_headers(signed, 1), ORIGIN,
                                      DEAD_LETTER_MAX_MESSAGE_BYTES)  # fmt: skip
    assert (key, fitted) == (b"citizen:001090012345", value)
    assert headers == mine + kept_headers(signed, 1)


def test_a_value_past_the_limit_becomes_size_digest_and_origin_never_its_content() -> None:
    mine = own()  # once: its ps.failed_at is the time of the call
    value = b'{"full_name": "Nguy\xe1\xbb\x85n V\xc4\x83n An"}' * 10
    key, reference, headers = fit_letter(b"citizen:001090012345", value, mine, [], ORIGIN,
                                         LETTER_OVERHEAD + 100)  # fmt: skip
    assert reference is not None
    body = json.loads(reference)
    assert body == {
        "value_omitted": "too_large",
        "size": len(value),
        "sha256": hashlib.sha256(value).hexdigest(),
        "origin": {"topic": "p.changes.citizen", "partition": 3, "offset": 41},
    }
    assert b"Nguy" not in reference
    assert headers == [*mine, ("ps.value.sha256", body["sha256"].encode())]
    assert key == b"citizen:001090012345"


def test_the_originals_time_is_kept_whatever_signature_headers_come_before_it() -> None:
    kept = kept_headers([("ps.sig", b"s" * 88)] * 20, 1_733_360_000_000)
    _, _, headers = fit_letter(b"k", b"{}", [], kept, ORIGIN, DEAD_LETTER_MAX_MESSAGE_BYTES)
    assert headers[:7] == [("ps.sig", b"s" * 88)] * 7
    assert dict(headers[7:]) == {
        "ps.origin.timestamp": b"1733360000000",
        "ps.headers.omitted": b"13",
    }


def test_an_oversized_key_and_oversized_or_too_many_headers_go_as_references() -> None:
    mine = own()  # once: its ps.failed_at is the time of the call
    key = b"citizen:" + b"0" * 5_000
    kept = [("ps.sig", b"s" * 88)] * 9 + [("ps.kid", b"k" * 2_000)]
    fitted_key, value, headers = fit_letter(key, b"{}", mine, kept, ORIGIN,
                                            DEAD_LETTER_MAX_MESSAGE_BYTES)  # fmt: skip
    assert fitted_key is None and value == b"{}"
    assert headers[: len(mine)] == mine
    rest = headers[len(mine) :]
    assert rest[:8] == [("ps.sig", b"s" * 88)] * 8
    assert dict(rest[8:]) == {
        "ps.headers.omitted": b"2",
        "ps.key.sha256": hashlib.sha256(key).hexdigest().encode(),
        "ps.key.size": b"5008",
    }


@given(
    key=st.one_of(st.none(), st.binary(max_size=3_000)),
    value_size=st.integers(0, 3 * DEAD_LETTER_MAX_MESSAGE_BYTES),
    kept=st.lists(
        st.tuples(
            st.sampled_from(["ps.sig", "ps.kid", "ps.origin.timestamp"]), st.binary(max_size=3_000)
        ),
        max_size=40,
    ),
)
def test_every_letter_fits_the_dead_letter_topic(
    key: bytes | None, value_size: int, kept: list[tuple[str, bytes]]
) -> None:
    mine = own()  # once: its ps.failed_at is the time of the call
    value = b"x" * value_size
    fitted_key, fitted, headers = fit_letter(key, value, mine, kept, ORIGIN,
                                             DEAD_LETTER_MAX_MESSAGE_BYTES)  # fmt: skip
    size = len(fitted_key or b"") + len(fitted or b"") + sum(len(n) + len(v) for n, v in headers)
    assert size <= DEAD_LETTER_MAX_MESSAGE_BYTES - LETTER_OVERHEAD // 2
    if fitted == value:  # kept whole whenever it fits
        return
    assert len(value) > DEAD_LETTER_MAX_MESSAGE_BYTES - LETTER_OVERHEAD - 40_000
