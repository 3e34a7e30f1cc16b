"""A dead letter whose value would not fit the dead-letter topic carries a reference."""

from __future__ import annotations

import hashlib
import json

from consumers.worker import DEAD_LETTER_VALUE_LIMIT, value_reference
from schemas.dead_letter import dead_letter_headers
from transport.reader import Message
from transport.topics import CHANGE_MAX_MESSAGE_BYTES, DEAD_LETTER_MAX_MESSAGE_BYTES


def test_anything_a_change_topic_takes_fits_the_dead_letter_topic_whole() -> None:
    assert CHANGE_MAX_MESSAGE_BYTES < DEAD_LETTER_VALUE_LIMIT < DEAD_LETTER_MAX_MESSAGE_BYTES


def test_a_value_past_the_limit_becomes_size_digest_and_origin_never_its_content() -> None:
    value = b'{"full_name": "Nguy\xe1\xbb\x85n V\xc4\x83n An"}' * 10
    message = Message("p.changes.citizen", 3, 41, value, b"citizen:001090012345")
    headers = dead_letter_headers("too_large", "message too large", message.topic, 3, 41)
    reference, with_digest = value_reference(message, headers)
    body = json.loads(reference)
    assert body == {
        "value_omitted": "too_large",
        "size": len(value),
        "sha256": hashlib.sha256(value).hexdigest(),
        "origin": {"topic": "p.changes.citizen", "partition": 3, "offset": 41},
    }
    assert b"Nguy" not in reference
    assert ("ps.value.sha256", body["sha256"].encode()) in with_digest
    assert with_digest[: len(headers)] == headers
