"""Debezium change events (JSON converter) as record changes: envelope, values, version.

A message value is either `{"schema": …, "payload": …}` (the JSON converter with
`schemas.enable=true`, its default) or the bare payload. The payload's `op` is `c`
(insert), `u` (update), `d` (delete) or `r` (a snapshot read); `before`/`after` hold the
row; `source` the connector's position. A Kafka tombstone (no value) follows each delete
for log compaction and carries nothing.

Values. With an inline schema each column's semantic type is known and decoded: dates
(days since 1970, or ISO text), timestamps without a zone (milli-, micro- or nanoseconds
since 1970, or ISO text, in each case the source's *wall time*: read in the mapping's
`timezone`), timestamps with a zone (ISO text, an instant: kept as such), decimals (base64
unscaled bytes and a scale). A bare payload carries no types: then the connector should run
with `time.precision.mode=isostring` and `decimal.handling.mode=string`; dates `2024-01-15Z`
become `2024-01-15`, and the columns named in `local_time_columns` (timestamps without a
zone) are read as wall time whatever zone suffix Debezium wrote.

Versions (strictly increasing per record, at most 2^53):

- PostgreSQL (`version = "lsn"`): `source.lsn` is the WAL position of the change. The
  connector emits transactions in commit order, and a row's next change can only be written
  after the transaction that changed it before committed (row locks; for a natural key other
  than the primary key, a unique index on it gives the same), so per record the LSN rises in
  commit order. Changes get `2^52 + lsn`, and one more for a create or an update, so that
  a primary key's change (a delete and a create at one LSN) leaves the record live when
  both name it. Snapshot reads get the snapshot's LSN, *below*
  every change: a transaction that was open when the snapshot was taken can commit after it
  with a change whose LSN is lower than the snapshot's, and that change is newer than the
  row the snapshot read; ranking reads below changes keeps it. Successive snapshots still
  rank among themselves by their LSN. `snapshot_reads = "as_changes"` ranks reads like
  changes (`2^52 + snapshot LSN`): for a repair snapshot after lost changes (a dropped slot),
  on a quiet source.
- Other connectors (`version = "ts_ms"`): `source.ts_ms * 1000 + offset % 1000`, the
  commit time in milliseconds, ties broken by the message's position in the province topic;
  the adapter raises it to one above the partition's last version where it is not above it
  (`DebeziumAdapter._ts_version`), so versions rise along a partition.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from schemas.dead_letter import Reason
from schemas.events import MAX_VERSION
from schemas.json_text import DuplicateKey, loads_unique

CHANGE_BAND = 2**52  # changes rank above every snapshot read (versions stay <= 2^53)
EPOCH = datetime(1970, 1, 1)
_ISO_DATE_Z = re.compile(r"^\d{4}-\d{2}-\d{2}Z$")
_ZONE_SUFFIX = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")

# Semantic types (Kafka Connect schema names) and how their JSON values decode.
DATE_DAYS = {"io.debezium.time.Date", "org.apache.kafka.connect.data.Date"}
LOCAL_EPOCH = {
    "io.debezium.time.Timestamp": 1_000,
    "org.apache.kafka.connect.data.Timestamp": 1_000,
    "io.debezium.time.MicroTimestamp": 1_000_000,
    "io.debezium.time.NanoTimestamp": 1_000_000_000,
}
TIME_OF_DAY = {
    "io.debezium.time.Time": 1_000,
    "org.apache.kafka.connect.data.Time": 1_000,
    "io.debezium.time.MicroTime": 1_000_000,
    "io.debezium.time.NanoTime": 1_000_000_000,
}
ZONED = {"io.debezium.time.ZonedTimestamp"}
ISO_DATE = {"io.debezium.time.IsoDate"}
ISO_LOCAL = {"io.debezium.time.IsoTimestamp"}
DECIMAL = "org.apache.kafka.connect.data.Decimal"
VARIABLE_DECIMAL = "io.debezium.data.VariableScaleDecimal"

VersionFrom = Literal["lsn", "ts_ms"]
SnapshotReads = Literal["below_changes", "as_changes"]


# A `ts_ms` version above the contract's largest (2^53: `ts_ms` past the year 2255).
TS_MS_PAST_VERSIONS = "`source.ts_ms` gives a version above the contract's largest (2^53)"


class Unmappable(Exception):
    """A message that is no usable change event: dead-lettered with `code` and `message`
    (which never quote a value)."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ColumnType:
    name: str | None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChangeEvent:
    """One Debezium change event, decoded."""

    op: str  # c, u, d, r
    row: dict[str, Any]  # `after` (c, u, r) or `before` (d), values decoded
    source: dict[str, Any]
    # An update's `before`, values decoded, when the table sends it (REPLICA IDENTITY
    # FULL): an update that changes the record's key deletes the old one.
    before: dict[str, Any] | None = None

    @property
    def is_delete(self) -> bool:
        return self.op == "d"


