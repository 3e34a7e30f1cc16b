"""Fault suite on real processes: real Kafka, real PostgreSQL, the real `portal-sync` commands.

    .venv/bin/python bench/faults.py                 # 100,000 events, full fault plan
    .venv/bin/python bench/faults.py --short         # CI: ~15,000 events, fewer faults
    .venv/bin/python bench/faults.py --store sqlite --seed 7 --keep
    .venv/bin/python bench/faults.py --workers 3 --partitions 12   # three workers join/leave
    .venv/bin/python bench/faults.py --drill brokers [--short]   # 3 nodes, kill -9 two in turn

One run: a feed of mixed events (4 entities, 6 sources, duplicates, out-of-order versions,
deletes, ~1 % invalid raw messages) is published by producer processes (this file with
`_produce`, the project's Publisher) that checkpoint only after the broker acknowledged a
batch, while a chaos loop SIGKILLs `portal-sync worker` processes, starts and stops the
other workers of the group (`--workers`, rebalances), kill -9s and restarts the broker,
stops PostgreSQL with `pg_ctl -m immediate` and restarts it, and deletes and recreates the
dead-letter topic. Producers are SIGKILLed between send and checkpoint and restarted from
their checkpoint (duplicates). Then `portal-sync worker --until-caught-up` and the checks:
the export equals `merge_events` of the valid events, every partition's `apply_journal` is
contiguous up to the end offset, the dead letters are exactly the invalid messages (by
origin headers).
Exit 1 when anything is lost, divergent or wrong.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Project imports, kept here only (module paths are about to move).
from consumers.merge import Authority, merge_events
from schemas import ENTITIES, build_event, message_key, parse_event
from schemas.dead_letter import read_headers
from store import Store
from store.tables import applied_offsets, apply_journal
from tests.support.store_helpers import refuse_views_of
from transport import admin
from transport.local import LocalKafka, free_port
from transport.publisher import Publisher


def change_topic(settings: Any, entity: str) -> str:
    return str(settings.topics().change_topic(entity))


def change_topics(settings: Any) -> list[str]:
    return list(settings.topics().change_topics())


def dead_letter_topic(settings: Any) -> str:
    return str(settings.topics().dead_letters)


def end_offsets(settings: Any) -> dict[tuple[str, int], int]:
    return admin.end_offsets(settings.connection(), change_topics(settings))


SOURCES = [
    "province-01",
    "province-79",
    "province-48",
    "ministry-btp",
    "ministry-bca",
    "national-population",
]
NAMES = [
    "Nguyễn Văn An",
    "Trần Thị Bích Ngọc",
    "Lê Hoàng Dũng",
    "Phạm Thu Hà",
    "Đặng Quốc Việt",
    "Huỳnh Thị Thuỳ Dương",
    "Võ Minh Khôi",
    "Bùi Đức Thắng",
]
ORG_NAMES = [
    "Công ty TNHH Thương mại Hà Nội",
    "Công ty Cổ phần Đầu tư Sài Gòn",
    "Hợp tác xã Nông nghiệp Đồng Tháp",
    "Công ty TNHH Một thành viên Điện lực Đà Nẵng",
]
STREETS = ["Số 1 Lê Lợi", "12 Phố Huế", "45 Nguyễn Huệ", "Thôn Đông, xã Yên Phú"]
UNITS = ["000.00.01.H29", "000.00.12.H56", "000.20.31.G01"]
VN = timezone(timedelta(hours=7))
PG_OPTIONS = "-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# -- events ----------------------------------------------------------------------------------
@dataclass
class Item:
    """One feed line: what a producer sends (topic by entity, key, raw value)."""

    entity: str
    key: bytes | None
    value: bytes | None
    event: dict[str, Any] | None = None  # a valid contract-v1 event
    invalid: str | None = None  # the reason code we expect, for an invalid message


def _maybe(rng: random.Random, data: dict[str, Any]) -> dict[str, Any]:
    """A source's view: most fields present, some absent, a few asserted empty (null)."""
    view: dict[str, Any] = {}
    for name, value in data.items():
        roll = rng.random()
        if roll < 0.8:
            view[name] = value
        elif roll < 0.9:
            view[name] = None
    return view or {next(iter(data)): next(iter(data.values()))}


def _day(rng: random.Random, first: int, last: int) -> date:
    return date(first, 1, 1) + timedelta(days=rng.randrange((last - first) * 365))


def _personal_id(rng: random.Random) -> str:
    return f"{rng.choice(['001', '079', '048'])}{rng.randrange(4)}{rng.randrange(10**8):08d}"


def _tax_code(rng: random.Random) -> str:
    base = f"0{rng.randrange(10**9):09d}"
    return base if rng.random() < 0.7 else f"{base}-{rng.randrange(1, 1000):03d}"


