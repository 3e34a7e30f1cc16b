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
from tests.support.raw_batches import encode_records as encode_records_for
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


def _fetches(data: bytes, parser: type, limit: int = guard.DECOMPRESSED_LIMIT) -> list[list[Any]]:
    """What a client's fetches read: each fetch from the first batch the one before left."""
    fetched: list[list[Any]] = []
    pos = 0
    while pos < len(data):
        records = GuardedRecords(data[pos:], parser, limit)
        fetched.append([])
        while records.has_next():
            fetched[-1] += list(records.next_batch())
        assert records._pos > 0
        pos += records._pos
    return fetched


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
    fetched = _fetches(data, parser, limit=1_000_000)
    # The refusal counts as the limit's worth: the next batch comes with the next fetch.
    assert [[r.offset for r in f] for f in fetched] == [[0, 1, 5], [6, 7]]
    marked = fetched[0][2]
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
    fetched = _fetches(data, parser)
    assert [[r.offset for r in f] for f in fetched] == [[2], [3]]
    read = fetched[0]
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


class _ManyHeaders(list):  # type: ignore[type-arg]
    """`n` empty headers, as `encode_records` reads them, without making `n` tuples."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter(((b"", b""),) * self.n)


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
@pytest.mark.parametrize("codec", ["none", "gzip"])
def test_a_batch_with_a_record_of_more_headers_than_allowed_is_one_marked_record(
    parser: type, codec: str
) -> None:
    """A header is 2 bytes on the wire and far fewer compressed, and a Python tuple of
    about 128 bytes in the clients: one record of a gzip batch of a few kilobytes became
    gigabytes in the worker, which the OOM killer restarted on it for ever. None of its
    headers is made; the batch is one marked record, as a bomb is, and the next batch is
    read."""
    import tracemalloc

    records = _records(3)
    key, value, _ = records[1]
    records[1] = (key, value, _ManyHeaders(200_000))
    data = encode_batch(records, codec, timestamp_ms=T)
    allowed = _records(1, 3)
    allowed[0] = (allowed[0][0], allowed[0][1], [(b"h", b"")] * guard.MAX_HEADERS)
    data += encode_batch(allowed, codec, base_offset=3, timestamp_ms=T)
    assert len(data) < 2_000 if codec == "gzip" else len(data) > 400_000
    tracemalloc.start()
    try:
        read = _read(data, parser)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak  # the client alone: about 50 MB
    assert [r.offset for r in read] == [2, 3]
    code, reason = unreadable(read[0].headers) or ("", "")
    assert code == "unreadable_batch" and "0-2" in reason and "more than 64 headers" in reason
    assert (read[0].key, read[0].value) == (None, None)
    assert unreadable(read[1].headers) is None and len(read[1].headers) == guard.MAX_HEADERS


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_the_tolerant_parser_hands_out_no_record_outside_its_batch(parser: type) -> None:
    """A batch the client refuses (a header name not UTF-8) is read on by the tolerant
    parser: a record whose offset delta leaves its batch, or goes back, would move the
    consumer's position to where the sender chose, past events nobody then reads."""
    from tests.support.raw_batches import _field, _varint

    def record(delta: int, name: bytes) -> bytes:
        body = b"\x00" + _varint(0) + _varint(delta) + _field(b"k") + _field(b"{}")
        body += _varint(1) + _field(name) + _field(b"v")
        return _varint(len(body)) + body

    for deltas in ((0, 1000), (1, 0)):
        body = record(deltas[0], b"ok") + record(deltas[1], b"\xff")
        data = encode_batch(_records(2), "none", timestamp_ms=T, body=body)
        read = _read(data, parser)
        assert [unreadable(r.headers) is not None for r in read][-1], deltas
        assert all(r.offset <= 1 for r in read), [r.offset for r in read]


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize(
    ("attributes", "deltas", "why"),
    [
        (b"\x00", (0, 20), "offset is not within"),  # past the batch's last offset
        (b"\x00", (1, 0), "offset is not within"),  # back
        (b"\x00", (0, 0), "offset is not within"),  # twice the same
        (b"\x80", (0, 1), "attributes are not 0"),  # read as a varint by the clients
    ],
    ids=["past its batch", "back", "repeated", "attributes 0x80"],
)
def test_a_record_the_clients_would_read_elsewhere_makes_its_batch_one_marked_record(
    parser: type, codec: str, attributes: bytes, deltas: tuple[int, int], why: str
) -> None:
    """The clients trust a record's offset delta, and read its attributes byte as a
    varint: a producer with WRITE made a record at offset 2 read as offset 22 (the 20 real
    events after it skipped, neither applied nor dead-lettered), or a record of one header
    on the broker read as sixteen million (the worker killed for its memory, for ever)."""
    from tests.support.raw_batches import _field, _varint, compress

    def record(first: bytes, delta: int) -> bytes:
        body = first + _varint(0) + _varint(delta) + _field(b"k") + _field(b"{}")
        body += _varint(1) + _field(b"h") + _field(b"v")
        return _varint(len(body)) + body

    body = record(b"\x00", deltas[0]) + record(attributes, deltas[1])
    data = encode_batch(_records(2), codec, timestamp_ms=T, body=compress(codec, body))
    data += encode_batch(_records(1, 2), codec, base_offset=2, timestamp_ms=T)
    read = _read(data, parser)
    assert [r.offset for r in read] == [1, 2]  # the mark at its batch's last offset
    code, reason = unreadable(read[0].headers) or ("", "")
    assert code == "unreadable_batch" and why in reason and "0-1" in reason, reason
    assert unreadable(read[1].headers) is None


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


