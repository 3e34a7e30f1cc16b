"""Any message of the dead-letter topic is read as far as it can be: what cannot be read is
named, never raised (portal_sync.ops.dlq)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal_sync.ops.dlq import DeadLetterRecord, Filters, _letter, _purged_after
from schemas.dead_letter import dead_letter_headers
from schemas.identifiers import ReferenceKey, key_reference
from transport.reader import Message

GOOD_HEADERS = tuple(
    dead_letter_headers("invalid_field", "data.sex: enum", "t.changes.citizen", 2, 41)
)
EVENT = b'{"schema_version": 1, "source": "province-01", "entity": "citizen"}'


Headers = tuple[tuple[str, bytes], ...]


def letter_of(value: bytes | None = EVENT, headers: Headers = GOOD_HEADERS) -> DeadLetterRecord:
    return _letter(Message("t.dead-letters", 0, 7, value, b"citizen:1", None, headers))


def replaced(name: str, value: bytes) -> Headers:
    return tuple((n, value if n == name else v) for n, v in GOOD_HEADERS)


def test_a_letter_portal_sync_wrote_reads_whole() -> None:
    letter = letter_of()
    assert letter.unreadable == ()
    assert (letter.reason_code, letter.source, letter.attempt) == (
        "invalid_field",
        "province-01",
        1,
    )
    assert letter.failed_at is not None and letter.failed_at.tzinfo is not None


def test_a_value_nested_5000_levels_deep_is_listed() -> None:
    deep = b'{"source": "province-01", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    letter = letter_of(deep)
    assert letter.source is None
    assert letter.unreadable == ("value: nested over 1024 levels",)
    assert letter.reason_code == "invalid_field"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"\xff\xfe\x00binary", "value: not UTF-8"),
        (b"{not json", "value: not JSON"),
        (b"[1, 2]", "value: JSON array, not an object"),
        (b'"province-01"', "value: JSON string, not an object"),
        (b"42", "value: JSON number, not an object"),
        (b"null", "value: JSON null, not an object"),
        (b"", "value: empty"),
        (None, "value: empty"),
    ],
)
def test_a_value_that_is_no_event_is_named(value: bytes | None, problem: str) -> None:
    letter = letter_of(value)
    assert letter.unreadable == (problem,)
    assert letter.source is None and letter.reason_code == "invalid_field"


@pytest.mark.parametrize(
    ("header", "value", "problem"),
    [
        ("ps.failed_at", b"yesterday", "ps.failed_at: not a time"),
        ("ps.failed_at", b"2025-08-01T08:00:00", "ps.failed_at: no UTC offset"),
        # a redrive adds or takes the clocks' skew away: it overflowed at the ends
        ("ps.failed_at", b"0001-01-01T00:00:00+00:00", "ps.failed_at: out of range"),
        ("ps.failed_at", b"9999-12-31T23:59:59+00:00", "ps.failed_at: out of range"),
        ("ps.failed_at", b"\xff\xfe", "ps.failed_at: not UTF-8"),
        ("ps.attempt", b"two", "ps.attempt: not an integer"),
        ("ps.attempt", b"9" * 5000, "ps.attempt: not an integer"),
        ("ps.attempt", "\u0663".encode(), "ps.attempt: not an integer"),  # an Arabic-Indic 3
        ("ps.origin.partition", b"-1", "ps.origin.partition: not an integer"),
        ("ps.origin.offset", b"1e3", "ps.origin.offset: not an integer"),
        ("ps.reason.code", b"\xc3\x28", "ps.reason.code: not UTF-8"),
    ],
)
def test_a_bad_header_is_named_and_the_rest_is_read(
    header: str, value: bytes, problem: str
) -> None:
    letter = letter_of(headers=replaced(header, value))
    assert letter.unreadable == (problem,)
    assert letter.source == "province-01"
    assert letter.attempt >= 1


@pytest.mark.parametrize(
    ("header", "attempt"),
    [
        (None, 1),
        (b"1", 2),
        (b"123456789", 123456790),
        (b"9" * 4300, 1),  # its text: more digits than Python writes (ValueError)
        (b"1234567890", 1),
        (b"1_0", 1),  # int() would take these
        (b" 7", 1),
        (b"+1", 1),
        ("\u0663".encode(), 1),
    ],
)
def test_a_messages_attempt_counts_only_a_few_ascii_digits(
    header: bytes | None, attempt: int
) -> None:
    headers = () if header is None else (("ps.attempt", header),)
    assert Message("t", 0, 0, b"{}", headers=headers).attempt == attempt


def test_bad_time_is_no_time_for_the_filters() -> None:
    letter = letter_of(headers=replaced("ps.failed_at", b"2025-08-01T08:00:00"))
    assert letter.failed_at is None
    since = datetime(2025, 1, 1, tzinfo=UTC)
    assert not Filters(since=since).keep(letter)  # compared, not a TypeError
    assert Filters(reasons=["invalid_field"]).keep(letter)


def test_missing_headers_are_named() -> None:
    letter = letter_of(headers=())
    assert letter.unreadable == (
        "ps.reason.code: missing", "ps.origin.topic: missing", "ps.failed_at: missing"
    )  # fmt: skip
    assert (letter.reason_code, letter.origin_topic, letter.failed_at) == ("unknown", "", None)
    assert not letter.redrivable


@pytest.mark.parametrize("odd", [b"1e400", b'"\\ud800"', b"123456789012345678901234567890"])
def test_json_that_orjson_refuses_is_still_read(odd: bytes) -> None:
    letter = letter_of(b'{"source": "province-01", "x": ' + odd + b"}")
    assert (letter.source, letter.unreadable) == ("province-01", ())


def test_a_source_rows_origin_offset_may_be_its_primary_key() -> None:
    headers = tuple(dead_letter_headers("invalid_key", "key: format", "source:hcm", "", "HS-42"))
    assert letter_of(headers=headers).unreadable == ()


@given(
    st.one_of(st.none(), st.binary(max_size=200)),
    st.lists(
        st.tuples(st.sampled_from([n for n, _ in GOOD_HEADERS] + ["x"]), st.binary(max_size=40))
    ),
)
def test_any_message_reads_without_raising(
    value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    letter = letter_of(value, tuple(headers))
    assert letter.attempt >= 1
    assert all(isinstance(problem, str) for problem in letter.unreadable)


def test_a_letter_shows_its_source_only_when_it_is_a_source_id() -> None:
    """Anything may stand in a refused event's `source`: a name, a personal id, a phone
    number; `dlq list` and `dlq show` print it without `--reveal`, so only a source id
    shows (the hostile corpus's letters: none of its personal data)."""
    from tests.support.hostile import hostile_corpus, needles

    shown = [letter_of(m.value).source for m in hostile_corpus()]
    assert "province-01" in shown and "province-99" in shown
    leaked = [s for s in shown if s and any(n in s for n in needles())]
    assert leaked == []
    for source in ("0912345678", "079185123456", "nguyen.van.a@example.vn", "Trần Thị Bích Ngọc"):
        assert letter_of(b'{"source": "%s"}' % source.encode()).source is None


def _failed_at(moment: datetime | None) -> DeadLetterRecord:
    return DeadLetterRecord(0, 0, None, b"{}", "invalid_field", "", "t", "0", "0", moment, 1, None)


def test_a_redrive_recorded_without_the_topics_id_stands_only_for_a_letter_failed_before_it() -> (
    None
):
    """Such a redrive may be of an earlier topic of the same name, whose letter had this
    place: a letter that failed after it, by the clocks less their allowed skew, is a new
    one and is sent (at worst twice, a duplicate), never taken as re-driven (lost)."""
    from datetime import timedelta

    from portal_sync.ops.dlq import _redriven_already

    at = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    skew = timedelta(seconds=5)
    by_id: dict[tuple[int, int], datetime | None] = {(0, 0): None}
    without_id: dict[tuple[int, int], datetime | None] = {(0, 0): at}
    assert _redriven_already(by_id, _failed_at(at + timedelta(days=1)), skew)
    assert _redriven_already(without_id, _failed_at(at - timedelta(minutes=1)), skew)
    assert not _redriven_already(without_id, _failed_at(at + timedelta(seconds=1)), skew)
    # a worker's clock 2 s behind the operator's: the new letter still goes out
    assert not _redriven_already(without_id, _failed_at(at - timedelta(seconds=2)), skew)
    assert not _redriven_already(without_id, _failed_at(None), skew)
    assert not _redriven_already({}, _failed_at(at), skew)


def test_the_ids_named_that_no_letter_answered_to_are_told_apart() -> None:
    """`dlq redrive 0:5 5 1:7`: one letter answers to two of them, none to the third.
    Counting letters against IDs said 'one not found' (exit 1) of this letter named twice,
    and on a topic of several partitions, a bare offset matching two hid an ID missing."""
    from portal_sync.ops.dlq import DeadLetterRecord, Filters

    def letter(partition: int, offset: int) -> DeadLetterRecord:
        return DeadLetterRecord(
            partition, offset, None, b"{}", "invalid_field", "", "t", "0", "0", None, 1, None
        )

    filters = Filters(ids=["0:5", "5", "1:7"])
    kept = [x for x in (letter(0, 5), letter(1, 5), letter(0, 7)) if filters.keep(x)]
    assert [x.id for x in kept] == ["0:5", "1:5"]
    assert filters.unmatched() == ["1:7"]
    assert Filters(reasons=["invalid_field"]).unmatched() == []


def test_a_letter_is_held_back_by_a_purge_of_its_source_and_entity_after_it_failed() -> None:
    failed = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    skew = timedelta(minutes=5)
    event = ("citizen", "079090000001", "province-79", 7)

    secret = ReferenceKey(b"k" * 32)

    def purge(
        source: str,
        entity: str | None,
        minutes: int,
        key: str | None = None,
        keyed: bool = False,
        lasted: int | None = 0,  # minutes from its start to its finish; None: unfinished
    ) -> Any:
        started = failed + timedelta(minutes=minutes)
        finished = None if lasted is None else started + timedelta(minutes=lasted)
        reference = None if key is None else key_reference(key, secret if keyed else None)
        return {"source": source, "entity": entity, "reference": reference,
                "started_at": started, "finished_at": finished}  # fmt: skip

    def held(
        *rows: dict[str, Any], at: datetime | None = failed, here: ReferenceKey | None = None
    ) -> bool:
        return _purged_after(list(rows), event, at, skew, here)

    assert held(purge("province-79", None, 60))  # of every entity
    assert held(purge("province-79", "citizen", 60))
    assert held(purge("province-79", "citizen", -4))  # within the clocks' skew
    assert not held(purge("province-79", "citizen", -6))  # before the letter failed
    # Begun before the letter failed, still removing after it: its chunks after the
    # failure may have taken the record away (held back from its start only, before).
    assert held(purge("province-79", "citizen", -10, lasted=30))
    assert held(purge("province-79", "citizen", -600, lasted=None))  # unfinished: resumable
    assert not held(purge("province-79", "citizen", -30, lasted=20))  # over before it failed
    assert not held(purge("province-79", "dossier", 60), purge("province-01", None, 60))
    assert held(purge("province-79", "citizen", -600), at=None)  # it does not say when
    assert held(purge("province-79", "citizen", 60, key="079090000001"))  # its own record
    assert not held(purge("province-79", "citizen", 60, key="079090000002"))
    # A masked key (no reference key at the purge) may be another key of the same mask.
    assert held(purge("province-79", "citizen", 60, key="079990000001"))
    # A keyed reference: compared under the reference key here, held when there is none.
    own = purge("province-79", "citizen", 60, key="079090000001", keyed=True)
    other = purge("province-79", "citizen", 60, key="079090000002", keyed=True)
    assert held(own, here=secret) and held(own) and held(other)
    assert not held(other, here=secret)
    assert not held()


def test_dlq_shows_a_letters_source_only_when_the_registry_lists_it(tmp_path: Path) -> None:
    """A refused event's `source` may be a name or a number written with separators, which
    pass for a source id: `dlq list` and `dlq show` print only the sources the registry
    lists (in development mode, any source id without a long number)."""
    from portal_sync.cli.ops import _readable_registry, _source_shown
    from portal_sync.settings import Settings

    registry = tmp_path / "registry.toml"
    registry.write_text(
        '[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n', encoding="utf-8"
    )
    shown = _source_shown(_readable_registry(Settings(registry=registry)))
    assert shown("province-01", "") == "province-01"
    for refused in ("tran-thi-bich-ngoc", "0912-345-678", "079.185.123.456", "province-99"):
        assert letter_of(b'{"source": "%s"}' % refused.encode()).source == refused
        assert shown(refused, "") == "(unregistered)"
    assert shown(None, "(unreadable)") == "(unreadable)"
    assert (
        _source_shown(_readable_registry(Settings(registry=None)))("dev-laptop-01", "")
        == "dev-laptop-01"
    )
    registry.write_text("[sources.province-01]\nkind = 7\n", encoding="utf-8")  # unreadable
    assert (
        _source_shown(_readable_registry(Settings(registry=registry)))("province-01", "")
        == "(unregistered)"
    )


def test_dlq_show_names_a_signing_key_only_when_the_registry_lists_it(tmp_path: Path) -> None:
    """A letter keeps its original's `ps.kid` header as its sender wrote it: a personal id
    planted there was printed by `dlq show`, without --reveal and without an access-log
    row. Only a key id the registry lists is shown."""
    from portal_sync.cli.ops import _key_shown, _readable_registry
    from portal_sync.settings import Settings
    from schemas.signing import Signer, public_key_text

    signer = Signer.generate("province-01", "province-01-20250801-aaaaaa")
    registry = tmp_path / "registry.toml"
    registry.write_text(
        '[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n'
        f'public_keys = [{{ id = "{signer.key_id}", '
        f'key = "{public_key_text(signer.public_key())}" }}]\n',
        encoding="utf-8",
    )
    settings = Settings(registry=registry)
    assert _key_shown(_readable_registry(settings), signer.key_id) == signer.key_id
    for planted in ("079123456789", "Nguyễn Văn Rò Rỉ", "province-01-20250801-ffffff"):
        assert (
            _key_shown(_readable_registry(settings), planted)
            == "(a key the registry does not list)"
        )
    assert _key_shown(_readable_registry(settings), None) == "(unsigned)"
    assert _key_shown(_readable_registry(Settings(registry=None)), "079123456789") == (
        "(a key the registry does not list)"
    )


def test_a_producers_letter_is_of_its_producers_source() -> None:
    """A producer's letter (a file it could not read) holds no event: its source was
    unreadable, and `dlq list --source province-79`, which the runbooks give for a
    producer's letters, left them out. Its origin names its source."""
    headers = tuple(
        (name, b"source:province-79" if name == "ps.origin.topic" else value)
        for name, value in GOOD_HEADERS
    )
    letter = letter_of(b"export.csv", headers)
    assert letter.source == "province-79"
    assert Filters(source="province-79").keep(letter)
    for forged in (b"source:079123456789", b"source:Nguyen Van A", b"source:"):
        planted = tuple((n, forged if n == "ps.origin.topic" else v) for n, v in GOOD_HEADERS)
        assert letter_of(b"export.csv", planted).source is None
    # A letter whose value is an event keeps the event's source.
    assert letter_of(EVENT, headers).source == letter_of().source


def test_named_letters_are_read_from_their_offsets_not_the_whole_topic() -> None:
    """`dlq show 1:120` and `dlq redrive` read only the offsets the IDs name: the whole
    topic was read for one letter (5 s for 23,000 letters; minutes at national scale)."""
    from portal_sync.ops.dlq import _named

    topic = "ps.dead-letters"
    ranges = {(topic, 0): (100, 5_000), (topic, 1): (0, 4_000), (topic, 2): (0, 10)}
    assert _named(ranges, ["1:120"]) == {(topic, 1): (120, 121)}
    assert _named(ranges, ["1:120", "1:7", "0:4999"]) == {
        (topic, 0): (4_999, 5_000),
        (topic, 1): (7, 121),
    }
    # an offset alone names it in every partition; one past a partition's end, in none
    assert _named(ranges, ["12"]) == {(topic, 1): (12, 13)}
    assert _named(ranges, ["1:4000", "0:99", "3:1"]) == {}  # past the end, before the start
    assert _named(ranges, ["x", "1:", ":3", "١:٢", "1:2:3"]) == {}  # no ID of either form
