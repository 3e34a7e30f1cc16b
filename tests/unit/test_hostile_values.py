"""Hostile values the contract refuses: look-alike digits,
invisible and direction-changing characters, versions and times that would freeze a record,
and messages whose Kafka key or topic is not the event's."""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumers.checks import classify
from schemas import InvalidEvent, message_key, parse_event, partition_for
from schemas.dead_letter import Reason
from transport.reader import Message
from transport.topics import Topics

PERSONAL_ID = "001090012345"
TAX_CODE = "0100109106"
NOW = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
TOPICS = Topics(prefix="t")


def event(entity: str = "citizen", key: str = PERSONAL_ID, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "citizen": {"full_name": "Nguyễn Văn An", "phone": "0912345678"},
        "organization": {"name": "Công ty TNHH Sao Mai"},
        "document": {"owner_kind": "citizen", "owner_id": PERSONAL_ID, "title": "Giấy khai sinh"},
        "dossier": {"agency_code": "000.00.01.H29", "status": 1},
    }[entity]
    base = {
        "schema_version": 1,
        "event_id": "0b8b2e0e-4c38-4c43-9d46-3b8a1f6c2a11",
        "source": "province-01",
        "entity": entity,
        "key": key,
        "op": "upsert",
        "version": 7,
        "occurred_at": "2026-11-30T14:00:00+07:00",
        "data": data,
    }
    return base | overrides


def with_data(entity: str, key: str, **fields: Any) -> dict[str, Any]:
    raw = event(entity, key)
    return raw | {"data": raw["data"] | fields}


def reason_of(raw: dict[str, Any]) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps(raw, ensure_ascii=False).encode())
    return caught.value.code


FULLWIDTH = "".join(chr(0xFF10 + int(d)) for d in PERSONAL_ID)  # ００１…
ARABIC_INDIC = "".join(chr(0x0660 + int(d)) for d in PERSONAL_ID)
BENGALI = "".join(chr(0x09E6 + int(d)) for d in TAX_CODE)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (event(key=FULLWIDTH), "invalid_key"),
        (event(key=ARABIC_INDIC), "invalid_key"),
        (event("organization", BENGALI), "invalid_key"),
        (event(key=PERSONAL_ID + "\n"), "invalid_key"),
        (event("organization", TAX_CODE + "\n"), "invalid_key"),
        (with_data("citizen", PERSONAL_ID, phone="０912345678"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, phone="0912345678\n"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, full_name="Nguyễn\u200bVăn An"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, full_name="Nguyễn \u202eнA năV"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, full_name="\ufeffNguyễn Văn An"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, full_name="Nguyễn\u2066Văn\u2069"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, email="an\u200b@example.vn"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, email="an@example.vn\u202e"), "invalid_field"),
        (with_data("citizen", PERSONAL_ID, email="an\x85@example.vn"), "invalid_field"),
        (
            with_data("citizen", PERSONAL_ID, permanent_address={"province_code": "٠١"}),
            "invalid_field",
        ),
        (
            with_data("citizen", PERSONAL_ID, permanent_address={"ward_code": "００００１"}),
            "invalid_field",
        ),
        (
            with_data("document", "GKS-1", owner_kind=None, owner_id="0010900\x00123"),
            "invalid_field",
        ),
        (with_data("document", "GKS-1", owner_id="\x1b[2J" + PERSONAL_ID), "invalid_field"),
        (with_data("document", "GKS-1", owner_id=PERSONAL_ID + "\n"), "invalid_field"),
        (with_data("document", "GKS-1", owner_id=FULLWIDTH), "invalid_field"),
        (
            with_data("dossier", "000.00.01.H29-240115-0001", applicant_id=TAX_CODE + "\n"),
            "invalid_field",
        ),
        (
            with_data("dossier", "000.00.01.H29-240115-0001", applicant_id="٠١٠٠١٠٩١٠٦"),
            "invalid_field",
        ),
        (event("dossier", "000.00.01.H29-２４0115-0001"), "invalid_key"),
        (
            with_data("dossier", "000.00.01.H29-240115-0001", procedure_code="1.００0001"),
            "invalid_field",
        ),
        (event(version=2**53 + 1), "invalid_field"),
        (event(version=2**63 - 1), "invalid_field"),
    ],
)
def test_hostile_values_are_refused(raw: dict[str, Any], code: str) -> None:
    assert reason_of(raw) == code


