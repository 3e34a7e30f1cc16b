"""Event contract v1: parsing, stable dead-letter codes, soft warnings, exported schemas."""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from schemas import InvalidEvent, derive_event_id, message_key, parse_event, partition_for
from schemas.events import (
    NO_UTC_FORM,
    CitizenEvent,
    DocumentEvent,
    DossierEvent,
    OrganizationEvent,
)
from schemas.export import JSON_DIR, rendered_schemas
from schemas.identifiers import current_province_codes, tax_code_check_digit
from schemas.partitioning import murmur2
from schemas.validation import MAX_EVENT_BYTES, misdecoded

EVENT_ID = "0b8b2e0e-4c38-4c43-9d46-3b8a1f6c2a11"
PERSONAL_ID = "001090012345"  # Hà Nội (001), 20th century male (0), born 1990 (90)


def _valid_tax_code(prefix: str = "010000000") -> str:
    for start in range(int(prefix), int(prefix) + 100):
        head = f"{start:09d}"
        check = tax_code_check_digit(head + "0")
        if check is not None:
            return f"{head}{check}"
    raise AssertionError("no tax code with a check digit found")


TAX_CODE = _valid_tax_code()


def envelope(entity: str, key: str, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": EVENT_ID,
        "source": "province-01",
        "entity": entity,
        "key": key,
        "op": "upsert",
        "version": 7,
        "occurred_at": "2024-01-15T10:00:00+07:00",
        "data": {},
    }
    event.update(overrides)
    return event


def citizen(**overrides: Any) -> dict[str, Any]:
    data = {"full_name": "Nguyễn Văn An", "date_of_birth": "1990-05-01", "sex": "male"}
    return envelope("citizen", PERSONAL_ID, data=data) | overrides


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode("utf-8")


def without(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != name}


def reject(raw: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw)
    return caught.value


# -- valid events of every entity ---------------------------------------------------------


def test_valid_citizen_parses() -> None:
    data = {
        "full_name": "Nguyễn Văn An",
        "date_of_birth": "1990-05-01",
        "sex": "male",
        "permanent_address": {"province_code": "01", "ward_code": "00004", "line": "12 Lê Lợi"},
        "phone": "0912345678",
        "email": "an@example.vn",
    }
    parsed = parse_event(encode(citizen(data=data)))
    event = parsed.event
    assert isinstance(event, CitizenEvent)
    assert event.entity == "citizen"
    assert event.key == PERSONAL_ID
    assert event.source == "province-01"
    assert event.version == 7
    assert event.event_id == uuid.UUID(EVENT_ID)
    assert event.occurred_at == datetime(2024, 1, 15, 3, 0, tzinfo=UTC)
    assert event.data_dict() == data
    assert parsed.warnings == []


@pytest.mark.parametrize(
    ("entity", "data"),
    [
        ("citizen", {"phone": "+16505551234"}),  # a citizen living abroad
        ("citizen", {"phone": "+821012345678"}),
        ("citizen", {"phone": "+998123456789012"}),  # E.164's 15 digits
        ("organization", {"legal_representative_id": "C1234567"}),  # a foreign passport
        ("organization", {"legal_representative_id": "EA1234567"}),
        ("organization", {"status": "dissolving"}),
        ("organization", {"status": "not_at_address"}),
        ("organization", {"status": "converted"}),
        ("document", {"title": "Quyết định về việc phê duyệt điều chỉnh quy hoạch " * 15}),
    ],
)
def test_real_data_that_was_refused_is_taken(entity: str, data: dict[str, Any]) -> None:
    """Each made its whole record a dead letter: a citizen's foreign phone, a foreign
    legal representative (every foreign-invested firm), an enterprise's legal states past
    three, a decision's summary line past 255 characters."""
    key = {"citizen": PERSONAL_ID, "organization": TAX_CODE}.get(entity, "000.00.01.H29:QD-1")
    parsed = parse_event(encode(envelope(entity, key, data=data)))
    assert parsed.event.data_dict() == data


@pytest.mark.parametrize(
    ("entity", "data"),
    [
        ("citizen", {"phone": "+8412345"}),  # +84: a Vietnamese number's length
        ("citizen", {"phone": "+0123456789"}),
        ("citizen", {"phone": "+1234567890123456"}),  # beyond E.164's 15 digits
        ("organization", {"legal_representative_id": "Nguyễn Văn An"}),
        ("organization", {"legal_representative_id": "0101234567"}),  # a tax code
        ("organization", {"legal_representative_id": "c1234567"}),
        ("organization", {"legal_representative_id": "NGUYENVANAN"}),  # a name in capitals
        ("organization", {"legal_representative_id": "UNKNOWN"}),
        ("organization", {"status": "closed"}),
        ("document", {"title": "x" * 1001}),
    ],
)
def test_what_stays_refused_beside_it(entity: str, data: dict[str, Any]) -> None:
    key = {"citizen": PERSONAL_ID, "organization": TAX_CODE}.get(entity, "000.00.01.H29:QD-1")
    with pytest.raises(InvalidEvent) as refused:
        parse_event(encode(envelope(entity, key, data=data)))
    assert refused.value.code == "invalid_field"


@pytest.mark.parametrize("key", [TAX_CODE, TAX_CODE + "-001"])
def test_valid_organization_parses(key: str) -> None:
    data = {
        "name": "Công ty cổ phần Minh Phát",
        "status": "active",
        "address": {"province_code": "79"},
        "legal_representative_id": PERSONAL_ID,
        "established_on": "2010-03-04",
    }
    parsed = parse_event(encode(envelope("organization", key, data=data)))
    assert isinstance(parsed.event, OrganizationEvent)
    assert parsed.event.key == key
    assert parsed.event.data_dict() == data
    assert parsed.warnings == []


