"""What a source with write access to a change topic can send that the Kafka clients
themselves cannot read: a record batch that decompresses to gigabytes, corrupt compressed
data, a header name that is not UTF-8. aiokafka (the worker) and kafka-python (replay,
the readers) decompress a whole batch in memory and decode every header name as UTF-8
before any message reaches the project's checks: such a batch stopped its partition at
every start, and could exhaust the worker's memory.

`install()` puts a guard between each client's fetcher and its record parser (both
fetchers build `MemoryRecords(fetched bytes)`; the guard wraps it and each of its record
batches, and parses with the client's own parser):

- a compressed batch is decompressed here with a bound, `DECOMPRESSED_LIMIT`; the client
  then parses the decompressed records without decompressing again. A batch over the bound,
  or whose compressed data does not decompress, is handed out as one record at the batch's
  last offset, without key or value, marked unreadable (`unreadable_batch`): the worker
  dead-letters it, its offsets range in the reason, and goes on after it.
- once one partition's fetched data has given `DECOMPRESSED_LIMIT` bytes of decompressed
  records, its other batches wait for the next fetch: a fetch of a few MiB of compressed
  batches cannot become gigabytes in memory.
- a record whose header name is not UTF-8 is read by a tolerant parser of the same batch
  (from that record on) and handed out marked unreadable (`not_utf8`), with its key, value
  and the headers that do decode: the worker dead-letters it with its value, and the
  records after it in the batch are read as usual.

The mark is a header whose name is an `UnreadableMark`: a `str` subclass no client creates
from the wire, so a source cannot forge it (`unreadable(headers)` tests the type). Written
here because neither client bounds a batch's decompressed size nor tolerates a header
name it cannot decode (aiokafka 0.14, kafka-python 3.0); the wrapped names are module
globals of their fetchers, checked by `install()` and by the tests of both clients.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any, cast

from aiokafka.codec import snappy_decode

from schemas.dead_letter import Reason

DECOMPRESSED_LIMIT = 32 * 1_048_576

# A v2 record batch's header (Kafka's DefaultRecordBatch), 61 bytes.
_HEADER = struct.Struct(">qiibIhiqqqhii")
_LENGTH_END = 12  # base offset and length: what the batch's length does not count
_ATTRIBUTES = 21  # where the attributes (int16) sit in the header
_CODEC_MASK = 0x07
_TIMESTAMP_TYPE = 0x08
_CONTROL = 0x20
_GZIP, _SNAPPY, _LZ4, _ZSTD = 1, 2, 3, 4
_CODECS = {_GZIP: "gzip", _SNAPPY: "snappy", _LZ4: "lz4", _ZSTD: "zstd"}
_XERIAL = b"\x82SNAPPY\x00"


class UnreadableMark(str):
    """The name of the header that marks a record the guard could not read; its value is
    the reason's text, `code` its reason code."""

    code: str

    def __new__(cls, code: str) -> UnreadableMark:
        mark = super().__new__(cls, "ps.unreadable")
        mark.code = code
        return mark


def unreadable(headers: Any) -> tuple[str, str] | None:
    """(reason code, reason) when a client's record carries the guard's mark."""
    if headers:
        name, value = headers[0]
        if type(name) is UnreadableMark:
            return name.code, value.decode()
    return None


class _Unreadable(Exception):
    pass


class _Record:
    """A record as both clients' fetchers read one (aiokafka's `DefaultRecord`,
    kafka-python's)."""

    __slots__ = (
        "headers",
        "key",
        "offset",
        "size_in_bytes",
        "timestamp",
        "timestamp_type",
        "value",
    )
    checksum = None

    def __init__(
        self,
        offset: int,
        timestamp: int,
        timestamp_type: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        size_in_bytes: int,
    ) -> None:
        self.offset = offset
        self.timestamp = timestamp
        self.timestamp_type = timestamp_type
        self.key = key
        self.value = value
        self.headers = headers
        self.size_in_bytes = size_in_bytes

    def validate_crc(self) -> bool:  # v2 records have no CRC of their own (the batch has)
        return True


