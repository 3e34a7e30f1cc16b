"""Helpers of the integration tests: sample events, the expected store, CLI runs."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from consumers.merge import Authority, merge_events
from portal_sync.settings import Settings
from schemas import derive_event_id, message_key, parse_event, partition_for
from store.export import export_records
from transport.reader import Message

SOURCES = ["province-01", "province-79", "ministry-btp"]
NAMES = ["Nguyễn Văn An", "Trần Thị Bích", "Lê Hoàng Dũng", "Phạm Thu Hà", "Đặng Quốc Việt"]


def citizen_events(keys: int, versions: int, seed: int = 1) -> list[dict[str, Any]]:
    """Upserts and deletes of `keys` citizens by three sources, `versions` each."""
    rng = random.Random(seed)
    base = datetime(2025, 8, 1, 8, tzinfo=UTC)
    events = []
    for index in range(keys):
        pid = f"0010{90 + index % 10:02d}{index:06d}"
        for source in rng.sample(SOURCES, rng.randint(1, 3)):
            for version in range(1, versions + 1):
                delete = version == versions and rng.random() < 0.15
                event: dict[str, Any] = {
                    "schema_version": 1,
                    "event_id": str(derive_event_id(source, "citizen", pid, version)),
                    "source": source,
                    "entity": "citizen",
                    "key": pid,
                    "op": "delete" if delete else "upsert",
                    "version": version,
                    "occurred_at": (base + timedelta(seconds=rng.randrange(86_400))).isoformat(),
                }
                if not delete:
                    event["data"] = {
                        "full_name": rng.choice(NAMES),
                        "phone": rng.choice([None, f"09{rng.randrange(10**8):08d}"]),
                        "permanent_address": _address(rng.choice(["01", "79"])),
                    }
                events.append(event)
    return events


# A ward of each province (vietnam-provinces' 2025 list)
WARDS = {"01": "00070", "79": "27004"}


def _address(province: str) -> dict[str, str]:
    return {"province_code": province, "ward_code": WARDS[province], "line": "Số 1 Lê Lợi"}


def shuffled_with_duplicates(events: list[dict[str, Any]], seed: int = 2) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    mixed = events + rng.sample(events, len(events) // 5)
    rng.shuffle(mixed)
    return mixed


def expected_export(events: list[dict[str, Any]], authority: Authority) -> list[dict[str, Any]]:
    """What the store must hold: the merge rules over each source's highest version."""
    parsed = [parse_event(json.dumps(raw).encode()).event for raw in events]
    return [
        {"entity": entity, "key": key, "data": record.data, "sources": record.sources}
        for (entity, key), record in sorted(merge_events(parsed, authority).items())
    ]


def exported(settings: Settings) -> list[dict[str, Any]]:
    out = io.StringIO()
    export_records(settings.store_url, out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events))
    return path


def cli(
    settings: Settings, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `portal-sync ARGS` in a child process with these settings, no terminal to ask
    (a prompt reads the end of its input: a command that asks is not confirmed)."""
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        env=os.environ | settings.as_env() | env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_worker(settings: Settings, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "portal_sync", "worker", *args],
        env=os.environ | settings.as_env() | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


REPO = Path(__file__).resolve().parents[2]


def registry_without_signatures(directory: Path) -> Path:
    """A copy of deploy/registry.toml that does not require signatures: for tests of
    other rules that publish unsigned events (scope, kinds and the rest still apply)."""
    text = (REPO / "deploy" / "registry.toml").read_text(encoding="utf-8")
    assert "\nrequire_signatures = true\n" in text
    path = directory / "registry-unsigned.toml"
    path.write_text(text.replace("\nrequire_signatures = true\n", "\nrequire_signatures = false\n"))
    return path


def run_id() -> str:
    return uuid.uuid4().hex[:8]


def change_message(settings: Settings, offset: int, raw: bytes) -> Message:
    """A message as a producer places it: on its entity's change topic, under its record's
    key (a value that is not an event goes to the citizen topic, without a key)."""
    try:
        event = json.loads(raw)
        entity, key, source = str(event["entity"]), str(event["key"]), str(event["source"])
    except (ValueError, TypeError, KeyError):
        return Message(settings.topics().change_topic("citizen"), 0, offset, raw)
    message_key_ = message_key(entity, key, source)
    partition = partition_for(message_key_, settings.change_partitions)
    topic = settings.topics().change_topic(entity)
    return Message(topic, partition, offset, raw, message_key_)
