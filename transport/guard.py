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
- a batch with a record of more than `MAX_HEADERS` headers (a few bytes each on the wire,
  far fewer compressed, each a Python object in the clients) is never parsed by the
  client: it is handed out as one record marked unreadable (`unreadable_batch`), as a
  batch over the bound is (a record's own mark, with its key and value, would trust the
  length the record declares to find the next one: made up, it would hand out records of
  the sender's choosing, at offsets of its choosing);
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

import contextlib
import re
import struct
import zlib
from collections.abc import Iterator
from functools import cache
from typing import Any

from schemas.dead_letter import Reason
from schemas.errors import ConfigurationError

DECOMPRESSED_LIMIT = 32 * 1_048_576
# Headers a record may carry. The clients make each one a Python tuple of about 128 bytes
# from 2 bytes on the wire, and far fewer compressed: a batch of a few kilobytes became
# gigabytes in the worker, killed and restarted on it for ever. An event carries a few
# (`ps.sig`, `ps.kid`, a redrive's `ps.attempt` and `ps.origin.timestamp`).
MAX_HEADERS = 64
TOO_MANY_HEADERS = f"has a record with more than {MAX_HEADERS} headers"
ATTRIBUTES_SET = "has a record whose attributes are not 0"
OFFSET_OUTSIDE = "has a record whose offset is not within its batch"

# A v2 record batch's header (Kafka's DefaultRecordBatch), 61 bytes.
_HEADER = struct.Struct(">qiibIhiqqqhii")
_LENGTH_END = 12  # base offset and length: what the batch's length does not count
_ATTRIBUTES = 21  # where the attributes (int16) sit in the header
_LAST_DELTA = 23  # where the last offset delta (int32) sits
_CODEC_MASK = 0x07
_TIMESTAMP_TYPE = 0x08
_CONTROL = 0x20
_GZIP, _SNAPPY, _LZ4, _ZSTD = 1, 2, 3, 4
_CODECS = {_GZIP: "gzip", _SNAPPY: "snappy", _LZ4: "lz4", _ZSTD: "zstd"}
_XERIAL = b"\x82SNAPPY\x00"


class UnreadableMark(str):
    """The name of the header that marks a record the guard could not read; its value is
    the reason's text, `code` its reason code, `first` the first offset it stands for (a
    batch's base offset: the record itself sits at the batch's last)."""

    code: str
    first: int

    def __new__(cls, code: str, first: int = 0) -> UnreadableMark:
        mark = super().__new__(cls, "ps.unreadable")
        mark.code = code
        mark.first = first
        return mark


def first_offset(record: Any) -> int:
    """The first offset a client's record stands for: a marked batch's base offset."""
    headers = record.headers
    if headers and type(headers[0][0]) is UnreadableMark:
        return int(headers[0][0].first)
    return int(record.offset)


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


def _uvarint(buffer: bytes | memoryview, pos: int, bits: int, what: str) -> tuple[int, int]:
    """An unsigned varint of at most `bits` bits, and the position after it; `what` says
    what is wrong when it runs past the buffer or the bits."""
    shift = result = 0
    while pos < len(buffer) and shift < bits:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise _Unreadable(what)


def _varint(buffer: bytes | memoryview, pos: int) -> tuple[int, int]:
    """A zigzag varint (Kafka's record fields), and the position after it."""
    result, pos = _uvarint(buffer, pos, 64, "a record's field runs past its batch")
    return (result >> 1) ^ -(result & 1), pos


def _bytes(buffer: memoryview, pos: int) -> tuple[bytes | None, int]:
    length, pos = _varint(buffer, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buffer):
        raise _Unreadable("a record's field runs past its batch")
    return bytes(buffer[pos : pos + length]), pos + length


def _refused(batch: memoryview) -> str | None:
    """Why the clients must not parse an uncompressed v2 batch, read without making any
    record, or None. Its records' attributes byte (no bit is defined, every client writes
    0) must be 0: the clients read it as a varint, so a byte of 0x80 shifts what they
    read from what the broker and this walk read (a header count of millions). Its offset
    deltas must rise within the batch (the clients trust them: a made-up one hands a
    record out at an offset the sender chose, skipping real events). No record may
    declare more than `MAX_HEADERS` headers. A batch it cannot walk (a length that does
    not move on, fields past the batch) is None: the client's parser refuses it, and the
    tolerant parser says where. Every batch the worker fetches goes through it, so its
    varints are read inline, one- and two-byte ones without a call, and the timestamp
    deltas skipped undecoded."""
    (last_delta,) = struct.unpack_from(">i", batch, _LAST_DELTA)
    (count,) = struct.unpack_from(">i", batch, _HEADER.size - 4)
    pos = _HEADER.size
    previous = -1
    try:
        for _ in range(count):
            byte = batch[pos]
            if byte < 0x80:
                length, pos = (byte >> 1) ^ -(byte & 1), pos + 1
            else:
                length, pos = _varint(batch, pos)
            if length <= 0:  # no record: it would not move on
                return None
            end = pos + length
            if batch[pos]:  # the record's attributes
                return ATTRIBUTES_SET
            pos += 1
            while batch[pos] & 0x80:  # its timestamp delta
                pos += 1
            pos += 1
            byte = batch[pos]  # its offset delta
            if byte < 0x80:
                raw, pos = byte, pos + 1
            elif batch[pos + 1] < 0x80:
                raw, pos = (byte & 0x7F) | (batch[pos + 1] << 7), pos + 2
            else:
                raw, pos = _uvarint(batch, pos, 64, "a record's field runs past its batch")
            delta = (raw >> 1) ^ -(raw & 1)
            if not previous < delta <= last_delta:
                return OFFSET_OUTSIDE
            previous = delta
            for _field in (0, 1):  # its key and its value, skipped
                byte = batch[pos]
                if byte < 0x80:
                    size, pos = (byte >> 1) ^ -(byte & 1), pos + 1
                else:
                    size, pos = _varint(batch, pos)
                if size > 0:
                    pos += size
            byte = batch[pos]  # its header count
            headers = (byte >> 1) ^ -(byte & 1) if byte < 0x80 else _varint(batch, pos)[0]
            if headers > MAX_HEADERS:
                return TOO_MANY_HEADERS
            pos = end
    except (IndexError, _Unreadable):  # runs past the batch
        return None
    return None


def _tolerant_records(batch: memoryview) -> Iterator[_Record]:
    """The records of an uncompressed v2 batch, a record whose header name is not UTF-8
    marked `not_utf8` (with the headers that decode) instead of failing the batch. A
    record with more than `MAX_HEADERS` headers, fields that do not add up to its length,
    or an offset outside its batch's make the batch unreadable (`_Unreadable`)."""
    header = _HEADER.unpack_from(batch)
    base_offset, attributes, last_delta = header[0], header[5], header[6]
    first_ts, max_ts, count = header[7], header[8], header[12]
    ts_type = 1 if attributes & _TIMESTAMP_TYPE else 0
    pos = _HEADER.size
    previous = -1
    for _ in range(count):
        length, pos = _varint(batch, pos)
        start = pos
        if pos < len(batch) and batch[pos]:  # the clients read it as a varint
            raise _Unreadable(ATTRIBUTES_SET)
        ts_delta, pos = _varint(batch, pos + 1)  # after the record's attributes byte
        offset_delta, pos = _varint(batch, pos)
        if not previous < offset_delta <= last_delta:
            raise _Unreadable(OFFSET_OUTSIDE)
        previous = offset_delta
        key, pos = _bytes(batch, pos)
        value, pos = _bytes(batch, pos)
        names, pos = _varint(batch, pos)
        if names > MAX_HEADERS:  # never made
            raise _Unreadable(TOO_MANY_HEADERS)
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
            mark = UnreadableMark(Reason.NOT_UTF8.value, base_offset + offset_delta)
            headers.insert(0, (mark, b"a header name is not UTF-8"))
        timestamp = max_ts if ts_type else first_ts + ts_delta
        yield _Record(base_offset + offset_delta, timestamp, ts_type, key, value, headers, length)


_CHUNK = 65_536  # input fed to a streaming decompressor at a time
_NOT_ZERO = re.compile(b"[^\x00]")


def _inflate(codec: int, data: memoryview, limit: int) -> bytes:
    """The batch's records decompressed, refused beyond `limit` bytes before they are
    made (not after). Streams of several members or frames, with zero padding between
    gzip members, are read as the clients read them; input goes in chunks, so that many
    tiny members cost linear time."""
    if codec == _GZIP:
        return _members(bytes(data), limit, lambda: zlib.decompressobj(wbits=47), "gzip")
    if codec == _LZ4:
        import lz4.frame  # type: ignore[import-untyped]

        return _members(bytes(data), limit, lz4.frame.LZ4FrameDecompressor, "lz4")
    if codec == _ZSTD:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=True)
        inflated: bytes = reader.read(limit + 1)
        if len(inflated) > limit:
            raise _Unreadable(f"decompresses to more than {limit} bytes")
        return inflated
    if codec == _SNAPPY:
        return _snappy(data, limit)
    raise _Unreadable(f"its compression codec {codec} is unknown")


