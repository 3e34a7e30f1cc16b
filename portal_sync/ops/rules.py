"""The rules an operation runs with must be the live worker's: a replay, rebuild or remerge
under other rules (or none: development mode) would re-rank sources or apply events of
sources the worker refused."""

from __future__ import annotations

from consumers.config import (
    RULES_FILES,
    RULES_FINGERPRINT,
    rules_files,
    rules_fingerprint,
    with_registry,
)
from portal_sync.settings import Settings
from schemas.errors import Refused
from store import Store


class RulesMismatch(Refused):
    """The operation's registry or authority differs from the one the worker runs with."""


def guard_rules(
    store: Store, settings: Settings, mismatch_ok: bool = False, applies_events: bool = False
) -> None:
    """Refuse unless the settings' rules are those the store's worker recorded (a store
    no worker has run on has nothing to compare with). An operation that `applies_events`
    (replay, rebuild) is refused without a registry where the worker has one, even with
    `mismatch_ok`: development mode checks no signature, source or write scope, and the
    change topics keep the events the worker refused for those."""
    recorded = store.meta(RULES_FINGERPRINT)
    if recorded is None:
        return
    recorded_files = store.meta(RULES_FILES)
    theirs = recorded_files or "unknown files"
    if applies_events and registry_missing(store, settings):
        raise RulesMismatch(
            "this command runs without a registry (development mode: no signature, source "
            f"or write-scope check), but the worker of this store runs with {theirs}: set "
            "PORTAL_SYNC_REGISTRY as the worker has it (--rules-mismatch-ok does not stand in "
            "for a registry)"
        )
    if mismatch_ok:
        return
    mine = rules_fingerprint(settings.registry, settings.authority_file)
    if mine != recorded:
        raise RulesMismatch(
            f"this command runs with {rules_files(settings.registry, settings.authority_file)}"
            f", but the worker of this store runs with {theirs} (other content): set "
            "PORTAL_SYNC_REGISTRY and PORTAL_SYNC_AUTHORITY_FILE as the worker has them, run "
            "the workers' release where the merge rules differ, or pass --rules-mismatch-ok"
        )


def registry_missing(store: Store, settings: Settings) -> bool:
    """Whether this command runs without a registry while the store's worker runs with
    one (or with rules it did not name: a store of a release before `RULES_FILES`)."""
    if settings.registry is not None or store.meta(RULES_FINGERPRINT) is None:
        return False
    recorded_files = store.meta(RULES_FILES)
    return recorded_files is None or with_registry(recorded_files)
