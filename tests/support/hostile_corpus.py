"""The hostile corpus of `tests/data/hostile-corpus.jsonl`: messages that break every rule
the worker enforces, for every entity, each with the dead-letter reason it must end with,
and valid events to publish among them (`expect` = `applied`).

One line per message: `label`, `entity` (whose change topic it is published to), `key`
(the Kafka message key as text, or null), `value` (UTF-8 text, or null) or `value_b64`
(bytes that are not UTF-8), optional `pad_to` (pad the JSON with spaces to that many bytes),
`sign` (how the test signs it: `own` with `signer`'s key, `none`, `tamper` (signed, then a
byte changed), `unknown_kid`, `garbage` (a signature that is not one), `double` (two
signature headers)), `signer`, and `expect`.

Regenerate after a change here: `python -m tests.support.hostile_corpus`; a unit test fails
while the file is stale.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas import derive_event_id, message_key

CORPUS = Path(__file__).resolve().parents[1] / "data" / "hostile-corpus.jsonl"
OCCURRED = "2025-08-01T08:00:00+07:00"
FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")

# Per entity: a source in its write scope (deploy/registry.toml), a key, its data.
RECORDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "citizen": (
        "province-01",
        "001190000101",
        {"full_name": "Nguyễn Thị Hạnh", "sex": "female", "phone": "0912345001",
         "email": "hanh.nguyen@example.vn",
         "permanent_address": {"province_code": "01", "line": "12 Hàng Bông"}},
    ),
    "organization": (
        "province-79",
        "0312345001",
        {"name": "Công ty TNHH Sao Việt", "status": "active",
         "address": {"province_code": "79", "line": "1 Lê Lợi"}},
    ),
    "document": (
        "province-01",
        "000.00.01.H26:GKS-2025-000101",
        {"owner_kind": "citizen", "owner_id": "001190000101", "title": "Giấy khai sinh",
         "issuer_code": "000.00.01.H26", "doc_type": "GKS"},
    ),
    "dossier": (
        "province-79",
        "000.00.01.H29-250801-0101",
        {"agency_code": "000.00.01.H29", "status": 1, "applicant_kind": "citizen",
         "applicant_id": "079190000101", "procedure_code": "1.000001"},
    ),
}  # fmt: skip
# A text field of each entity's data, and one of its identifiers.
TEXT_FIELD = {"citizen": "full_name", "organization": "name", "document": "title",
              "dossier": None}  # fmt: skip
ID_FIELD = {"citizen": "phone", "organization": None, "document": "owner_id",
            "dossier": "applicant_id"}  # fmt: skip


def event(entity: str, serial: int, /, **changes: Any) -> dict[str, Any]:
    """A valid event of `entity`, unique by `serial` (its key and version); `changes`
    replace envelope fields, `data` merges into the data (a value of None removes it)."""
    source, key, data = RECORDS[entity]
    key = _serial_key(entity, key, serial)
    raw: dict[str, Any] = {
        "schema_version": 1,
        "event_id": str(derive_event_id(source, entity, key, serial)),
        "source": source,
        "entity": entity,
        "key": key,
        "op": "upsert",
        "version": serial,
        "occurred_at": OCCURRED,
        "data": dict(data),
    }
    for name, value in changes.pop("data", {}).items():
        if value is None:
            raw["data"].pop(name, None)
        else:
            raw["data"][name] = value
    raw.update(changes)
    return raw


def _serial_key(entity: str, key: str, serial: int) -> str:
    return key[:-4] + f"{serial:04d}"


def line(label: str, raw: Any, expect: str, *, entity: str | None = None,
         key: str | bool | None = True, sign: str = "own", signer: str | None = None,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    """One corpus line; `key=True`: the event's own message key."""
    record = raw if isinstance(raw, dict) else {}
    topic = entity or record.get("entity") or "citizen"
    if key is True:
        entity_, key_, source_ = (str(record.get(f)) for f in ("entity", "key", "source"))
        key = message_key(entity_, key_, source_).decode()
    out: dict[str, Any] = {"label": label, "entity": topic, "key": key}
    if raw is None or isinstance(raw, str):
        out["value"] = raw
    elif isinstance(raw, bytes):
        import base64

        out["value_b64"] = base64.b64encode(raw).decode()
    else:
        out["value"] = json.dumps(raw, ensure_ascii=False)
    out |= {"sign": sign, "signer": signer or record.get("source") or "province-01"}
    return out | extra | {"expect": expect}


