"""`portal-sync source purge`: recovery from a bad source.

A source that sent wrong data (or a version that freezes a record: one above 2^53, from
before the contract capped versions) is cleared from the store: its views and tombstones
go (all of them, of one entity, or of one record), every touched record is re-merged from
the views of the other sources (a record no source contributes to any more goes), and one
audit row (`source_purges`) records who, when, which source and scope, why and how much.

The work runs through the reconciler's batch path (`Reconciler.purge`), in chunks of keys
(one store transaction each, the records locked as the live worker's batches lock them),
so a province's million views never make one giant transaction. The audit row is written
in every chunk's transaction, so an interrupted purge is recorded with what it committed
(and no `finished_at`); running it again finishes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from consumers.merge import Authority
from consumers.reconciler import Reconciler
from portal_sync.ops import PURGE_CHUNK
from portal_sync.ops.access import record_key, who_and_why
from schemas.errors import Refused
from schemas.identifiers import REFERENCE_PREFIX, SOURCE_ID, SOURCE_ID_RULE, ReferenceKey
from store import Store, utcnow
from store.purge import (
    PurgePlan,
    SourcePurge,
    finish_purge,
    purge_keys,
    purge_plan,
    touches,
    undoable_purges,
    unfinished_purge,
)


def new_purge(
    source: str,
    entity: str | None,
    key: str | None,
    reason: str | None,
    operator: str | None,
    secret: ReferenceKey | None,
) -> SourcePurge:
    """The audit row of a purge about to run, after checking what it was given: a source
    id, an entity, a key only with its entity (named by its reference, never itself), a
    reason and who acts (`--operator`, else the OS user)."""
    if not SOURCE_ID.fullmatch(source):
        raise Refused(f"SOURCE: not a source id ({SOURCE_ID_RULE})")
    if key is not None and entity is None:
        raise Refused("--key needs --entity: a key names a record of one entity")
    if not (reason or "").strip():
        raise Refused("`source purge` changes the national store: say why with --reason")
    who, text = who_and_why(operator, reason or "")
    entity, reference = record_key(entity, key, secret)
    return SourcePurge(
        id=str(uuid.uuid4()),
        source=source,
        entity=entity,
        reference=reference,
        operator=who,
        reason=text,
        started_at=utcnow(),
    )


def carried_on(store: Store, purge: SourcePurge) -> SourcePurge:
    """The interrupted purge of the same source and scope, if there is one, to be finished
    under its own audit row (its id, start, operator, reason and counts so far); else
    `purge`. A purge run again after an interruption left one row unfinished for ever and
    recorded the rest in another. A purge of one record named by its mask (no reference
    key: another record's key can have the same mask) is never carried on. Two purges of
    one scope at once are an operator's error: the second carries on the first's row."""
    if purge.reference is not None and not purge.reference.startswith(REFERENCE_PREFIX):
        return purge
    found = unfinished_purge(store, purge.source, purge.entity, purge.reference)
    return purge if found is None else found


def plan(store: Store, purge: SourcePurge, key: str | None) -> PurgePlan:
    """What the purge would touch, counted from the views."""
    return purge_plan(store, purge.source, purge.entity, key)


def run(
    store: Store,
    authority: Authority,
    purge: SourcePurge,
    key: str | None,
    dry_run: bool = False,
    chunk: int = PURGE_CHUNK,
    on_progress: Callable[[int], None] | None = None,
) -> SourcePurge:
    """Purge chunk by chunk (`chunk` keys per transaction); return the audit row with what
    was done (a `dry_run` rolls every chunk back and writes no audit row: its counts are
    what the real run would do). `on_progress(keys)` after each chunk."""
    if chunk < 1:
        raise Refused("the chunk size must be at least 1")
    reconciler = Reconciler(store, authority)
    after = None
    while True:
        page = purge_keys(store, purge.source, purge.entity, key, after, chunk)
        if not page:
            break
        purge = purge.add(reconciler.purge(purge.source, page, purge, dry_run=dry_run))
        after = page[-1]
        if on_progress is not None:
            on_progress(len(page))
        if len(page) < chunk:
            break
    if dry_run:
        return replace(purge, finished_at=utcnow())
    return finish_purge(store, purge)


def purges_after(
    store: Store,
    moment: datetime | None,
    source: str | None = None,
    entities: set[str] | None = None,
) -> list[str]:
    """The purges that removed something (`undoable_purges`) and `touches` a read of the
    topics after `moment`, oldest first, each as "<source> (<scope>, <started at>)".
    Reading the topics again from before such a purge (`offsets reset`, `replay`) applies
    the purged source's events once more: the topics still hold them (docs/operations.md)."""
    found = []
    for row in undoable_purges(store):
        if not touches(row, moment, source, entities):
            continue
        scope = row["entity"] or "every entity"
        if row["reference"]:
            scope += f" {row['reference']}"
        started = row["started_at"].isoformat(timespec="seconds")
        found.append(f"{row['source']} ({scope}, {started})")
    return found


def purge_warning(found: list[str]) -> str | None:
    """The operator's warning for `purges_after`'s findings, or None."""
    if not found:
        return None
    return (
        f"source purges after the target: {'; '.join(found)}. The events of those sources "
        "that the topics still hold from before each purge are read again: those older "
        "than what the store holds now are stale, the others are applied again and can "
        "bring back what the purge removed. Check those sources' records afterwards "
        "(show, conflicts); purge again only what came back, then re-drive the correct "
        "data (docs/operations.md, a province sent wrong data)"
    )


def redrive_warning(found: list[str]) -> str:
    """The operator's warning when a redrive sent letters of a source purged after they
    failed (`RedriveSummary.purged_since`)."""
    return (
        f"re-driven letters of sources purged after they failed: {'; '.join(found)}. Each "
        "is applied unless the store holds that version of its view or a newer one, and the "
        "purge removed the source's views: what it removed can come back. Re-snapshot a "
        "purged source before re-driving its letters (docs/operations.md, a province sent "
        "wrong data), check its records (show, conflicts) and purge again what came back"
    )


def rebuild_warning(found: list[str]) -> str:
    """The operator's warning when the live store records purges (`purges_after(store,
    None)`) and a new store is built from the topics: it starts empty, so nothing the
    purged sources sent is stale in it."""
    return (
        f"the live store records source purges: {'; '.join(found)}. A rebuild applies "
        "every event the change topics still hold, those sources' too: what the purges "
        "removed comes back in the new store wherever the topics still hold it (their "
        "compaction keeps each key's last event). Purge again in the new store before it "
        "takes over (`source purge` with PORTAL_SYNC_STORE_URL set to it), and compare "
        "(`rebuild --compare` lists what differs)"
    )
