"""Event contract v1: one record change of one entity, as a Kafka message value (UTF-8 JSON).

The envelope is Debezium-like but flat; `data` is the source's full current view of the
record. Models are strict and reject unknown fields. All text is normalised to NFC before
validation, so the store holds one spelling of every Vietnamese name.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime
from enum import IntEnum
from functools import cache
from typing import Annotated, Any, Literal, Self, get_args
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.identifiers import (
    AGENCY_CODE,
    DOSSIER_CODE,
    OWNER_ID,
    PERSONAL_ID,
    PHONE,
    PROCEDURE_CODE,
    REPRESENTATIVE_ID,
    SOURCE_ID,
    TAX_CODE,
    dossier_code_date,
)

SCHEMA_VERSION = 1
MAX_VERSION = 2**53
ENTITIES = ("citizen", "organization", "document", "dossier")
Entity = Literal["citizen", "organization", "document", "dossier"]

# Free text refuses what a reader cannot see or that changes what they see: control
# characters (C0, DEL, C1: Cc), format characters (Cf: zero-width spaces and joiners, the
# byte-order mark, bidi embeddings, overrides and isolates), line/paragraph separators,
# the other default-ignorable characters (Hangul fillers that show a name as blank, the
# combining grapheme joiner and variation selectors that make one spelling two), private
# use (Co) and unassigned code points (Cn); the emoji and text presentation selectors
# (U+FE0E, U+FE0F) stay, as phone keyboards type them after an emoji. The patterns run on
# pydantic's Rust regex engine, which knows Unicode properties; Cn is a class of its own
# (`&&`): in one negated class with Co, the engine lets private use through. The JSON
# Schemas carry the same rules in ECMA-262's syntax (`JSON_SCHEMA_PATTERNS`).
_INVISIBLE = r"\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}\p{Default_Ignorable_Code_Point}"
_SEEN = rf"(?:[[^{_INVISIBLE}]&&[^\p{{Cn}}]]|[\x{{FE0E}}\x{{FE0F}}])"
_PLAIN = rf"^{_SEEN}*$"


def _text(max_length: int, min_length: int = 1) -> Any:
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length, pattern=_PLAIN),
    ]


PersonalId = Annotated[str, StringConstraints(pattern=PERSONAL_ID.pattern)]
RepresentativeId = Annotated[str, StringConstraints(pattern=REPRESENTATIVE_ID.pattern)]
TaxCode = Annotated[str, StringConstraints(pattern=TAX_CODE.pattern)]
SourceId = Annotated[str, StringConstraints(pattern=SOURCE_ID.pattern)]
Code = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z._/-]{0,63}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Phone = Annotated[str, StringConstraints(pattern=PHONE.pattern)]
_MAILBOX = rf"[[^@\s{_INVISIBLE}]&&[^\p{{Cn}}]]+"
_ECMA_INVISIBLE = _INVISIBLE + r"\p{Cn}"
_ECMA_MAILBOX = rf"[^@\s{_ECMA_INVISIBLE}]+"
_EMAIL = rf"^{_MAILBOX}@{_MAILBOX}\.{_MAILBOX}$"
Email = Annotated[str, StringConstraints(max_length=254, pattern=_EMAIL)]
# The Rust patterns above as JSON Schema (ECMA-262 with the `u` flag) writes them: no class
# intersection there, and a negated class that holds Cn works.
JSON_SCHEMA_PATTERNS = {
    _PLAIN: rf"^(?:[^{_ECMA_INVISIBLE}]|[\uFE0E\uFE0F])*$",
    _EMAIL: rf"^{_ECMA_MAILBOX}@{_ECMA_MAILBOX}\.{_ECMA_MAILBOX}$",
}
OwnerId = Annotated[str, StringConstraints(max_length=14, pattern=OWNER_ID.pattern)]
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
DATE_RULE = "Input should be a valid date in the format YYYY-MM-DD"  # pydantic's own


def _date_text(value: Any) -> Any:
    """Only YYYY-MM-DD: pydantic also reads a number of seconds ("1704067200") as a date,
    and the payload as sent, which the store keeps, would then not be the date checked."""
    if not isinstance(value, str):
        return value  # a date (Python input), or refused by the strict date check
    if _ISO_DATE.fullmatch(value) is None:
        raise PydanticCustomError("date_parsing", DATE_RULE)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError("date_parsing", DATE_RULE) from None


IsoDate = Annotated[date, BeforeValidator(_date_text)]

# RFC 3339's date-time: seconds required, "T" (or a space, its note allows) and "Z" in
# either case, an offset always.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
DATETIME_RULE = "Input should be an RFC 3339 date-time with an offset"


def _datetime_text(value: Any) -> Any:
    """Only RFC 3339 text: pydantic also reads a number of seconds or milliseconds
    ("1700000000") and a time without seconds as a datetime, which the contract says
    nothing of (`_date_text` likewise)."""
    if not isinstance(value, str):
        return value  # a datetime (Python input), or refused by the strict check
    if _RFC3339.fullmatch(value) is None:
        raise PydanticCustomError("datetime_parsing", DATETIME_RULE)
    try:
        return datetime.fromisoformat(
            value.upper() if value[10] == "t" or value[-1] == "z" else value
        )
    except ValueError:  # a month 13, a second 60, an offset of 24 hours
        raise PydanticCustomError("datetime_parsing", DATETIME_RULE) from None


def _in_utc(moment: datetime) -> datetime:
    """The same instant, held in UTC with the `datetime.UTC` singleton for a zone: pydantic's
    own zone objects make every later comparison, timestamp and conversion of it several
    times slower (a comparison about 0.4 against 0.06 µs), and a worker makes many.

    An instant with no UTC form (year 1 at +14:00 is year 0 in UTC, year 9999 at -14:00
    is year 10000) is refused here (`invalid_field`): no store can hold it, and a worker
    would only find it by halving its batch down to it (`apply_failed`)."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(NO_UTC_FORM) from None


