"""Signed events, the pure part: signing key files, the
registry's public keys, verification, and the worker's classification of signed messages.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.checks import classify
from consumers.config import RulesError, load_rules
from consumers.registry import Registry, SourceInfo
from consumers.signatures import SignatureError, TrustedKey, check_signer, signed_at_ms, verify
from schemas import message_key, partition_for
from schemas.dead_letter import Reason, kept_headers
from schemas.signing import KeyFormatError, Signer, parse_public_key, public_key_text
from transport.reader import Message
from transport.topics import Topics

NOW = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
TOPICS = Topics(prefix="t")
HANOI = Signer.generate("province-01", "province-01-20250801-aaaaaa")
HCM = Signer.generate("province-79", "province-79-20250801-bbbbbb")


def trusted(signer: Signer, **window: int | None) -> TrustedKey:
    return TrustedKey(signer.key_id, signer.source, signer.public_key(), **window)


KEYS = {s.key_id: trusted(s) for s in (HANOI, HCM)}


def code_of(value: bytes, headers: list[tuple[str, bytes]], keys: Any = None, **kw: Any) -> str:
    try:
        key = verify(value, headers, KEYS if keys is None else keys, kw.get("at", NOW_MS),
                     kw.get("required", True))  # fmt: skip
    except SignatureError as error:
        return error.code
    return "unsigned-accepted" if key is None else f"by {key.source}"


# -- verification ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(value=st.binary(max_size=2048), other=st.binary(max_size=2048))
def test_a_signature_verifies_only_with_its_key_and_only_for_its_bytes(
    value: bytes, other: bytes
) -> None:
    headers = HANOI.headers(value)
    assert code_of(value, headers) == "by province-01"
    if other != value:
        assert code_of(other, headers) == Reason.BAD_SIGNATURE
    # the same key id, another key (a forger's): never verifies
    forger = Signer.generate("province-01", HANOI.key_id)
    assert code_of(value, headers, {HANOI.key_id: trusted(forger)}) == "bad_signature"
    assert code_of(value, forger.headers(value)) == "bad_signature"


def test_no_signature_is_unsigned_when_required_and_accepted_otherwise() -> None:
    assert code_of(b"{}", []) == Reason.UNSIGNED
    assert code_of(b"{}", [], required=False) == "unsigned-accepted"
    # a signature that is there is checked even when not required
    assert code_of(b"{}", HANOI.headers(b"{!}"), required=False) == "bad_signature"
    assert code_of(b"{}", HANOI.headers(b"{}"), required=False) == "by province-01"


@pytest.mark.parametrize(
    "headers",
    [
        [("ps.kid", HANOI.key_id.encode())],  # no ps.sig
        [("ps.sig", base64.b64encode(b"x" * 64))],  # no ps.kid
        [("ps.sig", b"not base64!"), ("ps.kid", HANOI.key_id.encode())],
        [("ps.sig", base64.b64encode(b"short")), ("ps.kid", HANOI.key_id.encode())],
        [("ps.sig", base64.b64encode(b"x" * 64)), ("ps.kid", b"\xff\xfe")],
        [*HANOI.headers(b"{}"), ("ps.sig", base64.b64encode(b"x" * 64))],  # two signatures
        [*HANOI.headers(b"{}"), ("ps.kid", HCM.key_id.encode())],  # two key ids
        [("ps.sig", HANOI.headers(b"{}")[0][1]), ("ps.kid", b"province-01-unknown")],
    ],
)
def test_malformed_partial_or_ambiguous_signature_headers_are_bad(
    headers: list[tuple[str, bytes]],
) -> None:
    assert code_of(b"{}", headers) == "bad_signature"


def test_a_key_counts_only_within_its_validity() -> None:
    value = b'{"a": 1}'
    headers = HANOI.headers(value)
    window = {HANOI.key_id: trusted(HANOI, not_before_ms=1000, not_after_ms=2000)}
    assert code_of(value, headers, window, at=999) == "bad_signature"
    assert code_of(value, headers, window, at=1000) == "by province-01"
    assert code_of(value, headers, window, at=1999) == "by province-01"
    assert code_of(value, headers, window, at=2000) == "bad_signature"  # expired


def test_the_key_must_be_one_of_the_events_source() -> None:
    check_signer(KEYS[HANOI.key_id], "province-01")
    check_signer(None, "province-01")  # unsigned and accepted: nothing to bind
    with pytest.raises(SignatureError) as caught:
        check_signer(KEYS[HCM.key_id], "province-01")
    assert caught.value.code == "bad_signature"


def test_signing_time_is_the_first_send_never_later_than_now() -> None:
    assert signed_at_ms([], 5000, NOW_MS) == 5000
    assert signed_at_ms([], None, NOW_MS) == NOW_MS
    assert signed_at_ms([], NOW_MS + 10**9, NOW_MS) == NOW_MS  # a timestamp from the future
    redriven = [("ps.origin.timestamp", b"1234")]
    assert signed_at_ms(redriven, 99_999, NOW_MS) == 1234
    assert signed_at_ms([("ps.origin.timestamp", b"12x")], 99_999, NOW_MS) == 99_999


def test_a_dead_letter_keeps_the_signature_and_the_first_send_time() -> None:
    headers = [*HANOI.headers(b"{}"), ("ps.attempt", b"1"), ("other", b"x")]
    kept = kept_headers(headers, 5000)
    assert kept == [*HANOI.headers(b"{}"), ("ps.origin.timestamp", b"5000")]
    # a re-driven letter that fails again keeps its original time, not the redrive's
    again = kept_headers([*kept, ("ps.attempt", b"2")], 9000)
    assert again == kept


# -- key files and registry -------------------------------------------------------------


def test_a_key_file_round_trips_and_never_shows_its_secret() -> None:
    text = HANOI.key_file_text()
    again = Signer.from_key_file_text(text)
    assert (again.source, again.key_id) == (HANOI.source, HANOI.key_id)
    assert code_of(b"v", again.headers(b"v")) == "by province-01"
    secret = text.split('private_key = "')[1].split('"')[0]
    assert secret not in repr(again) and secret not in again.registry_entry()
    entry = HANOI.registry_entry()
    assert entry == f'{{ id = "{HANOI.key_id}", key = "{public_key_text(HANOI.public_key())}" }}'


@pytest.mark.parametrize(
    "text",
    [
        "not toml [",
        'source = "province-01"\nkey_id = "k-1"\n',
        'source = "Province 01"\nkey_id = "k-1"\nprivate_key = "ed25519:AAAA"\n',
        'source = "province-01"\nkey_id = "k-1"\nprivate_key = "ed25519:AAAA"\n',
        'source = "province-01"\nkey_id = "k-1"\nprivate_key = "rsa:AAAA"\nextra = 1\n',
    ],
)
def test_a_malformed_key_file_is_refused_without_quoting_it(text: str) -> None:
    with pytest.raises(KeyFormatError) as caught:
        Signer.from_key_file_text(text)
    assert "AAAA" not in str(caught.value)


def test_public_key_texts() -> None:
    text = public_key_text(HANOI.public_key())
    assert text.startswith("ed25519:") and len(base64.b64decode(text[8:])) == 32
    assert parse_public_key(text).public_bytes_raw() == HANOI.public_key().public_bytes_raw()
    for bad in ("AAAA", "ed25519:" + base64.b64encode(b"x" * 31).decode(), "ed25519:!!"):
        with pytest.raises(KeyFormatError):
            parse_public_key(bad)


def registry_text(*, keys: str = "", top: str = "require_signatures = true\n") -> str:
    return (
        f'{top}[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n'
        f'agency_codes = ["000.00.01.H26"]\n{keys}'
    )


def test_the_registry_reads_public_keys_with_their_validity(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        registry_text(
            keys=f'public_keys = [{{ id = "{HANOI.key_id}", '
            f'key = "{public_key_text(HANOI.public_key())}", '
            "not_before = 2025-08-01T00:00:00+07:00, not_after = 2026-08-01T00:00:00+07:00 }]\n"
        ),
        encoding="utf-8",
    )
    registry = Registry.load(path)
    assert registry.require_signatures
    key = registry.keys[HANOI.key_id]
    assert key.source == "province-01"
    assert key.not_before_ms == int(datetime(2025, 7, 31, 17, tzinfo=UTC).timestamp() * 1000)
    assert key.not_after_ms == int(datetime(2026, 7, 31, 17, tzinfo=UTC).timestamp() * 1000)
    plain = tmp_path / "plain.toml"
    plain.write_text(registry_text(top=""), encoding="utf-8")
    assert not Registry.load(plain).require_signatures  # false when absent


@pytest.mark.parametrize(
    ("keys", "top"),
    [
        ('public_keys = [{ id = "k-1", key = "ed25519:AAAA" }]\n', ""),
        ('public_keys = [{ id = "k-1", key = "%s", not_before = 2025-08-01T00:00:00 }]\n', ""),
        (
            'public_keys = [{ id = "k-1", key = "%s", not_before = 2026-01-01T00:00:00Z, '
            "not_after = 2025-01-01T00:00:00Z }]\n",
            "",
        ),
        ('public_keys = [{ id = "k-1", key = "%s" }, { id = "k-1", key = "%s" }]\n', ""),
        ("", "require_signature = true\n"),  # misspelt: never silently off
        ("", 'require_signatures = "yes"\n'),
        ("", '[entities.citizen]\nkinds = ["village"]\n'),
        ('entities = ["person"]\n', ""),
        ('may_delete = "no"\n', ""),
    ],
)
def test_a_wrong_registry_is_refused(tmp_path: Path, keys: str, top: str) -> None:
    path = tmp_path / "registry.toml"
    key = public_key_text(HANOI.public_key())
    path.write_text(registry_text(keys=keys.replace("%s", key), top=top), encoding="utf-8")
    with pytest.raises(ValueError):
        Registry.load(path)


@pytest.mark.parametrize("source", ["079185123456", "mst-0312345675", "Province-01", "p"])
def test_a_registry_source_id_must_be_one_without_a_long_number(
    tmp_path: Path, source: str
) -> None:
    """A source id is a label of every metric of its events: never a personal id, a tax
    code or a phone number (nine digits in a row), and always the contract's pattern."""
    path = tmp_path / "registry.toml"
    path.write_text(registry_text().replace("province-01", source), encoding="utf-8")
    with pytest.raises(ValueError, match="a source id is"):
        Registry.load(path)
    path.write_text(registry_text().replace("province-01", "mst-03123456"), encoding="utf-8")
    assert list(Registry.load(path).sources) == ["mst-03123456"]  # eight digits: an id


