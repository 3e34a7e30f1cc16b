"""Built-in adapters and discovery of installed ones (entry-point group `portal_sync.adapters`)."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from producers.sdk import Adapter, ConfigurationError

GROUP = "portal_sync.adapters"


def installed() -> dict[str, EntryPoint]:
    """Every adapter registered in the entry-point group, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> type[Adapter]:
    """The adapter class registered as `name`; a ConfigurationError names the installed ones."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    places = sorted({ep.value for ep in found})
    if len(places) > 1:  # which one loads would depend on the order of the installs
        raise ConfigurationError(
            f"two adapters are installed as {name!r} ({', '.join(places)}): uninstall one"
        )
    if not found:
        names = ", ".join(sorted(installed())) or "none"
        raise ConfigurationError(f"no adapter named {name!r} is installed (installed: {names})")
    adapter = found[0].load()
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise ConfigurationError(f"entry point {name!r} is not a producers.sdk.Adapter class")
    return adapter
