"""What the SQL adapter makes of a row it reads: a change to send (`SourceChange`), a row
dead-lettered (`RejectedRow`) or held (`RowAhead`), and the markers its state keeps to
recognise a row read again (the content's fingerprint, a rejected or a reserved marker)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from schemas import build_event
from schemas.builder import has_non_finite_float

Raised = Literal["same_instant", "lower"]


class RowRejected(ValueError):
    """A row read whose values cannot make an event; the message names the column and the
    rule, never a value."""


class RowAhead(RowRejected):
    """A row whose cursor time is ahead of the producer's clock by more than
    `AHEAD_TOLERANCE`: held, neither sent nor dead-lettered, and the cursor does not move
    to its time. Under lookback capture every later change would otherwise fall behind the
    window for good; under snapshot capture every later change would be read as a late
    one and sent above the held row's version (its time in microseconds: a version years
    ahead, which the change after a repair of the row could never pass). Read again at
    each poll (it stays after the cursor), it is sent as any row once its time has come;
    each poll that holds some says so in a warning (a clock of the source, or of this
    host, that is wrong: this host's behind delays every change by its lag)."""


@dataclass(frozen=True)
class RejectedRow:
    """A row that cannot become an event (a NULL key or version, an unreadable soft-delete
    flag, a value the mapping cannot convert): dead-lettered as `unmappable_record` while
    the source goes on. The cursor moves past it and the state remembers it with version
    0 and the hash of its values, so it is dead-lettered once however often a poll reads
    it again, and its next change is read and sent as any row's. A row sent before keeps
    the version it was sent with (`version`), so its next change never goes below it."""

    pk: Any
    key: str | None
    stamp: str
    marker: str
    message: str
    version: int = 0
    xid: int | None = None


@dataclass(frozen=True)
class SourceChange:
    """One row read from a source: its key, version, commit time and mapped data."""

    source: str
    entity: str
    pk: Any
    key: str
    updated_at: datetime  # the cursor value: naive as stored, or UTC when it has a zone
    stamp: str  # updated_at as the cursor's state holds it (`_iso`)
    version: int
    occurred_at: datetime  # updated_at in the source's zone
    data: dict[str, Any] | None  # None: the row is (soft-)deleted
    marker: Any = None  # the version column's value, else the content hash
    xid: int | None = None  # PostgreSQL: the transaction that wrote the row version
    raised: Raised | None = None  # version set to last sent + 1
    backwards: bool = False  # updated_at is earlier than the row's previous one
    # A delete not sent: another row holds the key live (`_hold_live_keys`). Remembered as
    # a sent change is, so the cursor moves past it and it is not read again.
    held: bool = False

    @property
    def event(self) -> dict[str, Any]:
        """The contract event of this change (validation is the framework's job)."""
        return build_event(
            self.source, self.entity, self.key, self.version, self.occurred_at, self.data
        )


# The marker of a version reserved and maybe sent, for content no longer known (states of
# earlier releases): equal to no content's. `reserved` gives one for known content.
RESERVED = "v"


def reserved(marker: Any) -> str:
    """The marker of a version journaled for the content of `marker` and maybe sent
    (`CursorState.fold`): equal to no content's marker (a version column's value is a
    number, a content hash starts with a letter other than 'v')."""
    return f"{RESERVED}{marker}"


def rejected_marker(marker: Any) -> bool:
    """The marker `RejectedRow` leaves ('r' and 16 hex digits): no version value, and no
    content hash, which is 'o' and hex digits (or hex digits alone, older releases)."""
    return isinstance(marker, str) and marker.startswith("r")


def fingerprint(data: dict[str, Any] | None) -> str:
    """A short hash of a change's mapped content (None: a delete): `o` and the hash of its
    JSON by orjson, keys sorted (a twentieth of a SQL source's publishing was `json`'s
    instead). What orjson refuses or writes as null (an integer beyond 64 bits, a lone
    surrogate, a NaN) gets the fingerprint of earlier releases, which `json` computes."""
    try:
        body = orjson.dumps(data, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json_fingerprint(data)
    if b"null" in body and has_non_finite_float(data):
        return json_fingerprint(data)
    return "o" + hashlib.blake2b(body, digest_size=8).hexdigest()


def json_fingerprint(data: dict[str, Any] | None) -> str:
    """The fingerprint of releases before orjson's: 16 hex digits (states saved by them
    hold it for the rows of their lookback window). A lone surrogate, which made them fail,
    is hashed as it is (the row's event is then refused and dead-lettered)."""
    body = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def same_as_before(known: Any, data: dict[str, Any] | None) -> bool:
    """A row remembered by a release before orjson's fingerprint, read again unchanged."""
    return isinstance(known, str) and len(known) == 16 and json_fingerprint(data) == known
