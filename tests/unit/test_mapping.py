"""`map_fields` with its plan worked out once (`field_plan`): the same `data` as converting
every field of every row, whatever the paths, value maps, formats and driver values."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from producers.mapping import FieldMapping, convert, field_plan, map_fields

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")


class Text(str):
    """A driver's own text type (a str subclass): converted as any other value."""


def every_field_converted(values: dict[str, Any], mapping: FieldMapping) -> dict[str, Any]:
    """What `map_fields` did before its plan: `convert` for every field."""
    data: dict[str, Any] = {}
    for path, column in mapping.fields.items():
        target = data
        *parents, leaf = path.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = convert(path, values.get(column), mapping, ZONE)
    return data


NAMES = st.sampled_from(["ho_ten", "dia_chi", "ngay_sinh", "gioi_tinh", "so", "ma"])
PATHS = st.sampled_from(["full_name", "address.line", "address.ward", "birth_date", "sex", "a.b.c"])
VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.text(max_size=10).map(Text)
    | st.decimals(allow_nan=False, allow_infinity=False, places=2)
    | st.dates()
    | st.datetimes()
    | st.datetimes(timezones=st.just(UTC))
    | st.sampled_from(["Nam", "Nữ", "19900102", "1990-01-02"])
)


@given(
    fields=st.dictionaries(PATHS, NAMES, min_size=1),
    mapped=st.sets(PATHS),
    formatted=st.sets(PATHS),
    values=st.dictionaries(NAMES, VALUES),
)
def test_the_plan_maps_as_converting_every_field(
    fields: dict[str, str], mapped: set[str], formatted: set[str], values: dict[str, Any]
) -> None:
    mapping = FieldMapping(
        fields=fields,
        value_maps={path: {"Nam": "male", "Nữ": "female"} for path in mapped},
        formats={path: "yyyyMMdd" for path in formatted - mapped},
    )
    expected = every_field_converted(values, mapping)
    assert map_fields(values, mapping, ZONE, field_plan(mapping)) == expected
    assert map_fields(values, mapping, ZONE) == expected


def test_a_nested_path_and_a_value_map() -> None:
    mapping = FieldMapping(
        fields={"full_name": "ho_ten", "address.line": "dia_chi", "sex": "gt", "born": "ns"},
        value_maps={"sex": {"Nam": "male"}},
        formats={"born": "yyyyMMdd"},
    )
    row = {"ho_ten": "Nguyễn Văn An", "dia_chi": "Số 1 Lê Lợi", "gt": "Nam", "ns": "19900102"}
    assert map_fields(row, mapping, ZONE, field_plan(mapping)) == {
        "full_name": "Nguyễn Văn An",
        "address": {"line": "Số 1 Lê Lợi"},
        "sex": "male",
        "born": date(1990, 1, 2).isoformat(),
    }
    born = map_fields({"ns": datetime(1990, 1, 2)}, mapping, ZONE)["born"]
    assert born == "1990-01-02T00:00:00+07:00"


@pytest.mark.parametrize("pattern", ["dd/MM/yy", "yyMMdd", "yy-MM-dd HH:mm"])
def test_a_two_digit_year_is_refused(pattern: str) -> None:
    """`05/03/55` read as 2055-03-05 by Python's century rule: a birth date in the future,
    which the contract took."""
    with pytest.raises(ValidationError, match=r"date_of_birth: .* two-digit year \(yy\)"):
        FieldMapping(fields={"date_of_birth": "ngay_sinh"}, formats={"date_of_birth": pattern})
    assert FieldMapping(fields={"d": "c"}, formats={"d": "dd/MM/yyyy"}).formats == {
        "d": "dd/MM/yyyy"
    }


def test_a_file_s_time_with_a_two_digit_year_is_refused() -> None:
    from producers.adapters.filedrop import FileDropConfig

    with pytest.raises(ValidationError, match=r"occurred_at_format: 'dd/MM/yy HH:mm'"):
        FileDropConfig(
            directory="/tmp/drop", entity="citizen", key_field="so_dinh_danh",
            occurred_at_field="ngay_cap_nhat", occurred_at_format="dd/MM/yy HH:mm",
            fields={"full_name": "ho_ten"},
        )  # fmt: skip


