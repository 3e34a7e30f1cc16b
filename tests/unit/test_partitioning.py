"""Kafka's murmur2, as the partitioner computes it (Python: schemas.partitioning says why),
held to a line-by-line port of Java's `org.apache.kafka.common.utils.Utils.murmur2`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas.partitioning import murmur2, partition_for


def _java_int(value: int) -> int:
    """Java's 32-bit signed overflow."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _java_murmur2(data: bytes) -> int:
    """Utils.murmur2 as written in Java (signed ints, `>>>` as a logical shift)."""
    length = len(data)
    seed = _java_int(0x9747B28C)
    m = 0x5BD1E995
    r = 24
    h = _java_int(seed ^ length)
    for i in range(length // 4):
        i4 = i * 4
        k = (data[i4] & 0xFF) + ((data[i4 + 1] & 0xFF) << 8)
        k += ((data[i4 + 2] & 0xFF) << 16) + ((data[i4 + 3] & 0xFF) << 24)
        k = _java_int(k * m)
        k = _java_int(k ^ ((k & 0xFFFFFFFF) >> r))
        k = _java_int(k * m)
        h = _java_int(h * m)
        h = _java_int(h ^ k)
    tail = length % 4
    base = length & ~3
    if tail == 3:
        h = _java_int(h ^ ((data[base + 2] & 0xFF) << 16))
    if tail >= 2:
        h = _java_int(h ^ ((data[base + 1] & 0xFF) << 8))
    if tail >= 1:
        h = _java_int(h ^ (data[base] & 0xFF))
        h = _java_int(h * m)
    h = _java_int(h ^ ((h & 0xFFFFFFFF) >> 13))
    h = _java_int(h * m)
    h = _java_int(h ^ ((h & 0xFFFFFFFF) >> 15))
    return h


def test_java_test_vectors() -> None:
    # Kafka's UtilsTest.testMurmur2
    for data, java in [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ]:
        assert _java_murmur2(data) == java
        assert murmur2(data) == java & 0xFFFFFFFF


@given(st.binary(max_size=300))
def test_murmur2_is_javas_for_any_bytes(data: bytes) -> None:
    assert murmur2(data) == _java_murmur2(data) & 0xFFFFFFFF


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=1000))
def test_partition_is_the_default_partitioners(key: bytes, partitions: int) -> None:
    # A key without two colons is its own record part.
    part = key if key.count(b":") < 2 else key.rsplit(b":", 1)[0]
    expected = (_java_murmur2(part) & 0x7FFFFFFF) % partitions
    assert partition_for(key, partitions) == expected