NO_UTC_FORM = "an instant with no UTC form (before year 1 or after year 9999 in UTC)"


# A payload's time is held in UTC, as `occurred_at` is: one instant sent by two sources
# with two offsets (a local column's `+07:00`, a timestamptz's `Z`) is one value, never a
# conflict between them or a change in the history.
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_datetime_text), AfterValidator(_in_utc)]


# Validators raise fixed texts only: their messages become dead-letter reasons, which must
# never carry a value (tests/unit/test_no_personal_data.py checks every `raise` here).
OWNER_ID_RULE = "owner_id must be a personal id for owner_kind citizen, a tax code otherwise"
APPLICANT_ID_RULE = (
    "applicant_id must be a personal id for applicant_kind citizen, a tax code otherwise"
)


class ContractModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Address(ContractModel):
    province_code: Annotated[str, StringConstraints(pattern=r"^[0-9]{2}$")] | None = Field(
        default=None,
        description="2-digit province code: the 34 in force since 2025-07-01, or an old one",
    )
    ward_code: Annotated[str, StringConstraints(pattern=r"^[0-9]{5}$")] | None = None
    line: _text(200) | None = None  # type: ignore[valid-type]


YEAR_OF_BIRTH_RULE = "year_of_birth must be date_of_birth's year"


class CitizenData(ContractModel):
    full_name: _text(100) | None = None  # type: ignore[valid-type]
    date_of_birth: IsoDate | None = None
    # A birth known only by its year, as civil-status books of the 1940s-1970s often give
    # it: no day invented. With a date_of_birth, that date's year.
    year_of_birth: Annotated[int, Field(ge=1800, le=9999)] | None = None
    sex: Literal["male", "female"] | None = None
    permanent_address: Address | None = None
    phone: Phone | None = None
    email: Email | None = None

    @field_validator("year_of_birth")
    @classmethod
    def _year_of_the_date(cls, year: int | None, info: ValidationInfo) -> int | None:
        # Run only for a year given (a model validator ran for every citizen event: 0.7 µs
        # of the validator child's); date_of_birth, declared before it, is checked first.
        born = info.data.get("date_of_birth")
        if year is not None and born is not None and year != born.year:
            raise ValueError(YEAR_OF_BIRTH_RULE)
        return year


