"""Property tests of the national store with a non-trivial authority (source ids, `kind:`
rules through a registry, `owner:` rules): convergence, idempotence, tombstones, remerge
equals replay, and an audit history that redelivery does not duplicate."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.checks import Checked
from consumers.merge import Authority, SourceView, field_conflicts, merge
from consumers.reconciler import Message, Reconciler, document_owner
from schemas import derive_event_id, parse_event
from store.core import Store
from tests.support.store_helpers import (
    CITIZEN,
    CITIZEN_2,
    CITIZEN_MISSING,
    DOSSIER,
    DOSSIER_2,
    DOSSIER_3,
    G12,
    H26,
    H29,
    ORG,
    REGISTRY,
    TOPIC,
    Feed,
    anomaly_rows,
    conflict_rows,
    event,
    fresh_store,
    history_rows,
    owner_rows,
)

RECORDS = (
    ("citizen", CITIZEN),
    ("citizen", CITIZEN_2),
    ("organization", ORG),
    ("document", "D-1"),
    ("document", "D-2"),
    ("dossier", DOSSIER),
    ("dossier", DOSSIER_2),
)
# Registered sources of every kind, and one the registry does not know.
SOURCES = ("national-population", "ministry-btp", "province-01", "province-79", "zz-other")
OWNERS = (
    ("citizen", CITIZEN),
    ("citizen", CITIZEN_2),
    ("citizen", CITIZEN_MISSING),
    ("organization", ORG),
)
FIELDS: dict[str, dict[str, Sequence[Any]]] = {
    "citizen": {
        "full_name": ("Nguyễn Văn An", "Trần Thị Bình", None),
        "sex": ("male", "female"),
        "phone": ("0912345678", None),
    },
    "organization": {"name": ("Công ty A", "Công ty B"), "status": ("active", "dissolved")},
    "document": {
        "issuer_code": (H26, H29, G12, None),
        "title": ("Giấy khai sinh", "Bản sao"),
        "status": ("valid", "revoked"),
    },
    "dossier": {
        "agency_code": (H26, H29, G12),
        "status": (1, 2, 4, 9, 10),
        "original_code": (DOSSIER_3, DOSSIER),
    },
}

AUTHORITY_A = Authority.from_mapping(
    {
        "citizen": {
            "full_name": ["national-population", "kind:ministry"],
            "sex": ["kind:national"],
            "*": ["province-79"],
        },
        "organization": {"*": ["kind:ministry", "province-01"]},
        "document": {"*": ["owner:issuer_code", "kind:national"], "title": ["province-01"]},
        "dossier": {"*": ["owner:agency_code"], "status": ["owner:agency_code", "province-79"]},
    },
    REGISTRY,
)
AUTHORITY_B = Authority.from_mapping(
    {
        "citizen": {"full_name": ["kind:province", "national-population"], "*": ["zz-other"]},
        "organization": {"name": ["province-79"]},
        "document": {"*": ["kind:province"], "owner_id": ["owner:issuer_code"]},
        "dossier": {"*": ["province-01"], "original_code": ["owner:agency_code"]},
    },
    REGISTRY,
)
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Spec:
    record: int
    source: str
    version: int
    minute: int
    data: dict[str, Any] | None  # None: a delete

    @property
    def entity(self) -> str:
        return RECORDS[self.record][0]

    @property
    def key(self) -> str:
        return RECORDS[self.record][1]

    def encode(self) -> bytes:
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": str(derive_event_id(self.source, self.entity, self.key, self.version)),
            "source": self.source,
            "entity": self.entity,
            "key": self.key,
            "op": "delete" if self.data is None else "upsert",
            "version": self.version,
            "occurred_at": f"2024-01-15T10:{self.minute:02d}:00+07:00",
        }
        if self.data is not None:
            event["data"] = self.data
        return json.dumps(event, ensure_ascii=False).encode("utf-8")


@st.composite
def specs(draw: st.DrawFn, record: int | None = None) -> Spec:
    record = draw(st.integers(0, len(RECORDS) - 1)) if record is None else record
    entity = RECORDS[record][0]
    data = None
    if draw(st.integers(0, 3)) > 0:  # three upserts for one delete
        data = draw(
            st.fixed_dictionaries(
                {},
                optional={name: st.sampled_from(values) for name, values in FIELDS[entity].items()},
            )
        )
        if entity == "document" and draw(st.booleans()):
            owner_kind, owner_id = draw(st.sampled_from(OWNERS))
            data.update(owner_kind=owner_kind, owner_id=owner_id)
    return Spec(
        record,
        draw(st.sampled_from(SOURCES)),
        draw(st.integers(1, 5)),
        draw(st.integers(0, 3)),
        data,
    )


event_sets = st.lists(
    specs(), min_size=1, max_size=16, unique_by=lambda s: (s.record, s.source, s.version)
)


@st.composite
def sets_with_changes_of_one_version(draw: st.DrawFn) -> list[Spec]:
    """Event sets in which a source also sent other changes with a version it had used
    (the same event id, another payload or op: a source that broke the version rule), or
    the same change again at another time (a re-send that stamped it anew)."""
    base = draw(event_sets)
    again = []
    for spec in draw(st.lists(st.sampled_from(base), min_size=1, max_size=4)):
        other = draw(specs(record=spec.record))
        data = spec.data if draw(st.booleans()) else other.data
        again.append(Spec(spec.record, spec.source, spec.version, other.minute, data))
    unique = {(s.record, s.source, s.version, json.dumps(s.data, sort_keys=True), s.minute): s
              for s in [*base, *again]}  # fmt: skip
    return list(unique.values())


# -- helpers ------------------------------------------------------------------------------


def stream(specs_in_order: Sequence[Spec], partitions: int = 1, start: int = 0) -> list[Checked]:
    """Consecutive offsets per partition; a record always maps to one partition."""
    next_offset = [start] * partitions
    result = []
    for spec in specs_in_order:
        partition = spec.record % partitions
        raw = spec.encode()
        message = Message(TOPIC, partition, next_offset[partition], raw)
        result.append(Checked(message, parse_event(raw).event, []))
        next_offset[partition] += 1
    return result


def split(items: Sequence[Checked], cuts: Sequence[int]) -> list[list[Checked]]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(items)}), len(items)]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


def apply_batches(reconciler: Reconciler, batches: Sequence[Sequence[Checked]]) -> list[str]:
    outcomes = []
    for batch in batches:
        report = reconciler.apply(batch, [c.message for c in batch])
        outcomes += [o.outcome for o in report.outcomes]
    return outcomes


def state(store: Store) -> tuple[list[Any], list[Any], list[Any]]:
    """Records (data, sources, provenance), open conflicts, document owners and flags."""
    return list(store.iter_records()), conflict_rows(store), owner_rows(store)


def oracle(event_set: Sequence[Spec], authority: Authority) -> tuple[list[Any], ...]:
    """The expected state, merged in memory from the highest version of each source."""
    latest: dict[tuple[int, str], Spec] = {}
    for spec in event_set:
        current = latest.get((spec.record, spec.source))
        if current is None or (spec.version, _content(spec)) > (current.version, _content(current)):
            latest[(spec.record, spec.source)] = spec
    records, conflicts, documents = [], [], {}
    for index, (entity, key) in enumerate(RECORDS):
        views = []
        for spec in (s for (r, _), s in latest.items() if r == index):
            event = parse_event(spec.encode()).event
            deleted = spec.data is None
            views.append(
                SourceView(
                    spec.source,
                    spec.version,
                    str(event.event_id),
                    event.occurred_at,
                    deleted,
                    event.data_dict(),
                )
            )
        record = merge(entity, views, authority)
        if record is None:
            continue
        records.append((entity, key, record.data, record.sources, record.provenance))
        for name, sources in field_conflicts(views).items():
            conflicts.append((entity, key, name, tuple(tuple(group) for group in sources)))
        if entity == "document":
            documents[(entity, key)] = document_owner(record)
    present = {(r[0], r[1]) for r in records}
    owners = [
        (entity, key, owner[0], owner[1], owner not in present)
        for (entity, key), owner in documents.items()
        if owner is not None
    ]
    return sorted(records, key=lambda r: (r[0], r[1])), sorted(conflicts), sorted(owners)


def _content(spec: Spec) -> tuple[bool, str, int]:
    """Between two changes of one version (and event id): a delete after an upsert, then
    the payload whose JSON with sorted keys sorts after, then the later time (the merge's
    documented order)."""
    return (
        spec.data is None,
        json.dumps(spec.data, sort_keys=True, ensure_ascii=False, separators=(",", ":")),
        spec.minute,
    )


def replay_history(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    """Fold the audit history; every entry's old values must be the state it changes."""
    folded: dict[tuple[str, str], dict[str, Any]] = {}
    for entity, key, _event, _source, _version, changes in history_rows(store):
        record = folded.setdefault((entity, key), {})
        for name, (old, new) in changes.items():
            assert record.get(name) == old, (entity, key, name, record, changes)
            record[name] = new
    return _non_empty({k: r for k, r in folded.items()})