def test_development_mode_takes_no_source_id_with_a_long_number() -> None:
    """Without a registry every source is accepted, so its id reaches metric labels: one
    with nine digits in a row (a personal id as `source`) is refused instead."""
    for source, code in (("079185123456", "unregistered_source"), ("dev-laptop-01", "valid")):
        value = event(source=source)
        valid, dead = classify([message(value)], None, topics=TOPICS, now=NOW)
        assert ([d.code for d in dead] or ["valid" for _ in valid]) == [code]
        assert all(source not in d.reason for d in dead)


def test_one_key_id_for_two_sources_is_refused() -> None:
    entry = {"id": "shared-key", "key": public_key_text(HANOI.public_key())}
    info = {"kind": "province", "name": "x", "public_keys": [entry]}
    with pytest.raises(ValueError, match="more than once"):
        Registry({"a-1": SourceInfo(**info), "b-2": SourceInfo(**info)}, Path("r.toml"))


def same_bytes_other_text(text: str) -> str:
    """The same 32 bytes in other base64: the last digit's two unused bits set."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = digits[digits.index(text[-2]) | 3]
    return text[:-2] + last + "="


@pytest.mark.parametrize("other_text", [False, True])
def test_one_key_under_two_sources_is_refused(other_text: bool) -> None:
    """HANOI's key listed for province-79 too (under its own id) would let a message
    Hanoi signs pass as province-79's: refused, naming sources and ids, not the key."""
    text = public_key_text(HANOI.public_key())
    copy = same_bytes_other_text(text) if other_text else text
    assert (copy != text) == other_text
    assert base64.b64decode(copy[8:], validate=True) == base64.b64decode(text[8:])

    def info(key_id: str, key: str) -> SourceInfo:
        return SourceInfo(kind="province", name="x", public_keys=({"id": key_id, "key": key},))

    sources = {"province-01": info(HANOI.key_id, text), "province-79": info(HCM.key_id, copy)}
    with pytest.raises(ValueError) as caught:
        Registry(sources, Path("r.toml"))
    message = str(caught.value)
    for name in ("province-01", "province-79", HANOI.key_id, HCM.key_id):
        assert name in message
    assert text[8:] not in message and copy[8:] not in message