class OrganizationData(ContractModel):
    name: _text(255) | None = None  # type: ignore[valid-type]
    english_name: _text(255) | None = None  # type: ignore[valid-type]
    legal_form: _text(100) | None = None  # type: ignore[valid-type]
    # Enterprise registration's states: in operation, business suspended, dissolution under
    # way, dissolved, registration certificate revoked, not operating at the registered
    # address, bankruptcy under way, bankrupt, merged or consolidated into another,
    # divided, converted into another legal form.
    status: (
        Literal[
            "active", "suspended", "dissolving", "dissolved", "revoked", "not_at_address",
            "bankruptcy", "bankrupt", "merged", "divided", "converted",
        ]
        | None
    ) = None  # fmt: skip
    address: Address | None = None
    legal_representative_id: RepresentativeId | None = None
    established_on: IsoDate | None = None


class DocumentData(ContractModel):
    owner_kind: Literal["citizen", "organization"] | None = None
    owner_id: OwnerId | None = None
    doc_type: Code | None = None
    title: _text(1000) | None = None  # type: ignore[valid-type]  # a decision's summary line
    issuer_code: Code | None = None
    issued_on: IsoDate | None = None
    valid_until: IsoDate | None = None
    status: Literal["valid", "revoked", "expired"] | None = None
    file_sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _owner_id_matches_kind(self) -> Self:
        if self.owner_id is None or self.owner_kind is None:
            return self
        rule = PERSONAL_ID if self.owner_kind == "citizen" else TAX_CODE
        if not rule.fullmatch(self.owner_id):
            raise ValueError(OWNER_ID_RULE)
        return self


class DossierStatus(IntEnum):
    """National dossier status codes (TrangThaiHoSo) used by portal integrations."""

    SUBMITTED = 1
    ACCEPTED = 2
    NOT_ACCEPTED = 3
    PROCESSING = 4
    ADDITIONAL_DOCUMENTS_REQUESTED = 5
    FINANCIAL_OBLIGATION_REQUESTED = 6
    WITHDRAWN = 7
    STOPPED = 8
    FINISHED = 9
    RESULT_RETURNED = 10


StatusCode = Annotated[int, Field(ge=int(min(DossierStatus)), le=int(max(DossierStatus)))]


class DossierData(ContractModel):
    procedure_code: Annotated[str, StringConstraints(pattern=PROCEDURE_CODE.pattern)] | None = None
    agency_code: Annotated[str, StringConstraints(pattern=AGENCY_CODE.pattern)] | None = None
    applicant_kind: Literal["citizen", "organization"] | None = None
    applicant_id: OwnerId | None = None
    status: StatusCode | None = None
    received_at: Rfc3339 | None = None
    due_at: Rfc3339 | None = None
    finished_at: Rfc3339 | None = None
    original_code: Annotated[str, StringConstraints(pattern=DOSSIER_CODE.pattern)] | None = Field(
        default=None,
        description="For an inter-agency (liên thông) dossier: the code of the original dossier",
    )

    @model_validator(mode="after")
    def _applicant_id_matches_kind(self) -> Self:
        if self.applicant_id is None or self.applicant_kind is None:
            return self
        rule = PERSONAL_ID if self.applicant_kind == "citizen" else TAX_CODE
        if not rule.fullmatch(self.applicant_id):
            raise ValueError(APPLICANT_ID_RULE)
        return self


