"""Declarative column-to-field mapping: nested paths, value maps, date formats, time zone.

A value that a value map does not list, or text that does not match its date format, passes
through unchanged: contract validation then rejects the record with a reason that names the
field (never the value), and it goes to the dead letters instead of being silently altered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Self
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.events import FIELD_PATHS, nfc_text
from schemas.identifiers import PHONE

# Java/.NET-style patterns as province systems write them, to strptime directives.
_TOKENS = {"yyyy": "%Y", "yy": "%y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}
_TOKEN = re.compile("|".join(sorted(_TOKENS, key=len, reverse=True)))


def zone_name(name: str) -> str:
    """`name`, refused (ValueError) unless it names a time zone of the IANA database: a
    misspelt one failed only once the adapter started, with a traceback or, in the `sql`
    adapter, a failed run retried at every poll for ever."""
    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError("not a time zone of the IANA database (e.g. Asia/Ho_Chi_Minh)") from None
    return name


TimeZoneName = Annotated[str, AfterValidator(zone_name)]


class FieldMapping(BaseModel):
    """How source columns become the contract's `data` fields."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, str] = Field(description="contract field path ('a.b' nested) -> column")
    value_maps: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="contract field path -> {source value as text: contract value}",
    )
    formats: dict[str, str] = Field(
        default_factory=dict,
        description="contract field path -> date format of source text, e.g. yyyyMMddHHmmss",
    )
    timezone: TimeZoneName = "Asia/Ho_Chi_Minh"

    @model_validator(mode="after")
    def _contract_fields(self) -> Self:
        """Every path `fields`, `value_maps` and `formats` name is a field of the entity's
        data: a misspelt one (`fullname`) made every record a dead letter, named only as
        `<unknown field>`, while the cursor (or the file's checksum) moved past them."""
        entity = getattr(self, "entity", None)
        known = FIELD_PATHS.get(entity) if isinstance(entity, str) else None
        if known is None:
            return self
        for option in ("fields", "value_maps", "formats"):
            odd = sorted(set(getattr(self, option)) - known)
            if odd:
                raise ValueError(
                    f"{option}: {', '.join(odd)}: not a field of {entity} (its fields: "
                    f"{', '.join(sorted(known))})"
                )
        return self

    @field_validator("value_maps")
    @classmethod
    def _folded_keys(cls, maps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Keys as `map_key` reads a source's text: NFC, case folded. A source that stores
        `Nữ` decomposed (NFD) or as `NỮ` missed the map's `Nữ`: the raw text went on, was
        not one of the contract's values, and every such record was a dead letter."""
        folded: dict[str, dict[str, Any]] = {}
        for path, table in maps.items():
            folded[path] = {}
            for key, value in table.items():
                text = map_key(key)
                if folded[path].get(text, value) != value:
                    raise ValueError(
                        f"{path}: {key!r} and another key read alike (NFC, any case) but map "
                        "to different values"
                    )
                folded[path][text] = value
        return folded

    @field_validator("formats")
    @classmethod
    def _four_digit_years(cls, formats: dict[str, str]) -> dict[str, str]:
        """A two-digit year is refused: `05/03/55` read as 2055 (Python's century rule), a
        birth date in the future, which the contract took. No rule guesses right for every
        field (a birth date is past, a dossier's due date may be ahead)."""
        for path, pattern in formats.items():
            four_digit_year(path, pattern)
        return formats


def map_key(text: str) -> str:
    """A source's text as a value map's key: trimmed, NFC (`nfc_text`: a long text, which
    no map names, as it is), case folded."""
    return nfc_text(text.strip()).casefold()


def four_digit_year(name: str, pattern: str) -> str:
    """`pattern`, refused (ValueError naming `name`) when its year has two digits."""
    if "yy" in _TOKEN.findall(pattern):
        raise ValueError(
            f"{name}: {pattern!r} has a two-digit year (yy), which no rule reads right for "
            "every date: the source must give four digits (yyyy)"
        )
    return pattern


# The order in which a date text's fields must come for the text to sort in time order.
_SORTED = ["yyyy", "MM", "dd", "HH", "mm", "ss"]


def sorts_in_time_order(pattern: str) -> bool:
    """Whether fixed-width text in `pattern` sorts as the times it holds: the fields from
    the year down, none missing between (`yyyyMMddHHmmss`, `yyyy-MM-dd HH:mm:ss`), never
    `dd/MM/yyyy` (1 March before 28 February) nor a two-digit year."""
    tokens = _TOKEN.findall(pattern)
    return bool(tokens) and tokens == _SORTED[: len(tokens)]


def strptime_pattern(pattern: str) -> str:
    """'yyyyMMddHHmmss' -> '%Y%m%d%H%M%S'."""
    return _TOKEN.sub(lambda m: _TOKENS[m.group(0)], pattern)


def parse_local(text: str, pattern: str, zone: ZoneInfo) -> datetime | date | None:
    """Text in a source date format as an aware datetime (or a date when it has no time)."""
    try:
        parsed = datetime.strptime(text.strip(), strptime_pattern(pattern))
    except ValueError:
        return None
    if "HH" not in pattern:
        return parsed.date()
    return parsed.replace(tzinfo=zone)


def json_value(value: Any, zone: ZoneInfo) -> Any:
    """A driver value as JSON: naive datetimes are local time of the source."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=zone)
        return aware.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def convert(path: str, value: Any, mapping: FieldMapping, zone: ZoneInfo) -> Any:
    """One source value as the contract value of field `path`."""
    if value is None:
        return None
    blank = isinstance(value, str) and not value.strip()
    table = mapping.value_maps.get(path)
    if table is not None:
        return table.get(map_key(str(value)), None if blank else value)
    if blank:
        return None
    pattern = mapping.formats.get(path)
    if pattern is not None and isinstance(value, str | int):
        parsed = parse_local(str(value), pattern, zone)
        return json_value(parsed, zone) if parsed is not None else value
    leaf = path.rpartition(".")[2]
    if leaf in CONTRACT_FORMS and isinstance(value, str):
        return CONTRACT_FORMS[leaf](value)
    return json_value(value, zone)


_SEPARATORS = re.compile(r"[ .()\-]")
_BRANCH_TAX_CODE = re.compile(r"[0-9]{13}")


def _phone(text: str) -> str:
    """`091 234 5678`, `0912.345.678`, `(091) 234-5678`: the contract's form, when taking
    the separators out gives it; else as it is (refused by the contract)."""
    bare = _SEPARATORS.sub("", text)
    return bare if PHONE.fullmatch(bare) else text


def _owner_id(text: str) -> str:
    """A branch's 13-digit tax code written without its hyphen (`0100109106001`, as many
    databases keep it): the contract's `0100109106-001`; else as it is."""
    bare = text.strip()
    return f"{bare[:10]}-{bare[10:]}" if _BRANCH_TAX_CODE.fullmatch(bare) else text