def without_nulls(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    """Canonical records as the history can tell them: a null field reads as absent, and a
    record without fields has no history entry (record_changes sees no change)."""
    return _non_empty({(e, k): data for e, k, data, _s, _p in store.iter_records()})


def _non_empty(records: dict[tuple[str, str], dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    result = {}
    for record_key, record in records.items():
        fields = {name: value for name, value in record.items() if value is not None}
        if fields:
            result[record_key] = fields
    return result


# -- properties ---------------------------------------------------------------------------


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_permutation_and_duplication_converge(event_set: list[Spec], data: Any) -> None:
    expected = oracle(event_set, AUTHORITY_A)
    with fresh_store() as reference:
        apply_batches(Reconciler(reference, AUTHORITY_A), [stream(event_set)])
        assert state(reference) == expected

    duplicates = data.draw(st.lists(st.sampled_from(event_set), max_size=len(event_set)))
    shuffled = data.draw(st.permutations([*event_set, *duplicates]))
    messages = stream(shuffled, data.draw(st.integers(1, 3)))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=5))
    with fresh_store() as store:
        outcomes = apply_batches(Reconciler(store, AUTHORITY_A), split(messages, cuts))
        assert len(outcomes) == len(messages)
        assert outcomes.count("applied") <= len(event_set)
        assert state(store) == expected


@SETTINGS
@given(event_set=sets_with_changes_of_one_version(), data=st.data())
def test_changes_of_one_version_converge_whatever_their_order(
    event_set: list[Spec], data: Any
) -> None:
    """A source that sent two changes with one version: the store keeps the one that orders
    after, whichever arrived first, in whatever batches (a rebuild equals the live store)."""
    expected = oracle(event_set, AUTHORITY_A)
    for _ in range(2):
        shuffled = data.draw(st.permutations(event_set))
        messages = stream(shuffled, data.draw(st.integers(1, 3)))
        cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=5))
        with fresh_store() as store:
            apply_batches(Reconciler(store, AUTHORITY_A), split(messages, cuts))
            assert state(store) == expected
            assert replay_history(store) == without_nulls(store)


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_second_application_changes_nothing(event_set: list[Spec], data: Any) -> None:
    messages = stream(data.draw(st.permutations(event_set)))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=3))
    batches = split(messages, cuts)
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY_A)
        apply_batches(reconciler, batches)
        settled = (state(store), history_rows(store), anomaly_rows(store))
        assert settled[0] == oracle(event_set, AUTHORITY_A)

        # the same batches at the same offsets: skipped
        for batch in batches:
            report = reconciler.apply(batch, [c.message for c in batch])
            assert report.already_applied == len(batch)
            assert report.outcomes == []
        # everything again, in another order, at new offsets: nothing applies
        again = stream(data.draw(st.permutations(event_set)), start=len(messages))
        outcomes = apply_batches(reconciler, [again])
        assert set(outcomes) <= {"duplicate", "stale"}
        assert len(outcomes) == len(event_set)
        assert (state(store), history_rows(store), anomaly_rows(store)) == settled


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_late_older_upsert_never_resurrects(event_set: list[Spec], data: Any) -> None:
    record = data.draw(st.integers(0, len(RECORDS) - 1))
    entity = RECORDS[record][0]
    sources = data.draw(st.lists(st.sampled_from(SOURCES), min_size=1, unique=True))
    deletes = [Spec(record, source, 100, data.draw(st.integers(0, 3)), None) for source in sources]
    late_data = {name: values[0] for name, values in FIELDS[entity].items()}
    late = [
        Spec(record, source, version, 59, late_data)
        for source in sources
        for version in data.draw(st.lists(st.integers(1, 99), min_size=1, max_size=3, unique=True))
    ]
    others = [s for s in event_set if not (s.record == record and s.source in sources)]
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY_A)
        apply_batches(reconciler, [stream([*others, *deletes])])
        settled = state(store)
        history = history_rows(store)
        assert settled == oracle([*others, *deletes], AUTHORITY_A)
        for entity_name, key, _data, contributors, provenance in settled[0]:
            if (entity_name, key) == RECORDS[record]:
                assert not set(contributors) & set(sources)
                assert not {o["source"] for o in provenance.values()} & set(sources)

        late_messages = stream(data.draw(st.permutations(late)), start=len(others) + len(deletes))
        cuts = data.draw(st.lists(st.integers(1, max(1, len(late_messages) - 1)), max_size=3))
        outcomes = apply_batches(reconciler, split(late_messages, cuts))
        assert outcomes == ["stale"] * len(late_messages)
        assert state(store) == settled
        assert history_rows(store) == history


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_remerge_equals_replay(event_set: list[Spec], data: Any) -> None:
    messages = stream(data.draw(st.permutations(event_set)), data.draw(st.integers(1, 3)))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=3))
    with fresh_store() as replayed:
        apply_batches(Reconciler(replayed, AUTHORITY_B), split(messages, cuts))
        expected = state(replayed)
    assert expected == oracle(event_set, AUTHORITY_B)

    with fresh_store() as store:
        apply_batches(Reconciler(store, AUTHORITY_A), [messages])
        before = history_rows(store)
        records = {(r[0], r[1]): r[2:] for r in store.iter_records()}
        changed = Reconciler(store, AUTHORITY_B).remerge(store.record_keys())
        assert state(store) == expected
        added = history_rows(store)[len(before) :]
        assert history_rows(store)[: len(before)] == before
        # counted: the records whose values changed (a history entry each), and those whose
        # values stayed and whose sources or provenance moved
        moved = [
            key
            for entity, key, data, *credit in store.iter_records()
            if (entity, key) in records
            and records[(entity, key)][0] == data
            and list(records[(entity, key)][1:]) != credit
        ]
        assert (changed.values, changed.credit_only) == (len(added), len(moved))
        assert all(row[2:5] == (None, "remerge", None) and row[5] for row in added)
        # the audit trail still folds to the records
        assert replay_history(store) == without_nulls(store)
        # a second remerge under the same authority changes nothing
        assert Reconciler(store, AUTHORITY_B).remerge(store.record_keys()).total == 0
        assert state(store) == expected


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_history_is_not_duplicated_by_redelivery(event_set: list[Spec], data: Any) -> None:
    messages = stream(data.draw(st.permutations(event_set)))
    with fresh_store() as reference:
        apply_batches(Reconciler(reference, AUTHORITY_A), [messages])
        expected_history = history_rows(reference)
        # the history folds to the records, entry by entry
        assert replay_history(reference) == without_nulls(reference)
    applied_events = {str(c.event.event_id) for c in messages}
    assert {row[2] for row in expected_history} <= applied_events
    assert len(expected_history) <= len(messages)

    # A consumer that crashed after the store commit gets a tail of the last batch again,
    # with the rest; then everything is delivered again at new offsets.
    applied = data.draw(st.integers(0, len(messages)))
    restart = data.draw(st.integers(0, applied))
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY_A)
        apply_batches(reconciler, [messages[:applied], messages[restart:]])
        assert history_rows(store) == expected_history
        again = stream(data.draw(st.permutations([*event_set, *event_set])), start=len(messages))
        apply_batches(reconciler, split(again, data.draw(st.lists(st.integers(1, 20)))))
        assert history_rows(store) == expected_history
        assert state(store) == oracle(event_set, AUTHORITY_A)


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_a_batch_written_in_parts_equals_it_written_whole(event_set: list[Spec], data: Any) -> None:
    """Where the store's writes overlap the merge (PostgreSQL), a batch is merged and sent
    in parts, the same record possibly written by several parts: the tables, the history,
    the anomalies and the outcomes are those of the batch written whole. Conflicts are
    reported as new per part: one that comes and goes within the batch counts too."""
    duplicates = data.draw(st.lists(st.sampled_from(event_set), max_size=4))
    messages = stream(data.draw(st.permutations([*event_set, *duplicates])))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=2))
    part = data.draw(st.integers(1, 4))
    results = []
    new_conflicts: list[list[set[tuple[str, str]]]] = []
    for part_events in (None, part):
        with fresh_store() as store:
            reconciler = Reconciler(store, AUTHORITY_A, part_events=part_events)
            reports = [
                reconciler.apply(batch, [c.message for c in batch])
                for batch in split(messages, cuts)
            ]
            results.append(
                (
                    state(store),
                    history_rows(store),
                    anomaly_rows(store),
                    [(r.outcomes, r.anomalies, len(r.changes)) for r in reports],
                )
            )
            new_conflicts.append([set(r.new_conflicts) for r in reports])
    assert results[0] == results[1]
    assert all(whole <= parts for whole, parts in zip(*new_conflicts, strict=True))


def test_the_same_change_sent_again_at_another_time_converges_whatever_the_order() -> None:
    """One source's change sent twice under one version and event id, stamped anew (its
    time ranks its fields against another source's): the first to arrive stayed, so the
    record's value depended on the order, and a rebuild from the compacted topic (which
    keeps the last one sent) differed from the live store."""
    early = event("citizen", CITIZEN, "province-01", 1, {"phone": "0911111111"}, minute=0)
    late = event("citizen", CITIZEN, "province-01", 1, {"phone": "0911111111"}, minute=9)
    other = event("citizen", CITIZEN, "province-79", 1, {"phone": "0922222222"}, minute=5)
    stores = []
    for batches in ([[early], [late, other]], [[late, early, other]], [[other], [late], [early]]):
        with fresh_store() as store:
            feed = Feed(store)
            for batch in batches:
                feed.apply(*batch)
            stores.append(list(store.iter_records()))
    assert stores[0] == stores[1] == stores[2]
    (record,) = stores[0]
    assert record[2] == {"phone": "0911111111"}  # 10:09 is later than the other's 10:05
