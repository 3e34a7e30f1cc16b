"""A hostile corpus: change messages that break the contract in every way we could think of
while carrying known personal ids, tax codes and Vietnamese names, in values, in unknown
fields' names, in nested keys, in Kafka keys, in wrong types, around bad UTF-8, oversize;
plus valid events carrying them too.

Tests run the worker (or anything else) over it, then look for `needles()` in every log
line, dead-letter header and metric: none may appear. Only the store, `show` and
`dlq show --reveal` may hold or print these values.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas import derive_event_id, message_key

PERSONAL_IDS = ("079185123456", "001203004567", "038190011223", "052301099887")
SOFT_WARNING_ID = "999190011224"  # no such province: a soft-check warning (logged)
TAX_CODES = ("0312345675", "0108765432-001")
NAMES = (
    "Trần Thị Bích Ngọc",
    "Nguyễn Văn Hùng",
    "Lê Thị Hồng Nhung",
    "Phạm Quốc Khánh",
    "Đỗ Minh Tuấn",
    "Trần Thị B",
)
SECRETS = (*PERSONAL_IDS, SOFT_WARNING_ID, *TAX_CODES, *NAMES)
SOURCES = ("province-01", "province-79", "ministry-btp")  # in deploy/registry.toml
DOSSIER = "000.00.01.H29-240115-0001"  # province-79's (its write scope)
OCCURRED = "2025-08-01T08:00:00+07:00"


@dataclass(frozen=True)
class Hostile:
    label: str  # what this message tries (never printed by the code under test)
    entity: str  # the change topic it is published to
    key: bytes | None
    value: bytes | None
    valid: bool  # passes the contract (and comes from a registered source)


def needles(secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """Every spelling in which a secret could leak: as is, decomposed (NFD), as JSON with
    ASCII escapes and as the repr of its UTF-8 bytes."""
    found: set[str] = set()
    for secret in secrets:
        for text in (secret, unicodedata.normalize("NFD", secret)):
            found.add(text)
            found.add(json.dumps(text)[1:-1])
            found.add(repr(text.encode())[2:-1])
    return sorted(found)


def change_event(entity: str, key: Any, data: Any = None, **fields: Any) -> dict[str, Any]:
    source = fields.pop("source", SOURCES[0])
    version = fields.pop("version", 1)
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(derive_event_id(source, entity, str(key), 1)),
        "source": source,
        "entity": entity,
        "key": key,
        "op": "upsert",
        "version": version,
        "occurred_at": OCCURRED,
        "data": {} if data is None else data,
    }
    event.update(fields)
    return event


def _citizen(key: str = PERSONAL_IDS[0], **data: Any) -> dict[str, Any]:
    return change_event("citizen", key, {"full_name": NAMES[0], **data})


def encoded(event: Any) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode()


def kafka_key(entity: str, key: str, source: str = SOURCES[0]) -> bytes:
    return message_key(entity, key, source)


def valid_message(label: str, event: dict[str, Any]) -> Hostile:
    """A message of a valid event, keyed as our producers key it."""
    key = kafka_key(event["entity"], event["key"], event["source"])
    return Hostile(label, event["entity"], key, encoded(event), True)


def hostile_corpus() -> list[Hostile]:
    """About 90 messages; every secret appears in several invalid ones."""
    return list(_invalid()) + list(_valid())


def _invalid() -> Iterator[Hostile]:
    pid, pid2, pid3, pid4 = PERSONAL_IDS
    tax, branch = TAX_CODES
    name, name2, name3, name4, name5, short = NAMES
    c_key = kafka_key("citizen", pid)

    def bad(label: str, event: Any, entity: str = "citizen", key: bytes | None = c_key) -> Hostile:
        value = event if isinstance(event, bytes) or event is None else encoded(event)
        return Hostile(label, entity, key, value, False)

    # Unknown fields whose *names* are personal data.
    yield bad("envelope field named id+name", _citizen() | {f"{pid} {short}": 1})
    yield bad("envelope field named by a name", _citizen() | {name2: pid2})
    yield bad("data field named by an id", _citizen(**{pid2: name2}))
    yield bad("data field named by a name", _citizen(**{name3: True}))
    yield bad(
        "address field named by an id",
        _citizen(permanent_address={"province_code": "79", pid3: name3}),
    )
    yield bad(
        "address field named by a name",
        _citizen(permanent_address={f"{name4} ({pid4})": "x"}),
    )
    yield bad("unknown field named by a tax code", _citizen() | {tax: name5})
    yield bad(
        "organization data field named by a tax code",
        change_event("organization", tax, {"name": "Công ty TNHH A", branch: name}),
        "organization",
        kafka_key("organization", tax),
    )
    yield bad(
        "document data field named by an id",
        change_event("document", "D-1", {"owner_kind": "citizen", f"owner_{pid}": name}),
        "document",
        b"document:D-1",
    )
    yield bad(
        "dossier data field named by an id",
        change_event("dossier", DOSSIER, {"applicant_kind": "citizen", pid: name2}),
        "dossier",
        kafka_key("dossier", DOSSIER),
    )
    nfd = unicodedata.normalize("NFD", f"{name} {pid}")
    yield bad("NFD field name (normalised before validation)", _citizen() | {nfd: 1})
    escaped = json.dumps({f"{name2} {pid2}": 1})  # \\u escapes: the normalising path
    yield bad(
        "escaped field name",
        encoded(_citizen())[:-1] + b", " + escaped[1:-1].encode() + b"}",
    )
    yield bad("field name with a control character", _citizen() | {f"{pid}\u0007{name}": 1})
    yield bad("field name with a NUL", _citizen() | {f"{name3}\u0000": pid3})
    yield bad("two unknown fields", _citizen() | {pid: name, name2: pid2})
    yield bad("unknown field in a deleted record", _citizen() | {"op": "delete", pid4: name4})

    # Values of the wrong type or format that are personal data.
    yield bad("key with a trailing letter", _citizen(key=f"{pid}X"))
    yield bad("key with a space", _citizen(key=f"{pid} "))
    yield bad("key as a name", _citizen(key=name))
    yield bad("key as a number", _citizen(key=int(pid2)))
    yield bad("key as a list", _citizen(key=[pid, name]))
    yield bad("key as an object", _citizen(key={pid: name}))
    yield bad("key too short", _citizen(key=pid[:-1]))
    yield bad("tax code as a citizen key", _citizen(key=tax), key=kafka_key("citizen", tax))
    yield bad(
        "personal id as an organization key",
        change_event("organization", pid, {"name": name}),
        "organization",
    )
    yield bad(
        "branch tax code malformed",
        change_event("organization", branch + "9", {"name": name5}),
        "organization",
        kafka_key("organization", branch),
    )
    yield bad("entity is a name", change_event(name, pid, {"full_name": name}))
    yield bad("entity is an id", change_event(pid, pid, {"full_name": name}))
    yield bad("op is a name", _citizen() | {"op": name})
    yield bad("version is an id", _citizen() | {"version": pid})
    yield bad("version is an id with a fraction", _citizen() | {"version": float(pid2) + 0.5})
    yield bad("version negative id", _citizen() | {"version": -int(pid3)})
    yield bad("event_id is an id", _citizen() | {"event_id": pid})
    yield bad("event_id is a name", _citizen() | {"event_id": name})
    yield bad("occurred_at is a name", _citizen() | {"occurred_at": name})
    yield bad(
        "occurred_at without offset", _citizen() | {"occurred_at": f"{pid[:4]}-01-01T00:00:00"}
    )
    yield bad("schema_version is an id", _citizen() | {"schema_version": pid})
    yield bad("source is a name", _citizen() | {"source": name})
    yield bad("full_name as a list", _citizen(full_name=[name, pid]))
    yield bad("full_name as an object", _citizen(full_name={name: pid}))
    yield bad("full_name as a number", _citizen(full_name=int(pid)))
    yield bad("full_name too long", _citizen(full_name=" ".join([name2] * 20)))
    yield bad("full_name with a bell", _citizen(full_name=f"{name3}\u0007{pid3}"))
    yield bad("full_name with a C1 control", _citizen(full_name=f"{name4}\u0085"))
    yield bad("full_name empty", _citizen(full_name=""))
    yield bad("sex is a name", _citizen(sex=name))
    yield bad("phone is an id", _citizen(phone=pid))
    yield bad("email is a name", _citizen(email=f"{name}@example.vn"))
    yield bad("date_of_birth is an id", _citizen(date_of_birth=pid))
    yield bad("date_of_birth impossible", _citizen(date_of_birth=f"{pid[4:8]}-02-30"))
    yield bad("province_code is an id", _citizen(permanent_address={"province_code": pid}))
    yield bad("ward_code is a name", _citizen(permanent_address={"ward_code": name5}))
    yield bad("address line as a list", _citizen(permanent_address={"line": [name, pid]}))
    yield bad("address is a name", _citizen(permanent_address=name))
    yield bad("data is a name", change_event("citizen", pid, name))
    yield bad("data is a list", change_event("citizen", pid, [pid, name]))
    yield bad("data keyed by an id", change_event("citizen", pid, {pid: {"full_name": name}}))
    yield bad(
        "document owner id of the wrong kind",
        change_event("document", "D-2", {"owner_kind": "organization", "owner_id": pid}),
        "document",
        b"document:D-2",
    )
    yield bad(
        "document owner id too long",
        change_event("document", "D-3", {"owner_kind": "citizen", "owner_id": pid + pid2}),
        "document",
        b"document:D-3",
    )
    yield bad(
        "dossier applicant of the wrong kind",
        change_event("dossier", DOSSIER, {"applicant_kind": "citizen", "applicant_id": tax}),
        "dossier",
        kafka_key("dossier", DOSSIER),
    )
    yield bad(
        "dossier original_code is an id",
        change_event("dossier", DOSSIER, {"original_code": pid}),
        "dossier",
        kafka_key("dossier", DOSSIER),
    )
    yield bad(
        "organization legal representative is a name",
        change_event("organization", tax, {"legal_representative_id": name}),
        "organization",
        kafka_key("organization", tax),
    )
    yield bad("upsert without data", {k: v for k, v in _citizen().items() if k != "data"})
    yield bad("delete with data", _citizen() | {"op": "delete"})

    # Broken bytes around personal data.
    raw = encoded(_citizen())
    yield bad("invalid UTF-8 in a name", raw.replace(name.encode(), name.encode() + b"\xff\xfe"))
    yield bad("invalid UTF-8 before an id", raw.replace(pid.encode(), b"\xc3" + pid.encode()))
    in_cp1258 = name3.encode("cp1258", "replace")
    yield bad("name in a legacy code page", raw.replace(name.encode(), in_cp1258))
    yield bad("UTF-16", json.dumps(_citizen(), ensure_ascii=False).encode("utf-16"))
    yield bad("truncated", raw[: raw.index(name.encode()) + 4])
    yield bad("duplicate key", raw.replace(b'"key": ', f'"key": "{pid2}", "key": '.encode()))
    yield bad("NaN version", raw.replace(b'"version": 1', f'"version": NaN, "{pid}": 0'.encode()))
    yield bad("JSON array", encoded([pid, name, {"key": pid2}]))
    yield bad("JSON string", encoded(f"{name} {pid}"))
    yield bad("JSON number", pid.encode())
    yield bad("plain text", f"{pid};{name};{tax}".encode())
    yield bad("BOM", b"\xef\xbb\xbf" + raw)
    yield bad("deeply nested", b'{"key": "' + pid.encode() + b'", "x": ' + b"[" * 5000
              + encoded(name) + b"]" * 5000 + b"}")  # fmt: skip
    yield bad("nested 300 deep", raw[:-1] + b', "x": ' + b"[" * 300 + encoded(name)
              + b"]" * 300 + b"}")  # fmt: skip
    yield bad("nested 600 deep, an escape", raw[:-1] + b', "x": ' + b"[" * 600 + b'"\\ud800", '
              + encoded(pid) + b"]" * 600 + b"}")  # fmt: skip
    yield bad("nested unknown objects", _citizen(**{"a": {"b": {pid: {name: [pid2]}}}}))
    yield bad("too large", encoded(_citizen() | {"padding": f"{name} {pid} " * 45_000}))
    yield bad("too large data", encoded(_citizen(full_name=f"{name2} {pid2} " * 45_000)))
    yield bad("empty message", None)
    yield bad("empty bytes", b"")
    yield bad("whitespace", b"   \n")
    yield bad("source is an id (unregistered)", _citizen() | {"source": pid3})
    yield bad("source not registered", _citizen() | {"source": "province-99"})


def _valid() -> Iterator[Hostile]:
    pid, pid2, pid3, pid4 = PERSONAL_IDS
    tax, branch = TAX_CODES
    name, name2, name3, name4, name5, _ = NAMES

    good = valid_message

    yield good("citizen", _citizen(pid, date_of_birth="1985-03-04", sex="female"))
    citizen2 = {"full_name": name2, "phone": "0912345678"}
    yield good("citizen 2", change_event("citizen", pid2, citizen2, source=SOURCES[1]))
    warned = {"full_name": name3, "sex": "female"}
    yield good("citizen with soft warnings", change_event("citizen", SOFT_WARNING_ID, warned))
    yield good("citizen 4", change_event("citizen", pid4, {"full_name": name4}, source=SOURCES[2]))
    nfd = {"full_name": unicodedata.normalize("NFD", name5)}
    yield good("citizen NFD name", change_event("citizen", pid3, nfd))
    company = {"name": f"Công ty TNHH {name}", "legal_representative_id": pid}
    yield good("organization", change_event("organization", tax, company))
    yield good("organization branch", change_event("organization", branch, {"name": name5}))
    birth = {"owner_kind": "citizen", "owner_id": pid2, "title": f"Giấy khai sinh {name2}",
             "issuer_code": "000.00.01.H26"}  # fmt: skip
    yield good("document", change_event("document", "000.00.01.H26:GKS-" + pid2, birth))
    dossier = {"applicant_kind": "citizen", "applicant_id": pid, "status": 1}
    yield good("dossier", change_event("dossier", DOSSIER, dossier, source=SOURCES[1]))
    delete = change_event("citizen", pid4, op="delete", version=2, source=SOURCES[2])
    yield good("delete", {k: v for k, v in delete.items() if k != "data"})
