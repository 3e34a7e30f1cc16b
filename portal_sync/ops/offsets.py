"""`portal-sync offsets reset`: move a consumer group to a point in time, safely.

The reconciler resumes from the store's offsets, not from Kafka's: for its own group the
reset moves both (the store's `applied_offsets` and the group's committed offsets). For
any other group only Kafka's committed offsets move. A group with active members is
refused: a running consumer would overwrite the reset with its next commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from portal_sync.settings import Settings
from schemas.errors import Refused
from store import Store
from transport.admin import cluster


class GroupActive(Refused):
    """The group has members: a running consumer would overwrite the reset."""


@dataclass(frozen=True)
class PlanLine:
    topic: str
    partition: int
    kafka_committed: int | None
    store_applied: int | None
    target: int


def active_members(settings: Settings, group: str) -> int:
    with cluster(settings.connection()) as c:
        return c.active_members(group)


def plan_reset(
    settings: Settings, group: str, to_time: datetime, topics: list[str] | None = None
) -> list[PlanLine]:
    """Per partition: where the group is now and the first offset at or after `to_time`."""
    with cluster(settings.connection()) as c:
        partitions = c.partitions(topics or settings.topics().change_topics())
        ends = c.end_offsets(partitions)
        found = c.offsets_at(partitions, to_time)
        committed = c.group_offsets([group], partitions).get(group, {})
    stored = _store_offsets(settings) if group == settings.group_id else {}
    plan = []
    for tp in partitions:
        at = found.get(tp)
        target = ends[tp] if at is None else at
        plan.append(PlanLine(tp[0], tp[1], committed.get(tp), stored.get(tp), target))
    return plan


def _store_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    store = Store(settings.store_url)
    try:
        return store.all_offsets()
    finally:
        store.close()


def apply_reset(settings: Settings, group: str, plan: list[PlanLine]) -> None:
    """Carry out a plan; refuse when the group has active members."""
    with cluster(settings.connection()) as c:
        if c.active_members(group):
            raise GroupActive(f"group {group} has active members: stop its consumers first")
        c.alter_group_offsets(group, {(p.topic, p.partition): p.target for p in plan})
    if group == settings.group_id:
        store = Store(settings.store_url)
        try:
            store.reset_offsets({(p.topic, p.partition): p.target for p in plan})
        finally:
            store.close()
