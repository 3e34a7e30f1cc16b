"""Debezium change events as record changes: envelope forms, value types, versions, keys.

The messages have the shapes Debezium 3.6's PostgreSQL connector wrote through the JSON
converter in the integration test (trimmed to the parts the adapter reads)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from producers import debezium_events as dbz
from producers.adapters.debezium import DebeziumAdapter
from producers.sdk import Record, SkippableRecord
from schemas.dead_letter import Reason
from transport.committed_reader import ExternalConnection
from transport.reader import Message

SOURCE = {"connector": "postgresql", "ts_ms": 1796028923670, "snapshot": "false",
          "txId": 729, "lsn": 26376376, "sequence": '[null,"26376376"]'}  # fmt: skip


def field(name: str, kind: str, semantic: str | None = None, **parameters: str) -> dict[str, Any]:
    column: dict[str, Any] = {"type": kind, "optional": True, "field": name}
    if semantic:
        column["name"] = semantic
    if parameters:
        column["parameters"] = parameters
    return column


ROW_SCHEMA = {
    "type": "struct",
    "fields": [
        field("id", "int32"),
        field("so_dinh_danh", "string"),
        field("ho_ten", "string"),
        field("ngay_sinh", "int32", "io.debezium.time.Date"),
        field("cap_nhat", "int64", "io.debezium.time.MicroTimestamp"),
        field("han_tra", "string", "io.debezium.time.ZonedTimestamp"),
        field("phi", "bytes", "org.apache.kafka.connect.data.Decimal", scale="2"),
        field("so", "struct", "io.debezium.data.VariableScaleDecimal"),
    ],
}


def with_schema(payload: dict[str, Any]) -> bytes:
    schema = {
        "type": "struct",
        "fields": [
            ROW_SCHEMA | {"field": "before"},
            ROW_SCHEMA | {"field": "after"},
            {"type": "struct", "fields": [], "field": "source"},
            {"type": "string", "field": "op"},
        ],
        "name": "p79.public.cong_dan.Envelope",
    }
    return json.dumps({"schema": schema, "payload": payload}).encode()


def change(op: str, row: dict[str, Any], **source: Any) -> dict[str, Any]:
    before, after = (row, None) if op == "d" else (None, row)
    return {"before": before, "after": after, "source": SOURCE | source, "op": op}


ROW = {
    "id": 1,
    "so_dinh_danh": "079190000001",
    "ho_ten": "Nguyễn Thị Lan",
    "ngay_sinh": 7368,  # days since 1970
    "cap_nhat": 1705307400123456,  # 2024-01-15 08:30:00.123456 wall time, in µs
    "han_tra": "2024-01-20T10:00:00.000000Z",
    "phi": base64.b64encode((1250).to_bytes(2, "big")).decode(),  # 12.50
    "so": {"scale": 1, "value": base64.b64encode((-35).to_bytes(1, "big", signed=True)).decode()},
}


def test_an_envelope_with_an_inline_schema_decodes_each_column_by_its_semantic_type() -> None:
    event = dbz.parse(with_schema(change("u", ROW)))
    assert event.op == "u"
    assert event.row["ngay_sinh"] == date(1990, 3, 5)
    assert event.row["cap_nhat"] == datetime(2024, 1, 15, 8, 30, 0, 123456)  # naive: wall time
    assert event.row["han_tra"] == datetime(2024, 1, 20, 10, 0, tzinfo=UTC)  # an instant
    assert event.row["phi"] == Decimal("12.50")
    assert event.row["so"] == Decimal("-3.5")
    assert event.row["ho_ten"] == "Nguyễn Thị Lan"


def test_epoch_day_zero_and_a_null_decode() -> None:
    event = dbz.parse(with_schema(change("c", ROW | {"ngay_sinh": 0, "ho_ten": None})))
    assert event.row["ngay_sinh"] == date(1970, 1, 1)
    assert event.row["ho_ten"] is None


def test_a_bare_payload_in_isostring_mode() -> None:
    """Without a schema: `2024-01-15Z` is a date; the timestamp-without-zone column named in
    local_time_columns is wall time, although Debezium wrote a Z after it."""
    row = {
        "ma_ho_so": "000.00.01.H29-240115-0001",
        "ngay_tiep_nhan": "2024-01-15T08:30:00Z",
        "han_tra": "2024-01-20T10:00:00.000000Z",
        "ngay": "2024-01-15Z",
        "phi": "12.50",
    }
    event = dbz.parse(json.dumps(change("r", row)).encode(), frozenset({"ngay_tiep_nhan"}))
    assert event.row["ngay_tiep_nhan"] == datetime(2024, 1, 15, 8, 30)
    assert event.row["han_tra"] == "2024-01-20T10:00:00.000000Z"  # passed on: an instant
    assert event.row["ngay"] == "2024-01-15"
    assert event.row["phi"] == "12.50"


def test_a_delete_reads_before() -> None:
    event = dbz.parse(with_schema(change("d", ROW)))
    assert event.is_delete and event.row["so_dinh_danh"] == "079190000001"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"[1, 2", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (
            json.dumps(change("c", ROW)).replace('"op"', '"op": "d", "op"', 1).encode(),
            "invalid_json",
        ),
        (b'{"payload": {"x": 1}, "schema": {}}', "missing_field"),
        (json.dumps(change("t", ROW)).encode(), "invalid_field"),
        (json.dumps(change("c", ROW) | {"after": None}).encode(), "missing_field"),
        (json.dumps(change("c", ROW) | {"source": None}).encode(), "missing_field"),
    ],
)
def test_messages_that_are_no_change_event_are_unmappable(value: bytes, code: str) -> None:
    with pytest.raises(dbz.Unmappable) as raised:
        dbz.parse(value)
    assert raised.value.code == code


def versions(*events: tuple[str, int], mode: dbz.SnapshotReads = "below_changes") -> list[int]:
    return [
        dbz.version(dbz.parse(json.dumps(change(op, ROW, lsn=lsn)).encode()), 0, "lsn", mode)
        for op, lsn in events
    ]


def test_snapshot_reads_rank_below_every_change_even_one_with_a_lower_lsn() -> None:
    """A transaction open when the snapshot (LSN 5000) was taken commits after it: its
    change has LSN 4000 but is newer than the row the snapshot read."""
    read, late_change, later = versions(("r", 5000), ("u", 4000), ("u", 6000))
    assert read == 5000 < late_change == 2**52 + 4000 + 1 < later
    assert versions(("r", 5000), ("r", 9000)) == [5000, 9000]  # a later snapshot outranks
    assert versions(("r", 5000), mode="as_changes") == [2**52 + 5000 + 1]
    assert versions(("d", 4000), ("c", 4000)) == [2**52 + 4000, 2**52 + 4000 + 1]
    assert max(versions(("d", 2**52 - 1))) <= 2**53


def test_a_missing_or_out_of_range_lsn_is_unmappable() -> None:
    for lsn, code in ((None, "missing_field"), (2**52, "invalid_field"), (True, "missing_field")):
        event = dbz.parse(json.dumps(change("u", ROW, lsn=lsn)).encode())
        with pytest.raises(dbz.Unmappable) as raised:
            dbz.version(event, 0, "lsn", "below_changes")
        assert raised.value.code == code


def test_ts_ms_versions_break_ties_by_the_message_position() -> None:
    event = dbz.parse(json.dumps(change("u", ROW)).encode())
    assert dbz.version(event, 17, "ts_ms", "below_changes") == 1796028923670 * 1000 + 17
    assert dbz.occurred_at(event) == datetime.fromtimestamp(1796028923.670, UTC)
    no_time = dbz.parse(json.dumps(change("u", ROW, ts_ms=None)).encode())
    with pytest.raises(dbz.Unmappable):
        dbz.occurred_at(no_time)


CONFIG = {
    "bootstrap": "province-kafka:9092",
    "topics": ["p79.public.cong_dan"],
    "entity": "citizen",
    "key_column": "so_dinh_danh",
    "fields": {"full_name": "ho_ten", "date_of_birth": "ngay_sinh"},
}


def adapter(**options: Any) -> DebeziumAdapter:
    built = DebeziumAdapter.from_settings("province-79", CONFIG | options, Path("."))
    assert isinstance(built, DebeziumAdapter)
    return built


def item(source: DebeziumAdapter, msg: Message) -> Record | SkippableRecord | None:
    """The one record of a message (None for a tombstone)."""
    items = source._items(msg)
    assert len(items) <= 1
    return items[0] if items else None


def message(value: bytes | None, offset: int = 7) -> Message:
    return Message("p79.public.cong_dan", 0, offset, value)


def test_the_adapter_maps_after_and_turns_deletes_into_deletes() -> None:
    upsert = item(adapter(), message(with_schema(change("u", ROW))))
    assert isinstance(upsert, Record)
    assert (upsert.key, upsert.version, upsert.op) == ("079190000001", 2**52 + 26376377, "upsert")
    assert upsert.data == {"full_name": "Nguyễn Thị Lan", "date_of_birth": "1990-03-05"}
    assert upsert.origin == "p79.public.cong_dan:0:7"
    assert upsert.occurred_at == datetime.fromtimestamp(1796028923.670, UTC)
    delete = item(adapter(), message(with_schema(change("d", ROW))))
    assert isinstance(delete, Record) and delete.op == "delete" and delete.data is None
    assert item(adapter(), message(None)) is None  # a tombstone


def test_a_batch_the_kafka_client_could_not_read_is_a_dead_letter_not_a_tombstone() -> None:
    """`transport.guard` hands such a batch over as one record without a value: passed
    over as a tombstone, its changes would be lost without a trace."""
    why = "record batch of offsets 40-42 (gzip compression) does not decompress: not read"
    marked = Message("p79.public.cong_dan", 0, 42, None, unreadable=("unreadable_batch", why))
    skipped = item(adapter(), marked)
    assert isinstance(skipped, SkippableRecord)
    assert (skipped.code, skipped.message, skipped.origin) == (
        "unreadable_batch",
        why,
        "p79.public.cong_dan:0:42",
    )


@pytest.mark.parametrize("ts_ms", [10**17, 10**20])
def test_a_time_beyond_the_platform_s_is_a_dead_letter_not_a_stop(ts_ms: int) -> None:
    event = change("c", ROW)
    event["source"]["ts_ms"] = ts_ms
    skipped = item(adapter(), message(json.dumps(event).encode()))
    assert isinstance(skipped, SkippableRecord) and skipped.code == "unmappable_record"


def test_a_delete_without_its_key_in_before_is_a_dead_letter_naming_the_fix() -> None:
    """REPLICA IDENTITY DEFAULT: `before` holds the primary key only, other NOT NULL text
    columns come as ''."""
    raw = json.dumps(change("d", {"id": 2, "so_dinh_danh": "", "ho_ten": None})).encode()
    skipped = item(adapter(), message(raw))
    assert isinstance(skipped, SkippableRecord)
    assert skipped.code == "missing_field"
    assert "REPLICA IDENTITY FULL" in skipped.message
    assert skipped.raw == raw and skipped.origin == "p79.public.cong_dan:0:7"


def test_the_province_connection_never_takes_our_cluster_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_USERNAME", "national")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD", "secret")
    connection = adapter().connection()
    assert connection.security_protocol == "PLAINTEXT"
    assert connection.sasl_username is None
    assert connection.servers() == ["province-kafka:9092"]
    tls = adapter(security_protocol="SSL", ssl_cafile="ca.pem").connection()
    assert tls.ssl_cafile == Path("ca.pem")
    assert isinstance(tls, ExternalConnection)


def test_messages_expired_unread_are_counted_from_zero() -> None:
    """The source-errors alert watches `increase()`, which takes a series' first sample as
    its start: created at its first loss, the counter never paged for it."""
    from prometheus_client import REGISTRY

    DebeziumAdapter.from_settings("province-expiring", CONFIG, Path("."))
    labels = {"source": "province-expiring", "kind": "expired_unread"}
    assert REGISTRY.get_sample_value("portal_sync_source_errors_total", labels) == 0.0


def test_a_wrong_option_is_a_configuration_error() -> None:
    from producers.sdk import ConfigurationError

    with pytest.raises(ConfigurationError, match="version"):
        adapter(version="scn")
    with pytest.raises(ConfigurationError, match="topics"):
        adapter(topics=[])
    with pytest.raises(ConfigurationError, match="sasl_username"):
        adapter(security_protocol="SASL_SSL")


ENTRY = """
[[sources]]
id = "{id}"
source = "province-79"
adapter = "debezium"
[sources.connection]
bootstrap = "{bootstrap}"
{group}
[sources.mapping]
topics = [{topics}]
entity = "citizen"
key_column = "so_dinh_danh"
"""


@pytest.mark.parametrize(
    ("second", "refused"),
    [
        ({"topics": '"p79.public.cong_dan"'}, True),  # both under portal-sync-province-79
        ({"topics": '"p79.public.to_chuc", "p79.public.cong_dan"'}, True),
        (
            {"topics": '"p79.public.cong_dan"', "group": 'group_id = "portal-sync-province-79"'},
            True,
        ),
        ({"topics": '"p79.public.to_chuc"'}, False),  # one group, other topics: own offsets
        ({"topics": '"p79.public.cong_dan"', "group": 'group_id = "p79-orgs"'}, False),
        ({"topics": '"p79.public.cong_dan"', "bootstrap": "k2:9092, K1:9092"}, True),  # reordered
        ({"topics": '"p79.public.cong_dan"', "bootstrap": "k3:9092"}, False),  # another cluster
    ],
)
def test_two_entries_reading_one_topic_under_one_group_are_refused(
    tmp_path: Path, second: dict[str, str], refused: bool
) -> None:
    """Each commits the group's offsets of the topic: the other would start past messages
    it never read."""
    from producers.deployment import load_deployment
    from producers.sdk import ConfigurationError

    cluster = "k1:9092,k2:9092"
    topic = '"p79.public.cong_dan"'
    first = ENTRY.format(id="p79-citizens", group="", topics=topic, bootstrap=cluster)
    path = tmp_path / "sources.toml"
    defaults = {"group": "", "bootstrap": cluster}
    path.write_text(first + ENTRY.format(id="p79-other", **defaults | second))
    if refused:
        expected = "p79-citizens and p79-other read topic p79.public.cong_dan under one consumer"
        with pytest.raises(ConfigurationError, match=expected):
            load_deployment(path)
    else:
        assert [s.id for s in load_deployment(path).sources] == ["p79-citizens", "p79-other"]


def test_a_value_postgresql_did_not_send_is_the_before_row_s_or_a_dead_letter() -> None:
    """An unchanged TOASTed column comes as Debezium's placeholder. Left out ("not
    provided"), the event erased the field in the store: the reconciler takes each event
    as the source's whole view. It is the `before` row's value (REPLICA IDENTITY FULL),
    and without one the event is a dead letter naming the column (never its value)."""
    row = ROW | {"ho_ten": "__debezium_unavailable_value", "ngay_sinh": 7369}
    upsert = item(adapter(), message(with_schema(change("u", row) | {"before": ROW})))
    assert isinstance(upsert, Record)
    assert upsert.data == {"full_name": "Nguyễn Thị Lan", "date_of_birth": "1990-03-06"}
    for before in (None, row):  # no before, or one without the value either
        event = change("u", row) | {"before": before}
        skipped = item(adapter(), message(with_schema(event)))
        assert isinstance(skipped, SkippableRecord) and skipped.code == "unmappable_record"
        assert "ho_ten" in skipped.message and "REPLICA IDENTITY FULL" in skipped.message
        assert "Lan" not in skipped.message


def test_a_mapped_column_missing_from_the_event_stops_the_source() -> None:
    """A dropped or renamed column would become null, erasing the field in the store."""
    from producers.sdk import FatalError

    row = {k: v for k, v in ROW.items() if k != "ngay_sinh"}
    with pytest.raises(FatalError, match="ngay_sinh"):
        item(adapter(), message(with_schema(change("u", row))))
    # so does the key column: each change of the table was a dead letter of raw bytes,
    # which cannot be re-driven, and the offsets moved past them
    row = {k: v for k, v in ROW.items() if k != "so_dinh_danh"}
    with pytest.raises(FatalError, match="so_dinh_danh"):
        item(adapter(), message(with_schema(change("u", row))))
    gone = item(adapter(), message(with_schema(change("d", row))))  # a delete: its key
    assert isinstance(gone, SkippableRecord) and gone.code == "missing_field"  # not sent


def test_a_message_nested_beyond_the_parser_is_a_dead_letter_and_reading_goes_on() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    skipped = item(adapter(), message(raw))
    assert isinstance(skipped, SkippableRecord) and skipped.raw == raw
    assert skipped.code in {"invalid_json", "unmappable_record"}
    assert "[[" not in skipped.message


class Recreated:
    """A province topic deleted and created again: its log ends at 10, below the 50,000
    the adapter saved."""

    expired: ClassVar[dict[tuple[str, int], int]] = {}  # none lost to retention

    def topic_ids(self) -> dict[str, str]:
        return {}  # a cluster that gives no ids: the offsets are all there is to compare

    def compaction_lags(self) -> dict[str, int]:
        return {}  # no compacted topic

    def start(self, saved: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return {("p79.public.cong_dan", 0): max(saved.values())}

    def end_offsets(self) -> dict[tuple[str, int], int]:
        return {("p79.public.cong_dan", 0): 10}

    def poll(self, max_records: int, timeout: float) -> list[Message]:  # never reached
        raise AssertionError("read past a log that starts again")


def test_a_topic_behind_the_saved_position_stops_the_source_instead_of_skipping() -> None:
    from producers.sdk import FatalError

    reading = adapter()
    reading._reader = Recreated()  # type: ignore[assignment]
    state = {"group_id": "portal-sync-province-79", "offsets": {"p79.public.cong_dan:0": 50_000}}
    with pytest.raises(FatalError, match=r"p79.public.cong_dan\[0\] at 50000, its end 10"):
        list(reading.read(state))


class IdsChanged:
    """Both topics have ids other than the state's: one was created again while the
    adapter had read past its start, the other while it had read nothing of it (a topic
    deleted during a run loses its saved positions)."""

    expired: ClassVar[dict[tuple[str, int], int]] = {}  # none lost to retention

    def topic_ids(self) -> dict[str, str]:
        return {"p79.public.cong_dan": "new-1", "p79.public.ho_so": "new-2"}

    def compaction_lags(self) -> dict[str, int]:
        return {}  # no compacted topic

    def start(self, saved: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return {("p79.public.cong_dan", 0): saved.get(("p79.public.cong_dan", 0), 0)}

    def end_offsets(self) -> dict[tuple[str, int], int]:
        return {("p79.public.cong_dan", 0): 0}


@pytest.mark.parametrize("position", [0, 5])
def test_a_changed_topic_id_stops_the_source_only_where_a_position_would_be_lost(
    position: int,
) -> None:
    from producers.sdk import Checkpoint, FatalError

    reading = adapter()
    reading._reader = IdsChanged()  # type: ignore[assignment]
    state = {
        "group_id": "portal-sync-province-79",
        "offsets": {"p79.public.cong_dan:0": position},
        "topic_ids": {"p79.public.cong_dan": "old-1", "p79.public.ho_so": "old-2"},
    }
    if position:
        with pytest.raises(FatalError, match=r"created again since the saved position: "
                           r"p79\.public\.cong_dan \(their"):  # fmt: skip
            list(reading.read(state))
        return
    (checkpoint,) = [i for i in reading.read(state) if isinstance(i, Checkpoint)]
    assert checkpoint.state["topic_ids"] == {
        "p79.public.cong_dan": "new-1", "p79.public.ho_so": "new-2"
    }  # fmt: skip


def test_a_primary_key_change_keeping_the_record_key_leaves_it_live() -> None:
    """`UPDATE … SET id = 99`: Debezium sends a delete of the old primary key and a create
    of the new one, at one LSN. Both name the same record: the create must outrank the
    delete, or the record stays deleted nationally (the create a `duplicate`)."""
    a = adapter()
    gone = item(a, message(with_schema(change("d", ROW)), offset=10))
    back = item(a, message(with_schema(change("c", ROW | {"id": 99})), offset=12))
    assert isinstance(gone, Record) and isinstance(back, Record)
    assert gone.key == back.key and gone.op == "delete" and back.op == "upsert"
    assert back.version > gone.version


def test_an_update_that_changes_the_record_key_deletes_the_old_record() -> None:
    """`UPDATE … SET so_dinh_danh = …` on a table with REPLICA IDENTITY FULL: its `before`
    names the old key, which no longer exists at the source."""
    moved = change("u", ROW | {"so_dinh_danh": "079190000002"})
    moved["before"] = ROW
    items = adapter()._items(message(with_schema(moved)))
    assert [(r.key, r.op) for r in items if isinstance(r, Record)] == [
        ("079190000001", "delete"),
        ("079190000002", "upsert"),
    ]
    unchanged = change("u", ROW | {"ho_ten": "Nguyễn Thị Lan Anh"})
    unchanged["before"] = ROW
    assert [r.op for r in adapter()._items(message(with_schema(unchanged)))] == ["upsert"]
    assert adapter()._items(message(None)) == []


def test_with_ts_ms_the_old_record_s_delete_never_shares_its_last_change_s_version() -> None:
    """One below the new record's version was the old record's last change whenever that
    came at the offset before in the same millisecond (an update of A, then A renamed B):
    the reconciler dropped the delete as its duplicate, and A stayed live for good."""
    source = adapter(version="ts_ms")
    updated = change("u", ROW | {"ho_ten": "Nguyễn Thị Lan Anh"})
    updated["before"] = ROW
    (last,) = source._items(message(with_schema(updated), offset=41))
    moved = change("u", ROW | {"so_dinh_danh": "079190000002"})
    moved["before"] = ROW
    gone, new = source._items(message(with_schema(moved), offset=42))
    assert isinstance(last, Record) and isinstance(gone, Record) and isinstance(new, Record)
    assert (gone.key, gone.op) == (last.key, "delete")
    assert gone.version > last.version
    assert gone.version == new.version  # another record's: nothing to rank against
    lsn_gone, lsn_new = adapter()._items(message(with_schema(moved), offset=42))
    assert isinstance(lsn_gone, Record) and isinstance(lsn_new, Record)
    assert lsn_gone.version == lsn_new.version - 1  # with `lsn`: a delete at that position


def test_with_ts_ms_versions_rise_along_a_partition_and_come_back_the_same_from_a_save() -> None:
    """`ts_ms * 1000 + offset % 1000` gave one record's two changes in one millisecond,
    1,000 offsets apart, one version (and event id) for two contents: the reconciler kept
    the first. A commit time that went back gave a later change a lower one (stale)."""
    source = adapter(version="ts_ms")
    first = change("u", ROW | {"ho_ten": "An"})
    second = change("u", ROW | {"ho_ten": "Bình"})  # the same ts_ms
    earlier = change("u", ROW | {"ho_ten": "Châu"}, ts_ms=1796028923000)  # a clock set back
    versions = []
    for offset, event in ((5, first), (1005, second), (1006, earlier)):
        (record,) = source._items(message(with_schema(event), offset=offset))
        assert isinstance(record, Record)
        versions.append(record.version)
    assert versions == [1796028923670005, 1796028923670006, 1796028923670007]
    saved = source._state({("p79.public.cong_dan", 0): 1007})
    assert saved["last_versions"] == {"p79.public.cong_dan:0": 1796028923670007}
    # read again from a save before the last two: the same versions again
    again = adapter(version="ts_ms")
    again._last = {("p79.public.cong_dan", 0): 1796028923670005}
    (record,) = again._items(message(with_schema(second), offset=1005))
    assert isinstance(record, Record) and record.version == versions[1]
    assert "last_versions" not in adapter()._state({})  # `lsn`: none kept


def test_with_ts_ms_a_time_past_the_contract_s_versions_is_one_dead_letter() -> None:
    """`ts_ms` 9.1e12 (the year 2258) gives a version above 2^53: a dead letter. It was
    also kept as the partition's last version, and every later change of the partition
    came out one above it, a dead letter too, for good (and saved so with the position)."""
    source = adapter(version="ts_ms")
    far = change("u", ROW | {"ho_ten": "An"}, ts_ms=9_100_000_000_000)
    (letter,) = source._items(message(with_schema(far), offset=3))
    assert isinstance(letter, SkippableRecord) and letter.code == Reason.INVALID_FIELD
    (record,) = source._items(message(with_schema(change("u", ROW)), offset=4))
    assert isinstance(record, Record) and record.version == 1796028923670004


class OneChangeLeft:
    """A partition with one change left after the saved position."""

    expired: ClassVar[dict[tuple[str, int], int]] = {}

    def __init__(self) -> None:
        self.left = [message(with_schema(change("u", ROW)), offset=5)]

    def topic_ids(self) -> dict[str, str]:
        return {}

    def compaction_lags(self) -> dict[str, int]:
        return {}

    def start(self, saved: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return dict(saved)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        return {("p79.public.cong_dan", 0): 6}

    def poll(self, max_records: int, timeout: float) -> list[Message]:
        taken, self.left = self.left, []
        return taken

    def position(self, tp: tuple[str, int]) -> int:
        return 6

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        pass


def test_a_saved_last_version_past_the_contract_s_is_not_taken_up_again() -> None:
    """A release before kept (and saved) a version above 2^53 as the partition's last."""
    reading = adapter(version="ts_ms")
    reading._reader = OneChangeLeft()  # type: ignore[assignment]
    state = {
        "group_id": "portal-sync-province-79",
        "offsets": {"p79.public.cong_dan:0": 5},
        "last_versions": {"p79.public.cong_dan:0": 9_100_000_000_000_003},
    }
    (record,) = [i for i in reading.read(state) if isinstance(i, Record)]
    assert record.version == 1796028923670005
