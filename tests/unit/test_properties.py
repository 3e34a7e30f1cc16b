"""Property tests of the reconciler against the real store on SQLite.

The store's state must depend only on the set of events received: not on their order,
their batching, duplicates or redelivery.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from consumers.checks import Checked
from consumers.merge import Authority, SourceView, merge
from consumers.reconciler import Message, Reconciler, offset_ranges
from schemas import derive_event_id, parse_event
from store.core import Store
from store.tables import applied_offsets, apply_journal, records, source_views

SOURCES = ("s-a", "s-b", "s-c")
RECORD_KEYS = (
    ("citizen", "001090012345"),
    ("citizen", "079305012345"),
    ("organization", "0100109106"),
)
FIELDS: dict[str, dict[str, Sequence[Any]]] = {
    "citizen": {
        "full_name": ("Nguyễn Văn An", "Trần Thị Bình", None),
        "sex": ("male", "female", None),
        "email": ("an@example.vn", "binh@example.vn", None),
        "permanent_address": (
            {"province_code": "01"},
            {"line": "12 Lê Lợi", "ward_code": None},
            None,
        ),
    },
    "organization": {
        "name": ("Công ty A", "Công ty B", None),
        "status": ("active", "dissolved", None),
        "legal_form": ("JSC", None),
    },
}
OFFSETS = ("+07:00", "+00:00", "-05:00")
AUTHORITY = Authority.from_mapping(
    {
        "citizen": {"full_name": ["s-b"], "sex": ["s-c", "s-a"]},
        "organization": {"*": ["s-c", "s-a"]},
    }
)
TOPIC = "portal.changes"
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Spec:
    """One generated event before it is encoded."""

    record: int
    source: str
    version: int
    op: str
    minute: int
    micros: int
    offset: str
    data: dict[str, Any] | None

    @property
    def entity(self) -> str:
        return RECORD_KEYS[self.record][0]

    @property
    def key(self) -> str:
        return RECORD_KEYS[self.record][1]

    def encode(self) -> bytes:
        event: dict[str, Any] = {
            "schema_version": 1,
            "event_id": str(derive_event_id(self.source, self.entity, self.key, self.version)),
            "source": self.source,
            "entity": self.entity,
            "key": self.key,
            "op": self.op,
            "version": self.version,
            "occurred_at": f"2024-01-15T10:{self.minute:02d}:00.{self.micros:06d}{self.offset}",
        }
        if self.data is not None:
            event["data"] = self.data
        return json.dumps(event, ensure_ascii=False).encode("utf-8")


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    record = draw(st.integers(0, len(RECORD_KEYS) - 1))
    entity = RECORD_KEYS[record][0]
    op = draw(st.sampled_from(["upsert", "upsert", "delete"]))
    data = None
    if op == "upsert":
        data = draw(
            st.fixed_dictionaries(
                {},
                optional={name: st.sampled_from(values) for name, values in FIELDS[entity].items()},
            )
        )
    return Spec(
        record=record,
        source=draw(st.sampled_from(SOURCES)),
        version=draw(st.integers(1, 6)),
        op=op,
        minute=draw(st.integers(0, 3)),
        micros=draw(st.sampled_from([0, 1, 500000])),
        offset=draw(st.sampled_from(OFFSETS)),
        data=data,
    )


event_sets = st.lists(
    specs(), min_size=1, max_size=14, unique_by=lambda s: (s.record, s.source, s.version)
)


# -- helpers ------------------------------------------------------------------------------


@contextmanager
def fresh_store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'store.db'}")
        store.create_schema()
        try:
            yield store
        finally:
            store.close()


def checked(spec: Spec, partition: int, offset: int) -> Checked:
    parsed = parse_event(spec.encode())
    return Checked(Message(TOPIC, partition, offset, spec.encode()), parsed.event, [])


def stream(specs_in_order: Sequence[Spec], partitions: int = 1) -> list[Checked]:
    """Messages with consecutive offsets per partition; a record always maps to one partition."""
    next_offset = [0] * partitions
    result = []
    for spec in specs_in_order:
        partition = spec.record % partitions
        result.append(checked(spec, partition, next_offset[partition]))
        next_offset[partition] += 1
    return result


def reoffset(messages: Sequence[Checked], start: int) -> list[Checked]:
    return [
        Checked(
            Message(c.message.topic, c.message.partition, start + i, c.message.value), c.event, []
        )
        for i, c in enumerate(messages)
    ]


def split(items: Sequence[Checked], cuts: Sequence[int]) -> list[list[Checked]]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(items)}), len(items)]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


def apply_batches(reconciler: Reconciler, batches: Sequence[Sequence[Checked]]) -> list[str]:
    outcomes: list[str] = []
    for batch in batches:
        report = reconciler.apply(batch, [c.message for c in batch])
        outcomes += [o.outcome for o in report.outcomes]
    return outcomes


def ends(messages: Sequence[Checked]) -> dict[tuple[str, int], int]:
    """Per partition, the offset after the last message."""
    return {tp: end for tp, (_, end, _) in offset_ranges(c.message for c in messages).items()}


def assert_journal_contiguous(
    store: Store, expected_ends: dict[tuple[str, int], int], *, counts: bool = True
) -> None:
    """The apply journal covers [0, end) of every partition without gap or overlap; with
    `counts`, each row counts the messages of its range (our streams have no offset gaps)."""
    with store.engine.connect() as conn:
        rows = list(conn.execute(select(apply_journal).order_by(apply_journal.c.id)))
    covered: dict[tuple[str, int], int] = {}
    for row in rows:
        tp = (row.topic, row.partition)
        assert row.first_offset == covered.get(tp, 0), rows
        assert row.next_offset > row.first_offset
        if counts:
            assert row.events == row.next_offset - row.first_offset, rows
        covered[tp] = row.next_offset
    assert covered == expected_ends


def content(store: Store) -> tuple[list[Any], list[Any]]:
    """Canonical records and source views, without write timestamps."""
    views = []
    with store.engine.connect() as conn:
        for row in conn.execute(select(source_views)):
            views.append(
                (
                    row.entity,
                    row.key,
                    row.source,
                    row.version,
                    row.event_id,
                    row.occurred_at,
                    row.deleted,
                    row.data,
                )
            )
    views.sort(key=lambda v: v[:3])
    return list(store.iter_records()), views


def raw_tables(store: Store) -> list[list[Any]]:
    """Every row of every table, write timestamps included."""
    result = []
    with store.engine.connect() as conn:
        for table in (source_views, records, applied_offsets, apply_journal):
            rows = [tuple(r) for r in conn.execute(select(table))]
            result.append(sorted(rows, key=repr))
    return result


def oracle(
    event_set: Sequence[Spec],
) -> list[tuple[str, str, dict[str, Any], dict[str, int], dict[str, Any]]]:
    """The expected canonical records (with provenance): highest version per source, merged
    in memory."""
    latest: dict[tuple[int, str], Spec] = {}
    for spec in event_set:
        current = latest.get((spec.record, spec.source))
        if current is None or spec.version > current.version:
            latest[(spec.record, spec.source)] = spec
    expected = []
    for record, (entity, key) in enumerate(RECORD_KEYS):
        views = []
        for (r, source), spec in latest.items():
            if r != record:
                continue
            event = parse_event(spec.encode()).event
            views.append(
                SourceView(
                    source,
                    spec.version,
                    str(event.event_id),
                    event.occurred_at,
                    spec.op == "delete",
                    event.data_dict(),
                )
            )
        merged = merge(entity, views, AUTHORITY)
        if merged is not None:
            expected.append((entity, key, merged.data, merged.sources, merged.provenance))
    return sorted(expected, key=lambda r: (r[0], r[1]))


# -- properties ---------------------------------------------------------------------------


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_order_duplicates_and_batching_do_not_matter(event_set: list[Spec], data: Any) -> None:
    with fresh_store() as reference:
        apply_batches(Reconciler(reference, AUTHORITY), [stream(event_set)])
        expected = content(reference)
    assert expected[0] == oracle(event_set)

    duplicates = data.draw(st.lists(st.sampled_from(event_set), max_size=len(event_set)))
    shuffled = data.draw(st.permutations([*event_set, *duplicates]))
    partitions = data.draw(st.integers(1, 3))
    messages = stream(shuffled, partitions)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=5))
    with fresh_store() as store:
        outcomes = apply_batches(Reconciler(store, AUTHORITY), split(messages, cuts))
        assert content(store) == expected
        assert outcomes.count("applied") <= len(event_set)
        assert len(outcomes) == len(messages)
        assert store.all_offsets() == ends(messages)
        assert_journal_contiguous(store, ends(messages))


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_redelivery_changes_nothing(event_set: list[Spec], data: Any) -> None:
    messages = stream(data.draw(st.permutations(event_set)))
    cuts = data.draw(st.lists(st.integers(1, max(1, len(messages) - 1)), max_size=3))
    batches = split(messages, cuts)
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY)
        for batch in batches:
            offsets = [c.message for c in batch]
            first = reconciler.apply(batch, offsets)
            assert first.already_applied == 0
            assert len(first.outcomes) == len(batch)
            before = raw_tables(store)
            # The same batch redelivered at the same offsets: skipped by the offsets guard.
            stored: dict[tuple[str, int], int] = {}
            again = reconciler.apply(batch, offsets, after_offsets=stored.update)
            assert again.already_applied == len(batch)
            assert again.outcomes == []
            assert raw_tables(store) == before
            # What the worker is told inside the transaction: every message is behind.
            assert all(m.offset < stored[m.tp] for m in offsets)

        settled = content(store)
        assert settled[0] == oracle(event_set)

        # Every event again, in another order, at new offsets: nothing is applied.
        replay = reoffset(data.draw(st.permutations(messages)), start=len(messages))
        outcomes = apply_batches(reconciler, [replay])
        assert set(outcomes) <= {"duplicate", "stale"}
        assert len(outcomes) == len(replay)
        assert content(store) == settled
        assert store.all_offsets() == {(TOPIC, 0): 2 * len(messages)}
        assert_journal_contiguous(store, {(TOPIC, 0): 2 * len(messages)})


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_late_older_upsert_never_resurrects(event_set: list[Spec], data: Any) -> None:
    # Every source of some record ends with a delete ...
    record = data.draw(st.integers(0, len(RECORD_KEYS) - 1))
    sources = data.draw(st.lists(st.sampled_from(SOURCES), min_size=1, unique=True))
    deletes = [
        Spec(record, source, 100, "delete", data.draw(st.integers(0, 3)), 0, "+07:00", None)
        for source in sources
    ]
    # ... and older upserts of those sources arrive after the deletes.
    late = [
        Spec(
            record,
            source,
            version,
            "upsert",
            59,
            999999,
            "+07:00",
            {"legal_form": "late"}
            if RECORD_KEYS[record][0] == "organization"
            else {"full_name": "Hồi Sinh"},
        )
        for source in sources
        for version in data.draw(st.lists(st.integers(1, 99), min_size=1, max_size=3, unique=True))
    ]
    others = [s for s in event_set if not (s.record == record and s.source in sources)]

    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY)
        apply_batches(reconciler, [stream([*others, *deletes])])
        settled = content(store)
        deleted_key = RECORD_KEYS[record]
        for entity, key, _data, contributors, _provenance in settled[0]:
            if (entity, key) == deleted_key:
                assert not set(contributors) & set(sources)

        late_messages = reoffset(
            stream(data.draw(st.permutations(late))), start=len(others) + len(deletes)
        )
        cuts = data.draw(st.lists(st.integers(1, max(1, len(late_messages) - 1)), max_size=3))
        outcomes = apply_batches(reconciler, split(late_messages, cuts))
        assert outcomes == ["stale"] * len(late_messages)
        assert content(store) == settled
        assert settled[0] == oracle([*others, *deletes, *late])


@SETTINGS
@given(event_set=event_sets, data=st.data())
def test_overlapping_redelivery_applies_only_the_new_part(event_set: list[Spec], data: Any) -> None:
    # A consumer that crashed after the store commit but before the Kafka commit gets the
    # tail of the last batch again, followed by new messages, in one batch.
    messages = stream(event_set)
    applied = data.draw(st.integers(0, len(messages)))
    restart = data.draw(st.integers(0, applied))
    with fresh_store() as reference:
        apply_batches(Reconciler(reference, AUTHORITY), [messages])
        expected = content(reference)
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY)
        apply_batches(reconciler, [messages[:applied]])
        redelivered = messages[restart:]
        report = reconciler.apply(redelivered, [c.message for c in redelivered])
        assert report.already_applied == applied - restart
        assert len(report.outcomes) == len(messages) - applied
        assert content(store) == expected
        assert store.all_offsets() == ends(messages)
        assert_journal_contiguous(store, ends(messages))


# -- the same rules on hand-written scenarios ---------------------------------------------


def _spec(source: str, version: int, op: str = "upsert", **data: Any) -> Spec:
    return Spec(
        0, source, version, op, version % 4, 0, "+07:00", dict(data) if op == "upsert" else None
    )


def test_delete_then_late_upsert_leaves_no_record() -> None:
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY)
        upsert, delete = _spec("s-a", 1, full_name="Nguyễn Văn An"), _spec("s-a", 2, "delete")
        assert apply_batches(reconciler, [stream([upsert])]) == ["applied"]
        assert [r[1] for r in store.iter_records()] == ["001090012345"]
        assert apply_batches(reconciler, [reoffset(stream([delete]), 1)]) == ["applied"]
        assert list(store.iter_records()) == []
        assert apply_batches(reconciler, [reoffset(stream([upsert]), 2)]) == ["stale"]
        assert list(store.iter_records()) == []
        # a newer upsert does bring the record back
        newer = _spec("s-a", 3, full_name="Nguyễn Văn Bình")
        assert apply_batches(reconciler, [reoffset(stream([newer]), 3)]) == ["applied"]
        assert list(store.iter_records()) == [
            (
                "citizen",
                "001090012345",
                {"full_name": "Nguyễn Văn Bình"},
                {"s-a": 3},
                {"full_name": {"source": "s-a", "version": 3}},
            )
        ]


def test_authority_and_null_through_the_store() -> None:
    events = [
        # occurred_at minute = version % 4: s-a (3) is the latest, s-b (1) the oldest
        _spec("s-a", 3, full_name="A", sex="male", email=None, phone="0912345678"),
        _spec("s-b", 1, full_name="B", email="b@example.vn"),
        _spec("s-c", 2, sex="female"),
    ]
    with fresh_store() as store:
        apply_batches(Reconciler(store, AUTHORITY), [stream(events)])
        assert list(store.iter_records()) == [
            (
                "citizen",
                "001090012345",
                # full_name: s-b ranks first although it is the oldest; sex: s-c ranks
                # before the later s-a; email: equal rank, the latest (s-a) asserts null;
                # phone: only s-a has it.
                {"full_name": "B", "sex": "female", "email": None, "phone": "0912345678"},
                {"s-a": 3, "s-b": 1, "s-c": 2},
                {
                    "full_name": {"source": "s-b", "version": 1},
                    "sex": {"source": "s-c", "version": 2},
                    "email": {"source": "s-a", "version": 3},
                    "phone": {"source": "s-a", "version": 3},
                },
            )
        ]


def test_journal_counts_only_the_newly_applied_messages() -> None:
    events = [_spec("s-a", 1, full_name="A"), _spec("s-a", 2, full_name="B"), _spec("s-b", 1)]
    messages = stream(events)
    with fresh_store() as store:
        reconciler = Reconciler(store, AUTHORITY)
        apply_batches(reconciler, [messages[:2]])
        apply_batches(reconciler, [messages[1:]])  # offset 1 redelivered with offset 2
        with store.engine.connect() as conn:
            rows = [
                (r.first_offset, r.next_offset, r.events)
                for r in conn.execute(select(apply_journal).order_by(apply_journal.c.id))
            ]
    assert rows == [(0, 2, 2), (2, 3, 1)]