class _EventBase(ContractModel):
    schema_version: Literal[1]
    event_id: UUID
    source: SourceId
    op: Literal["upsert", "delete"]
    # At most 2^53: exact in every JSON reader, and far from the store's 2^63 - 1, so a
    # hostile version cannot freeze a record beyond every later real update.
    version: Annotated[int, Field(ge=1, le=MAX_VERSION)]
    occurred_at: Annotated[
        AwareDatetime,
        BeforeValidator(_datetime_text),
        AfterValidator(_in_utc),
        Field(description="RFC 3339 with an offset; an instant of years 1 to 9999 in UTC"),
    ]

    @model_validator(mode="after")
    def _data_matches_op(self) -> Self:
        data = getattr(self, "data", None)
        if self.op == "upsert" and data is None:
            raise ValueError("an upsert must carry data")
        if self.op == "delete" and data is not None:
            raise ValueError("a delete carries no data")
        return self

    def data_dict(self) -> dict[str, Any] | None:
        """The payload as JSON-ready dict; absent fields stay absent, nulls stay null."""
        data: BaseModel | None = getattr(self, "data", None)
        if data is None:
            return None
        return data.model_dump(mode="json", exclude_unset=True)


class CitizenEvent(_EventBase):
    entity: Literal["citizen"]
    key: PersonalId
    data: CitizenData | None = None


class OrganizationEvent(_EventBase):
    entity: Literal["organization"]
    key: TaxCode
    data: OrganizationData | None = None


class DocumentEvent(_EventBase):
    entity: Literal["document"]
    key: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z._:/-]{0,63}$")]
    data: DocumentData | None = None


class DossierEvent(_EventBase):
    entity: Literal["dossier"]
    key: Annotated[str, StringConstraints(pattern=DOSSIER_CODE.pattern)]
    data: DossierData | None = None

    @field_validator("key")
    @classmethod
    def _key_has_real_date(cls, key: str) -> str:
        if dossier_code_date(key) is None:
            raise ValueError("dossier code has no valid YYMMDD date")
        return key


ChangeEvent = Annotated[
    CitizenEvent | OrganizationEvent | DocumentEvent | DossierEvent,
    Field(discriminator="entity"),
]
CHANGE_EVENT: TypeAdapter[ChangeEvent] = TypeAdapter(ChangeEvent)
PAYLOAD_MODELS: dict[str, type[ContractModel]] = {
    "citizen": CitizenData,
    "organization": OrganizationData,
    "document": DocumentData,
    "dossier": DossierData,
}


def _written_text(model: type[ContractModel]) -> frozenset[str]:
    """A payload's fields that a person writes in any script (names, titles, e-mail
    addresses), as against its identifiers and codes, whose patterns take ASCII only."""
    return frozenset(
        name
        for name, info in model.model_fields.items()
        for arg in (info.annotation, *get_args(info.annotation))
        for constraint in getattr(arg, "__metadata__", ())
        if getattr(constraint, "pattern", None) in (_PLAIN, _EMAIL)
    )


WRITTEN_TEXT: dict[str, frozenset[str]] = {
    entity: _written_text(model) for entity, model in PAYLOAD_MODELS.items()
}


