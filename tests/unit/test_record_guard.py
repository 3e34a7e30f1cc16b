"""The guard between the Kafka clients' fetchers and their record parsers
(`transport.guard`), on record batches written byte by byte: what both clients read is
read the same; a decompression bomb, corrupt compressed data or a header name that is not
UTF-8 becomes a marked record instead of an exception that stops the partition."""

from __future__ import annotations

import gzip
from typing import Any

import aiokafka.consumer.fetcher
import kafka.consumer.fetcher
import pytest
from aiokafka.record.memory_records import MemoryRecords as AioRecords
from kafka.record import MemoryRecords as KafkaRecords

from consumers.checks import classify
from tests.support.raw_batches import CODECS, Record, encode_batch
from transport import guard
from transport.guard import GuardedRecords, UnreadableMark, unreadable
from transport.message import Message

T = 1_700_000_000_000
PARSERS = {"aiokafka": AioRecords, "kafka-python": KafkaRecords}


def _records(n: int, start: int = 0) -> list[Record]:
    return [
        (f"citizen:{i}:p".encode(), f'{{"n": {i}}}'.encode(), [(b"ps.kid", b"k1"), (b"h", b"")])
        for i in range(start, start + n)
    ]


def _read(data: bytes, parser: type, limit: int = guard.DECOMPRESSED_LIMIT) -> list[Any]:
    records = GuardedRecords(data, parser, limit)
    out = []
    while records.has_next():
        batch = records.next_batch()
        assert batch is not None
        assert batch.validate_crc()
        out += list(batch)
    assert records.next_batch() is None
    return out


def _plain(data: bytes, parser: type) -> list[Any]:
    records = parser(data)
    out = []
    while records.has_next():
        out += list(records.next_batch())
    return out


def _fields(record: Any) -> tuple[Any, ...]:
    return (record.offset, record.key, record.value, list(record.headers), record.timestamp)


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
@pytest.mark.parametrize("codec", CODECS)
def test_what_the_clients_read_is_read_the_same_through_the_guard(parser: type, codec: str) -> None:
    data = b"".join(
        encode_batch(_records(5, 5 * b), codec, base_offset=5 * b, timestamp_ms=1_700_000_000_000)
        for b in range(3)
    )
    guarded = _read(data, parser)
    assert [_fields(r) for r in guarded] == [_fields(r) for r in _plain(data, parser)]
    assert [r.offset for r in guarded] == list(range(15))
    assert all(unreadable(r.headers) is None for r in guarded)


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_a_batch_that_decompresses_beyond_the_limit_is_one_marked_record(
    parser: type, codec: str
) -> None:
    bomb = [(b"k", b"\x00" * 300_000, [])] * 4  # 1.2 MB of zeros, a few KB compressed
    data = encode_batch(_records(2), codec) + encode_batch(bomb, codec, base_offset=2)
    data += encode_batch(_records(2, 6), codec, base_offset=6)
    assert len(data) < 200_000
    read = _read(data, parser, limit=1_000_000)
    assert [r.offset for r in read] == [0, 1, 5, 6, 7]
    marked = read[2]
    assert (marked.key, marked.value) == (None, None)
    code, reason = unreadable(marked.headers) or ("", "")
    assert code == "unreadable_batch"
    assert reason == (
        f"record batch of offsets 2-5 ({codec} compression) decompresses to more than "
        "1000000 bytes: not read"
    )


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_corrupt_compressed_data_is_one_marked_record_and_the_next_batch_is_read(
    parser: type,
) -> None:
    corrupt = encode_batch(_records(3), "gzip", body=gzip.compress(b"x" * 100)[:20])
    data = corrupt + encode_batch(_records(1, 3), "gzip", base_offset=3)
    read = _read(data, parser)
    assert [r.offset for r in read] == [2, 3]
    assert unreadable(read[0].headers) == (
        "unreadable_batch",
        "record batch of offsets 0-2 (gzip compression) its gzip data ends early: not read",
    )


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_a_header_name_that_is_not_utf8_marks_its_record_alone(parser: type, codec: str) -> None:
    records = _records(5)
    key, value, _ = records[2]
    records[2] = (key, value, [(b"ps.kid", b"k1"), (b"\xff\xfe", b"x"), (b"ok", b"1")])
    records[4] = (records[4][0], records[4][1], [(b"\xc3", b"")])
    data = encode_batch(records, codec, timestamp_ms=T) + encode_batch(
        _records(1, 5), codec, base_offset=5, timestamp_ms=T
    )
    with pytest.raises(Exception, match="utf-8"):
        _plain(data, parser)  # what the client does alone
    read = _read(data, parser)
    assert [r.offset for r in read] == list(range(6))
    assert [unreadable(r.headers) is not None for r in read] == [0, 0, 1, 0, 1, 0]
    bad = read[2]
    assert (bad.key, bad.value) == (key, value)  # the letter keeps the value
    assert unreadable(bad.headers) == ("not_utf8", "a header name is not UTF-8")
    assert list(bad.headers)[1:] == [("ps.kid", b"k1"), ("ok", b"1")]
    assert [_fields(r) for r in read[:2]] == [_fields(r) for r in _read(
        encode_batch(_records(2), codec, timestamp_ms=T), parser)]  # fmt: skip


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_one_fetch_hands_out_batches_until_the_limit_was_decompressed(parser: type) -> None:
    big = [(b"k", b"\x00" * 100_000, [])] * 3  # 300 KB a batch decompressed
    data = b"".join(encode_batch(big, "gzip", base_offset=3 * b) for b in range(5))
    read = _read(data, parser, limit=700_000)
    assert [r.offset for r in read] == list(range(9))  # three batches; the rest next fetch


def test_a_header_from_the_wire_cannot_forge_the_mark() -> None:
    forged = encode_batch([(b"k", b"v", [(b"ps.unreadable", b"skipped")])])
    for parser in PARSERS.values():
        (record,) = _read(forged, parser)
        assert unreadable(record.headers) is None
    assert unreadable([(UnreadableMark("not_utf8"), b"why")]) == ("not_utf8", "why")


def test_a_marked_message_is_a_dead_letter_with_its_reason() -> None:
    message = Message("t", 0, 7, None, unreadable=("unreadable_batch", "record batch …"))
    valid, dead = classify([message])
    assert valid == []
    assert [(d.code, d.reason) for d in dead] == [("unreadable_batch", "record batch …")]


def test_install_guards_both_fetchers_once() -> None:
    guard.install()
    guard.install()
    for module in (aiokafka.consumer.fetcher, kafka.consumer.fetcher):
        assert isinstance(module.MemoryRecords, guard._Guard)
        assert not isinstance(module.MemoryRecords.parser, guard._Guard)
