"""Merge rules of the national store: pure functions, no I/O.

The store's state depends only on the set of events received, never on their order or
on duplicates:

1. Per (source, entity, key) only the highest version counts; a lower version changes
   nothing (stale), nor does the same event again (duplicate). Two different events of one
   source with one version (a source that broke the version rule: adapters.md) are ordered
   by event id, then op, then content, so that the store does not depend on which came
   first, and a rebuild equals the live store.
2. A delete removes that source's contribution and keeps a tombstone with its version, so a
   late, older upsert cannot bring it back.
3. The canonical record merges the sources' current views field by field: each field comes
   from the source with the highest authority for that (entity, field), then the latest
   `occurred_at`, then the greatest source id. A record exists while a source contributes.

Data-quality findings (field conflicts, unusual dossier transitions) are derived here too.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from consumers.registry import Registry, SourceKind
from schemas import ChangeEvent
from schemas.errors import ConfigurationError
from schemas.events import PAYLOAD_MODELS
from schemas.identifiers import SOURCE_ID
from schemas.views import CanonicalRecord, SourceView

Outcome = Literal["applied", "duplicate", "stale"]
# The revision of these rules as code: a release that changes how records merge (a rank,
# a tie-break, a derived finding) raises it. It is part of the rules' fingerprint
# (`consumers.config`), so that a replay, rebuild or remerge of one release is refused on a
# store another release's workers keep; after such a release, run `remerge`.
# 2: a tone mark's place in a word is no disagreement; a birth's year and date agree
MERGE_RULES_REVISION = 2


@dataclass(frozen=True)
class Authority:
    """Who is the truth for which field: per (entity, field) an ordered list of rules.

    A rule is a source id (`national-population`), a source kind from the registry
    (`kind:national`), or `owner:<field>`: the source whose registered agency codes contain
    the value of <field> in its own view (the issuing agency of a document, the handling
    agency of a dossier). The first matching rule ranks highest; sources no rule matches
    rank equal, below every matched one. A rule list for field "*" applies to every field
    of the entity without a list of its own.
    """

    rules: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)

    @cached_property
    def ruled_entities(self) -> frozenset[str]:
        """The entities with a rule list for at least one field."""
        return frozenset(entity for entity, _ in self.rules)

    def rank(self, entity: str, field_name: str, view: SourceView) -> int:
        return self.rank_by(self.rules_for(entity, field_name), view)

    def rules_for(self, entity: str, field_name: str) -> tuple[str, ...]:
        """The rule list that ranks the sources of one (entity, field); a field's own list,
        even empty (every source equal: the latest wins), before the entity's "*"."""
        own = self.rules.get((entity, field_name))
        return self.rules.get((entity, "*"), ()) if own is None else own

    def rank_by(self, order: tuple[str, ...], view: SourceView) -> int:
        for position, rule in enumerate(order):
            if self._matches(rule, view):
                return len(order) - position
        return 0

    def _matches(self, rule: str, view: SourceView) -> bool:
        if rule.startswith("kind:"):
            return self.registry.kind(view.source) == rule[5:]
        if rule.startswith("owner:"):
            value = (view.data or {}).get(rule[6:])
            return self.registry.covers_agency(view.source, value)
        return rule == view.source

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Mapping[str, Iterable[str]]], registry: Registry | None = None
    ) -> Authority:
        rules = {
            (entity, field_name): _rule_list(entity, field_name, sources)
            for entity, fields in _tables(raw).items()
            for field_name, sources in fields.items()
        }
        return cls(rules, registry or Registry())

    @classmethod
    def load(cls, path: Path | None, registry: Registry | None = None) -> Authority:
        """Read an authority TOML file (`[entity] field = ["rule", ...]`); None: all equal."""
        if path is None:
            return cls(registry=registry or Registry())
        with path.open("rb") as handle:
            return cls.from_mapping(tomllib.load(handle), registry)


# The fields an authority file may name, by entity ("*": every field without a list).
FIELDS = {entity: frozenset(model.model_fields) for entity, model in PAYLOAD_MODELS.items()}
KINDS = get_args(SourceKind)


