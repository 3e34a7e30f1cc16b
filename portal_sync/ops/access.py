"""The access log: who read personal data out of the store, when, with which command, what
and why.

The commands that reveal values (`show`, `history`, `export`, `dlq show --reveal`,
`replay --show-values`) refuse to run without a reason, and write their rows to the store's
append-only `access_log` before they print anything: when the row cannot be written, the
command fails and nothing is revealed. A row names the record by its key reference
(`schemas.identifiers.key_reference`), never by the key itself.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import unicodedata
from collections.abc import Iterable
from typing import Any, TypeGuard

from schemas.errors import Refused
from schemas.events import ENTITIES
from schemas.identifiers import ReferenceKey, key_reference
from schemas.partitioning import record_part
from store import Store, redacted_url

MAX_REASON = 1000  # access_log.reason
MAX_OPERATOR = 128  # access_log.operator
MAX_KEY = 64  # the contract's longest key
MAX_REFERENCE = 255  # access_log.reference


class ReasonRequired(Refused):
    """A command that reveals personal data was not told why."""


def operator_name(given: str | None = None) -> str:
    """Who acts: `--operator`, else the OS user (of the process's user id, not of the
    environment's USER or LOGNAME, which anyone can set)."""
    if given:  # one name whatever its Unicode form (a terminal may give it decomposed)
        return unicodedata.normalize("NFC", given)
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError, AttributeError):  # no passwd entry (a container), no pwd
        pass
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def checked_operator(operator: str | None) -> str:
    """Who acts (`operator_name`), refused unless printable and within the columns."""
    who = operator_name(operator)
    if len(who) > MAX_OPERATOR or not who.isprintable():
        raise Refused(f"--operator: printable text of at most {MAX_OPERATOR} characters")
    return who


def who_and_why(operator: str | None, reason: str) -> tuple[str, str]:
    """Who acts and why, as a command that changes the store records them: checked before
    it does anything (printable, within the columns), never refused by the database after
    a part of the work is done."""
    text = reason.strip()
    if not text:
        raise Refused("--reason: say why (it is recorded)")
    if len(text) > MAX_REASON or not text.isprintable():
        raise Refused(f"--reason: printable text of at most {MAX_REASON} characters")
    return checked_operator(operator), text


def require_reason(command: str, reason: str | None) -> str:
    """The reason a revealing command was given, or a refusal that says how to give it."""
    text = (reason or "").strip()
    if not text:
        raise ReasonRequired(
            f"`{command}` reveals personal data: say why with --reason "
            "(recorded in the access log with who and when)"
        )
    if len(text) > MAX_REASON:
        raise Refused(f"--reason: at most {MAX_REASON} characters")
    if not text.isprintable():
        raise Refused("--reason: printable text only (no control characters)")
    return text


def record_key(
    entity: str | None, key: str | None, secret: ReferenceKey | None = None
) -> tuple[str | None, str | None]:
    """A record as the access log names it: its entity and the key's reference (keyed with
    `secret`; no entity: all of them). An entity or key the store cannot hold is refused."""
    if entity is not None and entity not in ENTITIES:
        raise Refused(f"entity: not one of {', '.join(ENTITIES)}")
    if key is not None and not 0 < len(key) <= MAX_KEY:
        raise Refused(f"key: 1 to {MAX_KEY} characters")
    return entity, None if key is None else key_reference(key, secret)


def copy_target(store_url: str) -> tuple[None, str]:
    """A copy of every record (`rebuild`) as the access log names it: where it went (the
    URL without its password)."""
    return None, f"all records to {redacted_url(store_url)}"[:MAX_REFERENCE]


def dead_letter_key(
    letter_id: str, key: bytes | None, secret: ReferenceKey | None = None
) -> tuple[str | None, str]:
    """A dead letter as the access log names it: its id, with the entity and the key's
    reference when its message key reads as `<entity>:<key>:<source>` (or `<entity>:<key>`,
    as keys were before the source was in them): the reference `show` and `history` write
    for the same record."""
    text = record_part(key or b"").decode("utf-8", "replace")
    entity, _, record = text.partition(":")
    if entity in ENTITIES and 0 < len(record) <= MAX_KEY:
        return entity, f"dead letter {letter_id}: {key_reference(record, secret)}"
    return None, f"dead letter {letter_id}"


def dead_letter_targets(
    letter_id: str, key: bytes | None, value: bytes | None, secret: ReferenceKey | None = None
) -> list[tuple[str | None, str]]:
    """What `dlq show --reveal` shows of whom, as access log rows: the record its message
    key names (`dead_letter_key`), and the record its value names (`entity` and `key` of an
    event), when that is another: a forged or mis-keyed letter (`key_mismatch`) shows the
    data of the record in its value, whatever its key says."""
    targets = [dead_letter_key(letter_id, key, secret)]
    # Every `entity` and `key` the value names, a name given twice included (a forged
    # letter's: any reader may take either, and `dlq show` shows the value whole).
    try:
        pairs = json.loads(
            (value or b"").decode("utf-8", "surrogatepass"), object_pairs_hook=_Pairs
        )
    except (ValueError, RecursionError):
        return targets
    if isinstance(pairs, _Pairs):
        # Each name once, at most MAX_NAMED of them: a forged letter naming a key tens of
        # thousands of times took minutes and as many access log rows.
        entities = dict.fromkeys(v for name, v in pairs if name == "entity" and v in ENTITIES)
        records = dict.fromkeys(v for name, v in pairs if name == "key" and _a_key(v))
        for entity in entities:
            for record in list(records)[:MAX_NAMED]:
                named = (entity, f"dead letter {letter_id}: {key_reference(record, secret)}")
                if named not in targets:
                    targets.append(named)
    return targets


MAX_NAMED = 10  # the keys of a letter's value logged, at most (a real event names one)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (name, value) pairs, in order, names given twice kept."""


def _a_key(record: object) -> TypeGuard[str]:
    """Whether an event's `key` could name a record: text of a key's length that UTF-8 can
    hold (a lone surrogate, which the worker dead-letters, names none; its reference
    cannot be computed)."""
    if not isinstance(record, str) or not 0 < len(record) <= MAX_KEY:
        return False
    try:
        record.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_access(
    store_url: str,
    command: str,
    reason: str,
    operator: str | None,
    targets: Iterable[tuple[str | None, str | None]] = (),
) -> None:
    """Write the access log rows of one command: (entity, reference) per record read (one
    row naming neither when `targets` is empty). Raises when they cannot be written: the
    caller must then reveal nothing."""
    who = checked_operator(operator)
    store = Store(store_url)
    try:
        store.require_schema()  # never created: a wrong URL is refused, an old store too
        store.log_access(who, command, reason, targets)
    finally:
        store.close()
