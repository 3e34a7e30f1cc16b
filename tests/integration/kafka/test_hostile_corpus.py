"""The hostile corpus (`tests/data/hostile-corpus.jsonl`: over 200 messages that break
every rule, for every entity) published among valid events, signed as each line says, to
a worker running the shipped registry (signatures required, write scopes): every hostile
message ends in the dead letters with its expected reason, every valid event is applied,
and the worker never stops."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consumers.merge import Authority
from portal_sync.settings import Settings
from schemas.dead_letter import DEAD_LETTER_REASONS
from schemas.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Signer, registry_entry
from tests.support.adapter_helpers import read_topic
from tests.support.hostile_corpus import CORPUS, corpus
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import cli, expected_export, exported

pytestmark = pytest.mark.kafka

DEPLOY_REGISTRY = Path(__file__).resolve().parents[3] / "deploy" / "registry.toml"
# Reasons the corpus does not reach: the store's own refusal, an operator's skip, an
# unregistered source (with signatures required it has no key: bad_signature first), the
# file adapters' own (a producer's, before any event exists), and a batch the clients
# cannot read (not a message a producer can send).
NOT_IN_CORPUS = {
    "apply_failed",
    "skipped_by_operator",
    "unregistered_source",
    "unreadable_file",
    "unmappable_record",
    # a record batch written byte by byte (tests/integration/kafka/test_unreadable_batches.py)
    "unreadable_batch",
}


def _lines() -> list[dict[str, Any]]:
    return [json.loads(text) for text in CORPUS.read_text("utf-8").splitlines()]


def test_the_corpus_file_is_current_and_covers_every_rule_and_entity() -> None:
    assert _lines() == corpus(), "stale: run `python -m tests.support.hostile_corpus`"
    hostile = [x for x in _lines() if x["expect"] != "applied"]
    assert len(hostile) >= 200
    assert {x["expect"] for x in hostile} == set(DEAD_LETTER_REASONS) - NOT_IN_CORPUS
    by_entity = Counter(x["entity"] for x in hostile)
    assert set(by_entity) == {"citizen", "organization", "document", "dossier"}
    assert min(by_entity.values()) >= 40


def _signers(directory: Path) -> tuple[dict[str, Signer], Path]:
    """A key per source of the shipped registry, and a copy of it listing them."""
    text = DEPLOY_REGISTRY.read_text("utf-8")
    signers: dict[str, Signer] = {}
    for source in re.findall(r"^\[sources\.([a-z0-9._-]+)\]$", text, flags=re.M):
        signers[source] = Signer(source, f"{source}-test-1", Ed25519PrivateKey.generate())
        entry = registry_entry(signers[source].key_id, signers[source].public_key())
        text = text.replace(
            f"[sources.{source}]\n", f"[sources.{source}]\npublic_keys = [{entry}]\n"
        )
    path = directory / "registry.toml"
    path.write_text(text, "utf-8")
    return signers, path


def _value(line: dict[str, Any]) -> bytes | None:
    if "value_b64" in line:
        return base64.b64decode(line["value_b64"])
    if line["value"] is None:
        return None
    value = line["value"].encode()
    if "pad_to" in line:  # JSON whitespace up to the size
        value = value[:-1] + b" " * (line["pad_to"] - len(value)) + b"}"
    return value


def _headers(line: dict[str, Any], value: bytes | None, signers: dict[str, Signer]) -> Any:
    signer = signers[line["signer"]]
    sign = line["sign"]
    if sign == "none":
        return [], value
    if sign == "tamper":  # signed, then changed (still the same JSON)
        return signer.headers(value), (value or b"") + b" "
    if sign == "unknown_kid":
        return [
            (SIGNATURE_HEADER, signer.headers(value)[0][1]),
            (KEY_ID_HEADER, b"nobody-1"),
        ], value
    if sign == "garbage":
        return [
            (SIGNATURE_HEADER, base64.b64encode(b"x" * 64)),
            (KEY_ID_HEADER, signer.key_id.encode()),
        ], value
    if sign == "double":
        return [*signer.headers(value), *signer.headers(value)], value
    return signer.headers(value), value


def test_every_hostile_message_is_dead_lettered_with_its_reason_and_every_valid_one_applied(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    signers, registry = _signers(tmp_path)
    # Checked in two validator processes (consumers.validators), signatures verified there:
    # batches of 100, all but a last small one at least half full (the worker checks a
    # batch below half the maximum itself).
    settings: Settings = settings_for(
        sqlite_store_url, registry=registry, validator_processes=2, batch_max_events=100
    )
    ensure_topics(settings)
    sent: dict[bytes | None, list[str]] = {}
    publisher = publisher_for(settings)
    for line in _lines():  # valid and hostile interleaved, in the corpus's order
        value = _value(line)
        headers, value = _headers(line, value, signers)
        key = None if line["key"] is None else line["key"].encode()
        publisher.send(change_topic(settings, line["entity"]), key, value, headers)
        if line["expect"] != "applied":
            sent.setdefault(value, []).append(line["expect"])
    publisher.flush()
    publisher.close()

    worker = cli(settings, "worker", "--until-caught-up", timeout=300)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

    found: dict[bytes | None, list[str]] = {}
    for record in read_topic(settings, dead_letter_topic(settings)):
        code = dict(record.headers)["ps.reason.code"].decode()
        found.setdefault(record.value, []).append(code)
    wrong = {
        (v or b"")[:120]: (sorted(found.get(v, [])), sorted(codes))
        for v, codes in sent.items()
        if sorted(found.get(v, [])) != sorted(codes)
    }
    assert not wrong, f"{len(wrong)} messages with other reasons (found, expected): {wrong}"
    assert sum(len(c) for c in found.values()) == sum(len(c) for c in sent.values())

    valid = [json.loads(x["value"]) for x in _lines() if x["expect"] == "applied"]
    assert exported(settings) == expected_export(valid, Authority())
