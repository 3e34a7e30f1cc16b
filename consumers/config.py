"""Loading the store's rules (source registry and field authority) from the settings."""

from __future__ import annotations

from consumers.merge import Authority
from consumers.registry import Registry
from portal_sync.settings import Settings


def load_rules(settings: Settings) -> tuple[Registry, Authority]:
    registry = Registry.load(settings.registry)
    return registry, Authority.load(settings.authority_file, registry)