def test_valid_document_parses() -> None:
    data = {
        "owner_kind": "citizen",
        "owner_id": PERSONAL_ID,
        "doc_type": "GIAY_KHAI_SINH",
        "title": "Giấy khai sinh",
        "issuer_code": "000.00.00.G12",
        "issued_on": "2020-01-02",
        "valid_until": None,
        "status": "valid",
        "file_sha256": "a" * 64,
    }
    parsed = parse_event(encode(envelope("document", "KQ:2024/000123", data=data)))
    assert isinstance(parsed.event, DocumentEvent)
    assert parsed.event.key == "KQ:2024/000123"
    assert parsed.event.data_dict() == data


def test_valid_dossier_parses() -> None:
    data = {
        "procedure_code": "1.005129",
        "agency_code": "000.00.01.H29",
        "applicant_kind": "organization",
        "applicant_id": TAX_CODE,
        "status": 4,
        "received_at": "2024-01-15T08:30:00+07:00",
    }
    key = "000.00.01.H29-240115-0001"
    parsed = parse_event(encode(envelope("dossier", key, data=data)))
    assert isinstance(parsed.event, DossierEvent)
    assert parsed.event.key == key
    assert parsed.event.data_dict() == data | {"received_at": "2024-01-15T01:30:00Z"}


@pytest.mark.parametrize(
    "sent",
    [
        "2024-01-15T10:00:00+07:00",  # a local column
        "2024-01-15T03:00:00Z",  # a timestamptz
        "2024-01-15T03:00:00+00:00",
        "2024-01-15t03:00:00.000z",
        "2024-01-14T22:00:00-05:00",
    ],
)
def test_a_dossiers_times_are_held_in_utc_whatever_offset_they_came_with(sent: str) -> None:
    """One instant sent by two sources with two offsets is one value: never a conflict
    between them, a change in the history or a canonical text that flips between them."""
    data = {"received_at": sent, "due_at": sent, "finished_at": sent}
    parsed = parse_event(encode(envelope("dossier", "000.00.01.H29-240115-0001", data=data)))
    assert parsed.event.data_dict() == dict.fromkeys(data, "2024-01-15T03:00:00Z")


def test_delete_without_data_parses() -> None:
    parsed = parse_event(encode(without(citizen(op="delete"), "data")))
    assert parsed.event.op == "delete"
    assert parsed.event.data_dict() is None


def test_absent_and_null_fields_are_preserved() -> None:
    event = citizen(data={"full_name": "Trần Thị Bình", "email": None, "permanent_address": None})
    dumped = parse_event(encode(event)).event.data_dict()
    assert dumped == {"full_name": "Trần Thị Bình", "email": None, "permanent_address": None}
    assert "phone" not in dumped
    assert "sex" not in dumped


def test_nested_absent_and_null_fields_are_preserved() -> None:
    event = citizen(data={"permanent_address": {"ward_code": None, "line": "Số 1"}})
    dumped = parse_event(encode(event)).event.data_dict()
    assert dumped == {"permanent_address": {"ward_code": None, "line": "Số 1"}}


def test_text_is_normalised_to_nfc() -> None:
    name = "Nguyễn Thị Hương"
    decomposed = unicodedata.normalize("NFD", name)
    assert decomposed != name
    event = citizen(data={"full_name": decomposed, "permanent_address": {"line": decomposed}})
    dumped = parse_event(encode(event)).event.data_dict()
    assert dumped is not None
    assert dumped["full_name"] == name
    assert unicodedata.is_normalized("NFC", dumped["full_name"])
    assert dumped["permanent_address"]["line"] == name


def test_nfd_name_at_the_length_limit_counts_nfc_characters() -> None:
    # 100 NFC characters, but more than 100 code points in NFD: normalised before the limit.
    name = "ễ" * 100
    assert len(unicodedata.normalize("NFD", name)) > 100
    event = citizen(data={"full_name": unicodedata.normalize("NFD", name)})
    assert parse_event(encode(event)).event.data_dict() == {"full_name": name}


def test_message_key_names_the_source_and_the_partition_follows_the_record() -> None:
    assert message_key("citizen", PERSONAL_ID, "province-01") == (
        f"citizen:{PERSONAL_ID}:province-01".encode()
    )
    # Kafka's default partitioner on the record part: the partition a record had when it
    # was keyed <entity>:<key>, the same for every source.
    for partitions in (1, 3, 6, 12):
        places = {
            partition_for(message_key("citizen", PERSONAL_ID, source), partitions)
            for source in ("province-01", "national-population", "ministry-btp")
        }
        expected = (murmur2(f"citizen:{PERSONAL_ID}".encode()) & 0x7FFFFFFF) % partitions
        assert places == {expected}
    # Java's Utils.murmur2 of these bytes (its test vectors): the same signed values.
    for data, java in [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
    ]:
        assert murmur2(data) == java & 0xFFFFFFFF


# -- hard checks: stable codes, no echoed values ------------------------------------------

SECRET = "Bí Mật Giá Trị"


def _huge() -> bytes:
    event = citizen(data={"full_name": "x"})
    event["padding"] = "y" * MAX_EVENT_BYTES
    return encode(event)