def _key(entity: str, number: int, rng: random.Random) -> str:
    if entity == "citizen":
        return f"{rng.choice(['001', '079', '048'])}{rng.randrange(4)}{number:08d}"
    if entity == "organization":
        base = f"01{number:08d}"
        return base if number % 3 else f"{base}-{number % 997 + 1:03d}"
    if entity == "document":
        return f"{rng.choice(['CCCD', 'GPKD', 'GCN'])}-{number:09d}"
    day = date(2024, 1, 1) + timedelta(days=number // 9000)
    return f"{rng.choice(UNITS)}-{day:%y%m%d}-{number % 9000 + 1:04d}"


def _data(entity: str, rng: random.Random) -> dict[str, Any]:
    address = {
        "province_code": rng.choice(["01", "79", "48", "31"]),
        "ward_code": f"{rng.randrange(100000):05d}",
        "line": nfc(rng.choice(STREETS)),
    }
    if entity == "citizen":
        full = {
            "full_name": nfc(rng.choice(NAMES)),
            "date_of_birth": _day(rng, 1950, 2010).isoformat(),
            "sex": rng.choice(["male", "female"]),
            "permanent_address": address,
            "phone": f"09{rng.randrange(10**8):08d}",
            "email": f"cong.dan{rng.randrange(10**6)}@example.vn",
        }
    elif entity == "organization":
        full = {
            "name": nfc(rng.choice(ORG_NAMES)),
            "legal_form": nfc(rng.choice(["Công ty TNHH", "Công ty cổ phần", "Hợp tác xã"])),
            "status": rng.choice(["active", "suspended", "dissolved"]),
            "address": address,
            "legal_representative_id": _personal_id(rng),
            "established_on": _day(rng, 1995, 2025).isoformat(),
        }
    elif entity == "document":
        kind = rng.choice(["citizen", "organization"])
        issued = _day(rng, 2015, 2025)
        full = {
            "owner_kind": kind,
            "owner_id": _personal_id(rng) if kind == "citizen" else _tax_code(rng),
            "doc_type": rng.choice(["CCCD", "GPKD", "GCN-QSDD"]),
            "title": nfc(rng.choice(["Căn cước", "Giấy phép kinh doanh", "Sổ đỏ"])),
            "issuer_code": rng.choice(["BCA", "SKHDT-01", "STNMT-79"]),
            "issued_on": issued.isoformat(),
            "valid_until": (issued + timedelta(days=3650)).isoformat(),
            "status": rng.choice(["valid", "revoked", "expired"]),
            "file_sha256": f"{rng.getrandbits(256):064x}",
        }
    else:
        kind = rng.choice(["citizen", "organization"])
        received = datetime(2024, 1, 1, 8, tzinfo=VN) + timedelta(minutes=rng.randrange(10**6))
        full = {
            "procedure_code": f"{rng.randrange(1, 3)}.{rng.randrange(10**6):06d}",
            "agency_code": rng.choice(UNITS),
            "applicant_kind": kind,
            "applicant_id": _personal_id(rng) if kind == "citizen" else _tax_code(rng),
            "status": rng.randint(1, 10),
            "received_at": received.isoformat(),
            "due_at": (received + timedelta(days=rng.randint(3, 30))).isoformat(),
        }
    return _maybe(rng, full)


def _invalid(base: dict[str, Any], rng: random.Random) -> tuple[bytes | None, str]:
    """A raw message a producer might emit by mistake, with the reason code it deserves."""

    def variant(**changes: Any) -> bytes:
        return json.dumps(base | changes, ensure_ascii=False).encode()

    kind = rng.randrange(12)
    if kind == 0:
        return b"\xff\xfe" + variant()[2:], "not_utf8"
    if kind == 1:
        return variant()[: rng.randint(5, 40)], "invalid_json"
    if kind == 2:
        return variant(schema_version=2), "unsupported_schema_version"
    if kind == 3:
        return json.dumps({k: v for k, v in base.items() if k != "version"}).encode(), (
            "missing_field"
        )
    if kind == 4:
        return variant(entity="vehicle"), "unknown_entity"
    if kind == 5:
        return variant(data={**(base.get("data") or {}), "password": "x"}, op="upsert"), (
            "unknown_field"
        )
    if kind == 6:
        return variant(key="bad key!"), "invalid_key"
    if kind == 7:
        return variant(version=str(base["version"])), "invalid_field"
    if kind == 8:
        return variant(occurred_at="2025-08-01T08:00:00"), "invalid_field"
    if kind == 9:
        return variant(source="Province 01"), "invalid_field"
    if kind == 10:
        return variant(op="delete", data=base.get("data") or {}), "op_data_mismatch"
    return None, "empty_message"


def make_events(n: int, seed: int) -> list[Item]:
    """`n` feed items in publishing order: valid contract-v1 events of 4 entities by 6
    sources (versions with gaps, deletes, re-upserts after a delete), ~12 % exact duplicates,
    shuffled (versions out of order), and ~1 % invalid raw messages."""
    rng = random.Random(seed)
    n_invalid = max(1, n // 100)
    n_dups = (n - n_invalid) // 8
    n_unique = n - n_invalid - n_dups
    base = datetime(2025, 8, 1, 8, tzinfo=VN)
    unique: list[dict[str, Any]] = []
    number = 0
    while len(unique) < n_unique:
        number += 1
        entity = ENTITIES[number % 4]
        key = _key(entity, number, rng)
        for source in rng.sample(SOURCES, rng.randint(1, 3)):
            version = 0
            count = rng.randint(1, 4)
            for step in range(count):
                version += rng.randint(1, 3)
                last = step == count - 1
                delete = rng.random() < (0.12 if last else 0.05)
                when = base + timedelta(seconds=rng.randrange(10**7))
                data = None if delete else _data(entity, rng)
                event = build_event(source, entity, key, version, when, data)
                unique.append(event)
    unique = unique[:n_unique]
    chosen = unique + [rng.choice(unique) for _ in range(n_dups)]
    items = [
        Item(e["entity"], message_key(e["entity"], e["key"], e["source"]), _encode(e), event=e)
        for e in chosen
    ]
    for _ in range(n_invalid):
        template = rng.choice(unique)
        value, code = _invalid(template, rng)
        items.append(
            Item(
                template["entity"],
                message_key(template["entity"], template["key"], template["source"]),
                value,
                invalid=code,
            )
        )
    for index in range(max(2, n // 1000)):
        items.append(poison_event(10**7 + index, rng))
    rng.shuffle(items)
    return items


def poison_event(number: int, rng: random.Random) -> Item:
    """A contract-valid upsert of a fresh record that the store cannot apply: the store's
    database refuses its key (`refuse_poison`, a trigger installed before the run). The
    worker must dead-letter it as `apply_failed` and apply everything around it."""
    key = _key("citizen", number, rng)
    source = rng.choice(SOURCES)
    when = datetime(2025, 9, 1, 7, tzinfo=VN) + timedelta(seconds=number % 86_400)
    event = build_event(source, "citizen", key, 1, when, {"full_name": nfc(rng.choice(NAMES))})
    key_bytes = message_key("citizen", key, source)
    return Item("citizen", key_bytes, _encode(event), invalid="apply_failed")


def refuse_poison(store_url: str, items: list[Item]) -> int:
    """The store created, its database refusing any view of the poison events' keys
    (`refuse_views_of`); the number of keys refused."""
    keys = sorted({json.loads(i.value or b"{}")["key"] for i in items
                   if i.invalid == "apply_failed"})  # fmt: skip
    refuse_views_of(store_url, keys)
    return len(keys)


def make_tail(seed: int) -> list[Item]:
    """What `portal-sync publish` sends while the dead-letter topic is missing: 40 valid
    events of fresh records with one poison event among them (and no contract-invalid one,
    so the batch reaches the store and the poison's dead letter has nowhere to go)."""
    rng = random.Random(seed + 3)
    items: list[Item] = []
    base = datetime(2025, 9, 1, 8, tzinfo=VN)
    for index in range(40):
        entity = ENTITIES[index % 4]
        key = _key(entity, 2 * 10**7 + index, rng)
        source = rng.choice(SOURCES)
        when = base + timedelta(seconds=index)
        event = build_event(source, entity, key, 1, when, _data(entity, rng))
        items.append(Item(entity, message_key(entity, key, source), _encode(event), event=event))
    items.insert(20, poison_event(3 * 10**7, rng))
    return items


def _encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


def write_feed(items: list[Item], path: Path) -> None:
    with path.open("w") as out:
        for item in items:
            line = {
                "t": item.entity,
                "k": base64.b64encode(item.key).decode() if item.key is not None else None,
                "v": base64.b64encode(item.value).decode() if item.value is not None else None,
            }
            out.write(json.dumps(line) + "\n")


# -- producer process ------------------------------------------------------------------------
def produce_main(argv: list[str]) -> None:
    """`faults.py _produce FEED CHECKPOINT START END BATCH RATE KILLS`: publish feed lines
    [checkpoint or START, END) with the project's Publisher, `BATCH` per flush, at about
    `RATE` lines/s; write the checkpoint (next line) only after the flush returned. At a
    kill point (`LINE:inflight` or `LINE:acked`, comma-separated) print a marker for the
    harness, which SIGKILLs us: after the sends (inflight) or after the acks (acked)."""
    from portal_sync.settings import Settings

    feed, checkpoint = Path(argv[0]), Path(argv[1])
    start, end, batch, rate = int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5])
    kills = dict(k.split(":") for k in argv[6].split(",") if k)
    lines = feed.read_text().splitlines()
    position = int(checkpoint.read_text()) if checkpoint.exists() else start
    settings = Settings()
    publisher = Publisher(
        settings.connection(), settings.topics(), client_id=f"faults-producer-{start}"
    )
    while position < end:
        began = time.monotonic()
        stop = min(end, position + batch)
        for number in range(position, stop):
            line = json.loads(lines[number])
            publisher.send(
                change_topic(settings, line["t"]),
                base64.b64decode(line["k"]) if line["k"] is not None else None,
                base64.b64decode(line["v"]) if line["v"] is not None else None,
                headers=[("bench.line", str(number).encode())],
            )
        mode = next((m for at, m in kills.items() if position <= int(at) < stop), None)
        if mode == "inflight":
            print(f"INFLIGHT {stop}", flush=True)
        publisher.flush()
        if mode == "acked":
            print(f"ACKED {stop}", flush=True)
            time.sleep(3600)
        tmp = checkpoint.with_suffix(".tmp")
        with tmp.open("w") as out:
            out.write(str(stop))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, checkpoint)
        sent, position = stop - position, stop
        time.sleep(max(0.0, sent / rate - (time.monotonic() - began)))
    publisher.close()
    print("DONE", flush=True)


# -- processes -------------------------------------------------------------------------------
def _cli() -> list[str]:
    script = Path(sys.executable).parent / "portal-sync"
    return [str(script)] if script.exists() else [sys.executable, "-m", "portal_sync"]


@dataclass
class Postgres:
    root: Path
    port: int
    bindir: Path
    prefix: list[str]

    @classmethod
    def start(cls, root: Path) -> Postgres:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1].parent
        root.mkdir(parents=True)
        prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        server = cls(root, free_port(), bindir, prefix)
        subprocess.run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                "portal",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            check=True,
            capture_output=True,
        )
        server.up()
        admin = f"postgresql+psycopg://portal@127.0.0.1:{server.port}/postgres"
        from sqlalchemy import create_engine, text

        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("CREATE DATABASE faults"))
        engine.dispose()
        return server

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://portal@127.0.0.1:{self.port}/faults"

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        command = [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), *args]
        return subprocess.run(command, capture_output=True, timeout=120)

    def up(self) -> None:
        options = PG_OPTIONS.format(port=self.port, root=self.root)
        result = self._ctl("-o", options, "-w", "-l", str(self.root / "server.log"), "start")
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr[-500:]!r}")

    def crash(self) -> None:
        self._ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