def test_the_forgery_one_key_under_two_sources_would_allow() -> None:
    """Why: with the key under both, Hanoi's signature verifies as province-79's key."""
    keys = {HCM.key_id: TrustedKey(HCM.key_id, "province-79", HANOI.public_key())}
    value = event("province-79")
    headers = [(n, v) for n, v in HANOI.headers(value) if n != "ps.kid"]
    assert code_of(value, [*headers, ("ps.kid", HCM.key_id.encode())], keys) == "by province-79"


def test_one_key_twice_under_one_source_is_refused(tmp_path: Path) -> None:
    """A rotation makes a new key (`keys new`); the same key under a second id of the same
    source would keep it trusted after its entry is removed (a leak): refused too."""
    text = public_key_text(HANOI.public_key())
    path = tmp_path / "registry.toml"
    path.write_text(
        registry_text(
            keys=f'public_keys = [{{ id = "{HANOI.key_id}", key = "{text}" }}, '
            f'{{ id = "province-01-20260801-cccccc", key = "{text}" }}]\n'
        ),
        encoding="utf-8",
    )
    with pytest.raises(RulesError) as caught:
        load_rules(path, None)
    message = str(caught.value)
    for name in ("province-01", HANOI.key_id, "province-01-20260801-cccccc"):
        assert name in message
    assert text[8:] not in message


