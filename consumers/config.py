"""Loading the store's rules (source registry and field authority) from the settings."""

from __future__ import annotations

from consumers.merge import Authority
from consumers.registry import Registry
from portal_sync.settings import Settings


class RulesError(RuntimeError):
    """The registry or authority file is missing or malformed; the message says which."""


def load_rules(settings: Settings) -> tuple[Registry, Authority]:
    try:
        registry = Registry.load(settings.registry)
    except (OSError, ValueError) as error:
        raise RulesError(f"source registry {settings.registry}: {_reason(error)}") from None
    try:
        return registry, Authority.load(settings.authority_file, registry)
    except (OSError, ValueError) as error:
        raise RulesError(f"authority file {settings.authority_file}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith("For further information"))
