"""Turning raw Kafka message bytes into a valid event, or a dead-letter reason.

Reasons carry a stable code and a message that names the rule and the field's path in
the contract, never a value nor a name that came from the data (an unknown field's name may
be a personal id): dead-letter reasons end up in headers, logs and dashboards.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
import unicodedata
import uuid
from dataclasses import field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from schemas.dead_letter import Reason
from schemas.errors import RecordError
from schemas.events import (
    CHANGE_EVENT,
    ENTITIES,
    MAX_MARK_RUN,
    WRITTEN_TEXT,
    ChangeEvent,
    CitizenEvent,
    DocumentEvent,
    DossierEvent,
    OrganizationEvent,
    nfc,
    unnormalised,
)
from schemas.identifiers import (
    OLD_PROVINCE_CODES,
    current_province_codes,
    current_wards,
    personal_id_warnings,
    tax_code_warnings,
)
from schemas.values import value_class

MAX_EVENT_BYTES = 1_048_576
# Nesting of one JSON value: the contract's data is a few levels deep, and a value nested
# hundreds deep exhausts a recursive encoder's or normaliser's stack (orjson writes at most
# 254 levels; `nfc` and `json.dumps` recurse).
MAX_DEPTH = 32
# pydantic-core's validator of the contract itself: `TypeAdapter.validate_json`'s Python
# wrapper around it cost 0.7 µs of its 5.3 per event.
_VALIDATE_JSON = CHANGE_EVENT.validator.validate_json
EVENT_ID_NAMESPACE = uuid.UUID("8d0f6a52-0e5e-5b8c-9a53-06d1a0c0de06")


class InvalidEvent(RecordError):
    """An event that breaks the contract: it goes to the dead-letter topic."""


@value_class
class ValidEvent:
    event: ChangeEvent
    warnings: list[str] = field(default_factory=list)
    # The payload as decoded from the message when it is exactly `event.data_dict()`
    # (validated as sent, nothing changed by validation): spares a dump per event.
    data: dict[str, Any] | None = None
    as_sent: bool = False  # the message's bytes were validated as they are

    def data_dict(self) -> dict[str, Any] | None:
        """`event.data_dict()`, without dumping the model when the decoded payload is it.
        Callers must not modify it."""
        return self.data if self.data is not None else self.event.data_dict()


def derive_event_id(source: str, entity: str, key: str, version: int) -> uuid.UUID:
    """The id our producers give a change: the same change sent again keeps its id."""
    return uuid.UUID(derive_event_id_text(source, entity, key, version))


def derive_event_id_text(source: str, entity: str, key: str, version: int) -> str:
    """The event id's text: the UUIDv5 of the namespace and `source␟entity␟key␟version`,
    computed as `uuid.uuid5` does (SHA-1, version and variant bits set) without building a
    `UUID`: 2.0 µs against 5.1, for every event a producer sends. A key with a lone
    surrogate (whose event the contract refuses, `invalid_field`) gets an id too."""
    name = f"{source}\x1f{entity}\x1f{key}\x1f{version}".encode("utf-8", "surrogatepass")
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes


def parse_event(raw: bytes | None, *, warn: bool = True) -> ValidEvent:
    """Validate one message value; raise InvalidEvent with a stable reason code. `warn`:
    the soft checks' warnings are computed (a producer, which does not report them, skips
    them: 3 % of its publishing)."""
    if not raw:  # no value (null) or zero bytes
        raise InvalidEvent(Reason.EMPTY_MESSAGE, "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(
            Reason.TOO_LARGE, f"message has {len(raw)} bytes, limit {MAX_EVENT_BYTES}"
        )
    obj = _decode_json(raw)
    if not isinstance(obj, dict):
        raise InvalidEvent(Reason.INVALID_JSON, "message is not a JSON object")
    version = obj.get("schema_version")
    if type(version) is not int or version != 1:  # JSON true and 1.0 equal 1 in Python
        if too_deep(obj):  # as below: compact JSON skipped the decoder's depth check
            raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP)
        raise InvalidEvent(Reason.UNSUPPORTED_SCHEMA_VERSION, "schema_version must be 1")
    if b"\\u" not in raw and unicodedata.is_normalized("NFC", raw.decode("utf-8")):
        normalised: str | bytes = raw  # already NFC, no escapes: validate the bytes as sent
    else:
        composed = nfc(obj)
        normalised = json.dumps(composed, ensure_ascii=False)
    try:
        event: ChangeEvent = _VALIDATE_JSON(normalised, strict=True)
    except ValidationError as error:
        # Compact JSON skips the decoder's depth check (`_decode_json`), and no contract
        # field takes nested values: a message nested too deep is refused here, for the
        # same reason whatever its whitespace (at no cost to a valid event).
        if too_deep(obj):
            raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP) from None
        raise _reason(error) from None
    if normalised is not raw:
        left = unnormalised(composed.get("data"), "data")
        if left is not None:  # `nfc_text` left it: a run of marks too long to reorder
            raise InvalidEvent(Reason.INVALID_FIELD, f"{left}: {LONG_MARK_RUN}")
        _refuse_ascii_by_normalisation(obj)
    data = obj.get("data")
    if normalised is raw and type(data) is dict and DOSSIER_TIMES.isdisjoint(data):
        # Validated as sent, and strict validation changed no value: strings, integers and
        # dates (YYYY-MM-DD only) come out as they went in. Timestamps may not (`.000`,
        # `+00:00` dump otherwise): a payload with one is dumped when needed.
        return ValidEvent(event, soft_warnings(event) if warn else [], data, as_sent=True)
    return ValidEvent(event, soft_warnings(event) if warn else [], as_sent=normalised is raw)


def _refuse_ascii_by_normalisation(obj: dict[str, Any]) -> None:
    """A value valid only once NFC made it ASCII: identifiers and codes are ASCII as sent,
    and NFC turns a few characters into ASCII ones (the Kelvin sign into "K", a Greek
    question mark into ";"), which the contract's patterns would then take. The event's
    strings are checked after validation, so every field named here is the contract's.
    Text a person writes (`WRITTEN_TEXT`: a name, a title) is not an identifier: NFC is
    its normal form, whatever it turns into (a Greek question mark into ";")."""
    key = obj.get("key")
    if isinstance(key, str) and _ascii_only_by_nfc(key):
        raise InvalidEvent(Reason.INVALID_KEY, f"key: {ASCII_AS_SENT}")
    data = obj.get("data")
    if isinstance(data, dict):
        written = WRITTEN_TEXT.get(str(obj.get("entity")), frozenset())
        for name, value in data.items():
            if isinstance(value, str) and _ascii_only_by_nfc(value):
                field = unicodedata.normalize("NFC", name)
                if field not in written:
                    raise InvalidEvent(Reason.INVALID_FIELD, f"data.{field}: {ASCII_AS_SENT}")


LONG_MARK_RUN = (
    f"not in NFC: a run of more than {MAX_MARK_RUN} combining marks (no script writes one)"
)
ASCII_AS_SENT = "a value that is ASCII only once normalised to NFC (identifiers are ASCII)"


def _ascii_only_by_nfc(text: str) -> bool:
    return not text.isascii() and unicodedata.normalize("NFC", text).isascii()


# The payload fields whose JSON form validation may change (dossiers' timestamps).
DOSSIER_TIMES = frozenset({"received_at", "due_at", "finished_at"})


def _decode_json(raw: bytes) -> Any:
    """The message's JSON value; InvalidEvent for anything but strict JSON (duplicate keys,
    NaN and the infinities included)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:
        # Compact JSON that orjson writes back byte for byte (what our producers send) has
        # no duplicate key (orjson keeps the last: it would write fewer bytes) and nothing
        # orjson reads otherwise than the checking decoder below, at a fifth of its cost.
        try:
            if orjson.dumps(value) == raw:
                return value
        except TypeError:  # orjson reads 1,024 levels and writes 254
            raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent(Reason.NOT_UTF8, "message is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as error:
        raise InvalidEvent(
            Reason.INVALID_JSON, f"message is not JSON ({type(error).__name__})"
        ) from None
    if too_deep(value):  # before `nfc` and `json.dumps`, which recurse
        raise InvalidEvent(Reason.INVALID_JSON, _TOO_DEEP)
    return value


_TOO_DEEP = f"message nests JSON deeper than {MAX_DEPTH} levels"


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests dicts and lists more than `limit` deep (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise InvalidEvent(Reason.INVALID_JSON, "duplicate key in a JSON object")
        result[name] = value
    return result


def _no_nan(constant: str) -> Any:
    raise InvalidEvent(Reason.INVALID_JSON, "non-standard JSON constant (NaN or Infinity)")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_nan)


UNKNOWN_FIELD = "<unknown field>"  # stands for a field name that came from the data
EVENT_MODELS: dict[str, type[BaseModel]] = {
    "citizen": CitizenEvent,
    "organization": OrganizationEvent,
    "document": DocumentEvent,
    "dossier": DossierEvent,
}


def _reason(error: ValidationError) -> InvalidEvent:
    """The first validation error as a reason: the field's path in the contract and the
    rule, never the value nor a name from the data."""
    first = error.errors(include_input=False, include_url=False)[0]
    kind = first["type"]
    if kind == "union_tag_not_found":
        return InvalidEvent(Reason.MISSING_FIELD, "entity: Field required")
    if kind == "union_tag_invalid":
        return InvalidEvent(Reason.UNKNOWN_ENTITY, "entity: not one of " + ", ".join(ENTITIES))
    location = contract_path(first["loc"])
    message = rule_message(first)
    if kind == "extra_forbidden":
        code = Reason.UNKNOWN_FIELD
    elif kind == "missing":
        code = Reason.MISSING_FIELD
    elif location == "key":
        code = Reason.INVALID_KEY
    elif "carry data" in message or "carries no data" in message:
        code = Reason.OP_DATA_MISMATCH
    else:
        code = Reason.INVALID_FIELD
    return InvalidEvent(code, f"{location}: {message}")


def contract_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as a path of the contract's own field names.

    `loc` starts with the entity (the union's tag, already checked), then names fields;
    a part that is not a field of the contract at that point came from the data (an
    unknown field's name, a key inside a value that should not be an object) and becomes
    `<unknown field>`, as does everything below it; a list index becomes `*`."""
    model = EVENT_MODELS.get(str(loc[0])) if loc else None
    parts: list[str] = []
    for part in loc[1:]:
        fields = model.model_fields if model is not None else {}
        if isinstance(part, str) and part in fields:
            parts.append(part)
            model = _contract_model(fields[part].annotation)
        else:
            parts.append("*" if isinstance(part, int) else UNKNOWN_FIELD)
            model = None
    return ".".join(parts) or "event"


def _contract_model(annotation: Any) -> type[BaseModel] | None:
    """The contract model a field holds (through `X | None` and `Annotated`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = _contract_model(argument)
        if model is not None:
            return model
    return None


# Context entries that come from the contract (its patterns, bounds, allowed values),
# never from the input.
_CONTRACT_CONTEXT = frozenset(
    {
        "pattern", "min_length", "max_length", "expected_plural", "expected", "class_name",
        "gt", "ge", "lt", "le", "multiple_of", "discriminator", "field_type",
    }
)  # fmt: skip


def rule_message(error: ErrorDetails) -> str:
    """The rule an error broke, in words that carry nothing of the input.

    Our own validators (`value_error`) raise fixed texts (a test checks it). Pydantic's
    message is kept when every value it interpolates comes from the contract; otherwise
    (a parsing detail such as "found `n` at 1" quotes the input) the rule alone."""
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "value_error" or set(context) <= _CONTRACT_CONTEXT:
        return error["msg"]
    return _RULES.get(kind, f"breaks rule {kind}")


# The rule alone, for the kinds whose message interpolates something of the input.
_RULES = {
    "uuid_parsing": "Input should be a valid UUID",
    "date_parsing": "Input should be a valid date in the format YYYY-MM-DD",
    "date_from_datetime_parsing": "Input should be a valid date or datetime",
    "datetime_parsing": "Input should be a valid datetime",
    "datetime_from_date_parsing": "Input should be a valid datetime or date",
    "datetime_object_invalid": "Input should be a valid datetime",
    "timezone_offset": "Input should have the required timezone offset",
    "time_parsing": "Input should be in a valid time format",
    "json_invalid": "Invalid JSON",
    "union_tag_invalid": "Input tag does not match any of the expected tags",
    "too_short": "Input has too few items",
    "too_long": "Input has too many items",
}


# The identifiers of other records an event names: (field, the field that says its kind,
# or None where it is always a person's).
_RELATED_IDS = (
    ("legal_representative_id", None),
    ("owner_id", "owner_kind"),
    ("applicant_id", "applicant_kind"),
)
# Dates and times that come in an order: (earlier, later).
_IN_ORDER = (
    ("issued_on", "valid_until"),
    ("received_at", "due_at"),
    ("received_at", "finished_at"),
)


def _related_id_warnings(fields: dict[str, Any]) -> list[str]:
    """A legal representative's, a document owner's or a dossier applicant's id that fails
    the checks its own record's key would fail (personal id structure, tax code check
    digit): a typo there links the record to nobody, or to someone else."""
    for name, kind_field in _RELATED_IDS:
        value = fields.get(name)
        if value is None:
            continue
        kind = "citizen" if kind_field is None else fields.get(kind_field)
        if kind == "citizen" and len(value) == 12 and value.isdigit():
            failed = bool(personal_id_warnings(value, None, None))
        elif kind == "organization":
            failed = bool(tax_code_warnings(value))
        else:
            continue  # a passport, or a kind not given
        if failed:
            return ["related_id_structure"]
    return []


def _date_order_warnings(fields: dict[str, Any]) -> list[str]:
    """A document valid until before it was issued, a dossier due or finished before it
    was received: a date typed wrong at the source."""
    for earlier, later in _IN_ORDER:
        first, then = fields.get(earlier), fields.get(later)
        if first is not None and then is not None and then < first:
            return ["dates_out_of_order"]
    return []


# Vietnamese text that a system decoded with the wrong table, and sends as it reads it:
# - UTF-8 read as Windows-1252 ("Nguyễn" as "Nguyá»…n", "Đức" as "Äá»©c", "CÔNG" as
#   "CÃ”NG"): a Vietnamese letter of two bytes (lead 0xC3-0xC6: Ã Ä Å Æ) shows as its
#   lead and one of the continuations those letters have (`_LETTER_SECONDS`); one of
#   three bytes (0xE1 0xBA or 0xBB: "áº", "á»") as those and any continuation (0x80-0xBF
#   as Windows-1252 shows them), as a curly quote or a dash does ("â€"). A no-break
#   space after the lead ("Hà" as "HÃ\xa0") counts where no letter follows, or a small
#   one ("Hoàng" as "HoÃ\xa0ng", "Ơi" as "Æ\xa0i"), not before a capital ("NGÃ BA"
#   with a no-break space is a name; `_LEAD_SPACE`). Latin-1's reading gives C1
#   controls, which the contract refuses.
# - TCVN3 (ABC), the legacy Vietnamese 8-bit fonts, read as Windows-1252 ("Văn" as "V¨n",
#   "Hoàng" as "Hoµng"): one of U+00A1-U+00BF inside a word (but the middle dot, a
#   separator: "Trà·Vinh").
# VNI's readings are letters ("Nguyeãn") and pass unseen. Legitimate text hits these only
# with a symbol typed inside a word ("ABC®XYZ") or a capital Ã right before a curly quote
# ("“NGÃ”", which is also how "NGÔ" misreads): a warning only.
_CONTINUATION = (
    "[\u00a0-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
    "\u2013\u2014\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a"
    "\u20ac\u2122]"
)
# The second bytes of À-Ý's Vietnamese letters, ă Ă đ Đ ĩ Ĩ ũ Ũ ơ Ơ ư Ư, as Windows-1252
# shows them (0x80 0x82 0x83 0x88 0x89 0x8A 0x8C 0x91-0x95 0x99 0x9A 0xA1-0xA3 0xA8-0xAA
# 0xAC 0xAD 0xAF 0xB0 0xB2-0xB5 0xB9 0xBA 0xBD; its five unassigned bytes read as C1).
_LETTER_SECONDS = (
    "[\u20ac\u201a\u0192\u02c6\u2030\u0160\u0152\u2018\u2019\u201c\u201d\u2022"
    "\u2122\u0161\u00a1-\u00a3\u00a8-\u00aa\u00ac\u00ad\u00af\u00b0\u00b2-\u00b5"
    "\u00b9\u00ba\u00bd]"
)
_LETTER = r"[^\W\d_]"
_MISDECODED = re.compile(
    f"[\u00c3-\u00c6](?:{_LETTER_SECONDS}|\u00a0(?!{_LETTER}))"
    f"|\u00e1[\u00ba\u00bb]{_CONTINUATION}|\u00e2\u20ac{_CONTINUATION}"
    f"|{_LETTER}[\u00a1-\u00b6\u00b8-\u00bf]+{_LETTER}"
)


# Every reading above holds one of these (a continuation byte as Windows-1252 shows it, or
# a TCVN3 symbol); Vietnamese text almost never does: one scan for it, per text, keeps the
# check off the worker's time (the pattern above, tried at every place, cost 6 µs an event).
_SUSPECT = re.compile(_CONTINUATION)


# A lead and a no-break space before a letter: a misreading where the letter is a small
# one (`re` has no class of small letters beyond ASCII; `str.islower` judges).
_LEAD_SPACE = re.compile(f"[\u00c3-\u00c6]\u00a0({_LETTER})")


def misdecoded(text: str) -> bool:
    """Whether `text` looks like Vietnamese decoded with the wrong table (`_MISDECODED`,
    `_LEAD_SPACE`)."""
    if text.isascii() or _SUSPECT.search(text) is None:
        return False
    if _MISDECODED.search(text) is not None:
        return True
    return any(match[1].islower() for match in _LEAD_SPACE.finditer(text))


# The texts people type in Vietnamese: names, titles, an address's line (codes, phones and
# e-mail addresses are ASCII by the contract, or nearly).
_TYPED = ("full_name", "name", "english_name", "legal_form", "title")


def _encoding_warnings(fields: dict[str, Any], address: Any) -> list[str]:
    """A name, a title or an address's line that looks misdecoded (`misdecoded`)."""
    for name in _TYPED:
        value = fields.get(name)
        if value is not None and misdecoded(value):
            return ["text_misdecoded"]
    line = None if address is None else address.line
    return ["text_misdecoded"] if line is not None and misdecoded(line) else []


def soft_warnings(event: ChangeEvent) -> list[str]:
    """Checks that only warn: unverified identifier structure, retired province codes."""
    warnings: list[str] = []
    fields: dict[str, Any] = {} if event.data is None else vars(event.data)
    if event.entity == "citizen":
        dob = fields.get("date_of_birth")
        year = fields.get("year_of_birth")
        warnings += personal_id_warnings(event.key, dob.year if dob else year, fields.get("sex"))
        # after the event's day wherever it was sent (a local day runs at most a day ahead
        # of UTC's): a replay's verdict too; dates subtracted, which cannot overflow
        if dob is not None and (dob - event.occurred_at.date()).days > 1:
            warnings.append("date_of_birth_after_event")
        elif (
            dob is None
            and year is not None
            and year
            > event.occurred_at.year
            + (event.occurred_at.month == 12 and event.occurred_at.day == 31)
        ):
            warnings.append("date_of_birth_after_event")  # a year after the event's
    elif event.entity == "organization":
        warnings += tax_code_warnings(event.key)
    warnings += _related_id_warnings(fields) + _date_order_warnings(fields)
    address = fields.get("permanent_address") or fields.get("address")
    warnings += _encoding_warnings(fields, address)
    code = None if address is None else vars(address).get("province_code")
    if code is not None and code not in current_province_codes():
        # one of the 63 before 1 July 2025 (old data), or none ever
        old = code in OLD_PROVINCE_CODES
        warnings.append("province_code_not_current" if old else "province_code_unknown")
    elif code is not None:
        ward = vars(address).get("ward_code")
        if ward is not None and ward not in current_wards(code):
            warnings.append("ward_code_not_of_province")  # an old ward's, or none of its
    return warnings