_SPACES = re.compile(r"\s+")


def _name(text: str) -> str:
    """Text with its spaces as one writes it: trimmed, each run of spaces (a no-break
    space, a tab, a line break) one space. `Nguyễn  Văn An ` and `Nguyễn Văn An` from two
    sources were a conflict over one spelling, and an address or a title typed on two lines
    (a text area, Excel's Alt+Enter) was refused for its line break."""
    return _SPACES.sub(" ", text).strip()


def _hex(text: str) -> str:
    """A digest as PowerShell's `Get-FileHash` writes it (upper case): the contract's."""
    return text.strip().lower()


# Values written in a form the contract refuses, or in one of many spellings of one value,
# which only separators or spaces keep from the contract's: by the field's name, whatever
# its path. Nothing else is altered.
def _year(text: str) -> int | str:
    """A year read from a text column or a CSV cell (`1945`, ` 1945 `): the contract's
    integer; else as it is (refused by the contract)."""
    bare = text.strip()
    return int(bare) if len(bare) == 4 and bare.isascii() and bare.isdigit() else text


CONTRACT_FORMS: dict[str, Callable[[str], str | int]] = {
    "phone": _phone,
    "year_of_birth": _year,
    "owner_id": _owner_id,
    "applicant_id": _owner_id,
    "full_name": _name,
    "name": _name,
    "english_name": _name,
    "legal_form": _name,
    "line": _name,
    "title": _name,
    "file_sha256": _hex,
}