CASES: list[tuple[str, bytes, str, str | None]] = [
    # id, raw message, expected code, value that must not be echoed
    ("not_utf8", b'{"full_name": "\xff\xfe' + SECRET.encode() + b'"}', "not_utf8", SECRET),
    ("truncated json", encode(citizen())[:-5], "invalid_json", None),
    ("json array", b"[1, 2]", "invalid_json", None),
    ("json string", b'"citizen"', "invalid_json", None),
    (
        "duplicate key",
        encode(citizen()).replace(b'"source": "province-01"', b'"source": "a-1", "source": "b-2"'),
        "invalid_json",
        "b-2",
    ),
    ("NaN", encode(citizen()).replace(b'"version": 7', b'"version": NaN'), "invalid_json", None),
    (
        "Infinity",
        encode(citizen()).replace(b'"version": 7', b'"version": -Infinity'),
        "invalid_json",
        None,
    ),
    ("schema_version 2", encode(citizen(schema_version=2)), "unsupported_schema_version", None),
    (
        "schema_version missing",
        encode(without(citizen(), "schema_version")),
        "unsupported_schema_version",
        None,
    ),
    (
        "schema_version string",
        encode(citizen(schema_version="1")),
        "unsupported_schema_version",
        None,
    ),
    ("missing source", encode(without(citizen(), "source")), "missing_field", None),
    ("missing version", encode(without(citizen(), "version")), "missing_field", None),
    ("missing key", encode(without(citizen(), "key")), "missing_field", None),
    ("missing entity", encode(without(citizen(), "entity")), "missing_field", None),
    ("unknown entity", encode(citizen(entity="xzy-secret")), "unknown_entity", "xzy-secret"),
    ("unknown envelope field", encode(citizen(note=SECRET)), "unknown_field", SECRET),
    (
        "unknown data field",
        encode(citizen(data={"nickname": SECRET})),
        "unknown_field",
        SECRET,
    ),
    ("citizen key 11 digits", encode(citizen(key="00109001234")), "invalid_key", "00109001234"),
    ("citizen key letters", encode(citizen(key="00109001234X")), "invalid_key", "00109001234X"),
    (
        "organization key bad branch",
        encode(envelope("organization", "0100000001-01")),
        "invalid_key",
        "0100000001-01",
    ),
    (
        "dossier key malformed",
        encode(envelope("dossier", "000.00.01.h29-240115-0001")),
        "invalid_key",
        "000.00.01.h29-240115-0001",
    ),
    ("document key space", encode(envelope("document", "KQ 123")), "invalid_key", "KQ 123"),
    ("version as string", encode(citizen(version="1")), "invalid_field", None),
    ("version as bool", encode(citizen(version=True)), "invalid_field", None),
    ("version as float", encode(citizen(version=7.5)), "invalid_field", None),
    ("version zero", encode(citizen(version=0)), "invalid_field", None),
    ("version 2**63", encode(citizen(version=2**63)), "invalid_field", None),
    (
        "occurred_at without offset",
        encode(citizen(occurred_at="2024-01-15T10:00:00")),
        "invalid_field",
        "2024-01-15T10:00:00",
    ),
    ("bad event_id", encode(citizen(event_id="not-a-uuid")), "invalid_field", "not-a-uuid"),
    ("bad source", encode(citizen(source="Province 01")), "invalid_field", "Province 01"),
    ("bad op", encode(citizen(op="merge")), "invalid_field", "merge"),
    ("bad sex", encode(citizen(data={"sex": "unknown-x"})), "invalid_field", "unknown-x"),
    (
        "control character in full_name",
        encode(citizen(data={"full_name": "Nguyễn\x07An"})),
        "invalid_field",
        "Nguyễn\x07An",
    ),
    (
        "C1 control character in full_name",
        encode(citizen(data={"full_name": "Nguyễn\x85An"})),
        "invalid_field",
        "Nguyễn\x85An",
    ),
    ("too-long name", encode(citizen(data={"full_name": "Q" * 101})), "invalid_field", "Q" * 101),
    ("empty name", encode(citizen(data={"full_name": ""})), "invalid_field", None),
    (
        "impossible date of birth",
        encode(citizen(data={"date_of_birth": "1990-02-30"})),
        "invalid_field",
        "1990-02-30",
    ),
    ("bad phone", encode(citizen(data={"phone": "12345"})), "invalid_field", "12345"),
    (
        "bad province code",
        encode(citizen(data={"permanent_address": {"province_code": "7"}})),
        "invalid_field",
        None,
    ),
    (
        "dossier status 11",
        encode(envelope("dossier", "000.00.01.H29-240115-0001", data={"status": 11})),
        "invalid_field",
        None,
    ),
    (
        "dossier key with impossible date",
        encode(envelope("dossier", "000.00.01.H29-241345-0001")),
        "invalid_key",
        "000.00.01.H29-241345-0001",
    ),
    (
        "dossier received_at without offset",
        encode(
            envelope(
                "dossier",
                "000.00.01.H29-240115-0001",
                data={"received_at": "2024-01-15T08:30:00"},
            )
        ),
        "invalid_field",
        "2024-01-15T08:30:00",
    ),
    (
        "document owner id does not match kind",
        encode(envelope("document", "D1", data={"owner_kind": "citizen", "owner_id": TAX_CODE})),
        "invalid_field",
        TAX_CODE,
    ),
    ("upsert without data", encode(without(citizen(), "data")), "op_data_mismatch", None),
    ("upsert with null data", encode(citizen(data=None)), "op_data_mismatch", None),
    ("delete with data", encode(citizen(op="delete")), "op_data_mismatch", None),
    (
        "delete with empty data",
        encode(citizen(op="delete", data={})),
        "op_data_mismatch",
        None,
    ),
    ("too_large", _huge(), "too_large", None),
]


