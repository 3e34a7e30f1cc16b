"""Loading the store's rules (source registry and field authority) from their files."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

from consumers.merge import MERGE_RULES_REVISION, Authority
from consumers.registry import Registry
from schemas.errors import ConfigurationError


class RulesError(ConfigurationError):
    """The registry or authority file is missing or malformed; the message says which."""


def load_registry(registry_file: Path | None) -> Registry:
    """The source registry (None: development mode); RulesError says what is wrong with it."""
    try:
        return Registry.load(registry_file)
    except (OSError, ValueError) as error:
        raise RulesError(f"source registry {registry_file}: {_reason(error)}") from None


def load_rules(
    registry_file: Path | None, authority_file: Path | None
) -> tuple[Registry, Authority]:
    registry = load_registry(registry_file)
    try:
        return registry, Authority.load(authority_file, registry)
    except (OSError, ValueError) as error:
        raise RulesError(f"authority file {authority_file}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith("For further information"))


# The contract normalises text to NFC with the interpreter's Unicode tables (Python 3.11:
# 14.0.0), and its patterns run on pydantic-core's newer ones: a character assigned since
# is taken as it is, and another Python's NFC could compose it otherwise. A replay's store
# then differed from the worker's for the same events; the version is part of the rules.
UNICODE_VERSION = unicodedata.unidata_version

RULES_FINGERPRINT = "rules.fingerprint"
RULES_FILES = "rules.files"


def rules_fingerprint(registry_file: Path | None, authority_file: Path | None) -> str:
    """SHA-256 of the registry's and the authority file's bytes ("none" for a missing one),
    of the merge rules' revision (`MERGE_RULES_REVISION`: a release whose code merges
    otherwise) and of the Unicode version NFC follows (`UNICODE_VERSION`): the worker
    records it in the store; replay, rebuild and remerge compare theirs."""
    digest = hashlib.sha256(
        f"merge rules {MERGE_RULES_REVISION}\0Unicode {UNICODE_VERSION}\0".encode()
    )
    for label, path in (("registry", registry_file), ("authority", authority_file)):
        digest.update(label.encode() + b"\0")
        try:
            digest.update(path.read_bytes() if path is not None else b"none")
        except OSError as error:
            name = "source registry" if label == "registry" else "authority file"
            raise RulesError(f"{name} {path}: {_reason(error)}") from None
        digest.update(b"\0")
    return digest.hexdigest()


def with_registry(files: str | None) -> bool:
    """Whether the rules a store recorded (`RULES_FILES`) name a registry: a worker ran on
    it with one, not in development mode."""
    return files is not None and not files.startswith("registry (none),")


def rules_files(registry_file: Path | None, authority_file: Path | None) -> str:
    """The files by name, the merge rules' revision and the Unicode version, for messages."""
    return (
        f"registry {registry_file or '(none)'}, authority {authority_file or '(none)'}, "
        f"merge rules {MERGE_RULES_REVISION}, Unicode {UNICODE_VERSION}"
    )
