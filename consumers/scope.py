"""Write scope per source (pure: no I/O): which events a registered source may write.

In order, an event is out of scope when:

1. its entity is not in the source's `entities` (absent: every entity);
2. it is a delete and the source has `may_delete = false` (a delete is a write);
3. the registry's `[entities.<entity>] kinds` does not list the source's kind;
4. the source is not `national` and does not own the record:
   - a dossier: the agency part of its code (`000.00.01.H29` of
     `000.00.01.H29-240115-0001`) and, when the event carries one, its `agency_code` must
     both be among the source's `agency_codes` (an inter-agency dossier's
     `original_code` may name another agency: it is not checked);
   - a document upsert: its `issuer_code` must be among the source's `agency_codes`
     (none: nobody but a national source owns it). A document's id does not name its
     issuer and a delete carries no data; a delete only ever removes the sender's own view
     (merge rule 2), so it needs rules 1-3 only.
   Citizens and organisations have no owner field: rules 1-3 limit who writes them, and
   the authority file ranks the writers.

The verdict depends on the event and the registry only: a replay or a rebuild refuses
exactly what the live worker refused. Reasons name the rule and the field, never a value.

One more rule needs the record (`document_claim_violation`, applied by the reconciler
inside the batch's transaction): a document's id does not name its issuer, so rule 4 alone
lets an agency write a view of another agency's document under its own `issuer_code`, and
win the merge (`owner:issuer_code` ranks each view by the issuer it names). A non-national
document upsert whose `issuer_code` differs from the one another source's live view of
the document names is refused. Events of one record are applied in their partition's
order, so a rebuild refuses what the live worker refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from consumers.registry import Registry
from schemas import ChangeEvent
from schemas.identifiers import DOSSIER_CODE
from schemas.views import SourceView


def scope_violation(event: ChangeEvent, registry: Registry) -> str | None:
    """Why `event` is out of its source's write scope, or None when it is in scope (and
    always in development mode, or for a source the registry does not list)."""
    info = registry.sources.get(event.source)
    if registry.development_mode or info is None:
        return None
    if info.entities is not None and event.entity not in info.entities:
        return "the source may not write this entity (registry: entities)"
    if event.op == "delete" and not info.may_delete:
        return "the source may not delete (registry: may_delete = false)"
    kinds = registry.kinds_for(event.entity)
    if kinds is not None and info.kind not in kinds:
        return "sources of this kind may not write this entity (registry: entities.*.kinds)"
    if info.kind == "national":
        return None
    data = event.data  # a dossier's or document's payload model, None for a delete
    if event.entity == "dossier":
        match = DOSSIER_CODE.fullmatch(event.key)
        if match is None or match["unit"] not in info.agency_codes:
            return "key: the dossier code's agency is not one of the source's agency_codes"
        agency = getattr(data, "agency_code", None)
        if agency is not None and agency not in info.agency_codes:
            return "data.agency_code is not one of the source's agency_codes"
    elif (
        event.entity == "document"
        and event.op == "upsert"
        and getattr(data, "issuer_code", None) not in info.agency_codes
    ):
        return "data.issuer_code is not one of the source's agency_codes"
    return None


def document_claim_violation(
    source: str, issuer: object, views: Iterable[SourceView], registry: Registry
) -> str | None:
    """Why a document upsert of `source` naming `issuer` may not join the document's
    current `views` (None: it may): another source's live view names another issuer, as
    its issuer (the owner of that code) or as a national source. A national source is not
    limited (its `entities` are); an upsert naming no issuer is rule 4's to refuse.

    The first of two agencies claiming one document keeps it, whichever is genuine: events
    of one record from different sources converge in any order except in such a dispute,
    which the dead letters show (docs/security.md)."""
    if registry.development_mode or issuer is None:
        return None
    if registry.kind(source) in (None, "national"):
        return None
    for view in views:
        if view.source == source or view.deleted or view.data is None:
            continue
        named = view.data.get("issuer_code")
        if named is None or named == issuer:
            continue
        if registry.kind(view.source) == "national" or registry.covers_agency(view.source, named):
            return "data.issuer_code: another source's view names another issuer of the document"
    return None