def _key(entity: str, key: Any, source: Any) -> str:
    return message_key(entity, str(key), str(source)).decode()


def corpus() -> list[dict[str, Any]]:
    lines = [*_valid(), *_global()]
    for entity in RECORDS:
        lines += list(_per_entity(entity))
    return lines


def _valid() -> Iterator[dict[str, Any]]:
    for entity in RECORDS:
        for serial in range(1, 13):
            yield line(f"valid {entity} {serial}", event(entity, serial), "applied")
        yield line(f"valid {entity} NFD text", _nfd(event(entity, 13)), "applied")


def _nfd(raw: dict[str, Any]) -> dict[str, Any]:
    import unicodedata

    field = TEXT_FIELD[raw["entity"]] or "agency_code"
    raw["data"][field] = unicodedata.normalize("NFD", str(raw["data"][field]))
    return raw


def _global() -> Iterator[dict[str, Any]]:
    yield line("no value", None, "empty_message", entity="citizen", key="citizen:x")
    yield line("empty bytes", "", "empty_message", entity="dossier", key="dossier:x")
    yield line("over 1 MiB", event("citizen", 90), "too_large", pad_to=1_100_000)
    yield line("over 1 MiB of a dossier", event("dossier", 90), "too_large", pad_to=1_048_600)