def _members(buffer: bytes, limit: int, make: Any, name: str) -> bytes:
    """gzip members or lz4 frames one after the other, each decompressed by a new `make()`
    (zlib's and lz4's decompressors share `decompress(data, max_length)`, `eof` and
    `unused_data`)."""
    out = bytearray()
    pos, size = 0, len(buffer)
    while pos < size:
        if name == "gzip":  # zero padding between members, as Python's gzip reader skips
            found = _NOT_ZERO.search(buffer, pos)
            if found is None:
                break
            pos = found.start()
        inflater = make()
        while not inflater.eof:
            if pos >= size:
                raise _Unreadable(f"its {name} data ends early")
            chunk = buffer[pos : pos + _CHUNK]
            if name == "gzip":
                out += inflater.decompress(chunk, limit + 1 - len(out))
                pending = bool(inflater.unconsumed_tail)
            else:
                out += inflater.decompress(chunk, max_length=limit + 1 - len(out))
                pending = not inflater.eof and not inflater.needs_input
            if len(out) > limit or pending:
                raise _Unreadable(f"decompresses to more than {limit} bytes")
            pos += len(chunk) - len(inflater.unused_data or b"")  # lz4: None when none
    return bytes(out)


def _snappy(data: memoryview, limit: int) -> bytes:
    """Snappy, raw or in xerial's blocks (the magic bytes alone decide, as kafka-python
    does); each block's declared length is counted against `limit` before it is made, and
    checked by the decoder."""
    import cramjam

    if bytes(data[:8]) != _XERIAL or len(data) <= 16:
        if _varint_unsigned(data, 0) > limit:
            raise _Unreadable(f"decompresses to more than {limit} bytes")
        return bytes(cramjam.snappy.decompress_raw(bytes(data)))
    out = bytearray()
    pos = 16
    while pos < len(data):
        if pos + 4 > len(data):
            raise _Unreadable("its snappy blocks run past the batch")
        (size,) = struct.unpack_from("!i", data, pos)
        pos += 4
        if size < 0 or pos + size > len(data):
            raise _Unreadable("its snappy blocks run past the batch")
        block = bytes(data[pos : pos + size])
        pos += size
        if len(out) + _varint_unsigned(memoryview(block), 0) > limit:
            raise _Unreadable(f"decompresses to more than {limit} bytes")
        out += cramjam.snappy.decompress_raw(block)
    return bytes(out)