def _field_paths(model: type[BaseModel]) -> frozenset[str]:
    """A payload's field paths as a producer's mapping names them: `full_name`, and a nested
    model's fields under its own (`permanent_address.ward_code`)."""
    paths = set(model.model_fields)
    for name, info in model.model_fields.items():
        for arg in (info.annotation, *get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                paths.update(f"{name}.{inner}" for inner in _field_paths(arg))
    return frozenset(paths)


FIELD_PATHS: dict[str, frozenset[str]] = {
    entity: _field_paths(model) for entity, model in PAYLOAD_MODELS.items()
}


# CPython's NFC takes time quadratic in a run of combining marks whose classes alternate:
# a 400 KB name took 40 s, a signed message of 1 MiB about five minutes, in the validator
# child and again in the worker once the child gave up, while the partition waited and the
# worker's liveness failed (every worker the message reached stopped on it). A text of up
# to NFC_ALWAYS code points is normalised whatever it holds (at most about a millisecond
# and a half), as long as a message's texts so normalised stay within NFC_ALWAYS_PER_VALUE
# code points (a contract event's all do; a message of a thousand such texts took a
# second); a longer one, or one beyond that budget, only without a run of more than
# MAX_MARK_RUN combining marks, which no script writes (linear time then; Unicode's
# stream-safe text allows 30). Else it is left as it is, and refused: where a field would
# take it, as not NFC (`unnormalised`); beyond MAX_TEXT_BEFORE_NFC it is longer than any
# contract text (a title: 1,000 characters composed; a Vietnamese letter is at most three
# code points decomposed, so a title typed decomposed has up to about 3,000).
NFC_ALWAYS = 1_024
NFC_ALWAYS_PER_VALUE = 8_192
MAX_TEXT_BEFORE_NFC = 4_096
MAX_MARK_RUN = 32


@cache
def _long_mark_run() -> re.Pattern[str]:
    """A run of more than MAX_MARK_RUN characters that NFC reorders: of a non-zero
    canonical combining class, or decomposing into such a mark first (Tibetan's U+0F73,
    U+0F75 and U+0F81 are of class 0, and each decomposes into two marks of alternating
    classes). Built once, when a long text first needs it (about a fifth of a second)."""
    marks = [code for code in range(0x300, 0x110000) if _reordered(chr(code))]
    ranges: list[tuple[int, int]] = []
    for code in marks:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    members = "".join(
        re.escape(chr(low)) if low == high else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in ranges
    )
    return re.compile(f"[{members}]{{{MAX_MARK_RUN + 1}}}")


def _reordered(char: str) -> bool:
    """Whether NFC's canonical reordering moves `char`, or the mark its decomposition
    begins with."""
    if unicodedata.combining(char):
        return True
    parts = unicodedata.decomposition(char).split()
    return (
        bool(parts)
        and not parts[0].startswith("<")
        and unicodedata.combining(chr(int(parts[0], 16))) != 0
    )


def nfc_text(text: str) -> str:
    """`text` in Unicode NFC; as it is when it could not be a contract text once composed,
    or normalising it could take quadratic time (above)."""
    return _nfc_within(text, [NFC_ALWAYS])


def _nfc_within(text: str, budget: list[int]) -> str:
    """`nfc_text`, normalising a text unchecked only within `budget` (code points left,
    decreased by each text so normalised)."""
    size = len(text)
    if size <= MAX_MARK_RUN:  # no run too long fits in it
        return unicodedata.normalize("NFC", text)
    if text.isascii():  # NFC as it is (a signature, a long code)
        return text
    if size <= NFC_ALWAYS and size <= budget[0]:
        budget[0] -= size
        return unicodedata.normalize("NFC", text)
    if size > MAX_TEXT_BEFORE_NFC or _long_mark_run().search(text):
        return text
    return unicodedata.normalize("NFC", text)


def nfc(value: Any) -> Any:
    """Every string in a decoded JSON value, normalised to Unicode NFC (`nfc_text`; texts
    normalised unchecked within NFC_ALWAYS_PER_VALUE code points for the whole value)."""
    return _nfc_value(value, [NFC_ALWAYS_PER_VALUE])


def _nfc_value(value: Any, budget: list[int]) -> Any:
    if isinstance(value, str):
        return _nfc_within(value, budget)
    if isinstance(value, dict):
        return {_nfc_value(k, budget): _nfc_value(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_nfc_value(v, budget) for v in value]
    return value


def unnormalised(value: Any, path: str) -> str | None:
    """The path of the first string in a decoded JSON object or array that is not NFC
    (`nfc_text` left it as it was), else None; `path` names the value (`data`: then
    `data.address.line`)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for name, item in items:
        if isinstance(item, str):
            if not unicodedata.is_normalized("NFC", item):
                return f"{path}.{name}"
        elif isinstance(item, dict | list):
            found = unnormalised(item, f"{path}.{name}")
            if found is not None:
                return found
    return None
