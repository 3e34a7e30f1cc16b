"""The native codecs the clients fall back from silently: a missing one costs speed, not
correctness, so only a test notices."""

from __future__ import annotations

from kafka.record import util
from kafka.record._crc32c import crc as pure_python_crc32c


def test_kafka_python_checksums_record_batches_in_c() -> None:
    # kafka-python computes CRC-32C of every batch it produces (and checks every batch it
    # consumes); without the `crc32c` module it does so in pure Python.
    assert util.crc32c_c is not None
    assert util.calc_crc32c.__defaults__ == (util.crc32c_c,)
    sample = memoryview("Nguyễn Văn An, 079090000001".encode())
    assert util.calc_crc32c(sample) == pure_python_crc32c(sample)