@pytest.mark.parametrize(
    "stored",
    ["Nữ", unicodedata.normalize("NFD", "Nữ"), "NỮ", " nữ ", unicodedata.normalize("NFD", "NỮ")],
)
def test_a_value_map_reads_a_source_s_text_whatever_its_form_and_case(stored: str) -> None:
    """A source storing `Nữ` decomposed (NFD) or upper-cased missed the map's `Nữ`: the raw
    text went on, was not one of the contract's values, and every female citizen of that
    source was a dead letter."""
    mapping = FieldMapping(
        fields={"sex": "gioi_tinh"}, value_maps={"sex": {"Nam": "male", "Nữ": "female"}}
    )
    zone = ZoneInfo("Asia/Ho_Chi_Minh")
    assert convert("sex", stored, mapping, zone) == "female"
    assert convert("sex", "khác", mapping, zone) == "khác"  # not in the map: as it is


def test_value_map_keys_that_read_alike_must_agree() -> None:
    with pytest.raises(ValidationError, match="read alike"):
        FieldMapping(fields={"sex": "g"}, value_maps={"sex": {"Nam": "male", "NAM": "female"}})
    assert FieldMapping(fields={"sex": "g"}, value_maps={"sex": {"Nam": "male", "NAM": "male"}})


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("phone", "091 234 5678", "0912345678"),
        ("phone", "0912.345.678", "0912345678"),
        ("phone", "(024) 3825-1234", "02438251234"),
        ("phone", "+84 912 345 678", "+84912345678"),
        ("phone", "0912345678", "0912345678"),
        ("phone", "gọi sau", "gọi sau"),  # no phone under the separators: as it is
        ("phone", "09-12", "09-12"),
        ("owner_id", "0100109106001", "0100109106-001"),
        ("owner_id", "0100109106", "0100109106"),
        ("owner_id", "079090000001", "079090000001"),
        ("owner_id", "01001091060012", "01001091060012"),
        ("full_name", "  Nguyễn\u00a0Văn   An ", "Nguyễn Văn An"),
        ("full_name", "Trần\tThị Bích", "Trần Thị Bích"),
        ("full_name", "   ", None),  # blank: no value, as an empty CSV cell
        ("name", "Công ty  TNHH An Bình ", "Công ty TNHH An Bình"),
        ("address.line", "Số 12, ngõ 34/5\r\nphường Ba Đình", "Số 12, ngõ 34/5 phường Ba Đình"),
        ("title", "Quyết định về việc\nphê duyệt", "Quyết định về việc phê duyệt"),
        ("legal_form", "Công ty TNHH\tMTV", "Công ty TNHH MTV"),
        ("file_sha256", "9F86D081884C7D65" * 4, "9f86d081884c7d65" * 4),
        ("phone", "", None),  # a NOT NULL DEFAULT '' column: no value, not a dead letter
        ("year_of_birth", " 1945", 1945),  # a CSV cell or a text column: the integer
        ("year_of_birth", "1945?", "1945?"),  # as it is: the contract refuses it
        ("year_of_birth", "１９４５", "１９４５"),  # fullwidth digits: as they are, refused
        ("address.ward_code", " ", None),
    ],
)
def test_phones_and_branch_tax_codes_in_a_form_one_separator_from_the_contract_s(
    column: str, value: str, expected: str | int | None
) -> None:
    """`091 234 5678` made a whole citizen event a dead letter over its contact field; a
    branch's tax code kept without its hyphen did the same to a document's owner. Taking
    the separators out (or putting the hyphen in) gives the contract's form; nothing else
    is altered."""
    mapping = FieldMapping(fields={column: "cot"})
    data = map_fields({"cot": value}, mapping, ZoneInfo("UTC"), field_plan(mapping))
    *parents, leaf = column.split(".")
    for parent in parents:
        data = data[parent]
    assert data == {leaf: expected}


