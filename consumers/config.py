"""Loading the store's rules (source registry and field authority) from their files."""

from __future__ import annotations

from pathlib import Path

from consumers.merge import Authority
from consumers.registry import Registry
from schemas.errors import ConfigurationError


class RulesError(ConfigurationError):
    """The registry or authority file is missing or malformed; the message says which."""


def load_rules(
    registry_file: Path | None, authority_file: Path | None
) -> tuple[Registry, Authority]:
    try:
        registry = Registry.load(registry_file)
    except (OSError, ValueError) as error:
        raise RulesError(f"source registry {registry_file}: {_reason(error)}") from None
    try:
        return registry, Authority.load(authority_file, registry)
    except (OSError, ValueError) as error:
        raise RulesError(f"authority file {authority_file}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith("For further information"))