@pytest.mark.parametrize(
    ("raw", "code", "secret"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hard_check_failures_have_stable_codes(raw: bytes, code: str, secret: str | None) -> None:
    error = reject(raw)
    assert error.code == code, str(error)
    assert str(error).startswith(f"{code}: ")
    assert error.message
    if secret is not None:
        assert secret not in str(error)
        assert secret not in error.message


@pytest.mark.parametrize(
    ("entity", "key", "name"),
    [
        ("citizen", PERSONAL_ID, "date_of_birth"),
        ("organization", TAX_CODE, "established_on"),
        ("document", "KQ:2024/000123", "issued_on"),
        ("document", "KQ:2024/000123", "valid_until"),
    ],
)
@pytest.mark.parametrize("text", ["1704067200", "-86400", "2024-01-01T00:00:00", "2024-02-30"])
def test_a_date_is_written_yyyy_mm_dd_only(entity: str, key: str, name: str, text: str) -> None:
    """pydantic reads a number of seconds written as text as a date; the payload as sent,
    which the store keeps, would then hold "1704067200" where the date checked was
    2024-01-01."""
    error = reject(encode(envelope(entity, key, data={name: text})))
    assert error.message == f"data.{name}: Input should be a valid date in the format YYYY-MM-DD"
    parsed = parse_event(encode(envelope(entity, key, data={name: "2024-01-01"})))
    assert parsed.event.data_dict() == {name: "2024-01-01"}


@pytest.mark.parametrize(
    "text",
    [
        "1700000000",  # seconds
        "1700000000000",  # milliseconds
        "0",
        "-1",
        "2025-01-01t00:00z",  # no seconds
        "2025-01-01T00:00+07:00",
        "2025-01-01",
        "2025-01-01T00:00:00",  # no offset
        "2025-13-01T00:00:00Z",
        "2025-01-01T00:00:60Z",
        "2025-01-01T00:00:00+24:00",
        "2025-01-01T00:00:00.Z",
        "２０２５-01-01T00:00:00Z",  # full-width digits
    ],
)
def test_a_date_time_is_rfc_3339_text_only(text: str) -> None:
    """pydantic reads a number of seconds (or milliseconds) written as text as a datetime,
    and a time without seconds; the contract says RFC 3339 with an offset."""
    rule = "Input should be an RFC 3339 date-time with an offset"
    assert reject(encode(citizen(occurred_at=text))).message == f"occurred_at: {rule}"
    dossier = envelope("dossier", "000.00.01.H29-240115-0001", data={"received_at": text})
    assert reject(encode(dossier)).message == f"data.received_at: {rule}"


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2025-01-01T07:00:00+07:00", "2025-01-01T00:00:00+00:00"),
        ("2025-01-01t00:00:00z", "2025-01-01T00:00:00+00:00"),
        ("2025-01-01T00:00:00z", "2025-01-01T00:00:00+00:00"),
        ("2025-01-01t00:00:00+07:00", "2024-12-31T17:00:00+00:00"),
        ("2025-01-01 00:00:00.123456789Z", "2025-01-01T00:00:00.123456+00:00"),
        ("2024-12-31T23:59:59-05:30", "2025-01-01T05:29:59+00:00"),
    ],
)
def test_rfc_3339_date_times_are_read_as_their_instant(text: str, instant: str) -> None:
    parsed = parse_event(encode(citizen(occurred_at=text)))
    assert parsed.event.occurred_at.isoformat() == instant


def test_an_event_read_dumps_without_a_serializer_warning() -> None:
    """The producers dump every event they send: a validator that left pydantic's
    serializer expecting another type warned on each one (the demo showed it)."""
    import warnings

    from schemas.events import CHANGE_EVENT

    dossier = envelope(
        "dossier", "000.00.01.H29-240115-0001", data={"received_at": "2024-01-15 10:00:00+07:00"}
    )
    for event in (citizen(occurred_at="2024-01-15t10:00:00+07:00"), dossier):
        parsed = parse_event(encode(event)).event
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dumped = json.loads(CHANGE_EVENT.dump_json(parsed))
            CHANGE_EVENT.dump_python(parsed, mode="json")
        assert dumped["occurred_at"].endswith("Z")


def test_an_identifier_ascii_only_once_normalised_is_refused() -> None:
    """NFC turns the Kelvin sign (U+212A) into "K": a dossier code or an agency code with
    it would match the contract's ASCII patterns once normalised, and be stored as another
    dossier's code."""
    kelvin = "000.00.01.\u212a29"
    dossier = envelope("dossier", f"{kelvin}-240115-0001", data={"status": 1})
    assert reject(encode(dossier)).code == "invalid_key"
    code = envelope("dossier", "000.00.01.K29-240115-0001", data={"agency_code": kelvin})
    refused = reject(encode(code))
    assert (refused.code, refused.message.split(":")[0]) == ("invalid_field", "data.agency_code")
    name = citizen(data={"full_name": "Nguyễn Văn \u212a"})  # not ASCII once normalised
    assert parse_event(encode(name)).event.data_dict() == {"full_name": "Nguyễn Văn K"}
    # Text a person writes is no identifier: ASCII once normalised, it is taken in NFC, as
    # the same text is in an address's line.
    written = {"english_name": "ABC Trading\u037e Ltd", "legal_form": "\u212a"}
    org = envelope("organization", "0312345675", data=written)
    assert parse_event(encode(org)).event.data_dict() == {
        "english_name": "ABC Trading; Ltd",
        "legal_form": "K",
    }
    title = envelope("document", "000.00.01.H29:QD-1", data={"title": "Quyết định\u037e"})
    assert parse_event(encode(title)).event.data_dict() == {"title": "Quyết định;"}
    code = {"title": "Quyết định", "doc_type": "QD-\u212a"}  # a code beside it still is
    refused = reject(encode(envelope("document", "000.00.01.H29:QD-1", data=code)))
    assert (refused.code, refused.message.split(":")[0]) == ("invalid_field", "data.doc_type")