# -- the worker's classification ---------------------------------------------------------


def event(source: str = "province-01", **overrides: Any) -> bytes:
    raw = {
        "schema_version": 1,
        "event_id": "0b8b2e0e-4c38-4c43-9d46-3b8a1f6c2a11",
        "source": source,
        "entity": "citizen",
        "key": "001090012345",
        "op": "upsert",
        "version": 7,
        "occurred_at": "2025-11-30T14:00:00+07:00",
        "data": {"full_name": "Nguyễn Văn An"},
    } | overrides
    return json.dumps(raw, ensure_ascii=False).encode()


def registry(required: bool = True, **window: int | None) -> Registry:
    def info(signer: Signer, codes: tuple[str, ...]) -> SourceInfo:
        entry: dict[str, Any] = {"id": signer.key_id, "key": public_key_text(signer.public_key())}
        for name, millis in window.items():
            if millis is not None:
                entry[name.removesuffix("_ms")] = datetime.fromtimestamp(millis / 1000, UTC)
        return SourceInfo(kind="province", name="x", agency_codes=codes, public_keys=(entry,))

    sources = {"province-01": info(HANOI, ("000.00.01.H26",)),
               "province-79": info(HCM, ("000.00.01.H29",))}  # fmt: skip
    return Registry(sources, Path("registry.toml"), require_signatures=required)


def message(value: bytes, headers: Any = (), timestamp: datetime | None = None) -> Message:
    try:
        entity = json.loads(value)["entity"]
    except (ValueError, KeyError, TypeError):
        entity = "citizen"
    try:
        source = json.loads(value)["source"]
    except (ValueError, KeyError, TypeError):
        source = "province-01"
    stamp = int(timestamp.timestamp() * 1000) if timestamp else None
    mkey = message_key(entity, "001090012345", str(source))
    return Message(TOPICS.change_topic(entity), partition_for(mkey, TOPICS.change_partitions),
                   0, value, mkey, stamp, tuple(headers))  # fmt: skip


def reasons(msg: Message, rules: Registry | None = None, now: datetime = NOW) -> list[str]:
    valid, dead = classify([msg], registry() if rules is None else rules, topics=TOPICS, now=now)
    return [d.code for d in dead] or (["valid"] if valid else [])


@pytest.mark.parametrize("value", [b"", b"{not json", b"null"], ids=["empty", "not JSON", "null"])
def test_a_value_that_does_not_parse_signed_by_another_source_is_refused_as_forged(
    value: bytes,
) -> None:
    """Under Hà Nội's message key, signed with Hồ Chí Minh City's key: compaction takes it
    as Hà Nội's latest event of that record. It was refused as `empty_message` or
    `invalid_json`, which no alert pages, as the value was read before the signer was
    compared with the source; the message key says whose it claims to be."""
    assert reasons(message(value, HCM.headers(value))) == ["bad_signature"]
    assert reasons(message(value, HANOI.headers(value))) != ["bad_signature"]  # its own


def test_the_worker_applies_signed_events_and_refuses_forged_ones() -> None:
    value = event()
    assert reasons(message(value, HANOI.headers(value))) == ["valid"]
    assert reasons(message(value)) == ["unsigned"]
    tampered = value.replace(b"An", "Ân".encode())
    assert reasons(message(tampered, HANOI.headers(value))) == ["bad_signature"]
    unknown = Signer.generate("province-01", "province-01-20250801-ffffff")
    assert reasons(message(value, unknown.headers(value))) == ["bad_signature"]
    assert reasons(message(value, HCM.headers(value))) == ["bad_signature"]  # other source
    as_hcm = event(source="province-79")
    assert reasons(message(as_hcm, HCM.headers(as_hcm))) == ["valid"]


