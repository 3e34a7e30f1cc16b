"""`Store.iter_records`, `remerge`'s keys and a purge's on SQLite: keyset pages along the
primary key, each beginning where the page before ended (a page of one entity read from
the entity's first record made `export --entity` quadratic: 41 s against 4 s for 200,000
records; `remerge --entity` and `source purge --entity` the same, found on 1.6 million
records on PostgreSQL, whose planner does as SQLite's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.identifiers import tax_code_check_digit
from store.core import Store
from store.purge import purge_keys
from tests.support.store_helpers import Feed, event, put_records, record_page_statements


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty SQLite store."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        store.create_schema()
        yield store
    finally:
        store.close()


def _plans(store: Store, statements: list[tuple[str, Any]]) -> list[str]:
    """SQLite's plan of each statement, with its parameters."""
    with store.engine.connect() as conn:
        return [
            " ".join(
                str(row[-1])
                for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
            )
            for statement, parameters in statements
        ]


@pytest.mark.parametrize("entity", [None, "dossier"])
def test_each_page_reads_along_the_primary_key_without_a_sort(
    store: Store, entity: str | None
) -> None:
    keys = ["a1", "B1", "b0", "A2", "a-1", "a.1", "A10", *(f"{n:06d}" for n in range(30))]
    for each in ("citizen", "dossier"):
        put_records(store, keys, each)
    with record_page_statements(store) as statements:
        read = [(e, k) for e, k, *_ in store.iter_records(entity, page=7)]
    entities = ["citizen", "dossier"] if entity is None else [entity]
    assert read == [(e, k) for e in entities for k in sorted(keys, key=str.encode)]
    assert len(statements) == len(read) // 7 + 1
    for plan in _plans(store, statements[1:]):
        assert "TEMP B-TREE" not in plan, plan
        # begins at the page before's last key, not at the entity's first
        assert "key>?" in plan or "(entity,key)>(?,?)" in plan, plan


@pytest.mark.parametrize("entity", [None, "organization"])
def test_the_views_keys_are_read_in_pages_each_from_where_the_last_ended(
    store: Store, entity: str | None
) -> None:
    citizens = [f"00109001{n:04d}" for n in range(23)]
    organizations = [c + str(d) for c in (f"01001{n:04d}" for n in range(40))
                     if (d := tax_code_check_digit(c)) is not None][:23]  # fmt: skip
    keys = {"citizen": citizens, "organization": organizations}
    Feed(store).apply(
        *(event("citizen", key, "province-79", 1, {"full_name": "Lê Văn An"})
          for key in citizens),
        *(event("organization", key, "province-79", 1, {"name": "Công ty A"})
          for key in organizations),
    )  # fmt: skip
    entities = ["citizen", "organization"] if entity is None else [entity]
    expected = [(e, k) for e in entities for k in keys[e]]
    with record_page_statements(store, "source_views") as remerges:
        assert [k for page in store.record_key_pages(entity, size=5) for k in page] == expected
    with record_page_statements(store, "source_views") as purges:
        purged: list[tuple[str, str]] = []
        while page := purge_keys(store, "province-79", entity, None, purged[-1] if purged
                                 else None, 5):  # fmt: skip
            purged += page
        assert purged == expected
    pages = remerges[1:] + purges[1:]  # every page after the first
    assert len(pages) >= 2 * (len(expected) // 5 - 1)
    for plan in _plans(store, pages):
        if entity is not None:  # from the page before's last key, not the entity's first
            assert "key>?" in plan, plan
        else:
            assert "(entity,key)>(?,?)" in plan, plan
