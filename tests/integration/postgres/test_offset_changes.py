"""The store's record of operators' offset changes, on SQLite and PostgreSQL."""

from __future__ import annotations

from store.core import Store


def test_a_reset_of_no_partition_records_nothing_and_does_not_fail(store_url: str) -> None:
    """A plan of no partition (a topic the cluster does not have, or may not describe):
    its insert of no rows ran once without values and failed on a NOT NULL column, shown
    as `apply_failed`. The command refuses such a plan now; the store records nothing."""
    store = Store(store_url)
    store.create_schema()
    try:
        store.reset_offsets({}, "op", "nothing to reset")
        store.record_group_reset("other-group", {}, "op", "nothing to reset")
        assert store.offset_changes() == [] and store.all_offsets() == {}
    finally:
        store.close()