def _tables(raw: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    for entity, fields in raw.items():
        if entity not in FIELDS:
            raise ConfigurationError(
                f"authority file: [{entity}] is not an entity ({', '.join(FIELDS)})"
            )
        if not isinstance(fields, Mapping):
            raise ConfigurationError(f"authority file: [{entity}] must be a table of fields")
    return raw


def _rule_list(entity: str, field_name: str, sources: Any) -> tuple[str, ...]:
    """One field's rules, checked: a typo would rank nobody, silently."""
    where = f"authority file: [{entity}] {field_name}"
    if field_name != "*" and field_name not in FIELDS[entity]:
        raise ConfigurationError(f"{where}: not a field of {entity}")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ConfigurationError(f'{where}: a list of rules (["source-id", "kind:national"])')
    for rule in sources:
        if rule.startswith("kind:"):
            if rule[5:] not in KINDS:
                raise ConfigurationError(f"{where}: {rule!r}: a kind is one of {KINDS}")
        elif rule.startswith("owner:"):
            if rule[6:] not in FIELDS[entity]:
                raise ConfigurationError(f"{where}: {rule!r}: not a field of {entity}")
        elif SOURCE_ID.fullmatch(rule) is None:
            raise ConfigurationError(
                f"{where}: {rule!r} is not a source id, kind:<kind> or owner:<field>"
            )
    return tuple(sources)


def decide(current: SourceView | None, version: int) -> Outcome:
    """Rule 1: does an event of this version replace the source's current view? "duplicate"
    says only that the version is the same: `same_version` tells the same change again
    from another one."""
    if current is None or version > current.version:
        return "applied"
    if version == current.version:
        return "duplicate"
    return "stale"


def same_version(
    current: SourceView,
    event_id: str,
    deleted: bool,
    data: Mapping[str, Any] | None,
    occurred_at: datetime,
) -> Outcome:
    """Rule 1's tie: an event of the current view's version. The same change again is a
    duplicate; another change replaces the view if it orders after it (`change_order`), so
    either arrival order ends with the same view. The same change sent again with another
    time is another change: its time ranks the source's fields (rule 3)."""
    if (
        event_id == current.event_id
        and deleted == current.deleted
        and occurred_at == current.occurred_at
        and data == current.data
    ):
        return "duplicate"
    mine = change_order(event_id, deleted, data, occurred_at)
    if mine > change_order(current.event_id, current.deleted, current.data, current.occurred_at):
        return "applied"
    return "duplicate"


def change_order(
    event_id: str, deleted: bool, data: Mapping[str, Any] | None, occurred_at: datetime
) -> tuple[str, bool, bytes, datetime]:
    """A total order of the changes a source sent with one version: event id, a delete after
    an upsert, the payload's canonical JSON (keys sorted), then the time (the later one
    last: compaction keeps the last one sent, which a source that stamps a re-send anew
    sends with the later time). Payloads are JSON values as validated
    (`ChangeEvent.data_dict`), the same read from the store; times are in UTC, to the
    microsecond, as both backends keep them."""
    return (event_id, deleted, orjson.dumps(data, option=orjson.OPT_SORT_KEYS), occurred_at)


def live_views(views: Iterable[SourceView]) -> list[SourceView]:
    return [view for view in views if not view.deleted and view.data is not None]


def merge(entity: str, views: Iterable[SourceView], authority: Authority) -> CanonicalRecord | None:
    """Rule 3: the canonical record from every source's current view (None: no record)."""
    live = live_views(views)
    if not live:
        return None
    if len(live) == 1:  # one source: its view is the record (no ranking to do)
        (only,) = live
        fields = dict(sorted((only.data or {}).items()))
        return CanonicalRecord(
            fields, {only.source: only.version}, {only.source: list(fields)} if fields else {}
        )
    ruled = entity in authority.ruled_entities
    if len(live) == 2 and not ruled:  # the usual record of two sources, no rules
        return _one_birth(
            entity, _one_giver_per_pair(entity, _merge_two(*live), live), live, authority
        )
    if ruled:
        # Fields ranked by the same rule list share one ordering of the views.
        by_rules: dict[tuple[str, ...], dict[str, SourceView]] = {}
        winners: dict[str, SourceView] = {}
        for name in {name for view in live for name in view.data or {}}:
            rules = authority.rules_for(entity, name)
            best = by_rules.get(rules)
            if best is None:
                best = by_rules[rules] = _best_by_field(live, authority, rules)
            winners[name] = best[name]
    else:  # no rules for the entity: one ordering for every field
        winners = _best_by_field(live, authority, ())
    data: dict[str, Any] = {}
    origins: dict[str, list[str]] = {}  # source -> the fields it gave, in field order
    for name, giver in sorted(winners.items()):  # names are unique: views never compared
        data[name] = (giver.data or {})[name]
        gave = origins.get(giver.source)
        if gave is None:
            origins[giver.source] = [name]
        else:
            gave.append(name)
    record = CanonicalRecord(data, {view.source: view.version for view in live}, origins)
    return _one_birth(entity, _one_giver_per_pair(entity, record, live), live, authority)


# Fields that name one thing together: a kind and the identifier of that kind. Merged
# field by field, one source's kind could pair with another's identifier (an owner that
# cannot exist: a citizen's id as an organisation's), which the contract refuses in any
# one view. The identifier's giver gives the kind too (or none, if it gives none), unless
# the kind's own giver names the same identifier.
PAIRS = {"document": ("owner_kind", "owner_id"), "dossier": ("applicant_kind", "applicant_id")}


def _one_giver_per_pair(
    entity: str, record: CanonicalRecord, live: list[SourceView]
) -> CanonicalRecord:
    pair = PAIRS.get(entity)
    if pair is None or pair[0] not in record.data or pair[1] not in record.data:
        return record
    kind, ident = pair
    giver = {name: source for source, names in record.origins.items() for name in names}
    if giver[kind] == giver[ident]:
        return record
    (named_by,) = (view for view in live if view.source == giver[kind])
    if (named_by.data or {}).get(ident) == record.data[ident]:
        return record  # the kind's source names the same owner: one owner still
    (view,) = (view for view in live if view.source == giver[ident])
    data = dict(record.data)
    if kind in (view.data or {}):
        data[kind] = (view.data or {})[kind]
        giver[kind] = view.source
    else:
        del data[kind], giver[kind]
    origins: dict[str, list[str]] = {}
    for name in sorted(giver):  # sources in the order of the first field each gives
        origins.setdefault(giver[name], []).append(name)
    return CanonicalRecord(data, record.sources, origins)


def _one_birth(
    entity: str, record: CanonicalRecord, live: list[SourceView], authority: Authority
) -> CanonicalRecord:
    """A citizen's year of birth and date of birth, merged field by field, from sources
    that disagree (a year alone, 1945, from one; a date of 1946 from another) would make
    one person born twice. The one whose giver ranks higher under its own field's rules
    (then the later `occurred_at`, then the greater source id, as the merge orders views)
    stays; the other goes."""
    if entity != "citizen":
        return record
    year, born = record.data.get("year_of_birth"), record.data.get("date_of_birth")
    if year is None or born is None or _year_of(born) == year:
        return record
    giver = {name: source for source, names in record.origins.items() for name in names}
    by_source = {view.source: view for view in live}

    def standing(name: str) -> tuple[int, datetime, str]:
        view = by_source[giver[name]]
        return authority.rank(entity, name, view), view.occurred_at, view.source

    higher = standing("year_of_birth") > standing("date_of_birth")
    gone = "date_of_birth" if higher else "year_of_birth"
    data = {name: value for name, value in record.data.items() if name != gone}
    origins = {
        source: [name for name in names if name != gone] for source, names in record.origins.items()
    }
    return CanonicalRecord(
        data, record.sources, {source: names for source, names in origins.items() if names}
    )


def _year_of(born: Any) -> int | None:
    """The year of a date of birth as views hold it (`YYYY-MM-DD`), else None."""
    return int(born[:4]) if type(born) is str and born[:4].isdigit() else None


def _merge_two(one: SourceView, other: SourceView) -> CanonicalRecord:
    """`merge` of two live views of an entity without rules: every view ranks 0, so the
    later `occurred_at` (then the greater source id) gives each field it has, the other
    view the rest. A third of the general path's time (no ranking, no sort by key)."""
    sources = {one.source: one.version, other.source: other.version}  # as `live` has them
    if (one.occurred_at, one.source) > (other.occurred_at, other.source):
        one, other = other, one
    low, high = one.data or {}, other.data or {}
    data: dict[str, Any] = {}
    gave_low: list[str] = []
    gave_high: list[str] = []
    for name in sorted(low.keys() | high.keys()):
        if name in high:
            data[name] = high[name]
            gave_high.append(name)
        else:
            data[name] = low[name]
            gave_low.append(name)
    # Sources in the order of the first field each gives, as the general path has them.
    if not gave_low:
        origins = {other.source: gave_high} if gave_high else {}
    elif not gave_high:
        origins = {one.source: gave_low}
    elif gave_low[0] < gave_high[0]:
        origins = {one.source: gave_low, other.source: gave_high}
    else:
        origins = {other.source: gave_high, one.source: gave_low}
    return CanonicalRecord(data, sources, origins)


def merge_events(
    events: Iterable[ChangeEvent], authority: Authority
) -> dict[tuple[str, str], CanonicalRecord]:
    """The rules applied to a set of events at once, in memory: each source's highest
    version per record (rules 1 and 2), then the field merge (rule 3). What the store must
    hold after applying the same events in any order; the demo's self-check and the tests
    compare the store with it."""
    latest: dict[tuple[str, str, str], ChangeEvent] = {}
    for event in events:
        slot = (event.entity, event.key, event.source)
        current = latest.get(slot)
        if (
            current is None
            or event.version > current.version
            or (event.version == current.version and _order_of(event) > _order_of(current))
        ):
            latest[slot] = event
    views: dict[tuple[str, str], list[SourceView]] = {}
    for (entity, key, source), event in latest.items():
        view = SourceView(source, event.version, str(event.event_id), event.occurred_at,
                          event.op == "delete", event.data_dict())  # fmt: skip
        views.setdefault((entity, key), []).append(view)
    merged = {key: merge(key[0], record_views, authority) for key, record_views in views.items()}
    return {key: record for key, record in merged.items() if record is not None}


def _order_of(event: ChangeEvent) -> tuple[str, bool, bytes, datetime]:
    return change_order(
        str(event.event_id), event.op == "delete", event.data_dict(), event.occurred_at
    )


def _best_by_field(
    live: list[SourceView], authority: Authority, rules: tuple[str, ...]
) -> dict[str, SourceView]:
    """Per field, the view that gives it under one rule list: the highest rank, then the
    latest `occurred_at`, then the greatest source id (each view is one source's: no ties).
    The views are updated in from the lowest, so the last to give a field wins."""
    best: dict[str, SourceView] = {}
    for view in sorted(
        live, key=lambda view: (authority.rank_by(rules, view), view.occurred_at, view.source)
    ):
        best.update(dict.fromkeys(view.data or {}, view))
    return best


def field_conflicts(views: Iterable[SourceView]) -> dict[str, list[list[str]]]:
    """Fields on which contributing sources disagree: per field, the groups of sources that
    agree with each other (two groups or more), each group sorted, groups by first source.
    Values agree when their JSON is the same but for where each word's tone mark sits
    (`tone_folded`)."""
    live = live_views(views)
    if len(live) < 2:  # one source cannot disagree with itself
        return {}
    for view in live:
        if view.data and "year_of_birth" in view.data:  # rare: compared with dates too
            live = [_with_birth_year(view) for view in live]
            break
    if len(live) == 2:  # the usual case: a third of the time of the grouping below
        return _two_source_conflicts(*live)
    providers: dict[str, dict[str, Any]] = {}
    for view in live:
        for name, value in (view.data or {}).items():
            providers.setdefault(name, {})[view.source] = value
    result: dict[str, list[list[str]]] = {}
    for name, by_source in sorted(providers.items()):
        # Text (most fields) groups by itself; anything else by its canonical JSON (bytes,
        # never equal to text): 1, 1.0 and true stay apart, as JSON has them.
        groups: dict[str | bytes, list[str]] = {}
        for source, value in sorted(by_source.items()):
            group = value if type(value) is str else _canonical_json(value)
            groups.setdefault(group, []).append(source)
        if len(groups) > 1:
            groups = _regrouped_by_spelling(groups)
        if len(groups) > 1:
            result[name] = sorted(groups.values())
    return result


def _with_birth_year(view: SourceView) -> SourceView:
    """A view that gives a date of birth and no year (or a null one, as a table's empty
    column sends it), given its date's year as well: a year alone from one source (1945)
    disagrees with another's date of another year (1946), and agrees with one of 1945."""
    data = view.data or {}
    year = _year_of(data.get("date_of_birth"))
    if year is None or data.get("year_of_birth") is not None:  # null with a date: its year
        return view
    given = {**data, "year_of_birth": year}
    return SourceView(
        view.source, view.version, view.event_id, view.occurred_at, view.deleted, given
    )


def _two_source_conflicts(one: SourceView, other: SourceView) -> dict[str, list[list[str]]]:
    """`field_conflicts` of two views: the fields both give, with values of different JSON
    (text against text directly; text never equals a non-text value), unless they differ
    only in where tone marks sit."""
    first, second = (one, other) if one.source < other.source else (other, one)
    a, b = first.data or {}, second.data or {}
    result: dict[str, list[list[str]]] = {}
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        # Values Python finds unequal never print the same JSON (an address whose line
        # differs); equal text is equal JSON (text equals only text); other equal values
        # may print differently (1, 1.0 and true).
        if x == y and (type(x) is str or _canonical_json(x) == _canonical_json(y)):
            continue
        if _tones_apart_only(x, y):  # "Hoà" and "Hòa": one name, typed two ways
            continue
        result[name] = [[first.source], [second.source]]
    return result


def record_changes(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> dict[str, list[Any]]:
    """Field -> [old, new] for every field that differs (a missing side counts as None)."""
    old, new = before or {}, after or {}
    if not old:  # a new record: every field is new (the usual case in a first snapshot)
        return {name: [None, value] for name, value in sorted(new.items())}
    if not new:
        return {name: [value, None] for name, value in sorted(old.items())}
    if old.keys() == new.keys():  # the same fields (the usual update): no union to build
        return {name: [old[name], new[name]] for name in sorted(new) if old[name] != new[name]}
    return {
        name: [old.get(name), new.get(name)]
        for name in sorted(set(old) | set(new))
        if name not in old or name not in new or old[name] != new[name]
    }


# National dossier lifecycle (TrangThaiHoSo): the usual next statuses of each status.
DOSSIER_TRANSITIONS: Mapping[int, frozenset[int]] = {
    1: frozenset({2, 3, 7}),  # submitted -> accepted, not accepted, withdrawn
    2: frozenset(
        {4, 5, 6, 7, 8}
    ),  # accepted -> processing, docs/fees requested, withdrawn, stopped
    4: frozenset({5, 6, 7, 8, 9}),  # processing -> requests, withdrawn, stopped, finished
    5: frozenset({4, 7, 8}),  # additional documents requested -> processing again
    6: frozenset({4, 7, 8, 9}),  # financial obligation requested -> processing, finished
    9: frozenset({10}),  # finished -> result returned
    3: frozenset(),
    7: frozenset(),
    8: frozenset(),
    10: frozenset(),
}


# How far along the main path a status is. Sources report snapshots (a poll, a daily
# feed), so a forward jump that skips statuses (1 -> 4, 2 -> 10) is usual; going back, or
# leaving a final status (3, 7, 8, 10), is not.
LIFECYCLE_STAGE: Mapping[int, int] = {1: 0, 2: 1, 4: 2, 5: 2, 6: 2, 9: 3, 10: 4}


def unusual_transition(old_status: object, new_status: object) -> bool:
    """A status change that the national lifecycle does not foresee (same status is fine)."""
    if not isinstance(old_status, int) or not isinstance(new_status, int):
        return False
    if old_status == new_status or new_status in DOSSIER_TRANSITIONS.get(old_status, ()):
        return False
    old_stage, new_stage = LIFECYCLE_STAGE.get(old_status), LIFECYCLE_STAGE.get(new_status)
    forward = old_stage is not None and new_stage is not None and new_stage > old_stage
    return not forward


# Vietnamese writes a syllable's tone (huyền, sắc, hỏi, ngã, nặng) as one mark over or
# under one of its vowels, and two conventions place it differently in open syllables of
# oa, oe and uy: "Hòa", "Khỏe", "Thủy" (the older) and "Hoà", "Khoẻ", "Thuỷ" (the 1980s
# school rule). Sources keep either, and one person's name typed both ways is not a
# disagreement between them. A tone is a property of the syllable, not of a vowel: two
# words that differ only in where their marks sit are the same word.
_TONE_MARKS = "\u0300\u0301\u0303\u0309\u0323"  # huyền, sắc, ngã, hỏi, nặng (NFD)
_WORD = re.compile(r"(?:[^\W\d_]|[\u0300-\u036f])+")


def tone_folded(text: str) -> str:
    """`text` decomposed (NFD), with each word's tone marks moved to the word's end: equal
    for two spellings of one name that differ only in where the tone mark sits. A
    comparison key, never stored or shown."""
    if text.isascii():  # no marks (identifiers, codes, most of a record): as it is
        return text
    return _folded(unicodedata.normalize("NFD", text))


def _folded(decomposed: str) -> str:
    """`tone_folded` of a text already decomposed (NFD)."""
    return _WORD.sub(_tone_last, decomposed)


def _tone_last(word: re.Match[str]) -> str:
    letters = word.group()
    tones = "".join(mark for mark in letters if mark in _TONE_MARKS)
    if not tones:
        return letters
    return "".join(mark for mark in letters if mark not in _TONE_MARKS) + tones


def _tones_apart_only(x: Any, y: Any) -> bool:
    """Whether two JSON values are the same JSON but for where tone marks sit in their
    texts: of one type each part (text never agrees with anything else: "1" and 1, 1 and
    1.0, 1 and true stay apart), objects with the same keys, arrays of the same length.
    Part by part, so that an address whose ward code differs is told apart at once."""
    kind = type(x)
    if kind is not type(y):
        return False
    if kind is str:
        return x == y or _only_tones_apart(x, y)
    if kind is dict:
        return x.keys() == y.keys() and all(_tones_apart_only(x[k], y[k]) for k in x)
    if kind is list:
        return len(x) == len(y) and all(map(_tones_apart_only, x, y))
    return bool(x == y)


def _only_tones_apart(x: str, y: str) -> bool:
    """`tone_folded(x) == tone_folded(y)` for two different texts, cheaply when they differ
    otherwise (most disagreements): text without marks is never one with marks, and two
    texts whose letters differ once the tone marks are gone never fold equal."""
    if x.isascii() or y.isascii():
        return False
    x, y = unicodedata.normalize("NFD", x), unicodedata.normalize("NFD", y)
    if len(x) != len(y) or _toneless(x) != _toneless(y):  # a fold moves marks, keeps them
        return False
    return _folded(x) == _folded(y)


def _toneless(text: str) -> str:
    """`text` (NFD) without its tone marks (str.replace: a tenth of str.translate's time)."""
    for mark in _TONE_MARKS:
        text = text.replace(mark, "")
    return text


def _regrouped_by_spelling(
    groups: dict[str | bytes, list[str]],
) -> dict[str | bytes, list[str]]:
    """Groups of equal values joined where their values fold equal (`tone_folded`): text by
    its fold, canonical JSON by its fold as bytes. The sources of each group in order.
    Only values whose decomposed text is the same without tone marks can fold equal: the
    others (most disagreements) are never folded."""
    sized: dict[tuple[type, int], list[tuple[str | bytes, str]]] = {}
    for value in groups:
        text = value.decode() if isinstance(value, bytes) else value
        if not text.isascii():
            decomposed = unicodedata.normalize("NFD", text)
            sized.setdefault((type(value), len(decomposed)), []).append((value, decomposed))
    alike: dict[tuple[type, str], list[tuple[str | bytes, str]]] = {}
    for (kind, _), candidates in sized.items():
        if len(candidates) > 1:  # a fold moves marks and keeps them: one length
            for value, decomposed in candidates:
                alike.setdefault((kind, _toneless(decomposed)), []).append((value, decomposed))
    same = {
        value: _folded(decomposed)
        for candidates in alike.values()
        if len(candidates) > 1
        for value, decomposed in candidates
    }
    if not same:
        return groups
    joined: dict[str | bytes, list[str]] = {}
    for value, sources in groups.items():
        fold = same.get(value)
        key: str | bytes = value if fold is None else (type(value), fold)  # type: ignore[assignment]
        joined.setdefault(key, []).extend(sources)
    return {key: sorted(sources) for key, sources in joined.items()}


def _canonical_json(value: Any) -> bytes:
    """One text per JSON value whatever its key order: equal values group together."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
