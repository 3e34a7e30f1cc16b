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

_SEED = 0x9747B28C
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
    """Kafka's `Utils.murmur2` (seed 0x9747b28c), as an unsigned 32-bit value: Austin
    Appleby's 32-bit MurmurHash2 over little-endian words.

    Python, on purpose. The `murmurhash2` C module (0.26 µs a key against 1.5 here) lets
    the GIL go during every call, so a thread that hashes while another one runs Python
    waits to get it back: the producer's `send` next to kafka-python's sender thread spent
    21-30 µs a message with it, 17-24 without (three alternating pairs, docs/performance-log.md).
    tests/unit/test_partitioning.py holds it to a line-by-line port of the Java code and
    to Java's vectors."""
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    for k in struct.unpack_from(f"<{words}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) ^ (k * _M)) & _MASK  # the low 32 bits of a XOR are the XOR of theirs
    rest = length & 3
    if rest:
        tail = words * 4
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(message_key: bytes, partitions: int) -> int:
    """The partition of a change topic with `partitions` partitions for this key."""
    return (murmur2(record_part(message_key)) & 0x7FFFFFFF) % partitions