def _varint(buffer: bytes | memoryview, pos: int) -> tuple[int, int]:
    """A zigzag varint (Kafka's record fields), and the position after it."""
    shift = result = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise _Unreadable("a record's field runs past its batch")
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _bytes(buffer: memoryview, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(buffer, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buffer):
        raise _Unreadable("a record's field runs past its batch")
    return bytes(buffer[pos : pos + length]), pos + length


def _tolerant_records(batch: memoryview) -> Iterator[_Record]:
    """The records of an uncompressed v2 batch, a record whose header name is not UTF-8
    marked `not_utf8` (with the headers that decode) instead of failing the batch."""
    header = _HEADER.unpack_from(batch)
    base_offset, attributes, first_ts, max_ts, count = (header[i] for i in (0, 5, 7, 8, 12))
    ts_type = 1 if attributes & _TIMESTAMP_TYPE else 0
    pos = _HEADER.size
    for _ in range(count):
        length, pos = _varint(batch, pos)
        start = pos
        ts_delta, pos = _varint(batch, pos + 1)  # after the record's attributes byte
        offset_delta, pos = _varint(batch, pos)
        key, pos = _bytes(batch, pos)
        value, pos = _bytes(batch, pos)
        names, pos = _varint(batch, pos)
        headers: list[tuple[str, bytes | None]] = []
        bad = False
        for _n in range(names):
            name, pos = _bytes(batch, pos)
            header_value, pos = _bytes(batch, pos)
            try:
                headers.append(((name or b"").decode("utf-8"), header_value))
            except UnicodeDecodeError:
                bad = True
        if pos != start + length:
            raise _Unreadable("a record's length does not match its fields")
        if bad:
            mark = UnreadableMark(Reason.NOT_UTF8.value)
            headers.insert(0, (mark, b"a header name is not UTF-8"))
        timestamp = max_ts if ts_type else first_ts + ts_delta
        yield _Record(base_offset + offset_delta, timestamp, ts_type, key, value, headers, length)


def _inflate(codec: int, data: memoryview, limit: int) -> bytes:
    """The batch's records decompressed, refused beyond `limit` bytes before they are
    made (not after)."""
    if codec == _GZIP:  # gzip members, as the clients' gzip readers take them
        out = bytearray()
        rest = bytes(data)
        while rest:
            inflater = zlib.decompressobj(wbits=47)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise _Unreadable(f"decompresses to more than {limit} bytes")
            if not inflater.eof:
                raise _Unreadable("its gzip data ends early")
            rest = inflater.unused_data
        return bytes(out)
    if codec == _SNAPPY:
        total = 0
        if bytes(data[:8]) == _XERIAL and len(data) > 16:
            pos = 16
            while pos < len(data):
                (size,) = struct.unpack_from("!i", data, pos)
                if size < 0 or pos + 4 + size > len(data):
                    raise _Unreadable("its snappy blocks run past the batch")
                total += _varint_unsigned(data, pos + 4)
                pos += 4 + size
        else:
            total = _varint_unsigned(data, 0)
        if total > limit:
            raise _Unreadable(f"decompresses to more than {limit} bytes")
        return cast(
            bytes, snappy_decode(data)
        )  # each block's declared length is checked by its decoder
    if codec == _LZ4:
        import lz4.frame  # type: ignore[import-untyped]

        out = bytearray()
        rest = bytes(data)
        while rest:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out += decompressor.decompress(rest, max_length=limit + 1 - len(out))
            if len(out) > limit or (not decompressor.eof and not decompressor.needs_input):
                raise _Unreadable(f"decompresses to more than {limit} bytes")
            if not decompressor.eof:
                raise _Unreadable("its lz4 data ends early")
            rest = decompressor.unused_data
        return bytes(out)
    if codec == _ZSTD:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=True)
        inflated: bytes = reader.read(limit + 1)
        if len(inflated) > limit:
            raise _Unreadable(f"decompresses to more than {limit} bytes")
        return inflated
    raise _Unreadable(f"its compression codec {codec} is unknown")


def _varint_unsigned(buffer: memoryview, pos: int) -> int:
    """Snappy's preamble: the block's decompressed length, an unsigned varint."""
    shift = result = 0
    while pos < len(buffer) and shift <= 35:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
    raise _Unreadable("its snappy data is not snappy")


