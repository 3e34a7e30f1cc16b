"""`offsets reset` and `offsets skip`: what a plan counts as skipped, and what is refused
before anything is moved or sent."""

from __future__ import annotations

from typing import Any

import pytest

from portal_sync.ops.offsets import PlanLine, apply_reset, skip_message
from portal_sync.settings import Settings
from schemas.errors import Refused


def line(applied: int | None, target: int, start: int = 0, end: int = 5) -> PlanLine:
    return PlanLine("p.changes.citizen", 0, None, applied, target, start, end, True)


def test_a_plan_counts_the_unapplied_events_it_jumps_over() -> None:
    assert line(applied=2, target=4).skipped == 2
    assert line(applied=4, target=2).skipped == 0  # backwards: re-applied, never skipped
    assert line(applied=None, target=3).skipped == 3  # never consumed: from the log's start
    assert line(applied=None, target=3, start=1).skipped == 2


def test_a_store_past_the_end_of_a_log_created_again_has_consumed_none_of_it() -> None:
    # The store at 20, the new log 0..5: moving to 3 skips the new log's first three.
    assert line(applied=20, target=3).skipped == 3
    assert line(applied=20, target=5).skipped == 5
    assert line(applied=5, target=5).skipped == 0  # at the end, not past it


def test_a_store_inside_a_log_created_again_has_consumed_none_of_it() -> None:
    """The store at 20 in the earlier log; the new log (another topic id) already 0..25:
    its end cannot tell, its id does. Moving to 10 skips the new log's first ten."""

    def again(applied: int, target: int) -> PlanLine:
        return PlanLine("p.changes.citizen", 0, None, applied, target, 0, 25, True, True)

    assert again(applied=20, target=10).skipped == 10
    assert again(applied=20, target=25).skipped == 25
    assert again(applied=20, target=0).skipped == 0
    assert line(applied=20, target=10, end=25).skipped == 0  # the same log: behind the store
    other_group = PlanLine("p.changes.citizen", 0, 20, None, 25, 0, 25, False, True)
    assert other_group.skipped == 5  # another group's position is Kafka's, not the store's


BAD = [(None, "x" * 1001), ("o" * 129, "drill"), ("ops\n1", "drill"), (None, "two\nlines")]


@pytest.mark.parametrize("operator,reason", BAD)
def test_what_would_not_be_recorded_is_refused_before_anything_moves(
    operator: str | None, reason: str
) -> None:
    """Nothing reaches the broker (there is none at this address) or the store."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1", store_url="sqlite:///nowhere/x.db")
    with pytest.raises(Refused, match=r"--reason|--operator"):
        skip_message(settings, "p.changes.citizen", 0, 0, reason, operator)
    with pytest.raises(Refused, match=r"--reason|--operator"):
        apply_reset(settings, "g", [line(0, 0)], operator=operator, reason=reason)


def test_a_reset_whose_kafka_copy_is_refused_moved_the_reconcilers_store_and_says_so(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reconciler's own group: the store's offsets (the truth) move first, recorded.
    The coordinator then refusing Kafka's copy (a member that joined, a coordinator that
    moved) is a warning, not "not moved": the reset did happen."""
    import contextlib

    from portal_sync.ops import offsets
    from store import Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).create_schema()
    settings = Settings(kafka_bootstrap="127.0.0.1:1", store_url=url)

    class Refusing:
        def active_members(self, group: str) -> list[str]:
            return []

        def topic_ids(self, topics: Any) -> dict[str, str]:
            return {}

        def alter_group_offsets(self, group: str, offsets: Any) -> None:
            raise Refused(f"group {group}'s offsets not moved on p.changes.citizen[0]")

    monkeypatch.setattr(offsets, "cluster", lambda _: contextlib.nullcontext(Refusing()))
    plan = [PlanLine("p.changes.citizen", 0, 3, 3, 1, 0, 5, True)]
    apply_reset(settings, settings.group_id, plan, reason="drill")
    assert Store(url).all_offsets() == {("p.changes.citizen", 0): 1}
    assert "Kafka's copy of them not" in caplog.text
    with pytest.raises(Refused, match="not moved"):  # another group: Kafka's is its truth
        apply_reset(settings, "analytics", plan, reason="drill")