@pytest.mark.parametrize(
    "hidden",
    [
        "\u3164",  # Hangul filler: a name shown blank
        "\u115f",
        "\u034f",  # combining grapheme joiner: one spelling, other bytes
        "\ufe01",  # a variation selector (the emoji's, VS15 and VS16, stay)
        "\U000e0100",
        "\u17b4",
        "\u180b",
        "\u2065",  # unassigned
        "\ufff0",
        "\ue000",  # private use
        "\U000f0000",
    ],
)
def test_free_text_refuses_what_a_reader_cannot_see(hidden: str) -> None:
    for name in (hidden, f"Nguyễn Văn{hidden} An"):
        refused = reject(encode(citizen(data={"full_name": name})))
        assert (refused.code, refused.message.split(":")[0]) == ("invalid_field", "data.full_name")
    email = reject(encode(citizen(data={"email": f"an{hidden}@example.vn"})))
    assert email.message.startswith("data.email:")


@pytest.mark.parametrize(
    "name", ["Nguyễn Văn An", "Lê Thị Hoà", "Đặng Ngọc Ánh", "H'Hen Niê", "𠀧", "Cà phê ☕\ufe0f"]
)
def test_free_text_keeps_every_visible_letter(name: str) -> None:
    assert parse_event(encode(citizen(data={"full_name": name}))).event.data_dict() == {
        "full_name": name
    }


def test_empty_message_is_rejected() -> None:
    assert reject(None).code == "empty_message"  # type: ignore[arg-type]


def test_size_limit_is_exactly_one_mebibyte() -> None:
    assert MAX_EVENT_BYTES == 1024 * 1024
    event = citizen(data={"full_name": "x"})
    base = len(encode(event | {"padding": ""}))
    # Exactly at the limit: not too_large (rejected later for the unknown field).
    at_limit = encode(event | {"padding": "y" * (MAX_EVENT_BYTES - base)})
    assert len(at_limit) == MAX_EVENT_BYTES
    assert reject(at_limit).code == "unknown_field"
    assert reject(at_limit + b" ").code == "too_large"


def test_error_message_names_the_field() -> None:
    error = reject(encode(citizen(data={"sex": "unknown-x"})))
    assert "data.sex" in error.message
    error = reject(encode(citizen(occurred_at="2024-01-15T10:00:00")))
    assert error.message.startswith("occurred_at:")


# -- soft checks: warn, never reject ------------------------------------------------------


def test_personal_id_disagreeing_with_birth_year_and_sex_only_warns() -> None:
    # 001 0 90...: male born 1990; the data says female born 1991.
    event = citizen(data={"date_of_birth": "1991-05-01", "sex": "female"})
    parsed = parse_event(encode(event))
    assert parsed.event.key == PERSONAL_ID
    assert "personal_id_birth_year" in parsed.warnings
    assert "personal_id_sex" in parsed.warnings
    # a producer skips them (the worker reports them); the verdict is the same
    unwarned = parse_event(encode(event), warn=False)
    assert unwarned.warnings == [] and unwarned.event == parsed.event


def test_personal_id_21st_century_female_matches() -> None:
    # century/sex digit 3: female born 2000-2099
    event = citizen(key="079305012345", data={"date_of_birth": "2005-01-01", "sex": "female"})
    assert parse_event(encode(event)).warnings == []


def test_personal_id_unknown_province_and_century_warn() -> None:
    parsed = parse_event(encode(citizen(key="003790012345", data={"sex": "male"})))
    assert "personal_id_province" in parsed.warnings
    assert "personal_id_century" in parsed.warnings


def test_tax_code_with_wrong_check_digit_only_warns() -> None:
    wrong = TAX_CODE[:9] + str((int(TAX_CODE[9]) + 1) % 10)
    parsed = parse_event(encode(envelope("organization", wrong, data={"name": "Công ty A"})))
    assert parsed.event.key == wrong
    assert parsed.warnings == ["tax_code_check_digit"]
    assert parse_event(encode(envelope("organization", TAX_CODE))).warnings == []


@given(st.from_regex(r"\A[0-9]{10}\Z"))
def test_tax_code_check_digit_is_the_mod_11_rule(code: str) -> None:
    weighted = sum(
        int(d) * w for d, w in zip(code[:9], (31, 29, 23, 19, 17, 13, 7, 5, 3), strict=True)
    )
    check = 10 - weighted % 11
    assert tax_code_check_digit(code) == (check if check < 10 else None)
    # A known code of the circulating rule: 0100109106 (check digit 6).
    assert tax_code_check_digit("0100109106") == 6


