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
     (none: nobody but a national source owns it);
   - a document whose id names its issuer (`000.00.01.H26:GKS-000123`, the agency and a
     colon), upsert or delete: that agency must be among the source's `agency_codes` too.
     Only such an id ties a document to its issuer: with a bare id (`GKS-000123`) an
     agency could write its own `issuer_code` into another agency's document and win the
     merge (`owner:issuer_code` ranks each view by the issuer it names). The registry's
     `[entities.document] key_names_issuer = true` (the shipped one) refuses bare ids of
     non-national sources. A delete without such an id needs rules 1-3 only: it only ever
     removes the sender's own view (merge rule 2).
   Citizens and organisations have no owner field: rules 1-3 limit who writes them, and
   the authority file ranks the writers.

The verdict depends on the event and the registry only: a replay or a rebuild refuses
exactly what the live worker refused. Reasons name the rule and the field, never a value.
"""

from __future__ import annotations

from consumers.registry import Registry
from schemas import ChangeEvent
from schemas.identifiers import DOSSIER_CODE, ISSUER_KEY


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
    elif event.entity == "document":
        named = ISSUER_KEY.fullmatch(event.key)
        if named is not None and named["unit"] not in info.agency_codes:
            return "key: the document id's issuer is not one of the source's agency_codes"
        if named is None and registry.key_names_issuer("document"):
            return "key: a document id must begin with its issuer's agency code (registry)"
        if event.op == "upsert" and getattr(data, "issuer_code", None) not in info.agency_codes:
            return "data.issuer_code is not one of the source's agency_codes"
    return None