def parse(value: bytes, local_time_columns: frozenset[str] = frozenset()) -> ChangeEvent:
    """The change event in a message value; Unmappable when it is none."""
    try:
        document = loads_unique(value)
    except DuplicateKey:
        raise Unmappable(
            Reason.INVALID_JSON, "the message names a key twice in an object"
        ) from None
    except (UnicodeDecodeError, ValueError):
        raise Unmappable(Reason.INVALID_JSON, "the message is no JSON document") from None
    if not isinstance(document, dict):
        raise Unmappable(Reason.INVALID_JSON, "the message is no JSON object")
    types: dict[str, ColumnType] | None = None
    payload: Any = document
    if "payload" in document and "schema" in document:
        payload = document["payload"]
        types = column_types(document["schema"])
    if not isinstance(payload, dict) or not isinstance(payload.get("op"), str):
        raise Unmappable(Reason.MISSING_FIELD, "no `op`: not a Debezium change event")
    op = payload["op"]
    if op not in ("c", "u", "d", "r"):
        raise Unmappable(
            Reason.INVALID_FIELD,
            "`op` is not c, u, d or r (a truncate or a logical message maps to no record)",
        )
    side = "before" if op == "d" else "after"
    row = payload.get(side)
    if not isinstance(row, dict):
        raise Unmappable(Reason.MISSING_FIELD, f"`{side}` is missing from a change with op {op}")
    source = payload.get("source")
    if not isinstance(source, dict):
        raise Unmappable(Reason.MISSING_FIELD, "`source` is missing")

    def decoded(values: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for column, value in values.items():
            if types is None and column in local_time_columns:
                out[column] = local_iso(value)
            else:
                out[column] = decode(value, None if types is None else types.get(column))
        return out

    before = payload.get("before") if op == "u" else None
    return ChangeEvent(
        op, decoded(row), source, decoded(before) if isinstance(before, dict) else None
    )


def column_types(schema: Any) -> dict[str, ColumnType]:
    """Column -> semantic type, from the envelope's inline schema (`after`'s struct)."""
    types: dict[str, ColumnType] = {}
    if not isinstance(schema, dict):
        return types
    for part in schema.get("fields") or ():
        if isinstance(part, dict) and part.get("field") in ("after", "before"):
            for column in part.get("fields") or ():
                if isinstance(column, dict) and isinstance(column.get("field"), str):
                    parameters = column.get("parameters")
                    types[column["field"]] = ColumnType(
                        column.get("name"), parameters if isinstance(parameters, dict) else {}
                    )
    return types


def decode(value: Any, column: ColumnType | None) -> Any:
    """One JSON value of a column as a Python value the mapping understands (a value that
    does not have the form its type announces passes unchanged: validation rejects it)."""
    if value is None:
        return None
    name = column.name if column is not None else None
    try:
        if name is None:
            return value[:-1] if isinstance(value, str) and _ISO_DATE_Z.match(value) else value
        if name in DATE_DAYS and isinstance(value, int):
            return (EPOCH + timedelta(days=value)).date()
        if name in LOCAL_EPOCH and isinstance(value, int):
            return EPOCH + timedelta(microseconds=value * 1_000_000 // LOCAL_EPOCH[name])
        if name in TIME_OF_DAY and isinstance(value, int):
            moment = EPOCH + timedelta(microseconds=value * 1_000_000 // TIME_OF_DAY[name])
            return moment.time().isoformat()
        if name in ZONED and isinstance(value, str):
            return datetime.fromisoformat(value)
        if name in ISO_DATE and isinstance(value, str):
            return date.fromisoformat(_ZONE_SUFFIX.sub("", value))
        if name in ISO_LOCAL and isinstance(value, str):
            return local_iso(value)
        if name == DECIMAL and isinstance(value, str) and column is not None:
            return _decimal(value, int(column.parameters.get("scale", 0)))
        if name == VARIABLE_DECIMAL and isinstance(value, dict):
            return _decimal(str(value["value"]), int(value["scale"]))
    except (ValueError, KeyError, TypeError, OverflowError):
        return value
    return value


def local_iso(value: Any) -> Any:
    """ISO text of a timestamp without a zone as a naive (wall-time) datetime: Debezium's
    `isostring` mode writes such a column with a `Z` it never had."""
    if not isinstance(value, str):
        return value
    try:
        return datetime.fromisoformat(_ZONE_SUFFIX.sub("", value))
    except ValueError:
        return value


def _decimal(encoded: str, scale: int) -> Decimal:
    unscaled = int.from_bytes(base64.b64decode(encoded, validate=True), "big", signed=True)
    return Decimal(unscaled).scaleb(-scale)


def occurred_at(event: ChangeEvent) -> datetime:
    """`source.ts_ms`: when the change committed (a snapshot read: when it was read)."""
    millis = event.source.get("ts_ms")
    if not isinstance(millis, int) or isinstance(millis, bool) or millis <= 0:
        raise Unmappable(Reason.MISSING_FIELD, "`source.ts_ms` is missing or not a time")
    return datetime.fromtimestamp(millis / 1000, UTC)


def version(
    event: ChangeEvent, offset: int, version_from: VersionFrom, snapshot_reads: SnapshotReads
) -> int:
    """The contract version of a change (module docstring)."""
    if version_from == "ts_ms":
        occurred_at(event)  # present and a time
        derived = int(event.source["ts_ms"]) * 1000 + offset % 1000
        if derived > MAX_VERSION:
            raise Unmappable(Reason.INVALID_FIELD, TS_MS_PAST_VERSIONS)
        return derived
    lsn = event.source.get("lsn")
    if not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 1:
        raise Unmappable(Reason.MISSING_FIELD, "`source.lsn` is missing (not a PostgreSQL event?)")
    if lsn >= CHANGE_BAND:
        raise Unmappable(Reason.INVALID_FIELD, "`source.lsn` is at or above 2^52")
    if event.op == "r" and snapshot_reads == "below_changes":
        return lsn
    # A change of the primary key is a delete and a create at one LSN (Debezium): the
    # create ranks above the delete when they name the same record. Two WAL records are
    # at least 24 bytes apart, so lsn + 1 is no other change's.
    return CHANGE_BAND + lsn + (0 if event.is_delete else 1)