@pytest.mark.parametrize(
    "raw",
    [
        event(),
        event(version=2**53),
        with_data("citizen", PERSONAL_ID, full_name="Đặng Thị Ánh Tuyết"),
        with_data("citizen", PERSONAL_ID, email="an.nguyen@example.vn", phone="+84912345678"),
        with_data("document", "GKS-1", owner_kind="organization", owner_id=TAX_CODE + "-001"),
        with_data("document", "GKS-1", owner_kind=None, owner_id=PERSONAL_ID),
        with_data("dossier", "000.00.01.H29-240115-0001", applicant_id=TAX_CODE),
    ],
)
def test_legitimate_values_still_pass(raw: dict[str, Any]) -> None:
    parse_event(json.dumps(raw, ensure_ascii=False).encode())


def _message(
    raw: dict[str, Any],
    *,
    topic: str | None = None,
    key: bytes | None = None,
    partition: int | None = None,
) -> Message:
    entity = raw["entity"]
    key = key if key is not None else message_key(entity, raw["key"], raw["source"])
    return Message(
        topic if topic is not None else TOPICS.change_topic(entity),
        partition if partition is not None else partition_for(key, TOPICS.change_partitions),
        0,
        json.dumps(raw, ensure_ascii=False).encode(),
        key,
    )


def _reasons(message: Message, skew: float = 300) -> list[str]:
    valid, dead = classify([message], topics=TOPICS, now=NOW, max_clock_skew_seconds=skew)
    return [d.code for d in dead] or (["valid"] if valid else [])


def test_a_message_keyed_or_placed_for_another_record_is_a_key_mismatch() -> None:
    raw = event()
    assert _reasons(_message(raw)) == ["valid"]
    assert _reasons(_message(raw, key=b"anything")) == [Reason.KEY_MISMATCH]
    assert _reasons(_message(raw, key=message_key("citizen", "079185123456", "province-01"))) == [
        "key_mismatch"
    ]
    assert _reasons(_message(raw, key=f"citizen:{PERSONAL_ID}".encode())) == ["key_mismatch"]
    assert _reasons(_message(raw, key=message_key("citizen", PERSONAL_ID, "province-79"))) == [
        "key_mismatch"
    ]
    assert _reasons(_message(raw, key=b"")) == ["key_mismatch"]
    # The right key on another partition than its record's: refused too.
    right = partition_for(message_key("citizen", PERSONAL_ID, "province-01"), 6)
    assert TOPICS.change_partitions == 6
    assert _reasons(_message(raw, partition=(right + 1) % 6)) == ["key_mismatch"]
    assert _reasons(_message(raw, topic=TOPICS.change_topic("dossier"))) == ["key_mismatch"]
    dossier = event("dossier", "000.00.01.H29-240115-0001")
    assert _reasons(_message(dossier)) == ["valid"]
    assert _reasons(_message(dossier, topic=TOPICS.change_topic("citizen"))) == ["key_mismatch"]


def test_an_event_from_the_future_is_refused_beyond_the_allowed_clock_skew() -> None:
    def at(moment: datetime) -> Message:
        return _message(event(occurred_at=moment.isoformat()))

    assert _reasons(at(NOW + timedelta(seconds=299))) == ["valid"]
    assert _reasons(at(NOW + timedelta(seconds=301))) == [Reason.FUTURE_TIMESTAMP]
    assert _reasons(at(datetime(9999, 12, 31, tzinfo=UTC))) == ["future_timestamp"]
    assert _reasons(at(NOW + timedelta(seconds=301)), skew=600) == ["valid"]
    assert _reasons(at(NOW - timedelta(days=3650))) == ["valid"]  # late is fine


def test_the_reason_of_a_refused_value_never_quotes_it() -> None:
    raw = with_data("citizen", PERSONAL_ID, full_name="Trần Thị B\u202e", phone="０912345678")
    with pytest.raises(InvalidEvent) as caught:
        parse_event(json.dumps(raw, ensure_ascii=False).encode())
    assert "Trần" not in caught.value.message and "912345678" not in caught.value.message


def test_the_future_is_measured_from_the_message_timestamp_so_a_replay_agrees() -> None:
    sent = NOW - timedelta(days=400)
    ahead = event(occurred_at=(sent + timedelta(minutes=10)).isoformat())
    late = event(occurred_at=(sent + timedelta(minutes=4)).isoformat())
    for raw, expected in ((ahead, ["future_timestamp"]), (late, ["valid"])):
        message = _message(raw)
        stamped = Message(message.topic, message.partition, 0, message.value, message.key,
                          timestamp_ms=int(sent.timestamp() * 1000))  # fmt: skip
        assert _reasons(stamped) == expected
    forged = _message(event(occurred_at="9999-01-01T00:00:00+00:00"))
    forged = Message(
        forged.topic, forged.partition, 0, forged.value, forged.key, timestamp_ms=2**62
    )
    assert _reasons(forged) == ["future_timestamp"]


def _normalised_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the texts the contract's NFC is asked to normalise, from now on."""
    import schemas.events

    lengths: list[int] = []
    normalize = schemas.events.unicodedata.normalize

    def counted(form: str, text: str) -> str:
        lengths.append(len(text))
        return normalize(form, text)

    monkeypatch.setattr(schemas.events.unicodedata, "normalize", counted)
    return lengths