def test_old_province_code_warns() -> None:
    current = current_province_codes()
    assert len(current) == 34
    assert "01" in current
    assert "02" not in current  # Hà Giang merged into Tuyên Quang on 2025-07-01
    data = {"permanent_address": {"province_code": "02"}}
    parsed = parse_event(encode(citizen(data=data)))
    assert parsed.warnings == ["province_code_not_current"]
    org = envelope("organization", TAX_CODE, data={"address": {"province_code": "02"}})
    assert parse_event(encode(org)).warnings == ["province_code_not_current"]
    current_data = {"permanent_address": {"province_code": "01"}}
    assert parse_event(encode(citizen(data=current_data))).warnings == []
    # a code no province ever had is told apart from an old one
    nowhere = {"permanent_address": {"province_code": "99"}}
    assert parse_event(encode(citizen(data=nowhere))).warnings == ["province_code_unknown"]
    # a ward of another province (Cà Mau's under Hà Nội), or none at all
    for ward in ("32248", "00000"):
        elsewhere = {"permanent_address": {"province_code": "01", "ward_code": ward}}
        warnings = parse_event(encode(citizen(data=elsewhere))).warnings
        assert warnings == ["ward_code_not_of_province"]
    home = {"permanent_address": {"province_code": "01", "ward_code": "00070"}}
    assert parse_event(encode(citizen(data=home))).warnings == []


def test_a_birth_date_after_the_event_warns() -> None:
    """2090-05-01 with a personal id of 1990 (`001290…` would be 2090) gave no warning."""
    born = {"full_name": "Nguyễn Văn An", "date_of_birth": "2090-05-01", "sex": "male"}
    warnings = parse_event(encode(citizen(data=born))).warnings
    assert "date_of_birth_after_event" in warnings
    assert "date_of_birth_after_event" not in parse_event(encode(citizen())).warnings
    # born this morning in Vietnam, registered at once: still the event's day there
    today = {"full_name": "Nguyễn Văn An", "date_of_birth": "2025-09-10", "sex": "male"}
    registered = citizen(data=today, occurred_at="2025-09-10T06:00:00+07:00")
    assert "date_of_birth_after_event" not in parse_event(encode(registered)).warnings


# -- a birth known only by its year ----------------------------------------------------------


def test_a_birth_known_only_by_its_year() -> None:
    """Civil-status books of the 1940s-1970s often give a year alone: producers had to
    leave the birth out. `year_of_birth` takes it; with a date, it is the date's year."""
    alone = parse_event(encode(citizen(data={"full_name": "Lê Văn Tám", "year_of_birth": 1990})))
    assert alone.event.data is not None and vars(alone.event.data)["year_of_birth"] == 1990
    assert alone.warnings == []
    both = {"date_of_birth": "1990-05-01", "year_of_birth": 1990}
    assert parse_event(encode(citizen(data=both))).warnings == []
    error = reject(encode(citizen(data={"date_of_birth": "1990-05-01", "year_of_birth": 1991})))
    assert error.code == "invalid_field"
    assert "year_of_birth must be date_of_birth's year" in error.message
    assert "1991" not in error.message  # the rule, never the value
    for year in ("1990", 1799, 10000, 1990.0, True):
        assert reject(encode(citizen(data={"year_of_birth": year}))).code == "invalid_field"


def test_a_year_of_birth_is_soft_checked_as_a_date_is() -> None:
    """The personal id's birth-year digits (`001090…`: 1990), and a year after the event's."""
    warnings = parse_event(encode(citizen(data={"year_of_birth": 1991}))).warnings
    assert warnings == ["personal_id_birth_year"]
    late = citizen(data={"year_of_birth": 2090}, key="001290012345")
    assert parse_event(encode(late)).warnings == ["date_of_birth_after_event"]
    # the event's 31 December in UTC is already 1 January where it was sent
    new_year = citizen(
        data={"year_of_birth": 2025}, key="001225012345", occurred_at="2024-12-31T18:00:00Z"
    )
    assert parse_event(encode(new_year)).warnings == []


# -- event ids ----------------------------------------------------------------------------


def test_derive_event_id_is_deterministic_and_distinct() -> None:
    first = derive_event_id("province-01", "citizen", PERSONAL_ID, 1)
    assert first == derive_event_id("province-01", "citizen", PERSONAL_ID, 1)
    assert first.version == 5
    ids = {derive_event_id("province-01", "citizen", PERSONAL_ID, v) for v in range(1, 50)} | {
        derive_event_id("province-79", "citizen", PERSONAL_ID, 1),
        derive_event_id("province-01", "organization", PERSONAL_ID, 1),
        derive_event_id("province-01", "citizen", "001090012346", 1),
    }
    assert len(ids) == 52


def test_derive_event_id_fields_cannot_run_together() -> None:
    assert derive_event_id("a-b", "citizen", "1", 1) != derive_event_id("a", "b-citizen", "1", 1)
    assert derive_event_id("s1", "citizen", "12", 3) != derive_event_id("s1", "citizen", "1", 23)


def test_occurred_at_keeps_its_instant_held_in_utc() -> None:
    event = citizen(occurred_at="2024-01-15T23:30:00.123456-05:00")
    occurred = parse_event(encode(event)).event.occurred_at
    assert occurred == datetime(2024, 1, 16, 4, 30, 0, 123456, tzinfo=UTC)
    # The singleton, not an equal zone of pydantic's: the worker compares and converts
    # these times many times per event, several times faster with it.
    assert occurred.tzinfo is UTC
    assert occurred.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "when",
    [
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC
        "0001-01-01T13:59:59.999999+14:00",
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "9999-12-31T10:00:00-14:00",
    ],
)
def test_occurred_at_without_a_utc_form_is_refused(when: str) -> None:
    """No store can hold such an instant: refused by the contract, with the field's path and
    a fixed text, instead of reaching a worker that finds it only by halving its batch
    down to it (`apply_failed`)."""
    error = reject(encode(citizen(occurred_at=when)))
    assert error.code == "invalid_field"
    assert error.message == "occurred_at: Value error, " + NO_UTC_FORM
    assert when not in error.message