class Broker:
    """The local KRaft broker; kill -9 of its JVM, restart on the same data dir and port."""

    def __init__(self, data_dir: Path) -> None:
        self.kafka = LocalKafka(data_dir)
        self.port = free_port()

    def up(self) -> None:
        self.kafka.up(port=self.port, timeout=180)

    def crash(self) -> None:
        pid = self.kafka.status().pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        if self.kafka._process is not None:
            self.kafka._process.wait(timeout=30)

    def down(self) -> None:
        self.kafka.down()
        if self.kafka._process is not None:
            with contextlib.suppress(Exception):
                self.kafka._process.wait(timeout=30)


class Run:
    """Everything one run starts: paths, environment, the process table, a fault log."""

    def __init__(
        self, root: Path, bootstrap: str, store_url: str, seed: int, partitions: int = 6,
        workers: int = 2,
    ) -> None:  # fmt: skip
        self.root = root
        self.rng = random.Random(seed + 1)
        # Worker slots: "a" always runs; the others join and leave (rebalances under load).
        self.extra_slots = [chr(ord("b") + i) for i in range(max(0, workers - 1))]
        tag = uuid.uuid4().hex[:6]
        self.env = os.environ | {
            "PORTAL_SYNC_KAFKA_BOOTSTRAP": bootstrap,
            "PORTAL_SYNC_STORE_URL": store_url,
            "PORTAL_SYNC_TOPIC_PREFIX": f"faults-{tag}",
            "PORTAL_SYNC_GROUP_ID": f"faults-{tag}",
            "PORTAL_SYNC_CHANGE_PARTITIONS": str(partitions),
            "PORTAL_SYNC_BATCH_MAX_EVENTS": "400",
            "PORTAL_SYNC_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("PORTAL_SYNC_AUTHORITY_FILE", None)
        self.env.pop("PORTAL_SYNC_REGISTRY", None)
        self.faults: Counter[str] = Counter()
        self.log: list[str] = []
        self.began = time.monotonic()
        self.lock = threading.Lock()

    def note(self, text: str) -> None:
        with self.lock:
            line = f"{time.monotonic() - self.began:7.1f}s {text}"
            self.log.append(line)
            print(line, flush=True)

    def settings(self) -> Any:
        from portal_sync.settings import Settings

        names = ["KAFKA_BOOTSTRAP", "STORE_URL", "TOPIC_PREFIX", "GROUP_ID", "CHANGE_PARTITIONS"]
        values = {n.lower(): self.env[f"PORTAL_SYNC_{n}"] for n in names}
        return Settings(**values)

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_cli(), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


class Workers:
    """`portal-sync worker` processes of one group in two slots; logs under the run dir."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.started = 0

    def start(self, slot: str) -> None:
        self.started += 1
        port = free_port()
        xdg = self.run.root / f"xdg-{slot}"
        env = self.run.env | {"XDG_DATA_HOME": str(xdg), "PORTAL_SYNC_METRICS_PORT": str(port)}
        log = (self.run.root / f"worker-{slot}.log").open("ab")
        self.procs[slot] = subprocess.Popen(
            [*_cli(), "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.ports[slot] = port

    def running(self) -> list[str]:
        return [slot for slot, p in self.procs.items() if p.poll() is None]

    def reap(self) -> None:
        """Restart the primary slot if it exited on its own (it should not)."""
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[slot]
                self.run.note(f"worker {slot} exited by itself with {code}")
                if slot == "a":
                    self.start("a")

    def kill(self, slot: str) -> bool:
        """SIGKILL a worker; whether it was running until then (not exited on its own)."""
        proc = self.procs.pop(slot)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self, slot: str) -> None:
        proc = self.procs.pop(slot)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def health(self) -> dict[str, str]:
        result = {}
        for slot in self.running():
            try:
                url = f"http://127.0.0.1:{self.ports[slot]}/healthz"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    result[slot] = str(answer.status)
            except urllib.error.HTTPError as error:
                result[slot] = str(error.code)
            except Exception as error:
                result[slot] = type(error).__name__
        return result


@dataclass
class ProducerSlot:
    """One producer of a slice of the feed, restarted from its checkpoint after each death."""

    run: Run
    feed: Path
    start: int
    end: int
    rate: float
    kills: list[tuple[int, str]]
    batch: int = 250
    done: bool = False
    deaths: Counter[str] = field(default_factory=Counter)
    proc: subprocess.Popen[str] | None = None
    running: threading.Event = field(default_factory=threading.Event)
    stopped: bool = False

    def pause(self) -> None:
        self.running.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.running.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    @property
    def checkpoint(self) -> Path:
        return self.run.root / f"producer-{self.start}.checkpoint"

    def position(self) -> int:
        return int(self.checkpoint.read_text()) if self.checkpoint.exists() else self.start

    def loop(self, deadline: float) -> None:
        log = (self.run.root / f"producer-{self.start}.log").open("a")
        self.running.set()
        while not self.done and not self.stopped and time.monotonic() < deadline:
            self.running.wait()
            kills = ",".join(f"{at}:{mode}" for at, mode in self.kills)
            args = [
                str(self.feed),
                str(self.checkpoint),
                str(self.start),
                str(self.end),
                str(self.batch),
                str(self.rate),
                kills,
            ]
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "_produce", *args],
                env=self.run.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                word, *rest = line.split()
                if word in ("INFLIGHT", "ACKED"):
                    self.proc.send_signal(signal.SIGKILL)
                    self.proc.wait()
                    stop = int(rest[0])
                    self.kills = [(at, m) for at, m in self.kills if not (at < stop)]
                    between = self.position() < stop
                    kind = "between send and checkpoint" if between else "after checkpoint"
                    self.run.faults[f"producer SIGKILL ({word.lower()}, {kind})"] += 1
                    self.run.note(
                        f"producer {self.start}: SIGKILL {word.lower()} batch→{stop}, "
                        f"checkpoint {self.position()}"
                    )
                    break
                if word == "DONE":
                    self.done = True
            code = self.proc.wait()
            if not self.done and not self.stopped and code not in (0, -9):
                self.deaths["crashed"] += 1
                self.run.note(f"producer {self.start} exited with {code}; restarting")
                time.sleep(1)

    def stop(self) -> None:
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


# -- chaos -----------------------------------------------------------------------------------
@dataclass
class Plan:
    events: int
    worker_kills: int
    broker_kills: int
    pg_crashes: int
    producer_kills: int
    rebalances: int
    gap: tuple[float, float]  # seconds between two faults
    dead_letter_window: tuple[float, float]  # seconds the dead-letter topic stays deleted
    final_timeout: float  # seconds for the final `worker --until-caught-up`


# The full run keeps the dead-letter topic away longer than the publisher's max_block_ms
# (10 s, transport/publisher.py), so a dead-letter send times out while it is missing.
FULL = Plan(100_000, 20, 3, 3, 10, 6, (3.0, 8.0), (75.0, 85.0), 1200)
SHORT = Plan(15_000, 5, 1, 1, 3, 2, (1.5, 3.5), (6.0, 10.0), 240)


def chaos(
    run: Run,
    plan: Plan,
    workers: Workers,
    broker: Broker,
    pg: Postgres | None,
    producers: list[ProducerSlot],
    tail: tuple[list[Item], Path],
) -> None:
    rng = run.rng
    actions = (
        ["worker_kill"] * plan.worker_kills
        + ["broker_kill"] * plan.broker_kills
        + ["pg_crash"] * (plan.pg_crashes if pg else 0)
        + ["rebalance"] * plan.rebalances
    )
    rng.shuffle(actions)
    # While producers still publish invalid messages: in the first half of the plan.
    actions.insert(rng.randrange(len(actions) // 5, len(actions) // 2 + 1), "dead_letter_topic")
    for action in actions:
        time.sleep(rng.uniform(*plan.gap))
        workers.reap()
        if action == "worker_kill":
            slot = rng.choice(workers.running() or ["a"])
            if slot not in workers.procs:
                workers.start(slot)
                time.sleep(rng.uniform(*plan.gap))
            if workers.kill(slot):
                run.faults["worker SIGKILL"] += 1
                run.note(f"worker {slot}: SIGKILL")
            else:
                run.note(f"worker {slot}: had exited before its SIGKILL")
            workers.start(slot)
        elif action == "rebalance" and run.extra_slots:
            slot = rng.choice(run.extra_slots)
            if slot in workers.procs:
                workers.stop(slot)
                run.note(f"worker {slot}: SIGTERM (group shrinks to {len(workers.procs)})")
            else:
                workers.start(slot)
                run.note(f"worker {slot}: started (group grows to {len(workers.procs)})")
            run.faults["rebalance (a worker joins/leaves)"] += 1
        elif action == "broker_kill":
            broker.crash()
            run.note("broker: kill -9")
            time.sleep(rng.uniform(1, 5))
            broker.up()
            run.faults["broker kill -9 + restart"] += 1
            run.note("broker: up again")
        elif action == "pg_crash":
            assert pg is not None
            pg.crash()
            run.note("postgresql: pg_ctl stop -m immediate")
            time.sleep(rng.uniform(1, 5))
            pg.up()
            run.faults["postgresql immediate stop + restart"] += 1
            run.note("postgresql: up again")
        else:
            recreate_dead_letter_topic(run, workers, producers, tail, plan.dead_letter_window)
    for slot in run.extra_slots:
        if slot in workers.procs:
            workers.stop(slot)


ARCHIVED: list[Any] = []


def recreate_dead_letter_topic(
    run: Run,
    workers: Workers,
    producers: list[ProducerSlot],
    tail: tuple[list[Item], Path],
    window: tuple[float, float],
) -> None:
    """Pause the producers and let the workers catch up; freeze the workers, archive the
    dead-letter topic (an operator's backup), delete it, thaw them; publish (Publisher)
    a tail of valid events with one poison event (its dead letter has nowhere to go); resume
    the producers (their invalid events meet the missing topic too); after `window`
    seconds, `portal-sync topics` recreates it."""
    from kafka import KafkaAdminClient

    settings = run.settings()
    topic = dead_letter_topic(settings)
    for slot in producers:
        slot.pause()
    caught_up = wait_caught_up(run, timeout=180)
    workers.signal_all(signal.SIGSTOP)
    try:
        archived = read_topics(settings.kafka_bootstrap, [topic])
        ARCHIVED.extend(archived)
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        admin.delete_topics([topic], timeout_ms=30_000)
        deadline = time.monotonic() + 60
        while topic in admin.list_topics() and time.monotonic() < deadline:
            time.sleep(0.2)
        admin.close()
    finally:
        workers.signal_all(signal.SIGCONT)
    run.note(
        f"dead-letter topic deleted (workers caught up: {caught_up}; "
        f"{len(archived)} dead letters archived first)"
    )
    missing_until = time.monotonic() + run.rng.uniform(*window)
    # Not `portal-sync publish`: like every worker start, it recreates missing topics.
    feed, first = tail[1], int(tail[1].stem.rsplit("-", 1)[1])
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_produce",
        str(feed),
        str(run.root / "tail.checkpoint"),
        str(first),
        str(first + len(tail[0])),
        "1000",
        "1000",
        "",
    ]
    published = subprocess.run(command, env=run.env, capture_output=True, text=True, timeout=120)
    run.note(
        f"published the tail ({len(tail[0])} events, 1 poison) with the Publisher: "
        f"exit {published.returncode}"
    )
    before = applied_total(run)
    time.sleep(5)
    for slot in producers:
        slot.resume()
    probes: Counter[str] = Counter()
    while time.monotonic() < missing_until:
        probes.update(f"{slot}:{code}" for slot, code in workers.health().items())
        time.sleep(2)
    run.note(
        f"while it is missing: /healthz answers {dict(probes)}, applied offsets "
        f"{before} -> {applied_total(run)}"
    )
    result = run.command("topics")
    run.faults["dead-letter topic deleted + recreated"] += 1
    answer = (result.stdout + result.stderr).strip().replace("\n", " ")
    run.note(f"portal-sync topics: {answer} (exit {result.returncode})")


def applied_total(run: Run) -> int:
    store = Store(run.env["PORTAL_SYNC_STORE_URL"])
    try:
        return sum(store.all_offsets().values())
    finally:
        store.close()


def wait_caught_up(run: Run, timeout: float) -> bool:
    """Until the store's offsets reach the change topics' end offsets."""
    deadline = time.monotonic() + timeout
    settings = run.settings()
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            ends = end_offsets(settings)
            store = Store(settings.store_url)
            stored = store.all_offsets()
            store.close()
            if all(stored.get(tp, 0) >= end for tp, end in ends.items()):
                return True
        time.sleep(1)
    return False


# -- verification ----------------------------------------------------------------------------
def read_topics(bootstrap: str, topics: list[str]) -> list[Any]:
    return read_with_ends(bootstrap, topics)[0]


def read_with_ends(
    bootstrap: str, topics: list[str]
) -> tuple[list[Any], dict[tuple[str, int], int]]:
    """Every record of these topics, from the beginning to the end offsets seen at start."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    partitions = [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    ends = consumer.end_offsets(partitions)
    records: list[Any] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in ends):
        for batch in consumer.poll(timeout_ms=1000, max_records=10_000).values():
            records.extend(
                r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)]
            )
    consumer.close()
    return records, {(tp.topic, tp.partition): end for tp, end in ends.items()}


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def verify(run: Run, items: list[Item]) -> tuple[dict[str, Any], list[str]]:
    settings = run.settings()
    rows: dict[str, Any] = {}
    problems: list[str] = []
    # What the topics hold (every copy a producer got acknowledged).
    changes, ends = read_with_ends(settings.kafka_bootstrap, change_topics(settings))
    line_of: dict[tuple[str, int, int], int] = {}
    copies: Counter[int] = Counter()
    by_id = {
        json.loads(item.value)["event_id"]: n
        for n, item in enumerate(items)
        if item.value and (item.event or item.invalid == "apply_failed")
    }
    for record in changes:
        headers = dict(record.headers or [])
        if "bench.line" in headers:
            number = int(headers["bench.line"])
        else:
            number = by_id[json.loads(record.value)["event_id"]]
        line_of[(record.topic, record.partition, record.offset)] = number
        copies[number] += 1
    unpublished = [n for n in range(len(items)) if copies[n] == 0]
    rows["feed lines (+ publish tail)"] = len(items)
    rows["messages acknowledged (in topics)"] = len(changes)
    rows["producer re-sends (extra copies)"] = len(changes) - len(copies)
    valid_lines = [n for n, item in enumerate(items) if item.event is not None]
    unique_ids = {items[n].event["event_id"] for n in valid_lines}  # type: ignore[index]
    rows["valid events (unique / with duplicates)"] = f"{len(unique_ids)} / {len(valid_lines)}"
    rows["feed lines never published (lost)"] = len(unpublished)
    if unpublished:
        problems.append(f"feed lines never acknowledged: {unpublished[:20]}")

    # Store vs the pure merge.
    export = run.root / "export.jsonl"
    result = run.command(
        "export", "--output", str(export), "--reason", "fault bench check", timeout=600
    )
    if result.returncode != 0:
        problems.append(f"portal-sync export failed: {result.stderr[-500:]}")
    found = {}
    for line in export.read_text().splitlines() if export.exists() else []:
        record = json.loads(line)
        found[(record["entity"], record["key"])] = record
    parsed = [parse_event(items[n].value).event for n in valid_lines]
    expected = {
        key: {"entity": key[0], "key": key[1], "data": r.data, "sources": r.sources}
        for key, r in merge_events(parsed, Authority()).items()
    }
    lost = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    divergent = sorted(
        k for k in set(expected) & set(found) if _canonical(expected[k]) != _canonical(found[k])
    )
    rows["records expected / found"] = f"{len(expected)} / {len(found)}"
    rows["records lost"] = len(lost)
    rows["records divergent"] = len(divergent)
    rows["records unexpected"] = len(extra)
    where: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)
    for position, number in line_of.items():
        event = items[number].event
        if event is not None:
            where[(event["entity"], event["key"])].append(position)
    for label, keys in (("lost", lost), ("divergent", divergent), ("unexpected", extra)):
        for key in keys[:10]:
            exp, got = expected.get(key), found.get(key)
            detail = (
                f"{label} {key[0]} {key[1]}: offsets {sorted(where[key])}; expected "
                f"sources {exp and exp['sources']}, found {got and got['sources']}"
            )
            if label == "divergent":
                fields = sorted(
                    f
                    for f in set(exp["data"]) | set(got["data"])  # type: ignore[index]
                    if exp["data"].get(f) != got["data"].get(f)
                )  # type: ignore[index]
                detail += f"; fields {fields}"
            problems.append(detail)

    # The journal: contiguous [first, next) per partition up to the end offset.
    store = Store(settings.store_url)
    with store.engine.connect() as conn:
        journal = conn.execute(apply_journal.select().order_by(apply_journal.c.id)).all()
        offsets = {
            (r.topic, r.partition): r.next_offset for r in conn.execute(applied_offsets.select())
        }
    store.close()
    position: dict[tuple[str, int], int] = {}
    gaps = overlaps = 0
    for row in journal:
        tp = (row.topic, row.partition)
        at = position.get(tp, 0)
        if row.first_offset > at:
            gaps += 1
            skipped = [line_of.get((tp[0], tp[1], o)) for o in range(at, row.first_offset)]
            problems.append(
                f"journal gap {tp[0]}[{tp[1]}] offsets [{at}, {row.first_offset}) "
                f"(feed lines {skipped[:10]}), next range committed "
                f"{row.committed_at}"
            )
        elif row.first_offset < at:
            overlaps += 1
            problems.append(
                f"journal overlap {tp[0]}[{tp[1]}]: [{row.first_offset}, "
                f"{row.next_offset}) after {at}, committed {row.committed_at}"
            )
        position[tp] = max(at, row.next_offset)
    short = {
        tp: (position.get(tp, 0), end) for tp, end in ends.items() if position.get(tp, 0) != end
    }
    for tp, (at, end) in short.items():
        problems.append(f"journal of {tp[0]}[{tp[1]}] ends at {at}, partition end {end}")
    if offsets != {tp: end for tp, end in ends.items() if end}:
        problems.append("applied_offsets differ from the partitions' end offsets")
    rows["journal rows / offsets covered"] = f"{len(journal)} / {sum(position.values())}"
    rows["journal gaps / overlaps / short ends"] = f"{gaps} / {overlaps} / {len(short)}"
    rows["events applied (journal)"] = sum(r.events for r in journal)

    # Dead letters: every copy of every invalid message, with its origin; nothing valid.
    letters = ARCHIVED + read_topics(settings.kafka_bootstrap, [dead_letter_topic(settings)])
    origins: Counter[tuple[str, int, int]] = Counter()
    codes: dict[tuple[str, int, int], str] = {}
    for letter in letters:
        headers = read_headers(letter.headers)
        origin = (
            headers.get("ps.origin.topic", "?"),
            int(headers.get("ps.origin.partition", -1)),
            int(headers.get("ps.origin.offset", -1)),
        )
        origins[origin] += 1
        codes[origin] = headers.get("ps.reason.code", "?")
    wanted = {pos for pos, number in line_of.items() if items[number].invalid is not None}
    missing = sorted(wanted - set(origins))
    wrong = sorted(set(origins) - wanted)
    mismatched = Counter(
        f"{items[line_of[o]].invalid} -> {codes[o]}"
        for o in wanted & set(origins)
        if codes[o] != items[line_of[o]].invalid
    )
    rows["dead letters expected / found (archived)"] = (
        f"{len(wanted)} / {len(letters)} ({len(ARCHIVED)})"
    )
    rows["dead letters missing"] = len(missing)
    rows["dead letters of valid events"] = len(wrong)
    rows["dead letters repeated (same origin)"] = sum(c - 1 for c in origins.values())
    rows["dead letters with another reason code"] = (
        ", ".join(f"{pair} ({n})" for pair, n in sorted(mismatched.items())) or 0
    )
    for origin in missing[:10]:
        problems.append(
            f"dead letter missing for {origin[0]}[{origin[1]}]@{origin[2]} "
            f"(feed line {line_of[origin]}, {items[line_of[origin]].invalid})"
        )
    for origin in wrong[:10]:
        problems.append(f"dead letter for a valid event {origin} ({codes[origin]})")
    for pair, count in sorted(mismatched.items()):
        problems.append(f"dead letters with another reason code than expected: {pair} ({count})")
    return rows, problems


