"""What a raw producer with write access to a change topic can put there that the Kafka
clients themselves cannot read (real broker, batches written byte by byte): a batch that
decompresses to more than the guard's limit, and a record whose header name is not UTF-8.
Before `transport.guard`, each stopped its partition at every start of the worker (exit 3)
and of `replay`. Now each ends in the dead-letter topic with its reason, the valid events
around them are applied, and the store's offsets reach the log's end."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumers.merge import Authority
from schemas import message_key
from schemas.partitioning import partition_for
from tests.support.adapter_helpers import read_topic
from tests.support.kafka_helpers import change_topic, dead_letter_topic, end_offsets, ensure_topics
from tests.support.pipeline_helpers import citizen_events, cli, expected_export, exported
from tests.support.raw_batches import encode_batch, send_batch
from transport.guard import DECOMPRESSED_LIMIT

pytestmark = pytest.mark.kafka


def _record(event: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    key = message_key("citizen", event["key"], event["source"])
    return (key, json.dumps(event, ensure_ascii=False).encode(), headers or [])


def _partition_zero(
    settings_for: Any, store_url: str, keys: int, seed: int
) -> tuple[Any, str, list[dict[str, Any]]]:
    """Settings, the citizen topic, and the events of `keys` citizens that go to its
    partition 0 (where the test writes its batches byte by byte)."""
    settings = settings_for(store_url)
    ensure_topics(settings)
    partitions = settings.topics().change_partitions
    events = [
        e
        for e in citizen_events(keys, 1, seed=seed)
        if partition_for(message_key("citizen", e["key"], e["source"]), partitions) == 0
    ]
    return settings, change_topic(settings, "citizen"), events


def test_a_decompression_bomb_and_a_header_name_not_utf8_are_dead_lettered_and_the_rest_applied(
    settings_for: Any, sqlite_store_url: str
) -> None:
    settings, topic, events = _partition_zero(settings_for, sqlite_store_url, 40, seed=61)
    assert len(events) >= 8
    bootstrap = settings.connection().bootstrap
    send_batch(bootstrap, topic, 0, encode_batch([_record(e) for e in events[:3]], "gzip"))
    # 33 MiB of zeros in records of 1 MiB: about 33 KB once compressed, far within the topic's
    # message size; the clients would hold all of it in memory before any check.
    zeros = (message_key("citizen", "1", "x"), b"\x00" * 1_048_576, [])
    bomb = encode_batch([zeros] * (DECOMPRESSED_LIMIT // 1_048_576 + 1), "gzip")
    assert len(bomb) < 200_000
    send_batch(bootstrap, topic, 0, bomb)
    bad_header = _record(events[4], [(b"trace-\xff", b"1")])
    mixed = [_record(events[3]), bad_header, _record(events[5])]
    send_batch(bootstrap, topic, 0, encode_batch(mixed, "none"))
    send_batch(bootstrap, topic, 0, encode_batch([_record(e) for e in events[6:]], "zstd"))
    bomb_last = 3 + DECOMPRESSED_LIMIT // 1_048_576  # the bomb's records sit at offsets 3…

    worker = cli(settings, "worker", "--until-caught-up", timeout=180)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    valid = events[:4] + events[5:]
    assert exported(settings) == expected_export(valid, Authority())

    written = read_topic(settings, dead_letter_topic(settings))
    letters = {dict(r.headers)["ps.reason.code"].decode(): r for r in written}
    assert len(written) == len(letters) == 2
    assert set(letters) == {"unreadable_batch", "not_utf8"}
    bomb_letter = dict(letters["unreadable_batch"].headers)
    assert (letters["unreadable_batch"].key, letters["unreadable_batch"].value) == (None, b"")
    assert bomb_letter["ps.origin.offset"] == str(bomb_last).encode()
    assert (
        bomb_letter["ps.reason.message"]
        == (
            f"record batch of offsets 3-{bomb_last} (gzip compression) decompresses to more than "
            f"{DECOMPRESSED_LIMIT} bytes: not read"
        ).encode()
    )
    header_letter = dict(letters["not_utf8"].headers)
    assert letters["not_utf8"].value == bad_header[1]  # kept, for a redrive once fixed
    assert letters["not_utf8"].key == bad_header[0]
    assert header_letter["ps.reason.message"] == b"a header name is not UTF-8"
    assert header_letter["ps.origin.offset"] == str(bomb_last + 2).encode()

    ends = end_offsets(settings)
    assert ends[(topic, 0)] == bomb_last + 1 + len(mixed) + len(events[6:])
    rerun = cli(settings, "worker", "--until-caught-up", timeout=120)  # nothing left to do
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert len(read_topic(settings, dead_letter_topic(settings))) == 2

    replayed = cli(settings, "replay", "--since", "1h", "--json")  # kafka-python reads them
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert json.loads(replayed.stdout)["read"] == len(events) + 1  # the bomb as one record


def test_a_record_whose_offset_leaves_its_batch_skips_no_event_after_it(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """The broker stores an uncompressed batch without checking its records' offset
    deltas; the clients trust them. One record stored at offset 3 and read as offset 23
    made the worker take the 20 real events after it as applied: none applied, none
    dead-lettered, the lag at 0."""
    from tests.support.raw_batches import _field, _varint

    settings, topic, events = _partition_zero(settings_for, sqlite_store_url, 120, seed=62)
    assert len(events) >= 25
    bootstrap = settings.connection().bootstrap
    send_batch(bootstrap, topic, 0, encode_batch([_record(e) for e in events[:3]], "none"))
    key, value, _ = _record(events[3])
    body = b"\x00" + _varint(0) + _varint(20) + _field(key) + _field(value) + _varint(0)
    jump = encode_batch([(key, value, [])], "none", body=_varint(len(body)) + body)
    send_batch(bootstrap, topic, 0, jump)  # at offset 3, read as 23
    for event in events[4:]:
        send_batch(bootstrap, topic, 0, encode_batch([_record(event)], "none"))

    worker = cli(settings, "worker", "--until-caught-up", timeout=180)

    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    valid = events[:3] + events[4:]
    assert exported(settings) == expected_export(valid, Authority())
    written = read_topic(settings, dead_letter_topic(settings))
    assert [dict(r.headers)["ps.reason.code"] for r in written] == [b"unreadable_batch"]
    assert dict(written[0].headers)["ps.origin.offset"] == b"3"
