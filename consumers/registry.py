"""The source registry: which systems may publish, what kind they are, what they cover,
which keys sign their events and what they may write.

A TOML file (setting `PORTAL_SYNC_REGISTRY`):

    require_signatures = true      # every event must be signed (false when absent)

    [entities.organization]        # who may write an entity, by kind (absent: every kind)
    kinds = ["national", "province"]

    [sources.province-01]
    kind = "province"              # province, ministry or national
    name = "Hệ thống TTHC Thành phố Hà Nội"
    province_code = "01"
    agency_codes = ["000.00.01.H26"]
    entities = ["citizen", "organization", "document", "dossier"]  # absent: all
    may_delete = true              # absent: true
    public_keys = [
      { id = "province-01-20250801-3fa9c2", key = "ed25519:…",
        not_before = 2025-08-01T00:00:00+07:00, not_after = 2026-08-01T00:00:00+07:00 },
    ]

What each setting allows is checked by `consumers.scope` (write scope) and
`consumers.signatures` (keys). Without a registry every well-formed source id is accepted,
unsigned, and ranks equal (development mode).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, model_validator

from consumers.signatures import TrustedKey
from schemas.events import ENTITIES, Entity
from schemas.identifiers import LONG_NUMBER, SOURCE_ID, SOURCE_ID_RULE
from schemas.signing import KEY_ID, parse_public_key

SourceKind = Literal["province", "ministry", "national"]


class PublicKeyEntry(BaseModel):
    """One signing key of a source: `ed25519:<base64 of the 32 raw bytes>`, valid from
    `not_before` (inclusive) until `not_after` (exclusive), each optional (with offset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=KEY_ID.pattern)
    key: str
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None

    @model_validator(mode="after")
    def _valid_key_and_window(self) -> Self:
        parse_public_key(self.key, f"public key {self.id}")  # KeyFormatError: id and rule
        if self.not_before and self.not_after and self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self

    def trusted(self, source: str) -> TrustedKey:
        def millis(moment: AwareDatetime | None) -> int | None:
            return None if moment is None else int(moment.timestamp() * 1000)

        return TrustedKey(
            self.id,
            source,
            parse_public_key(self.key),
            millis(self.not_before),
            millis(self.not_after),
        )


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SourceKind
    name: str
    province_code: str | None = Field(default=None, pattern=r"^[0-9]{2}$")
    agency_codes: tuple[str, ...] = ()
    entities: tuple[Entity, ...] | None = None  # None: every entity
    may_delete: StrictBool = True
    public_keys: tuple[PublicKeyEntry, ...] = ()


class EntityRules(BaseModel):
    """Registry-wide rules of one entity: the kinds of source that may write it and, for
    documents, whether a document's id must name its issuer (`000.00.01.H26:…`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kinds: tuple[SourceKind, ...] | None = None  # None: every kind
    key_names_issuer: StrictBool = False


class RegistryFile(BaseModel):
    """The file as a whole: unknown top-level keys are refused (a misspelt
    `require_signatures` must never turn signatures off silently). Errors name the setting,
    never its value (a key pasted into the wrong place is not echoed)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    require_signatures: StrictBool = False
    entities: dict[Entity, EntityRules] = Field(default_factory=dict)
    sources: dict[str, SourceInfo] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _source_ids(self) -> RegistryFile:
        for source in self.sources:
            if not SOURCE_ID.fullmatch(source) or LONG_NUMBER.search(source):
                raise ValueError(
                    f"a source id is {SOURCE_ID_RULE}, without nine digits in a row "
                    "(a personal id, a tax code or a phone number)"
                )
        return self

    @model_validator(mode="after")
    def _issuer_keys_are_documents(self) -> RegistryFile:
        for entity, rules in self.entities.items():
            if rules.key_names_issuer and entity != "document":
                raise ValueError("key_names_issuer is a rule of [entities.document] only")
        return self


@dataclass(frozen=True)
class Registry:
    sources: Mapping[str, SourceInfo] = field(default_factory=dict)
    path: Path | None = None
    require_signatures: bool = False
    entity_rules: Mapping[str, EntityRules] = field(default_factory=dict)
    keys: Mapping[str, TrustedKey] = field(default_factory=dict)  # by key id

    def __post_init__(self) -> None:
        if not self.keys:  # built here when the registry is made from sources directly
            object.__setattr__(self, "keys", trusted_keys(self.sources))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for the validator processes) without its keys, which cryptography's
        objects cannot be: rebuilt from the sources' public keys on the other side."""
        return (type(self), (self.sources, self.path, self.require_signatures, self.entity_rules))

    @property
    def development_mode(self) -> bool:
        """No registry configured: every source is accepted and ranks equal."""
        return self.path is None

    def accepts(self, source: str) -> bool:
        """A registered source; in development mode any source id but one that carries a
        long number (`LONG_NUMBER`: a personal id, a tax code), which would reach metric
        labels."""
        if self.development_mode:
            return LONG_NUMBER.search(source) is None
        return source in self.sources

    def signs(self, source: str) -> bool:
        """Whether `source` has signing keys here: then every event in its name is signed."""
        info = self.sources.get(source)
        return info is not None and bool(info.public_keys)

    def kind(self, source: str) -> str | None:
        info = self.sources.get(source)
        return info.kind if info else None

    def covers_agency(self, source: str, agency_code: object) -> bool:
        info = self.sources.get(source)
        return info is not None and agency_code in info.agency_codes

    def key_names_issuer(self, entity: str) -> bool:
        """Whether a non-national source's key of `entity` must begin with its issuer."""
        rules = self.entity_rules.get(entity)
        return rules is not None and rules.key_names_issuer

    def writers(self) -> list[tuple[str, str]]:
        """Every (source, entity) the registry lets write: the source's `entities` (all when
        absent) of a kind `[entities.<entity>] kinds` lists (none in development mode)."""
        return [
            (source, entity)
            for source, info in sorted(self.sources.items())
            for entity in info.entities or ENTITIES
            if (kinds := self.kinds_for(entity)) is None or info.kind in kinds
        ]

    def kinds_for(self, entity: str) -> tuple[str, ...] | None:
        """The kinds of source that may write `entity` (None: every kind)."""
        rules = self.entity_rules.get(entity)
        return None if rules is None else rules.kinds

    @classmethod
    def load(cls, path: Path | None) -> Registry:
        if path is None:
            return cls()
        with path.open("rb") as handle:
            raw = RegistryFile.model_validate(tomllib.load(handle))
        return cls(
            raw.sources,
            path,
            require_signatures=raw.require_signatures,
            entity_rules={str(name): rules for name, rules in raw.entities.items()},
        )


def trusted_keys(sources: Mapping[str, SourceInfo]) -> dict[str, TrustedKey]:
    """Every source's public keys by key id. Refused, naming sources and ids (never the
    key): a key id listed twice, and one key (the same 32 bytes) listed twice, under two
    sources (one source's signature would pass for the other's) or under two ids of one
    source (a rotation makes a new key; removing a leaked key's entry must untrust it)."""
    keys: dict[str, TrustedKey] = {}
    by_bytes: dict[bytes, TrustedKey] = {}
    for source, info in sources.items():
        for entry in info.public_keys:
            if entry.id in keys:
                raise ValueError(f"public key id {entry.id} is listed more than once")
            key = entry.trusted(source)
            first = by_bytes.setdefault(key.public_key.public_bytes_raw(), key)
            if first is not key:
                raise ValueError(
                    f"public keys {first.key_id} (source {first.source}) and {key.key_id} "
                    f"(source {source}) are the same key: list each key once, for one source"
                )
            keys[entry.id] = key
    return keys