def test_the_signature_is_checked_before_the_value_is_read() -> None:
    assert reasons(message(b"{not json")) == ["unsigned"]
    assert reasons(message(b"{not json", HANOI.headers(b"{not json"))) == ["invalid_json"]
    forged = b"\xff\xfe"
    assert reasons(message(forged, HANOI.headers(b"other"))) == ["bad_signature"]


def test_key_validity_follows_the_message_timestamp_so_a_replay_agrees() -> None:
    sent = datetime(2025, 12, 1, tzinfo=UTC)
    until = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    rules = registry(not_after_ms=until)
    value = event()
    signed = message(value, HANOI.headers(value), timestamp=sent)
    assert reasons(signed, rules, now=NOW) == ["valid"]  # replayed long after not_after
    late = message(value, HANOI.headers(value), timestamp=sent + timedelta(days=40))
    assert reasons(late, rules, now=NOW) == ["bad_signature"]  # sent with an expired key
    early = registry(not_before_ms=int(NOW.timestamp() * 1000) + 1)
    assert reasons(message(value, HANOI.headers(value), timestamp=NOW), early) == ["bad_signature"]
    # a timestamp from the future does not make a key valid early
    future = message(value, HANOI.headers(value), timestamp=NOW + timedelta(days=30))
    assert reasons(future, early) == ["bad_signature"]


def test_an_origin_timestamp_cannot_date_a_fresh_event_into_a_retired_keys_window() -> None:
    """Any producer can set `ps.origin.timestamp`: with a retired key, it would date the
    key's check back while the event is dated now and wins recency ties. The future check
    uses the same time as the key's: such an event is from the future there."""
    until = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    value = event(occurred_at=NOW.isoformat())
    headers = [*HANOI.headers(value), ("ps.origin.timestamp", str(until - 1).encode())]
    forged = message(value, headers, timestamp=NOW)
    assert reasons(forged, registry(not_after_ms=until)) == ["future_timestamp"]


def test_a_redriven_letter_is_judged_by_its_original_time() -> None:
    sent = datetime(2025, 12, 1, tzinfo=UTC)
    until = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
    value = event()
    kept = kept_headers(HANOI.headers(value), int(sent.timestamp() * 1000))
    redriven = message(value, [("ps.attempt", b"1"), *kept], timestamp=NOW)
    assert reasons(redriven, registry(not_after_ms=until)) == ["valid"]


def test_without_required_signatures_a_source_without_keys_may_go_unsigned() -> None:
    """`require_signatures = false` (or absent) lets the sources that have no keys yet send
    unsigned events; a source that has keys signs every event, or anyone who can write a
    change topic could write in its name."""
    value = event()
    strict = registry(required=True)
    keyless = SourceInfo(kind="province", name="x", agency_codes=("000.00.01.H31",))
    lax = Registry({**strict.sources, "province-31": keyless}, Path("registry.toml"))
    assert not lax.require_signatures
    assert reasons(message(value), lax) == ["unsigned"]  # province-01 has keys
    assert reasons(message(value, HANOI.headers(value)), lax) == ["valid"]
    assert reasons(message(value, HCM.headers(value)), lax) == ["bad_signature"]
    as_31 = event(source="province-31")
    assert reasons(message(as_31), lax) == ["valid"]
    # Unsigned and unreadable under Hà Nội's message key: it would take Hà Nội's place in
    # the compacted topic, so it is `unsigned` (which pages), not `empty_message` or
    # `invalid_json` (which do not), as when signatures are required.
    for unreadable in (b"", b"null", b"{not json"):
        assert reasons(message(unreadable), lax) == ["unsigned"]
    # the same under a source without keys is read as before
    mkey = message_key("citizen", "001090012345", "province-31")
    partition = partition_for(mkey, TOPICS.change_partitions)
    keyless_key = Message(TOPICS.change_topic("citizen"), partition, 0, b"{not json", mkey)
    assert reasons(keyless_key, lax) == ["invalid_json"]
    # development mode (no registry): nothing to verify with, unsigned accepted
    valid, dead = classify([message(value)], None, topics=TOPICS, now=NOW)
    assert dead == [] and len(valid) == 1
