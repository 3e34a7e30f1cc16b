"""Message keys and partitions of the change topics: the rule every producer follows.

A change message is keyed `<entity>:<key>:<source>`: log compaction keeps the latest event
of every (source, entity, key), so a topic can always rebuild the store. It is placed by
its record part, `<entity>:<key>`, hashed as Kafka's default partitioner hashes a key
(murmur2, positive, modulo the partition count): every source's events of one record share
a partition, the one the record had when it was keyed `<entity>:<key>`. A producer of
another stack must place messages by the same rule (docs/operations.md, "Topics").
"""

from __future__ import annotations

import struct

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def message_key(entity: str, key: str, source: str) -> bytes:
    """Kafka message key of an event: one compaction key per (source, entity, key)."""
    return f"{entity}:{key}:{source}".encode()


def record_part(message_key: bytes) -> bytes:
    """`<entity>:<key>` of a message key (a source id never holds a colon)."""
    if message_key.count(b":") < 2:
        return message_key
    return message_key.rsplit(b":", 1)[0]


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (seed 0x9747b28c), as an unsigned 32-bit value."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    for k in struct.unpack_from(f"<{length // 4}I", data):  # the 4-byte words at once
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length % 4
    base = length - tail
    if tail >= 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(message_key: bytes, partitions: int) -> int:
    """The partition of a change topic with `partitions` partitions for this key."""
    return (murmur2(record_part(message_key)) & 0x7FFFFFFF) % partitions