def test_no_text_longer_than_any_contract_text_is_normalised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython's NFC is quadratic in a run of combining marks of alternating classes: a
    400 KB name held the validator 40 s, and a 1 MiB one about five minutes (the worker's
    liveness failed on it, at every worker it reached). Texts longer than any contract
    text could be before composition are left as they are, and refused as before."""
    import schemas.events

    lengths = _normalised_lengths(monkeypatch)
    # beyond any text; below a title typed decomposed; Tibetan signs of class 0 that
    # decompose into marks of alternating classes (quadratic too)
    for hostile in ("a" + "\u0301\u0323" * 3_000, "a" + "\u0301\u0323" * 1_000,
                    "\u0f40" + "\u0f73" * 2_000):  # fmt: skip
        for data in (
            {"full_name": hostile}, {"full_name": "An", hostile: 1}, {"x": [hostile] * 3}
        ):  # fmt: skip
            raw = json.dumps(event(data=data), ensure_ascii=False).encode()
            with pytest.raises(InvalidEvent) as refused:
                parse_event(raw)
            assert refused.value.code in {"invalid_field", "unknown_field"}
    assert lengths and max(lengths) <= schemas.events.NFC_ALWAYS
    # A decomposed name of a contract's length is still composed and accepted.
    name = "Nguye\u0302\u0303n Va\u0306n An"
    raw = json.dumps(event(data={"full_name": name}), ensure_ascii=False).encode()
    assert parse_event(raw).event.data.full_name == "Nguyễn Văn An"  # type: ignore[union-attr]


def test_a_message_of_mark_runs_is_refused_without_quadratic_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Texts of up to 1,024 code points were normalised whatever they held: a 1 MiB message
    of them, each a run of marks of alternating classes, held the validator about a second
    (about 1.4 ms each). A message's texts are normalised unchecked within
    NFC_ALWAYS_PER_VALUE code points now; beyond it, one with a run of more than
    MAX_MARK_RUN marks is left as it is, and refused where the contract would take it."""
    import schemas.events

    lengths = _normalised_lengths(monkeypatch)
    zalgo = "a" + "\u0301\u0323" * 500
    raw = json.dumps(event(data={f"f{i}": zalgo for i in range(480)}), ensure_ascii=False)
    assert len(raw.encode()) > 900_000
    with pytest.raises(InvalidEvent) as refused:
        parse_event(raw.encode())
    assert refused.value.code == "unknown_field"
    assert 0 < lengths.count(len(zalgo)) <= schemas.events.NFC_ALWAYS_PER_VALUE // len(zalgo)
    # A contract event's texts are all within the budget: a title with marks is composed.
    title = "Quyết định số 12" + "\u0301\u0323" * 40
    document = event(entity="document", key="000.00.01.H29:QD-1", data={"title": title})
    raw = json.dumps(document, ensure_ascii=False)
    assert parse_event(raw.encode()).event.data.title == unicodedata.normalize("NFC", title)  # type: ignore[union-attr]
    # Beyond the budget, such a text is refused where a field takes it, never stored out
    # of NFC.
    monkeypatch.setattr(schemas.events, "NFC_ALWAYS_PER_VALUE", 0)
    with pytest.raises(InvalidEvent) as refused:
        parse_event(raw.encode())
    assert str(refused.value).startswith("invalid_field: data.title: not in NFC")
    # A run in canonical order is NFC as it is (nothing to reorder): taken as sent.
    ordered = "Quyết định số 12 " + "\u0323" * 40 + "\u0301" * 40
    document = event(entity="document", key="000.00.01.H29:QD-1", data={"title": ordered})
    taken = parse_event(json.dumps(document, ensure_ascii=False).encode())
    assert taken.event.data.title == ordered  # type: ignore[union-attr]


def test_a_title_typed_decomposed_is_composed_as_its_composed_form_is_taken() -> None:
    """A 900-character decision title typed in NFD is about 1,180 code points: it was left
    as it was (longer than 1,024) and refused as over 1,000 characters, while the same
    title composed was accepted."""
    title = ("Quyết định về việc phê duyệt kế hoạch thực hiện Đề án 06 của Ủy ban nhân dân "
             * 14)[:900].strip()  # fmt: skip
    decomposed = unicodedata.normalize("NFD", title)
    assert len(decomposed) > 1_024
    for text in (title, decomposed):
        document = event(entity="document", key="000.00.01.H29:QD-1", data={"title": text})
        raw = json.dumps(document, ensure_ascii=False).encode()
        assert parse_event(raw).event.data.title == title  # type: ignore[union-attr]