# -- broker drill ----------------------------------------------------------------------------
@dataclass
class DrillPlan:
    events: int
    steady: float  # seconds before the first kill
    down: float  # seconds a node stays down
    settle: float  # seconds after a node is back in sync, before the next kill
    final_timeout: float


DRILL_FULL = DrillPlan(20_000, 20.0, 45.0, 20.0, 600)
DRILL_SHORT = DrillPlan(2_000, 5.0, 8.0, 3.0, 180)


def _get(url: str) -> tuple[int | str, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except Exception as error:
        return type(error).__name__, ""


def _metric(text: str, name: str, where: str = "") -> list[float]:
    """Values of a Prometheus metric in exposition text (lines whose labels hold `where`)."""
    values = []
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {" and where in line:
            with contextlib.suppress(ValueError):
                values.append(float(line.rsplit(" ", 1)[1]))
    return values


@dataclass
class Sample:
    at: float
    phase: str
    nodes: str  # e.g. "1-3" (node 2 down)
    applied: int | None
    acked: int
    ready: dict[str, int | str]
    retrying: float
    lag_messages: float | None
    lag_seconds: float | None
    lag_status: float | None
    exporter_ready: int | str


class DrillSampler(threading.Thread):
    """Once a second: the nodes, the store's applied offsets, the producers' checkpoints,
    each worker's /readyz and retrying gauge, the lag exporter's lag and status."""

    def __init__(
        self,
        run: Run,
        cluster: Any,
        workers: Workers,
        producers: list[ProducerSlot],
        exporter_port: int,
    ) -> None:
        super().__init__(daemon=True)
        self.harness, self.cluster, self.workers = run, cluster, workers
        self.producers, self.exporter_port = producers, exporter_port
        self.phase = "start"
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def run(self) -> None:
        group = self.harness.env["PORTAL_SYNC_GROUP_ID"]
        while not self.done.is_set():
            began = time.monotonic()
            nodes = "".join(str(n.node) if n.running else "-" for n in self.cluster.status())
            ready: dict[str, int | str] = {}
            retrying = 0.0
            for slot in self.workers.running():
                base = f"http://127.0.0.1:{self.workers.ports[slot]}"
                ready[slot] = _get(f"{base}/readyz")[0]
                retrying = max(
                    [
                        retrying,
                        *_metric(_get(f"{base}/metrics")[1], "portal_sync_worker_retrying_seconds"),
                    ]
                )
            exporter = f"http://127.0.0.1:{self.exporter_port}"
            text = _get(f"{exporter}/metrics")[1]
            where = f'group="{group}"'
            messages = _metric(text, "portal_sync_consumer_lag_messages", where)
            seconds = _metric(text, "portal_sync_consumer_lag_seconds", where)
            status = _metric(text, "portal_sync_consumer_status", where)
            applied = None
            with contextlib.suppress(Exception):
                applied = applied_total(self.harness)
            self.samples.append(
                Sample(
                    time.monotonic() - self.harness.began,
                    self.phase,
                    nodes,
                    applied,
                    sum(p.position() - p.start for p in self.producers),
                    ready,
                    retrying,
                    sum(messages) if messages else None,
                    max(seconds) if seconds else None,
                    max(status) if status else None,
                    _get(f"{exporter}/readyz")[0],
                )
            )
            self.done.wait(max(0.0, 1.0 - (time.monotonic() - began)))


def _wait_warm(sampler: DrillSampler, timeout: float) -> float:
    """Until both workers are ready, producers got acknowledgements and the exporter
    reports the group's lag (processes start slowly on a busy machine)."""
    began = time.monotonic()
    while time.monotonic() < began + timeout:
        last = sampler.samples[-1] if sampler.samples else None
        if (
            last is not None
            and len(last.ready) == 2
            and all(code == 200 for code in last.ready.values())
            and last.acked > 0
            and last.lag_messages is not None
        ):
            return time.monotonic() - began
        time.sleep(0.5)
    raise RuntimeError(f"workers, producers or lag exporter not up after {timeout:.0f}s")


def _wait_lag_reported(sampler: DrillSampler, timeout: float = 60) -> float | None:
    """Until the exporter reports the group's lag again (a poll that began while a node was
    down may run its full request timeout first); the seconds it took, None if it did not
    within `timeout` (the drill's checks then flag the phase)."""
    began = time.monotonic()
    since = began - sampler.harness.began
    while time.monotonic() < began + timeout:
        if any(s.at >= since and s.lag_messages is not None for s in sampler.samples[-3:]):
            return time.monotonic() - began
        time.sleep(0.5)
    return None


def _wait_in_sync(cluster: Any, timeout: float = 180) -> float:
    """Until every partition has all its replicas in sync again; the seconds it took."""
    began = time.monotonic()
    deadline = began + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            client = admin_client(cluster)
            try:
                topics = client.describe_topics()
            finally:
                client.close()
            if all(
                len(p["isr_nodes"]) == len(p["replica_nodes"])
                for topic in topics
                for p in topic["partitions"]
            ):
                return time.monotonic() - began
        time.sleep(1)
    raise RuntimeError(f"partitions still under-replicated after {timeout:.0f}s")


def admin_client(cluster: Any) -> Any:
    from transport import clients

    return clients.admin(cluster.connection(), request_timeout_ms=5000)


def _controller(cluster: Any) -> int:
    client = admin_client(cluster)
    try:
        return int(client.describe_cluster()["controller_id"])
    finally:
        client.close()


def broker_drill(args: argparse.Namespace) -> int:
    """Three KRaft nodes, producers, two workers and the lag exporter; kill -9 the active
    controller's node, restart it, wait until every replica is in sync, kill -9 another
    node, restart it; then the checks of the fault suite and a table per phase."""
    from transport.local import free_ports
    from transport.local_cluster import LocalCluster

    plan = DRILL_SHORT if args.short else DRILL_FULL
    n = args.events or plan.events
    root = Path(tempfile.mkdtemp(prefix="portal-sync-broker-drill-"))
    os.chmod(root, 0o755)
    cluster = LocalCluster(root / "kafka")
    pg: Postgres | None = None
    workers: Workers | None = None
    exporter: subprocess.Popen[bytes] | None = None
    sampler: DrillSampler | None = None
    producers: list[ProducerSlot] = []
    failed = True
    try:
        began = time.monotonic()
        items = make_events(n, args.seed)
        feed = root / "feed.jsonl"
        write_feed(items, feed)
        cluster.up(3, free_ports(3), timeout=180)
        if args.store == "postgresql":
            pg = Postgres.start(root / "pg")
            store_url = pg.url
        else:
            store_url = f"sqlite:///{root / 'store.db'}"
        refused = refuse_poison(store_url, items)
        run = Run(root, cluster.bootstrap(), store_url, args.seed)
        run.env["PORTAL_SYNC_REPLICATION_FACTOR"] = "3"
        run.note(f"{n} feed lines, 3 nodes {cluster.bootstrap()}, store {args.store}, {root}")
        run.note(f"the store refuses the {refused} poison events' keys (a trigger)")
        topics = run.command("topics")
        assert topics.returncode == 0, topics.stderr
        workers = Workers(run)
        workers.start("a")
        workers.start("b")
        exporter_port = free_port()
        exporter = subprocess.Popen(
            [*_cli(), "lag-exporter", "--port", str(exporter_port), "--interval", "1"],
            env=run.env,
            stdout=(root / "lag-exporter.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        # Producers publish over the whole drill (two outages and their recoveries).
        duration = plan.steady + 2 * (plan.down + plan.settle + 10)
        rate = len(items) / 5 / duration
        lines = len(items)
        slices = [(lines * i // 5, lines * (i + 1) // 5) for i in range(5)]
        producers = [ProducerSlot(run, feed, lo, hi, rate, [], batch=100) for lo, hi in slices]
        sampler = DrillSampler(run, cluster, workers, producers, exporter_port)
        sampler.start()
        deadline = time.monotonic() + 3600
        threads = [
            threading.Thread(target=p.loop, args=(deadline,), daemon=True) for p in producers
        ]
        for thread in threads:
            thread.start()
        warm = _wait_warm(sampler, timeout=180)
        run.note(f"warm after {warm:.0f}s: workers ready, events acknowledged, lag reported")
        sampler.phase = "steady"
        time.sleep(plan.steady)
        first = _controller(cluster)
        victims = [first, 1 + first % 3]
        recovery: dict[int, float] = {}
        reported: dict[int, float | None] = {}
        for round_, node in enumerate(victims, 1):
            sampler.phase = f"{round_}: node {node} down"
            if cluster.down(node, kill=True) != [node]:
                raise RuntimeError(f"node {node} was not running when it was to be killed")
            run.faults[f"node kill -9 (node {node})"] += 1
            run.note(f"node {node}: kill -9 (controller was {first if round_ == 1 else '?'})")
            time.sleep(plan.down)
            sampler.phase = f"{round_}: node {node} back"
            cluster.up(timeout=180)
            run.note(f"node {node}: up again")
            recovery[node] = _wait_in_sync(cluster)
            run.note(f"node {node}: every replica in sync after {recovery[node]:.1f}s")
            reported[node] = _wait_lag_reported(sampler)
            waited = reported[node]
            run.note(
                f"node {node}: lag reported again after {waited:.1f}s"
                if waited is not None
                else f"node {node}: lag not reported again within 60s"
            )
            time.sleep(plan.settle)
        sampler.phase = "drain"
        run.note("waiting for the producers")
        for thread in threads:
            thread.join(timeout=900)
        caught_up = wait_caught_up(run, plan.final_timeout)
        run.note(f"workers caught up: {caught_up}")
        time.sleep(3)  # the exporter's next polls see the end
        sampler.done.set()
        sampler.join(timeout=10)
        for slot in list(workers.procs):
            workers.stop(slot)
        rows, problems = verify(run, items)
        if not caught_up:
            problems.append("the two workers did not catch up")
        if not all(p.done for p in producers):
            problems.append("a producer did not finish its slice")
        restarts = sum(p.deaths["crashed"] for p in producers)
        rows["producer restarts (failed flush, from checkpoint)"] = restarts
        for node, seconds in recovery.items():
            rows[f"node {node}: replicas in sync after restart"] = f"{seconds:.1f}s"
        for node, after in reported.items():
            rows[f"node {node}: lag reported again, after in sync"] = (
                "no" if after is None else f"{after:.1f}s"
            )
        problems += drill_checks(sampler.samples)
        print_drill_table(run, sampler.samples, rows, time.monotonic() - began)
        for problem in problems:
            print("PROBLEM:", problem)
        (root / "drill.log").write_text("\n".join(run.log) + "\n")
        with (root / "samples.jsonl").open("w") as out:
            for sample in sampler.samples:
                out.write(json.dumps(sample.__dict__) + "\n")
        failed = bool(problems)
        return 1 if failed else 0
    finally:
        if sampler is not None:
            sampler.done.set()
        for slot in producers:
            slot.stop()
        if workers is not None:
            for slot in list(workers.procs):
                workers.kill(slot)
        if exporter is not None:
            exporter.kill()
            exporter.wait()
        cluster.down(timeout=30)
        if pg is not None:
            pg.stop()
        if args.keep or failed:
            print(f"run dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _phases(samples: list[Sample]) -> dict[str, list[Sample]]:
    phases: dict[str, list[Sample]] = {}
    for sample in samples:
        phases.setdefault(sample.phase, []).append(sample)
    return phases


def drill_checks(samples: list[Sample]) -> list[str]:
    """What the metrics must show: lag measured throughout, back to 0 at the end, and the
    exporter answering all along (it reads any live node): at least once while each node
    is down, and at the end of each phase after a restart."""
    problems = []
    lags = [s.lag_messages for s in samples if s.lag_messages is not None]
    if not lags:
        problems.append("the lag exporter never reported the group's lag")
    elif lags[-1] != 0:
        problems.append(f"lag at the end {lags[-1]:.0f}, not 0")
    if max(lags or [0]) <= 0:
        problems.append("the lag never rose (the workers were never behind)")
    for phase, group in _phases(samples).items():
        if phase.endswith("back") and group[-1].lag_messages is None:
            problems.append(f"the lag exporter reports no lag at the end of '{phase}'")
        if phase.endswith("down") and all(s.lag_messages is None for s in group):
            problems.append(f"the lag exporter reports no lag while '{phase}'")
    return problems


def print_drill_table(
    run: Run, samples: list[Sample], rows: dict[str, Any], seconds: float
) -> None:
    print()
    header = (
        f"{'phase':<20} {'secs':>5} {'nodes':>5} {'acked':>7} {'applied':>8} "
        f"{'lag max':>8} {'lag s max':>9} {'status':>6} {'not ready':>9} {'retrying':>8}"
    )
    print(header)
    print("-" * len(header))
    for phase, group in _phases(samples).items():
        applied = [s.applied for s in group if s.applied is not None]
        lags = [s.lag_messages for s in group if s.lag_messages is not None]
        lag_s = [s.lag_seconds for s in group if s.lag_seconds is not None]
        status = [s.lag_status for s in group if s.lag_status is not None]
        not_ready = sum(1 for s in group for code in s.ready.values() if code != 200)
        probes = sum(len(s.ready) for s in group)
        nodes = "/".join(sorted({s.nodes for s in group}))
        print(
            f"{phase:<20} {group[-1].at - group[0].at + 1:>5.0f} {nodes:>5} "
            f"{group[-1].acked - group[0].acked:>7} "
            f"{(applied[-1] - applied[0]) if applied else '-':>8} "
            f"{max(lags) if lags else '-':>8} {max(lag_s) if lag_s else 0:>9.1f} "
            f"{max(status) if status else '-':>6} {f'{not_ready}/{probes}':>9} "
            f"{max(s.retrying for s in group):>8.1f}"
        )
    width = 58
    print()
    print(f"{'fault':<{width}} {'injected':>12}")
    print("-" * (width + 13))
    for name, count in sorted(run.faults.items()):
        print(f"{name:<{width}} {count:>12}")
    print()
    print(f"{'check':<{width}} {'value':>12}")
    print("-" * (width + 13))
    for name, value in rows.items():
        print(f"{name:<{width}} {value!s:>12}")
    print(f"{'wall time':<{width}} {seconds:>11.0f}s")


# -- main ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, help="feed size (default 100000; 15000 short)")
    parser.add_argument("--short", action="store_true", help="CI size: fewer events and faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--keep", action="store_true", help="keep the run dir (logs, data)")
    parser.add_argument("--workers", type=int, default=2, help="worker slots (rebalances)")
    parser.add_argument("--partitions", type=int, default=6, help="change topic partitions")
    parser.add_argument(
        "--drill",
        choices=["brokers"],
        help="brokers: a 3-node cluster, two workers, the lag exporter; two nodes kill -9ed "
        "one after the other (default 20000 events; 2000 short)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    if args.drill == "brokers":
        return broker_drill(args)
    plan = SHORT if args.short else FULL
    n = args.events or plan.events
    root = Path(tempfile.mkdtemp(prefix="portal-sync-faults-"))
    os.chmod(root, 0o755)
    broker = Broker(root / "kafka")
    pg: Postgres | None = None
    workers: Workers | None = None
    producers: list[ProducerSlot] = []
    failed = True
    try:
        began = time.monotonic()
        items = make_events(n, args.seed)
        feed = root / "feed.jsonl"
        write_feed(items, feed)
        tail = make_tail(args.seed)
        tail_file = root / f"feed-with-tail-{len(items)}.jsonl"
        write_feed(items + tail, tail_file)
        broker.up()
        if args.store == "postgresql":
            pg = Postgres.start(root / "pg")
            store_url = pg.url
        else:
            store_url = f"sqlite:///{root / 'store.db'}"
        refused = refuse_poison(store_url, items + tail)
        run = Run(root, broker.kafka.bootstrap(), store_url, args.seed, args.partitions,
                  args.workers)  # fmt: skip
        run.note(
            f"{n} feed lines, broker {broker.kafka.bootstrap()}, store {args.store}, run dir {root}"
        )
        run.note(f"the store refuses the {refused} poison events' keys (a trigger)")
        topics = run.command("topics")
        assert topics.returncode == 0, topics.stderr
        workers = Workers(run)
        workers.start("a")
        # Producers: 5 slices, paced to publish over about 80 % of the chaos phase.
        chaos_seconds = (
            (plan.worker_kills + plan.rebalances + plan.broker_kills + plan.pg_crashes + 1)
            * sum(plan.gap)
            / 2
        ) + sum(plan.dead_letter_window) / 2
        rate = len(items) / 5 / max(10.0, 0.8 * chaos_seconds)
        rng = random.Random(args.seed + 2)
        lines = len(items)  # n plus the poison events
        slices = [(lines * i // 5, lines * (i + 1) // 5) for i in range(5)]
        kills: list[list[tuple[int, str]]] = [[] for _ in slices]
        for index in range(plan.producer_kills + plan.producer_kills // 3):
            which = index % 5
            lo, hi = slices[which]
            mode = "acked" if index < plan.producer_kills else "inflight"
            kills[which].append((rng.randrange(lo + 100, hi - 100), mode))
        deadline = time.monotonic() + 3600
        for (lo, hi), points in zip(slices, kills, strict=True):
            slot = ProducerSlot(run, feed, lo, hi, rate, sorted(points))
            producers.append(slot)
        threads = [
            threading.Thread(target=p.loop, args=(deadline,), daemon=True) for p in producers
        ]
        for thread in threads:
            thread.start()
        chaos(run, plan, workers, broker, pg, producers, (tail, tail_file))
        items = items + tail
        run.note("chaos over; waiting for the producers")
        for thread in threads:
            thread.join(timeout=900)
        for slot in list(workers.procs):
            workers.stop(slot)
        run.note("final: portal-sync worker --until-caught-up")
        final_env = run.env | {"XDG_DATA_HOME": str(root / "xdg-final")}
        try:
            final = subprocess.run(
                [*_cli(), "worker", "--until-caught-up"],
                env=final_env,
                capture_output=True,
                text=True,
                timeout=plan.final_timeout,
            )
            final_code: Any = final.returncode
            (root / "worker-final.log").write_text(final.stdout + final.stderr)
        except subprocess.TimeoutExpired as expired:
            final_code = f"timeout after {plan.final_timeout:.0f}s"
            output = (expired.stdout or b"") + (expired.stderr or b"")
            (root / "worker-final.log").write_bytes(
                output if isinstance(output, bytes) else output.encode()
            )
        run.note(f"final worker exit {final_code}")
        rows, problems = verify(run, items)
        if final_code != 0:
            problems.append(f"final worker --until-caught-up: {final_code}")
        if not all(p.done for p in producers):
            problems.append("a producer did not finish its slice")
        problems += fault_problems(run, plan, pg is not None)
        print_table(run, rows, plan, pg is not None, time.monotonic() - began)
        for problem in problems:
            print("PROBLEM:", problem)
        (root / "faults.log").write_text("\n".join(run.log) + "\n")
        failed = bool(problems)
        return 1 if failed else 0
    finally:
        for slot in producers:
            slot.stop()
        if workers is not None:
            for slot in list(workers.procs):
                workers.kill(slot)
        broker.down()
        if pg is not None:
            pg.stop()
        if args.keep or failed:
            print(f"run dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def planned_faults(run: Run, plan: Plan, pg: bool) -> dict[str, int]:
    """The faults the chaos loop injects, by name (the producers' kills apart)."""
    return {
        "worker SIGKILL": plan.worker_kills,
        "broker kill -9 + restart": plan.broker_kills,
        "postgresql immediate stop + restart": plan.pg_crashes if pg else 0,
        "rebalance (a worker joins/leaves)": plan.rebalances if run.extra_slots else 0,
        "dead-letter topic deleted + recreated": 1,
    }


def fault_problems(run: Run, plan: Plan, pg: bool) -> list[str]:
    """A run proves nothing of a fault it did not inject. The producers' kills are planned
    at lines of the feed, and two in one batch end in one kill: at least one is asked."""
    problems = [
        f"{name}: {run.faults.get(name, 0)} injected of {count} planned"
        for name, count in planned_faults(run, plan, pg).items()
        if run.faults.get(name, 0) < count
    ]
    producer_kills = sum(n for name, n in run.faults.items() if name.startswith("producer SIGKILL"))
    if plan.producer_kills and not producer_kills:
        problems.append("no producer was killed")
    return problems


def print_table(run: Run, rows: dict[str, Any], plan: Plan, pg: bool, seconds: float) -> None:
    planned = planned_faults(run, plan, pg)
    width = 58
    print()
    print(f"{'fault':<{width}} {'injected':>12}")
    print("-" * (width + 13))
    for name in sorted(set(planned) | set(run.faults)):
        print(f"{name:<{width}} {run.faults.get(name, 0):>12}")
    print()
    print(f"{'check':<{width}} {'value':>12}")
    print("-" * (width + 13))
    for name, value in rows.items():
        print(f"{name:<{width}} {value!s:>12}")
    print(f"{'wall time':<{width}} {seconds:>11.0f}s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_produce":
        produce_main(sys.argv[2:])
    else:
        sys.exit(main())