def test_occurred_at_at_the_edges_of_utc_is_valid() -> None:
    for when, utc in (
        ("0001-01-01T14:00:00+14:00", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T13:59:59+13:59", datetime(1, 1, 1, 0, 0, 59, tzinfo=UTC)),
        ("9999-12-31T09:59:59-14:00", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ):
        occurred = parse_event(encode(citizen(occurred_at=when))).event.occurred_at
        assert occurred == utc and occurred.tzinfo is UTC


# -- exported JSON Schemas ----------------------------------------------------------------


def test_checked_in_json_schemas_are_current() -> None:
    rendered = rendered_schemas()
    assert set(rendered) == {
        "change-event.v1.schema.json",
        "citizen.v1.schema.json",
        "organization.v1.schema.json",
        "document.v1.schema.json",
        "dossier.v1.schema.json",
    }
    stale = [
        name
        for name, text in rendered.items()
        if not (JSON_DIR / name).exists() or (JSON_DIR / name).read_text("utf-8") != text
    ]
    extra = sorted(p.name for p in JSON_DIR.glob("*.json") if p.name not in rendered)
    assert not stale and not extra, (
        f"schemas/json is stale ({stale}, unexpected {extra}): run `python -m schemas.export`"
    )


def test_exported_schema_describes_the_envelope() -> None:
    schema = json.loads(rendered_schemas()["citizen.v1.schema.json"])
    assert schema["additionalProperties"] is False
    assert "full_name" in schema["properties"]
    envelope_schema = rendered_schemas()["change-event.v1.schema.json"]
    for entity in ("citizen", "organization", "document", "dossier"):
        assert f'"{entity}"' in envelope_schema


@pytest.mark.parametrize("version", [True, 1.0])
def test_schema_version_must_be_the_integer_one(version: object) -> None:
    assert reject(encode(citizen(schema_version=version))).code == "unsupported_schema_version"


def test_every_reason_code_is_in_the_readme_contract_table() -> None:
    from schemas.dead_letter import DEAD_LETTER_REASONS

    readme = (JSON_DIR.parents[1] / "README.md").read_text("utf-8")
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    missing = [code for code in DEAD_LETTER_REASONS if not any(f"`{code}`" in r for r in table)]
    assert not missing, f"reason codes missing from README's contract table: {missing}"


NODE_CHECK = r"""
const fs = require('fs');
const patterns = new Set();
const walk = (o) => {
  if (Array.isArray(o)) o.forEach(walk);
  else if (o && typeof o === 'object')
    for (const [k, v] of Object.entries(o)) k === 'pattern' ? patterns.add(v) : walk(v);
};
process.argv.slice(2).forEach((f) => walk(JSON.parse(fs.readFileSync(f, 'utf8'))));
const out = {};
for (const p of patterns) {
  try {
    const r = new RegExp(p, 'u');
    out[p] = JSON.parse(process.env.SAMPLES).map((s) => r.test(s));
  } catch (e) { out[p] = String(e); }
}
console.log(JSON.stringify(out));
"""


def test_the_json_schemas_patterns_compile_in_ecma_262_and_judge_text_as_the_contract() -> None:
    """Producers validate against the published JSON Schemas with ECMA-262 regexes (ajv
    and the like): every pattern compiles there, and free text is judged as the worker
    judges it."""
    import os
    import shutil
    import subprocess

    from schemas.events import _PLAIN, JSON_SCHEMA_PATTERNS
    from tests.conftest import unavailable

    node = shutil.which("node")
    if node is None:  # deploy/install-system.sh --postgres installs it, as `make test` runs it
        unavailable("node (an ECMA-262 engine) is not installed")
    samples = [
        "Nguyễn Văn An",
        "Cà phê ☕\ufe0f",
        "\u3164",
        "An\u034f",
        "\ue000",
        "\u2065",
        "a\x00",
    ]
    done = subprocess.run(
        [node, "-e", NODE_CHECK, *map(str, sorted(JSON_DIR.glob("*.json")))],
        capture_output=True, text=True, timeout=60, check=True,
        env=os.environ | {"SAMPLES": json.dumps(samples)},
    )  # fmt: skip
    judged = json.loads(done.stdout)
    assert all(isinstance(result, list) for result in judged.values()), judged
    plain = judged[JSON_SCHEMA_PATTERNS[_PLAIN]]
    assert plain == [True, True, False, False, False, False, False]


@pytest.mark.parametrize(
    ("entity", "data", "warnings"),
    [
        ("organization", {"legal_representative_id": PERSONAL_ID}, []),
        ("organization", {"legal_representative_id": "003790012345"}, ["related_id_structure"]),
        ("organization", {"legal_representative_id": "C1234567"}, []),  # a passport: unchecked
        ("document", {"owner_kind": "organization", "owner_id": "0100109107"},
         ["related_id_structure"]),  # the check digit is 6
        ("document", {"owner_kind": "organization", "owner_id": "0100109106-001"}, []),
        ("document", {"owner_id": "0100109107"}, []),  # no kind: not judged
        ("dossier", {"applicant_kind": "citizen", "applicant_id": "001990012345"},
         ["related_id_structure"]),  # century digit 9
        ("document", {"issued_on": "2024-05-01", "valid_until": "2024-04-30"},
         ["dates_out_of_order"]),
        ("document", {"issued_on": "2024-05-01", "valid_until": "2024-05-01"}, []),
        ("dossier", {"received_at": "2024-01-15T09:00:00+07:00",
                     "finished_at": "2024-01-15T01:59:00Z"}, ["dates_out_of_order"]),
        ("dossier", {"received_at": "2024-01-15T09:00:00+07:00",
                     "due_at": "2024-01-15T02:00:00Z"}, []),  # the same instant
    ],
)  # fmt: skip
def test_the_ids_of_related_records_and_the_order_of_dates_are_soft_checked(
    entity: str, data: dict[str, Any], warnings: list[str]
) -> None:
    """A representative's, owner's or applicant's id with a typo linked its record to
    nobody, and a document valid until before its issue passed, without a word. They warn
    (the event is applied, the check counted), as the record keys' own checks do."""
    key = {"organization": TAX_CODE, "dossier": "000.00.01.H29-240115-0001"}.get(
        entity, "000.00.01.H29:QD-1"
    )
    assert parse_event(encode(envelope(entity, key, data=data))).warnings == warnings


# -- text decoded with the wrong table --------------------------------------------------------

_VOWELS = "aăâeêioôơuưy"
_TONE_MARKS = ("", "\u0300", "\u0301", "\u0309", "\u0303", "\u0323")
_LETTERS = sorted(
    {
        unicodedata.normalize("NFC", vowel + tone)
        for vowel in _VOWELS + _VOWELS.upper()
        for tone in _TONE_MARKS
    }
    | set("bcdđghklmnpqrstvxfjwzBCDĐGHKLMNPQRSTVXFJWZ")
)
_PUNCTUATION = [" ", ".", ",", "-", "/", "(", ")", "'", "\u00a0", "“", "”", "…", "–", "«", "»"]
_vietnamese = st.text(st.sampled_from([*_LETTERS, *_PUNCTUATION]))
_words = st.text(st.sampled_from(_LETTERS), min_size=1, max_size=8)


def _read_as_windows_1252(text: str) -> str:
    """`text`'s UTF-8 bytes as Windows-1252 shows them; its five unassigned bytes as
    Latin-1 (C1 controls), as Windows' own conversion gives them."""
    return "".join(
        bytes([byte]).decode("cp1252", errors="ignore") or chr(byte) for byte in text.encode()
    )


@given(_vietnamese)
def test_vietnamese_text_never_looks_misdecoded(text: str) -> None:
    """Letters, spaces (a no-break one too) and punctuation, but a curly quote right after
    a capital Ã ("“NGÃ”"), which is also how "NGÔ" misreads, and a guillemet between two
    letters (TCVN3's ô, as in "C«ng"), which nobody types."""
    assume("Ã”" not in text and "Ã“" not in text)
    assume(re.search(r"[^\W\d_][«»][^\W\d_]", text) is None)
    assert not misdecoded(text)


@pytest.mark.parametrize(
    "text",
    ["NGÃ\u00a0BA", "Thanh Hoá\u00a0\u00a0", "“Vui quá…”", "NGÃ–BA", "«NGÃ»", "Trà·Vinh",
     "25°C", "Nestlé Việt Nam", "Müller GmbH", "Quyết định về «Hoá»"],
)  # fmt: skip
def test_what_vietnamese_writers_type_is_not_taken_for_a_misreading(text: str) -> None:
    assert not misdecoded(text)


@given(_words.filter(lambda word: not word.isascii()))
@example("àn")  # "Hoàng" as "HoÃ\xa0ng": the lead and a no-break space before a small letter
@example("Ơi")  # "Æ\xa0i"
def test_utf8_read_as_windows_1252_looks_misdecoded_or_is_refused(word: str) -> None:
    """Every Vietnamese word with a letter beyond ASCII, read with the wrong table: the
    soft check sees it, or it holds a C1 control, which the contract refuses. But a small
    à right before a capital ("àA" reads as "Ã\xa0A", as the name "NGÃ BA" with a no-break
    space is written): no word is cased so."""
    assume(not any(a == "à" and b.isupper() for a, b in itertools.pairwise(word)))
    seen = _read_as_windows_1252(word)
    assert misdecoded(seen) or any("\x80" <= char <= "\x9f" for char in seen)


@pytest.mark.parametrize(
    ("entity", "data", "warnings"),
    [
        ("citizen", {"full_name": "Nguyá»…n VÄƒn An"}, ["text_misdecoded"]),  # UTF-8 as 1252
        ("citizen", {"full_name": "NguyÔn V¨n An"}, ["text_misdecoded"]),  # TCVN3 as 1252
        ("citizen", {"full_name": "Nguyễn Văn An"}, []),
        ("citizen", {"full_name": "HoÃ\u00a0ng Văn An"}, ["text_misdecoded"]),  # "Hoàng"
        ("citizen", {"permanent_address": {"line": "Sè 12 phè Hµng B¹c"}},
         ["text_misdecoded"]),  # an address's line
        ("organization", {"name": "CÃ”NG TY TNHH AN PHÃšC"}, ["text_misdecoded"]),
        ("organization", {"name": "CÔNG TY TNHH “AN PHÚC”"}, []),
        ("organization", {"name": "CÔNG TY TNHH NGÔ"}, []),
        ("document", {"title": "Quyáº¿t Ä‘á»‹nh"}, ["text_misdecoded"]),
    ],
)  # fmt: skip
def test_text_decoded_with_the_wrong_table_is_soft_checked(
    entity: str, data: dict[str, Any], warnings: list[str]
) -> None:
    """A provincial system that read its UTF-8 names as Windows-1252, or its TCVN3 ones,
    sent "Nguyá»…n": the contract took it and the store held it. It warns (counted, the
    event applied): the source's reading needs fixing, not the event."""
    key = {"citizen": PERSONAL_ID, "organization": TAX_CODE}.get(entity, "000.00.01.H29:QD-1")
    assert parse_event(encode(envelope(entity, key, data=data))).warnings == warnings