# A field as `map_fields` walks it: path, column, parent and leaf names, and whether it has
# no value map nor format.
FieldStep = tuple[str, str, tuple[str, ...], str, bool]


def field_plan(mapping: FieldMapping) -> tuple[FieldStep, ...]:
    """The steps of `map_fields` for a mapping, worked out once by an adapter that maps
    many rows rather than for every row."""
    steps = []
    for path, column in mapping.fields.items():
        *parents, leaf = path.split(".")
        plain = (
            path not in mapping.value_maps
            and path not in mapping.formats
            and leaf not in CONTRACT_FORMS
        )
        steps.append((path, column, tuple(parents), leaf, plain))
    return tuple(steps)


def map_fields(
    values: Mapping[str, Any],
    mapping: FieldMapping,
    zone: ZoneInfo,
    plan: tuple[FieldStep, ...] | None = None,
) -> dict[str, Any]:
    """The `data` of an upsert from one source row (`plan`: `field_plan(mapping)`)."""
    data: dict[str, Any] = {}
    for path, column, parents, leaf, plain in plan or field_plan(mapping):
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        value = values.get(column)
        if plain and (value is None or type(value) in _JSON_SCALARS):
            # what `convert` would return, without its lookups
            target[leaf] = None if type(value) is str and not value.strip() else value
        else:
            target[leaf] = convert(path, value, mapping, zone)
    return data


# Values a driver gives that are already JSON, as `json_value` would return them.
_JSON_SCALARS = frozenset({str, int, float, bool})


_DELETED = frozenset({"1", "true", "t", "yes", "y", "x"})
_LIVE = frozenset({"0", "false", "f", "no", "n", ""})


def soft_deleted(value: Any) -> bool:
    """A soft-delete column's value as a verdict. Live: NULL, false, zero, and the texts
    `false`, `f`, `no`, `n` and empty. Deleted: true, any other number (also written as
    text: `2`, `-1`, `1.0`), a time (a `deleted_at`, also as ISO text or digits such as
    `20240115100000`), and the texts `true`, `t`, `yes`, `y`, `x`. Texts in any case, spaces
    around ignored; bytes of printable ASCII read as text (a CHAR BINARY `N`), other bytes
    as bits (BIT(1)). Any other value raises ValueError: a flag nobody can read must never
    erase a live record, so its row is rejected instead."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value).rstrip(b"\x00")  # BINARY(n) pads with NUL
        if not (raw and all(32 <= byte < 127 for byte in raw)):
            return any(raw)  # bits
        value = raw.decode("ascii")
    if isinstance(value, datetime | date):
        return True
    if not isinstance(value, int | float | Decimal):
        text = str(value).strip()
        flag = text.lower()
        if flag in _DELETED:
            return True
        if flag in _LIVE:
            return False
        try:
            value = Decimal(flag)
        except ArithmeticError:  # decimal.InvalidOperation
            try:
                datetime.fromisoformat(text)  # not lowered: a 'Z' stays one
            except ValueError:
                raise ValueError(
                    "deleted_column: not a flag (1/0, true/false, yes/no, y/n, t/f, x, a time)"
                ) from None
            return True
    if isinstance(value, float | Decimal) and not math.isfinite(value):
        raise ValueError("deleted_column: not a flag (a number that is not finite)")
    return bool(value != 0)