class _GuardedBatch:
    """One v2 record batch: the client's own, decompressed here with a bound, read
    tolerantly from a record whose header name does not decode."""

    def __init__(self, batch: Any, raw: memoryview, owner: GuardedRecords) -> None:
        self._batch = batch
        self._raw = raw
        self._owner = owner

    def __getattr__(self, name: str) -> Any:  # the header's fields, `validate_crc` …
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        batch, raw = self._batch, self._raw
        codec = raw[_ATTRIBUTES + 1] & _CODEC_MASK
        if codec:
            try:
                records = _inflate(codec, raw[_HEADER.size :], self._owner.limit)
            except (_Unreadable, zlib.error, RuntimeError, ValueError, OSError) as error:
                yield self._unreadable(error)
                return
            self._owner.inflated += len(records)
            attributes = struct.unpack_from(">h", raw, _ATTRIBUTES)[0] & ~_CODEC_MASK
            head = bytearray(raw[: _HEADER.size])
            struct.pack_into(">i", head, 8, _HEADER.size - _LENGTH_END + len(records))
            struct.pack_into(">h", head, _ATTRIBUTES, attributes)
            raw = memoryview(bytes(head) + records)
            batch = self._owner.parse(raw)
        handed = 0
        try:
            for record in batch:
                handed += 1
                yield record
        except Exception:  # the client's parser failed on a record: read on tolerantly
            try:
                for index, record in enumerate(_tolerant_records(raw)):
                    if index >= handed:
                        yield record
            except _Unreadable as error:
                yield self._unreadable(error)

    def _unreadable(self, error: Exception) -> _Record:
        header = _HEADER.unpack_from(self._raw)
        base, last = header[0], header[0] + header[6]
        codec = _CODECS.get(self._raw[_ATTRIBUTES + 1] & _CODEC_MASK, "no")
        what = error.args[0] if isinstance(error, _Unreadable) else "does not decompress"
        reason = f"record batch of offsets {base}-{last} ({codec} compression) {what}: not read"
        mark = UnreadableMark(Reason.UNREADABLE_BATCH.value)
        ts_type = 1 if header[5] & _TIMESTAMP_TYPE else 0
        return _Record(last, header[8], ts_type, None, None, [(mark, reason.encode())], 0)


class GuardedRecords:
    """A client's `MemoryRecords` over one partition's fetched bytes, its v2 data batches
    guarded, and no further batch once `limit` bytes were decompressed."""

    def __init__(self, data: bytes, parser: type, limit: int = DECOMPRESSED_LIMIT) -> None:
        self._records = parser(data)
        self._parser = parser
        self._data = memoryview(data)
        self._pos = 0
        self.limit = limit
        self.inflated = 0

    def __getattr__(self, name: str) -> Any:  # size_in_bytes, valid_bytes …
        return getattr(self._records, name)

    def parse(self, raw: memoryview) -> Any:
        return self._parser(bytes(raw)).next_batch()

    def has_next(self) -> bool:
        return self.inflated < self.limit and bool(self._records.has_next())

    def next_batch(self, *args: Any) -> Any:
        if self.inflated >= self.limit:
            return None
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        (length,) = struct.unpack_from(">i", self._data, start + 8)
        self._pos = start + _LENGTH_END + length
        raw = self._data[start : self._pos]
        if raw[16] < 2 or raw[_ATTRIBUTES + 1] & _CONTROL:
            return batch  # old formats (brokers convert them on write), control batches
        return _GuardedBatch(batch, raw, self)

    def __iter__(self) -> GuardedRecords:
        return self

    def __next__(self) -> Any:
        batch = self.next_batch()
        if batch is None:
            raise StopIteration
        return batch


class _Guard:
    """What replaces a fetcher's `MemoryRecords`."""

    def __init__(self, parser: type) -> None:
        self.parser = parser

    def __call__(self, data: bytes) -> GuardedRecords:
        return GuardedRecords(data, self.parser)


def install() -> None:
    """Guard both clients' fetchers (once per process)."""
    import aiokafka.consumer.fetcher as aiokafka_fetcher
    import kafka.consumer.fetcher as kafka_fetcher

    for module in (aiokafka_fetcher, kafka_fetcher):
        current: Any = module.MemoryRecords
        if not isinstance(current, _Guard):
            module.MemoryRecords = _Guard(current)