def _xerial(blocks: list[bytes], version: int = 1, tail: bytes = b"") -> bytes:
    import struct

    import cramjam

    body = b"".join(
        struct.pack("!i", len(c)) + c
        for c in (bytes(cramjam.snappy.compress_raw(b)) for b in blocks)
    )
    return b"\x82SNAPPY\x00" + struct.pack("!ii", version, 1) + body + tail


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_what_the_broker_takes_and_no_codec_reads_is_one_marked_record_not_a_crash(
    parser: type,
) -> None:
    """Leftover bytes after xerial's last block, snappy that is not snappy, zstd and lz4
    that are not: each codec raised its own error out of the client (struct.error,
    cramjam's, zstandard's), and stopped the partition."""
    records = encode_records_for(_records(3))
    bodies = {
        "snappy": _xerial([records], tail=b"\x00\x01"),
        "raw snappy": b"\x05garbage",
        "zstd": b"\x28\xb5\x2f\xfd" + b"\x00" * 20,
        "lz4": b"\x04\x22\x4d\x18" + b"\xff" * 20,
    }
    for name, body in bodies.items():
        codec = name.split()[-1]
        data = encode_batch(_records(3), codec, body=body)
        data += encode_batch(_records(1, 3), codec, base_offset=3)
        read = [r for f in _fetches(data, parser) for r in f]
        assert [r.offset for r in read] == [2, 3], name
        assert unreadable(read[0].headers)[0] == "unreadable_batch"  # type: ignore[index]
        assert unreadable(read[1].headers) is None


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_what_a_client_reads_the_guard_reads_too(parser: type) -> None:
    """A xerial header of another version (kafka-python reads it: Redpanda writes it),
    zero padding after a gzip member (Python's gzip reader skips it), several members."""
    records = encode_records_for(_records(3))
    half = len(records) // 2
    bodies = {
        "snappy": _xerial([records[:half], records[half:]], version=2),
        "gzip": gzip.compress(records[:half]) + gzip.compress(records[half:]) + b"\x00" * 64,
    }
    for codec, body in bodies.items():
        data = encode_batch(_records(3), codec, body=body, timestamp_ms=T)
        read = _read(data, parser)
        assert [_fields(r) for r in read] == [
            _fields(r) for r in _read(encode_batch(_records(3), timestamp_ms=T), parser)
        ], codec


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_a_fetch_of_bombs_decompresses_one_of_them(parser: type) -> None:
    """Each bomb costs a decompression up to the limit: a fetch of hundreds blocked the
    worker's event loop past its group session."""
    bomb = [(b"k", b"\x00" * 300_000, [])] * 4
    data = b"".join(encode_batch(bomb, "zstd", base_offset=4 * b) for b in range(20))
    fetched = _fetches(data, parser, limit=1_000_000)
    assert [[r.offset for r in f] for f in fetched] == [[4 * b + 3] for b in range(20)]


def test_a_marked_batch_says_where_it_begins() -> None:
    bomb = encode_batch([(b"k", b"\x00" * 300_000, [])] * 4, "gzip", base_offset=40)
    (marked,) = _read(bomb, AioRecords, limit=1_000_000)
    assert (marked.offset, guard.first_offset(marked)) == (43, 40)
    (plain,) = _read(encode_batch(_records(1), base_offset=7), AioRecords)
    assert guard.first_offset(plain) == 7


def test_a_codec_library_missing_is_a_configuration_error_not_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Marked unreadable, a good batch would be dead-lettered without its value and
    passed: an install that lacks a codec must stop, as the operations guide says."""
    import sys

    from schemas.errors import ConfigurationError

    data = encode_batch(_records(2), "zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    guard._codec_errors.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="compressed with zstd"):
            _read(data, AioRecords)
    finally:
        guard._codec_errors.cache_clear()
