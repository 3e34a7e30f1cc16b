"""The source registry: which systems may publish, what kind they are, what they cover.

A TOML file (setting `PORTAL_SYNC_REGISTRY`), one table per source:

    [sources.province-01]
    kind = "province"              # province, ministry or national
    name = "Hệ thống TTHC Thành phố Hà Nội"
    province_code = "01"
    agency_codes = ["000.00.01.H26"]

Without a registry every well-formed source id is accepted and ranks equal (development
mode).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SourceKind = Literal["province", "ministry", "national"]


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SourceKind
    name: str
    province_code: str | None = Field(default=None, pattern=r"^[0-9]{2}$")
    agency_codes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Registry:
    sources: Mapping[str, SourceInfo] = field(default_factory=dict)
    path: Path | None = None

    @property
    def development_mode(self) -> bool:
        """No registry configured: every source is accepted and ranks equal."""
        return self.path is None

    def accepts(self, source: str) -> bool:
        return self.development_mode or source in self.sources

    def kind(self, source: str) -> str | None:
        info = self.sources.get(source)
        return info.kind if info else None

    def covers_agency(self, source: str, agency_code: object) -> bool:
        info = self.sources.get(source)
        return info is not None and agency_code in info.agency_codes

    @classmethod
    def load(cls, path: Path | None) -> Registry:
        if path is None:
            return cls()
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
        sources = {sid: SourceInfo(**info) for sid, info in raw.get("sources", {}).items()}
        return cls(sources, path)
