"""Message keys and partitions of the change topics: the rule every producer follows.

A change message is keyed `<entity>:<key>:<source>`: log compaction keeps the latest event
of every (source, entity, key), so a topic can always rebuild the store. It is placed by
its record part, `<entity>:<key>`, hashed as Kafka's default partitioner hashes a key
(murmur2, positive, modulo the partition count): every source's events of one record share
a partition, the one the record had when it was keyed `<entity>:<key>`. A producer of
another stack must place messages by the same rule (docs/operations.md, "Topics").
"""

from __future__ import annotations

from murmurhash2 import murmurhash2 as _murmurhash2

_SEED = 0x9747B28C


def message_key(entity: str, key: str, source: str) -> bytes:
    """Kafka message key of an event: one compaction key per (source, entity, key)."""
    return f"{entity}:{key}:{source}".encode()


def record_part(message_key: bytes) -> bytes:
    """`<entity>:<key>` of a message key (a source id never holds a colon)."""
    if message_key.count(b":") < 2:
        return message_key
    return message_key.rsplit(b":", 1)[0]


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (seed 0x9747b28c), as an unsigned 32-bit value.

    Kafka's hash is Austin Appleby's 32-bit MurmurHash2 (little-endian words); the
    `murmurhash2` C module computes it in 0.26 µs against 2.3 µs in Python, and the worker
    hashes every message's key to check its partition. tests/unit/test_partitioning.py
    holds it equal to a line-by-line Python port of the Java code, and to Java's vectors."""
    return _murmurhash2(data, _SEED)


def partition_for(message_key: bytes, partitions: int) -> int:
    """The partition of a change topic with `partitions` partitions for this key."""
    return (murmur2(record_part(message_key)) & 0x7FFFFFFF) % partitions