@cache
def _codec_errors() -> tuple[type[Exception], ...]:
    """What the codecs raise on data they cannot read, and nothing else: a bug of the
    guard, or memory running out, must not turn a good batch into a dead letter."""
    errors: list[type[Exception]] = [
        _Unreadable,
        zlib.error,
        struct.error,
        ValueError,  # lz4 (and zstandard) on a bad frame
        RuntimeError,  # lz4's frame errors
        EOFError,
    ]
    with contextlib.suppress(ImportError):  # a codec not installed raises nothing
        import zstandard

        errors.append(zstandard.ZstdError)
    with contextlib.suppress(ImportError):
        import cramjam

        errors.append(cramjam.DecompressionError)
    return tuple(errors)


def _varint_unsigned(buffer: memoryview, pos: int) -> int:
    """Snappy's preamble: the block's decompressed length, an unsigned varint."""
    return _uvarint(buffer, pos, 36, "its snappy data is not snappy")[0]


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
            except ImportError:  # an install without the codec's library: not the data's
                name = _CODECS.get(codec, str(codec))
                raise ConfigurationError(
                    f"a record batch is compressed with {name}, whose library this install "
                    "lacks (pip's aiokafka[lz4,snappy,zstd] and kafka-python[lz4,snappy,zstd])"
                ) from None
            except _codec_errors() as error:  # data a source made up
                # Counted as the limit's worth: the fetch hands out no further batch, and
                # a fetch of bombs costs one decompression at a time, not hundreds.
                self._owner.inflated += self._owner.limit
                yield self._unreadable(error)
                return
            self._owner.inflated += len(records)
            attributes = struct.unpack_from(">h", raw, _ATTRIBUTES)[0] & ~_CODEC_MASK
            head = bytearray(raw[: _HEADER.size])
            struct.pack_into(">i", head, 8, _HEADER.size - _LENGTH_END + len(records))
            struct.pack_into(">h", head, _ATTRIBUTES, attributes)
            raw = memoryview(bytes(head) + records)
            batch = self._owner.parse(raw)
        refused = _refused(raw)  # before the client makes any record
        if refused is not None:
            yield self._unreadable(_Unreadable(refused))
            return
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
        mark = UnreadableMark(Reason.UNREADABLE_BATCH.value, base)
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
