"""Kafka record batches written byte by byte, as a raw or hostile producer can: header names
that are not UTF-8, compressed data that decompresses to far more than it weighs. Our
producers and both Python clients cannot write these; the broker stores them."""

from __future__ import annotations

import asyncio
import struct
import time

from aiokafka.codec import gzip_encode, lz4_encode, snappy_encode, zstd_encode
from aiokafka.record.util import calc_crc32c

HEADER = struct.Struct(">qiibIhiqqqhii")
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
Record = tuple[bytes | None, bytes | None, list[tuple[bytes, bytes]]]


def _varint(value: int) -> bytes:
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(data: bytes | None) -> bytes:
    return _varint(-1) if data is None else _varint(len(data)) + data


def encode_records(records: list[Record]) -> bytes:
    out = bytearray()
    for delta, (key, value, headers) in enumerate(records):
        body = b"\x00" + _varint(0) + _varint(delta) + _field(key) + _field(value)
        body += _varint(len(headers)) + b"".join(_field(n) + _field(v) for n, v in headers)
        out += _varint(len(body)) + body
    return bytes(out)


def compress(codec: str, data: bytes) -> bytes:
    encode = {
        "none": bytes,
        "gzip": gzip_encode,
        "snappy": lambda d: snappy_encode(d, xerial_compatible=True),
        "lz4": lz4_encode,
        "zstd": zstd_encode,
    }[codec]
    return bytes(encode(data))


def encode_batch(
    records: list[Record],
    codec: str = "none",
    base_offset: int = 0,
    timestamp_ms: int | None = None,
    body: bytes | None = None,
) -> bytes:
    """A v2 record batch; `body` replaces its (compressed) records, as a hostile one may."""
    timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    payload = compress(codec, encode_records(records)) if body is None else body
    length = HEADER.size - 12 + len(payload)
    head = HEADER.pack(base_offset, length, -1, 2, 0, CODECS[codec], len(records) - 1,
                       timestamp, timestamp, -1, -1, -1, len(records))  # fmt: skip
    batch = bytearray(head + payload)
    struct.pack_into(">I", batch, 17, calc_crc32c(bytes(batch[21:])))
    return bytes(batch)


def send_batch(bootstrap: str, topic: str, partition: int, batch: bytes) -> None:
    """Produce one raw batch (acks=all) to the partition's leader; fails on any error."""
    from aiokafka import TopicPartition
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.produce import ProduceRequest

    async def send() -> list[int]:
        client = AIOKafkaClient(bootstrap_servers=bootstrap)
        await client.bootstrap()
        try:
            for _ in range(50):  # a topic just made may not have its leader known yet
                await client.force_metadata_update()
                await client._wait_on_metadata(topic)
                leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
                if leader is None or leader < 0:
                    await asyncio.sleep(0.2)
                    continue
                request = ProduceRequest(None, -1, 30_000, [(topic, [(partition, batch)])])
                response = await client.send(leader, request)
                errors = [p[1] for _, parts in response.topics for p in parts]
                if errors != [6]:  # NOT_LEADER_OR_FOLLOWER: ask again
                    return errors
                await asyncio.sleep(0.2)
            return [6]
        finally:
            await client.close()

    errors = asyncio.run(send())
    assert errors == [0], f"broker refused the batch: {errors}"