def test_a_blank_value_is_no_value_unless_a_value_map_names_it() -> None:
    """Legacy columns are often NOT NULL DEFAULT '': an empty phone or English name made the
    whole record a dead letter (`invalid_field`), where an empty CSV cell is a null."""
    mapping = FieldMapping(
        fields={"sex": "gt", "english_name": "en", "phone": "dt"},
        value_maps={"sex": {"": "unknown", "Nam": "male"}},
    )
    assert map_fields({"gt": "", "en": "  ", "dt": ""}, mapping, ZONE) == {
        "sex": "unknown", "english_name": None, "phone": None,
    }  # fmt: skip
    unmapped = FieldMapping(fields={"sex": "gt"}, value_maps={"sex": {"Nam": "male"}})
    assert map_fields({"gt": " "}, unmapped, ZONE) == {"sex": None}


SQL = {"url": "sqlite:///source.db", "entity": "citizen",
       "table": "cong_dan", "key_column": "so_dinh_danh", "pk_column": "id"}  # fmt: skip
DROP = {"directory": "inbox", "entity": "citizen", "key_field": "pid",
        "occurred_at_field": "at"}  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("fields", {"fullname": "ho_ten"}, "fields: fullname: not a field of citizen"),
        ("fields", {"permanent_address.ward": "xa"}, "permanent_address.ward: not a field"),
        ("value_maps", {"gender": {"Nam": "male"}}, "value_maps: gender: not a field"),
        ("formats", {"birth_date": "yyyyMMdd"}, "formats: birth_date: not a field"),
    ],
)
def test_a_mapping_naming_no_field_of_the_entity_is_refused_at_start(
    option: str, value: Any, said: str
) -> None:
    """`fullname` for `full_name` was accepted: every record a dead letter, its field named
    only `<unknown field>`, while the cursor (the file's checksum) moved past them all."""
    from producers.adapters.debezium import DebeziumAdapter
    from producers.adapters.filedrop import FileDropAdapter
    from producers.adapters.sql import SqlAdapter
    from producers.sdk import ConfigurationError

    debezium = {"bootstrap": "kafka:9092", "topics": ["p.cong_dan"], "entity": "citizen",
                "key_column": "so_dinh_danh"}  # fmt: skip
    for adapter, options in ((SqlAdapter, SQL), (FileDropAdapter, DROP),
                             (DebeziumAdapter, debezium)):  # fmt: skip
        mapped = {"fields": {"full_name": "ho_ten"}, **{option: value}}
        with pytest.raises(ConfigurationError, match=re.escape(said)):
            adapter.from_settings("province-01", options | mapped, Path("."))
    nested = {"fields": {"full_name": "ho_ten", "permanent_address.ward_code": "ma_xa"}}
    assert FieldMapping(**nested).fields == nested["fields"]  # a known nested path
    assert SqlAdapter.from_settings("province-01", SQL | nested, Path("."))


@pytest.mark.parametrize("zone", ["Asia/Hanoi_City", "Asia/Saigon ", "", "../etc/passwd"])
def test_a_time_zone_that_is_none_is_refused_at_start(zone: str) -> None:
    """A misspelt `timezone` failed once the adapter started: a traceback (filedrop,
    portal, outbox) or, in the `sql` adapter, a failed run retried at every poll."""
    from producers.adapters.filedrop import FileDropAdapter
    from producers.adapters.outbox import OutboxAdapter
    from producers.adapters.sql import SqlAdapter
    from producers.sdk import ConfigurationError

    fields = {"fields": {"full_name": "ho_ten"}}
    for adapter, options in ((SqlAdapter, SQL | fields), (FileDropAdapter, DROP | fields),
                             (OutboxAdapter, {"url": "sqlite:///outbox.db"})):  # fmt: skip
        with pytest.raises(ConfigurationError, match=r"timezone: .*not a time zone of the IANA"):
            adapter.from_settings("province-01", options | {"timezone": zone}, Path("."))
        assert adapter.from_settings("province-01", options | {"timezone": "UTC"}, Path("."))