def _per_entity(entity: str) -> Iterator[dict[str, Any]]:
    n = 100  # serials of hostile events: apart from the valid ones
    source, _, _ = RECORDS[entity]

    def bad(label: str, expect: str, **changes: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        raw = event(entity, n, **changes)
        return line(f"{entity}: {label}", raw, expect, entity=entity, signer=source,
                    key=_key(entity, raw.get("key"), raw.get("source")))  # fmt: skip

    # -- bytes that are no JSON object (signed by the entity's source, like the rest)
    def raw(label: str, value: str | bytes, expect: str) -> dict[str, Any]:
        return line(f"{entity}: {label}", value, expect, entity=entity, signer=source)

    text = json.dumps(event(entity, 200), ensure_ascii=False)
    yield raw("not JSON", "this is not JSON " + entity, "invalid_json")
    yield raw("truncated", text[:-7], "invalid_json")
    yield raw("trailing garbage", text + " }", "invalid_json")
    yield raw("duplicate key", text[:-1] + ', "version": 1}', "invalid_json")
    yield raw("NaN", text.replace('"version": 200', '"version": NaN'), "invalid_json")
    yield raw("an array", f"[{text}]", "invalid_json")
    yield raw("a string", json.dumps(text), "invalid_json")
    # nested deeper than orjson writes (254), and than `nfc` recurses (with a lone surrogate
    # escape, which only the checking decoder reads)
    yield raw("nested 300 deep", text[:-1] + ', "x": ' + "[" * 300 + "]" * 300 + "}",
              "invalid_json")  # fmt: skip
    deep = "[" * 600 + '"\\ud800"' + "]" * 600
    yield raw("nested 600 deep, an escape", text[:-1] + f', "x": {deep}}}', "invalid_json")
    yield raw("a Latin-1 byte", text.encode().replace(b'"op"', b'"o\xffp"'), "not_utf8")
    yield raw("a lone surrogate as UTF-8", text.encode() + b"\xed\xa0\x80", "not_utf8")
    # Under another registered source's key: compaction would take it as that source's
    # latest event of the record, though it does not parse.
    yield line(f"{entity}: not JSON under another source's key", "not JSON " + entity,
               "bad_signature", entity=entity, signer=source,
               key=message_key(entity, RECORDS[entity][0], "province-48").decode())  # fmt: skip
    # -- the envelope
    for version in (2, "1", 1.0, True, None):
        yield bad(f"schema_version {version!r}", "unsupported_schema_version",
                  schema_version=version)  # fmt: skip
    for field in ("event_id", "source", "key", "op", "version", "occurred_at"):
        raw = event(entity, n + 1)
        n += 1
        del raw[field]
        yield line(f"{entity}: no {field}", raw, "missing_field", signer=source,
                   key=_key(entity, raw.get("key", "x"), raw.get("source", source)))  # fmt: skip
    yield bad("entity person", "unknown_entity", entity="person")
    yield bad("envelope field", "unknown_field", priority="high")
    yield bad("data field", "unknown_field", data={"ghi_chu": "x"})
    yield bad("data field named by an id", "unknown_field", data={"079185123456": "x"})
    if entity in ("citizen", "organization"):
        address = "permanent_address" if entity == "citizen" else "address"
        yield bad("address field", "unknown_field",
                  data={address: {"province_code": "01", "so_nha": "12"}})  # fmt: skip
    # -- the key
    _, key, _ = RECORDS[entity]
    for label, wrong in (("fullwidth digits", key.translate(FULLWIDTH)),
                         ("Arabic-Indic digits", key.translate(ARABIC_INDIC)),
                         ("a trailing newline", key + "\n"),
                         ("a zero-width space", key[:4] + "\u200b" + key[4:]),
                         ("too long", key + "0" * 70)):  # fmt: skip
        raw = event(entity, n + 1, key=wrong)
        n += 1
        yield line(f"{entity}: key with {label}", raw, "invalid_key")
    # -- fields
    yield bad("version 0", "invalid_field", version=0)
    yield bad("version above 2^53", "invalid_field", version=2**53 + 1)
    yield bad("version 2^63 - 1", "invalid_field", version=2**63 - 1)
    yield bad("version a string", "invalid_field", version="7")
    yield bad("naive occurred_at", "invalid_field", occurred_at="2025-08-01T08:00:00")
    yield bad("occurred_at not a time", "invalid_field", occurred_at="hôm qua")
    # Instants no store can hold (years 0 and 10000 in UTC): the contract's, not the store's.
    yield bad("occurred_at year 0 in UTC", "invalid_field", occurred_at="0001-01-01T00:00:00+14:00")
    yield bad("occurred_at year 10000 in UTC", "invalid_field",
              occurred_at="9999-12-31T23:59:59-14:00")  # fmt: skip
    yield bad("event_id not a UUID", "invalid_field", event_id="not-a-uuid")
    yield bad("source in capitals", "invalid_field", source="Province-01")
    yield bad("op rename", "invalid_field", op="rename")
    text_field = TEXT_FIELD[entity]
    if text_field:
        for label, value in (("a zero-width space", "Nguyễn\u200bAn"),
                             ("a bidi override", "Lê \u202egnp.exe"),
                             ("a byte-order mark", "\ufeffCông ty"),
                             ("a NUL", "Trần\x00Bình"), ("an ESC", "\x1b[2JXoá"),
                             ("a C1 control", "Phạm\x85An"),
                             ("a line separator", "Đỗ\u2028Minh"),
                             ("too long", "Ngô " * 300)):  # fmt: skip
            yield bad(f"{text_field} with {label}", "invalid_field", data={text_field: value})
    id_field = ID_FIELD[entity]
    if id_field:
        _, _, data = RECORDS[entity]
        good = str(data[id_field])
        for label, value in (("fullwidth digits", good.translate(FULLWIDTH)),
                             ("a trailing newline", good + "\n"),
                             ("an ESC", "\x1b" + good[1:]),
                             ("Arabic-Indic digits", good.translate(ARABIC_INDIC))):  # fmt: skip
            yield bad(f"{id_field} with {label}", "invalid_field", data={id_field: value})
    if entity == "citizen":
        yield bad("email with a zero-width space", "invalid_field",
                  data={"email": "an\u200b@example.vn"})  # fmt: skip
        yield bad("sex other", "invalid_field", data={"sex": "x"})
        yield bad("date_of_birth 31 February", "invalid_field",
                  data={"date_of_birth": "1990-02-31"})  # fmt: skip
        yield bad("province code in Bengali digits", "invalid_field",
                  data={"permanent_address": {"province_code": "০১"}})  # fmt: skip
    if entity == "dossier":
        yield bad("status 11", "invalid_field", data={"status": 11})
        yield bad("status superscript two", "invalid_field", data={"status": "²"})
        yield bad("agency code in fullwidth", "invalid_field",
                  data={"agency_code": "000.00.01.H２9"})  # fmt: skip
    if entity == "document":
        yield bad("owner_id with a NUL, no kind", "invalid_field",
                  data={"owner_kind": None, "owner_id": "0011900\x00101"})  # fmt: skip
        yield bad("file_sha256 upper case", "invalid_field", data={"file_sha256": "A" * 64})
    if entity == "organization":
        yield bad("status closed", "invalid_field", data={"status": "closed"})
    # -- op and data
    yield bad("delete with data", "op_data_mismatch", op="delete")
    raw = event(entity, n + 1)
    n += 1
    del raw["data"]
    yield line(f"{entity}: upsert without data", raw, "op_data_mismatch")
    # -- the message's place
    yield line(f"{entity}: key of another record", event(entity, n + 1), "key_mismatch",
               key=message_key(entity, RECORDS[entity][1], source).decode())  # fmt: skip
    # (A message without a key never gets in: compacted topics refuse it.)
    yield line(f"{entity}: key 'anything'", event(entity, n + 3), "key_mismatch",
               key="anything")  # fmt: skip
    old_key = event(entity, n + 5)
    yield line(f"{entity}: key without its source", old_key, "key_mismatch",
               key=f"{entity}:{old_key['key']}")  # fmt: skip
    other_source = event(entity, n + 6)
    # Another registered source's compaction key, signed with the event's own source's key:
    # forged (refused before the value is read, whether it parses or not).
    yield line(f"{entity}: key naming another source", other_source, "bad_signature",
               key=message_key(entity, other_source["key"], "province-48").decode())  # fmt: skip
    other = "dossier" if entity != "dossier" else "citizen"
    yield line(f"{entity}: on the {other} topic", event(entity, n + 4), "key_mismatch",
               entity=other)  # fmt: skip
    n += 6
    yield bad("occurred_at in year 9999", "future_timestamp",
              occurred_at="9999-12-31T23:59:59+07:00")  # fmt: skip
    yield bad("occurred_at in 2999", "future_timestamp", occurred_at="2999-01-01T00:00:00Z")
    # -- signatures
    for sign, expect in (("none", "unsigned"), ("tamper", "bad_signature"),
                         ("unknown_kid", "bad_signature"), ("garbage", "bad_signature"),
                         ("double", "bad_signature")):  # fmt: skip
        yield line(f"{entity}: signature {sign}", event(entity, n + 1), expect, sign=sign)
        n += 1
    others = [s for s in ("province-79", "province-01") if s != source]
    yield line(f"{entity}: signed by {others[0]}'s key", event(entity, n + 1),
               "bad_signature", signer=others[0])  # fmt: skip
    n += 1
    # -- write scope
    yield from _out_of_scope(entity, n)


def _out_of_scope(entity: str, n: int) -> Iterator[dict[str, Any]]:
    def as_source(label: str, source: str, **changes: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        raw = event(entity, n, source=source, **changes)
        raw["event_id"] = str(derive_event_id(source, entity, raw["key"], n))
        return line(f"{entity}: {label}", raw, "out_of_scope", signer=source)

    if entity == "citizen":
        yield as_source("by the business registry", "national-business-registry")
        yield as_source("by the one-stop feed", "province-48-motcua")
    elif entity == "organization":
        yield as_source("by a ministry", "ministry-btp")
        yield as_source("by the population database", "national-population")
    elif entity == "document":
        yield as_source("issued by another agency", "province-79")
        yield as_source("another agency's, under the writer's own issuer_code", "province-79",
                        data={"issuer_code": "000.00.01.H29"})  # fmt: skip
        yield as_source("a bare id (the registry wants its issuer in it)", "province-01",
                        key="GKS-2025-000999")  # fmt: skip
        yield as_source("by a ministry, issued by a province", "ministry-btp")
    else:  # dossier
        yield as_source("of another province", "province-01")
        yield as_source("agency_code set to the writer's", "province-01",
                        data={"agency_code": "000.00.01.H26"})  # fmt: skip
        delete = {"op": "delete"}
        n += 1
        raw = event(entity, n, source="province-48-motcua", key="000.00.02.H17-250801-0999",
                    data={"agency_code": "000.00.02.H17"}, **delete)  # fmt: skip
        del raw["data"]
        raw["event_id"] = str(derive_event_id("province-48-motcua", entity, raw["key"], n))
        yield line("dossier: a delete by a source that may not delete", raw, "out_of_scope",
                   signer="province-48-motcua")  # fmt: skip


def write(path: Path = CORPUS) -> int:
    lines = corpus()
    path.parent.mkdir(parents=True, exist_ok=True)
    # ASCII only (escapes): line separators and C1 controls in the values stay in their line.
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), "utf-8")
    return len(lines)


if __name__ == "__main__":
    print(f"{write()} lines in {CORPUS}")
