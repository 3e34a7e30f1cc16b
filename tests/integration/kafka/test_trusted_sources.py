"""Signed events and write scope per source on the real broker: keys made by `portal-sync
keys new`, events signed by `publish --sign-key` and by the adapter runner, forged and
out-of-scope events dead-lettered and never merged, a re-driven signed dead letter verified
again."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumers.merge import Authority
from consumers.signatures import TrustedKey, verify
from portal_sync.settings import Settings
from producers.signing import load_signer
from schemas import derive_event_id, message_key
from schemas.signing import Signer, parse_public_key, public_key_text
from tests.support.adapter_helpers import read_topic
from tests.support.kafka_helpers import (
    change_topic,
    dead_letter_topic,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    write_jsonl,
)

pytestmark = pytest.mark.kafka

H26, H29, H17 = "000.00.01.H26", "000.00.01.H29", "000.00.02.H17"
AGENCIES = {"province-01": [H26], "province-79": [H29], "ministry-btp": ["000.00.00.G12"]}


def make_key(settings: Settings, source: str, directory: Path) -> tuple[Path, str]:
    """`portal-sync keys new`: the key file and the registry entry it printed."""
    made = cli(settings, "keys", "new", source, "--dir", str(directory))
    assert made.returncode == 0, made.stderr
    return directory / f"{source}.key", made.stdout.strip()


def write_registry(
    path: Path, entries: dict[str, list[str]], extra: dict[str, dict[str, str]] | None = None
) -> Path:
    """A registry requiring signatures; `entries`: source -> its `public_keys` entries;
    `extra`: source -> more `key = value` lines."""
    lines = ["require_signatures = true", ""]
    for source, keys in entries.items():
        kind = "ministry" if source.startswith("ministry") else "province"
        options = {"agency_codes": json.dumps(AGENCIES.get(source, [H17]))}
        options |= (extra or {}).get(source, {})
        lines += [f"[sources.{source}]", f'kind = "{kind}"', f'name = "{source}"']
        lines += [f"{name} = {value}" for name, value in options.items()]
        lines += [f"public_keys = [{', '.join(keys)}]", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_worker(settings: Settings) -> None:
    worker = cli(settings, "worker", "--until-caught-up", timeout=240)
    assert worker.returncode == 0, worker.stdout + worker.stderr


def letters(settings: Settings) -> dict[bytes, list[str]]:
    """Dead letters by original value: their reason codes, in order."""
    found: dict[bytes, list[str]] = {}
    for record in read_topic(settings, dead_letter_topic(settings)):
        code = dict(record.headers)["ps.reason.code"].decode()
        found.setdefault(record.value, []).append(code)
    return found


def event(source: str, entity: str, key: str, version: int, data: Any = None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(derive_event_id(source, entity, key, version)),
        "source": source,
        "entity": entity,
        "key": key,
        "op": "upsert" if data is not None else "delete",
        "version": version,
        "occurred_at": (
            datetime(2025, 8, 1, 8, tzinfo=UTC) + timedelta(minutes=version)
        ).isoformat(),
    }
    if data is not None:
        raw["data"] = data
    return raw


def send(
    settings: Settings, raw: dict[str, Any], signer: Signer | None, tamper: bool = False
) -> bytes:
    """Publish one event as a raw client would; return the bytes sent."""
    value = json.dumps(raw, ensure_ascii=False).encode()
    headers = signer.headers(value) if signer is not None else []
    if tamper:
        value = value.replace(b'"full_name": "', b'"full_name": "X')
    publisher = publisher_for(settings)
    key = message_key(raw["entity"], raw["key"], raw["source"])
    publisher.send(change_topic(settings, raw["entity"]), key, value, headers)
    publisher.flush()
    publisher.close()
    return value


def test_signed_events_apply_and_forged_ones_are_dead_lettered(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    base = settings_for(sqlite_store_url)
    keys = {s: make_key(base, s, tmp_path / "keys") for s in AGENCIES}
    old = Signer.generate("province-01", "province-01-20240101-expired")
    expired = (
        f'{{ id = "{old.key_id}", key = "{public_key_text(old.public_key())}", '
        "not_before = 2024-01-01T00:00:00+07:00, not_after = 2025-01-01T00:00:00+07:00 }"
    )
    entries = {s: [entry] for s, (_, entry) in keys.items()}
    entries["province-01"].append(expired)
    settings = settings_for(sqlite_store_url, registry=write_registry(tmp_path / "r.toml", entries))
    ensure_topics(settings)

    events = citizen_events(30, 2, seed=11)
    for source, (key_file, _) in keys.items():
        mine = [e for e in events if e["source"] == source]
        lines = write_jsonl(tmp_path / f"{source}.jsonl", mine)
        published = cli(settings, "publish", str(lines), "--sign-key", str(key_file))
        assert published.returncode == 0, published.stderr
        assert f"published {len(mine)}, invalid 0" in published.stderr
    # a key signs for its own source only: publish refuses lines of another
    other = write_jsonl(
        tmp_path / "other.jsonl", [e for e in events if e["source"] == "province-79"][:1]
    )
    refused = cli(settings, "publish", str(other), "--sign-key", str(keys["province-01"][0]))
    assert refused.returncode == 1 and "line 1: bad_signature" in refused.stderr
    # unsigned (a runbook's correction without --sign-key): the worker would letter it, and
    # the newest message of its compaction key would outlive the source's signed one
    unsigned = cli(settings, "publish", str(other))
    assert unsigned.returncode == 1 and "line 1: unsigned" in unsigned.stderr
    assert "published 0, invalid 1" in unsigned.stderr

    hanoi = load_signer(keys["province-01"][0])
    hcm = load_signer(keys["province-79"][0])

    def forged_event(number: int) -> dict[str, Any]:
        return event("province-01", "citizen", f"00109900000{number}", 1, {"full_name": "Giả"})

    nobody = Signer.generate("province-01", "province-01-20250801-nobody")
    forged = {  # name: (event claiming province-01, signed by, value changed after signing)
        "unsigned": (forged_event(1), None, False),
        "tampered": (forged_event(2), hanoi, True),
        "unknown key": (forged_event(3), nobody, False),
        "expired key": (forged_event(4), old, False),
        "other source's key": (forged_event(5), hcm, False),
    }
    sent = {
        name: send(settings, raw, signer, tamper) for name, (raw, signer, tamper) in forged.items()
    }

    run_worker(settings)

    assert exported(settings) == expected_export(events, Authority())
    found = letters(settings)
    assert {name: found.get(value) for name, value in sent.items()} == {
        "unsigned": ["unsigned"],
        "tampered": ["bad_signature"],
        "unknown key": ["bad_signature"],
        "expired key": ["bad_signature"],
        "other source's key": ["bad_signature"],
    }
    assert sum(len(codes) for codes in found.values()) == len(forged)  # nothing else refused


def test_out_of_scope_events_are_refused_and_a_redriven_signed_letter_verifies_again(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    base = settings_for(sqlite_store_url)
    sources = ("province-01", "province-79", "province-48-motcua")
    keys = {s: make_key(base, s, tmp_path / "keys") for s in sources}
    entries = {s: [entry] for s, (_, entry) in keys.items()}
    no_delete = {"province-48-motcua": {"may_delete": "false"}}
    registry = write_registry(tmp_path / "registry.toml", entries, no_delete)
    settings = settings_for(sqlite_store_url, registry=registry)
    ensure_topics(settings)
    signers = {s: load_signer(path) for s, (path, _) in keys.items()}

    dossier, own, feed_dossier = f"{H29}-250801-0001", f"{H26}-250801-0002", f"{H17}-250801-0003"
    document = "GKS/79/00000001"
    baseline = [
        event("province-79", "dossier", dossier, 1, {"agency_code": H29, "status": 1}),
        event("province-79", "document", document, 1, {"issuer_code": H29, "status": "valid"}),
        event("province-01", "dossier", own, 1, {"agency_code": H26, "status": 1}),
        event("province-48-motcua", "dossier", feed_dossier, 1, {"agency_code": H17, "status": 1}),
    ]
    for raw in baseline:
        send(settings, raw, signers[raw["source"]])
    intruding = {
        "dossier of another agency": event("province-01", "dossier", dossier, 1,
                                           {"agency_code": H26, "status": 4}),
        "document of another issuer": event("province-01", "document", document, 1,
                                            {"issuer_code": H29, "status": "revoked"}),
        "delete of another agency's dossier": event("province-01", "dossier", dossier, 2),
    }  # fmt: skip
    sent = {name: send(settings, raw, signers["province-01"]) for name, raw in intruding.items()}
    no_deletes = event("province-48-motcua", "dossier", feed_dossier, 2)
    sent["delete by a source that may not"] = send(
        settings, no_deletes, signers["province-48-motcua"]
    )

    run_worker(settings)

    assert exported(settings) == expected_export(baseline, Authority())  # store unchanged
    found = letters(settings)
    assert {name: found.get(value) for name, value in sent.items()} == {
        name: ["out_of_scope"] for name in sent
    }

    # Hanoi is given Ho Chi Minh City's agency; its key is retired meanwhile (not_after
    # now): the re-driven letters carry their original signature and first send time.
    retire = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    entries["province-01"] = [entries["province-01"][0][:-2] + f", not_after = {retire} }}"]
    wider = no_delete | {"province-01": {"agency_codes": json.dumps([H26, H29])}}
    write_registry(registry, entries, wider)
    time.sleep(1.5)  # past the key's not_after
    redriven = cli(settings, "dlq", "redrive", "--reason", "out_of_scope")
    assert "re-driven 4, already re-driven 0" in redriven.stdout, redriven.stdout

    run_worker(settings)

    applied = [*baseline, *intruding.values()]
    assert exported(settings) == expected_export(applied, Authority())
    again = letters(settings)
    assert again[sent["delete by a source that may not"]] == ["out_of_scope", "out_of_scope"]
    assert all(len(again[value]) == 1 for name, value in sent.items() if "may not" not in name)
    # without its signature the redrive would be `unsigned`; with the redrive time as the
    # signing time, `bad_signature` (the key's not_after has passed)


def test_a_forged_letter_s_version_never_keeps_a_genuine_letter_from_its_redrive(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    """Province-79's writer plants an event in province-01's name at the highest version,
    signed by a throwaway key under province-01's key id: a `bad_signature` letter. Then
    province-01's genuine v2 fails (signed by a key not registered yet). Re-driven by
    source after the key is registered, the forgery went first, refused again, and its
    claimed version had the genuine letter counted superseded and recorded: never sent,
    the store kept v1, and `dlq redrive ID` said "already re-driven"."""
    base = settings_for(sqlite_store_url)
    keys = {s: make_key(base, s, tmp_path / "keys") for s in ("province-01", "province-79")}
    entries = {s: [entry] for s, (_, entry) in keys.items()}
    registry = write_registry(tmp_path / "registry.toml", entries)
    settings = settings_for(sqlite_store_url, registry=registry)
    ensure_topics(settings)
    genuine = load_signer(keys["province-01"][0])
    pid = "001203004571"
    v1 = event("province-01", "citizen", pid, 1, {"full_name": "Nguyễn Văn An"})
    send(settings, v1, genuine)
    run_worker(settings)
    forger = Signer.generate("province-01", genuine.key_id)  # its id, another key
    top = 2**53
    forged = event("province-01", "citizen", pid, 3, {"full_name": "Giả Mạo"}) | {
        "version": top,
        "event_id": str(derive_event_id("province-01", "citizen", pid, top)),
    }
    send(settings, forged, forger)
    rotated_file, rotated_entry = make_key(base, "province-01", tmp_path / "rotated")
    v2 = event("province-01", "citizen", pid, 2, {"full_name": "Nguyễn Văn Ân"})
    v2_sent = send(settings, v2, load_signer(rotated_file))  # not registered yet
    run_worker(settings)
    assert letters(settings)[v2_sent] == ["bad_signature"]

    entries["province-01"].append(rotated_entry)
    write_registry(registry, entries)
    # Without the worker's registry no claim could be taken: refused, nothing sent.
    bare = settings.model_copy(update={"registry": None})
    refused = cli(bare, "dlq", "redrive", "--source", "province-01")
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 1 and "this redrive runs without a registry" in said, said
    redriven = cli(settings, "dlq", "redrive", "--source", "province-01")
    said = " ".join(redriven.stdout.split())
    assert redriven.returncode == 0, said + redriven.stderr
    assert "re-driven 2," in said and "newer one) 0" in said, said
    run_worker(settings)
    assert exported(settings) == expected_export([v1, v2], Authority())


def test_the_adapter_runner_signs_what_it_publishes(
    settings_for: Any, sqlite_store_url: str, tmp_path: Path
) -> None:
    settings = settings_for(sqlite_store_url)
    key_file, entry = make_key(settings, "province-02", tmp_path / "keys")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        '{"pid": "001090000001", "name": "Nguyễn Văn An", "at": "2025-08-01T08:00:00+07:00"}\n'
        '{"pid": "001090000002", "name": "Trần Thị Bích", "at": "2025-08-01T08:00:00+07:00"}\n',
        encoding="utf-8",
    )
    config = tmp_path / "sources.toml"
    config.write_text(
        f'[producer]\nmetrics_port = 0\nsigning_key_file = "{key_file}"\n\n'
        '[[sources]]\nid = "exports"\nsource = "province-02"\nadapter = "filedrop"\n'
        'connection = { directory = "in", settle_seconds = 0 }\n'
        'mapping = { entity = "citizen", key_field = "pid", occurred_at_field = "at", '
        'fields = { full_name = "name" } }\n',
        encoding="utf-8",
    )
    produced = cli(settings, "produce", "--config", str(config), "--once")
    assert produced.returncode == 0, produced.stdout + produced.stderr

    public = parse_public_key(entry.split('"')[3])
    kid = entry.split('"')[1]
    keys = {kid: TrustedKey(kid, "province-02", public)}
    records = read_topic(settings, change_topic(settings, "citizen"))
    assert len(records) == 2
    for record in records:
        assert dict(record.headers)["ps.kid"] == kid.encode()
        verified = verify(record.value, record.headers, keys, 0, required=True)
        assert verified is not None and json.loads(record.value)["source"] == "province-02"


def test_the_worker_says_when_it_accepts_unsigned_events(
    settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    worker = cli(settings, "worker", "--until-caught-up", timeout=120)
    assert worker.returncode == 0, worker.stderr
    assert "unsigned events too" in worker.stdout + worker.stderr
