"""Keyed references: outside the store a personal id or tax code
appears only as HMAC-SHA-256 under a secret key, or masked when there is no key."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from pathlib import Path

import pytest

from portal_sync.cli.ops import summary_dict
from portal_sync.ops.replay import ReplaySummary
from portal_sync.settings import Settings, deployment_settings, load_reference_key
from producers.deployment import load_deployment
from schemas.errors import ConfigurationError
from schemas.identifiers import MIN_REFERENCE_KEY_BYTES, ReferenceKey, key_reference, mask_key

PERSONAL_ID = "079185123456"
TAX_CODE = "0312345675"
SECRET = bytes(range(32))
KEY = ReferenceKey(SECRET)
HEX_DIGEST = re.compile(r"[0-9a-f]{6,}")


def _unkeyed_attack(reference: str, candidates: list[str]) -> str | None:
    """What reversed the old reference in seconds: hash every personal id that fits the
    visible digits and compare with the hash in the reference (here over a narrowed
    range; the real search is 10^7 ids)."""
    for candidate in candidates:
        if hashlib.sha256(candidate.encode()).hexdigest()[:10] in reference:
            return candidate
    return None


def test_the_attack_that_reversed_the_old_reference_finds_nothing_in_the_keyed_one() -> None:
    candidates = [f"0791851{n:03d}56" for n in range(1000)]
    # The old reference: masked id plus an unsalted SHA-256 prefix.
    old = f"{mask_key(PERSONAL_ID)}#{hashlib.sha256(PERSONAL_ID.encode()).hexdigest()[:10]}"
    assert _unkeyed_attack(old, candidates) == PERSONAL_ID

    keyed = key_reference(PERSONAL_ID, KEY)
    assert _unkeyed_attack(keyed, candidates) is None
    assert hashlib.sha256(PERSONAL_ID.encode()).hexdigest()[:10] not in keyed
    assert keyed != old


def test_a_keyed_reference_is_hmac_sha256_and_shows_no_digit_of_the_key() -> None:
    reference = key_reference(PERSONAL_ID, KEY)
    digest = hmac.new(SECRET, PERSONAL_ID.encode(), hashlib.sha256).hexdigest()
    assert reference == f"ref:{digest[:16]}"
    assert key_reference(PERSONAL_ID, KEY) == reference  # stable: log lines can be matched
    assert key_reference(PERSONAL_ID, ReferenceKey(b"x" * 32)) != reference
    assert key_reference(TAX_CODE, KEY) != reference
    assert mask_key(PERSONAL_ID) not in reference


@pytest.mark.parametrize("key", [PERSONAL_ID, TAX_CODE, "0108765432-001"])
def test_without_a_key_a_reference_is_the_masked_key_and_no_hash_at_all(key: str) -> None:
    reference = key_reference(key, None)
    assert reference == mask_key(key)
    assert HEX_DIGEST.search(reference) is None
    assert key not in reference


def test_a_reference_key_never_shows_its_secret_and_refuses_short_ones() -> None:
    assert SECRET.hex() not in repr(KEY) and str(SECRET) not in str(KEY)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ReferenceKey(b"short")


def test_the_key_file_is_read_from_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "reference.key"
    path.write_bytes(SECRET)
    monkeypatch.setenv("PORTAL_SYNC_REFERENCE_KEY_FILE", str(path))
    settings = Settings()
    assert settings.reference_key_file == path
    key = settings.reference_key()
    assert key is not None and key_reference(PERSONAL_ID, key) == key_reference(PERSONAL_ID, KEY)
    assert settings.model_copy(update={"kafka_bootstrap": "h:1"}).as_env()[
        "PORTAL_SYNC_REFERENCE_KEY_FILE"
    ] == str(path)
    monkeypatch.delenv("PORTAL_SYNC_REFERENCE_KEY_FILE")
    assert Settings().reference_key() is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file"),
        (b"", f"0 bytes, at least {MIN_REFERENCE_KEY_BYTES}"),
        (b"hunter2-0123456789abcdef", "24 bytes"),
    ],
)
def test_an_unusable_key_file_is_a_configuration_error_that_never_shows_the_key(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "reference.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError) as caught:
        load_reference_key(path)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message and "PORTAL_SYNC_REFERENCE_KEY_FILE" in message
    assert "head -c 32 /dev/urandom" in message
    if content:
        assert content.decode() not in message and "hunter2" not in message


def test_an_unreadable_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="Is a directory"):
        load_reference_key(tmp_path)


def test_a_deployment_file_names_its_own_key_file_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ref.key").write_bytes(SECRET)
    config = tmp_path / "sources.toml"
    config.write_text(
        '[producer]\nreference_key_file = "keys/ref.key"\n\n'
        '[[sources]]\nid = "hn-files"\nadapter = "filedrop"\n'
    )
    settings = deployment_settings(load_deployment(config), Settings())
    assert settings.reference_key_file == tmp_path / "keys" / "ref.key"
    key = settings.reference_key()
    assert key is not None and key_reference(TAX_CODE, key) == key_reference(TAX_CODE, KEY)


def test_the_replay_summary_names_records_by_keyed_reference_unless_values_are_shown() -> None:
    item = {"entity": "citizen", "key": PERSONAL_ID, "source": "province-79",
            "changes": {"full_name": ["Trần Thị B", "Trần Thị Bích"]}}  # fmt: skip
    summary = ReplaySummary(read=1, outcomes=Counter(applied=1), sample=[item])
    (hidden,) = summary_dict(summary, False, KEY)["sample"]  # type: ignore[misc]
    assert hidden["key"] == key_reference(PERSONAL_ID, KEY)
    assert "Trần" not in str(hidden)
    (masked,) = summary_dict(summary, False, None)["sample"]  # type: ignore[misc]
    assert masked["key"] == mask_key(PERSONAL_ID)
    (shown,) = summary_dict(summary, True, KEY)["sample"]  # type: ignore[misc]
    assert shown["key"] == PERSONAL_ID


def test_a_child_process_gets_the_topics_replicas_set_for_a_cluster() -> None:
    """`kafka up --nodes 3` prints PORTAL_SYNC_REPLICATION_FACTOR=3: a child started with
    `as_env` (a worker, the demo's) made topics of one replica before."""
    three = Settings(kafka_bootstrap="h:1", replication_factor=3).as_env()
    assert three["PORTAL_SYNC_REPLICATION_FACTOR"] == "3"
    assert "PORTAL_SYNC_REPLICATION_FACTOR" not in Settings(kafka_bootstrap="h:1").as_env()
