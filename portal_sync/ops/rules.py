"""The rules an operation runs with must be the live worker's: a replay, rebuild or remerge
under other rules (or none: development mode) would re-rank sources or apply events of
sources the worker refused."""

from __future__ import annotations

from consumers.config import RULES_FILES, RULES_FINGERPRINT, rules_files, rules_fingerprint
from portal_sync.settings import Settings
from schemas.errors import Refused
from store import Store


class RulesMismatch(Refused):
    """The operation's registry or authority differs from the one the worker runs with."""


def guard_rules(store: Store, settings: Settings, mismatch_ok: bool = False) -> None:
    """Refuse unless the settings' rules are those the store's worker recorded (a store
    no worker has run on has nothing to compare with)."""
    recorded = store.meta(RULES_FINGERPRINT)
    if recorded is None or mismatch_ok:
        return
    mine = rules_fingerprint(settings.registry, settings.authority_file)
    if mine != recorded:
        theirs = store.meta(RULES_FILES) or "unknown files"
        raise RulesMismatch(
            f"this command runs with {rules_files(settings.registry, settings.authority_file)}"
            f", but the worker of this store runs with {theirs} (other content): set "
            "PORTAL_SYNC_REGISTRY and PORTAL_SYNC_AUTHORITY_FILE as the worker has them, or "
            "pass --rules-mismatch-ok"
        )
