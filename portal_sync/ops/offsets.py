"""`portal-sync offsets reset` and `offsets skip`: move a consumer group, safely.

The reconciler resumes from the store's offsets, not from Kafka's: for its own group a
reset moves both (the store's `applied_offsets` and the group's committed offsets). For
any other group only Kafka's committed offsets move. A group with active members is
refused: a running consumer would overwrite the reset with its next commit.

Moving the reconciler forward past events it has not applied skips them: the plan counts
them and the reset is refused without `allow_skip`. `skip` moves one partition past the one
message the worker is stuck at, after copying it to the dead letters. Both are recorded in
the store (`offset_changes`: operator, time, from, to, reason), a reset of any group (its
`consumer_group`; NULL for the store's own offsets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from portal_sync.ops.access import who_and_why
from portal_sync.ops.purge import purge_warning, purges_after
from portal_sync.settings import Settings
from schemas.dead_letter import Reason, dead_letter_headers, fit_letter, kept_headers
from schemas.errors import Refused
from schemas.events import ENTITIES
from store import Store
from transport.admin import Cluster, cluster
from transport.publisher import Publisher
from transport.reader import Message, RangeReader, Selection
from transport.topics import DEAD_LETTER_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


class GroupActive(Refused):
    """The group has members: a running consumer would overwrite the reset."""


class WouldSkip(Refused):
    """The reset would move the reconciler past events it has not applied."""


@dataclass(frozen=True)
class PlanLine:
    topic: str
    partition: int
    kafka_committed: int | None
    store_applied: int | None
    target: int
    start: int  # the partition's log-start offset now
    end: int  # the partition's log-end offset now
    own_group: bool = True  # the reconciler's group: the store's offsets count
    # The store's offset is in an earlier log of this name: the topic's id is not the one
    # the store recorded (`check_topic_ids`).
    created_again: bool = False

    @property
    def skipped(self) -> int:
        """Events not yet applied (consumed) that the reset would jump over."""
        position = self.store_applied if self.own_group else self.kafka_committed
        if self.own_group and self.created_again:
            # Nothing of this log was applied, however long it has grown since.
            position = None
        if position is not None and position > self.end:
            # The log ends before the position (a topic created again, a cluster restored):
            # nothing of this log was consumed, so everything before the target is skipped.
            position = None
        base = self.start if position is None else max(position, self.start)
        return max(0, self.target - base)

    @property
    def past_the_end(self) -> bool:
        return self.target >= self.end


def active_members(settings: Settings, group: str) -> int:
    with cluster(settings.connection()) as c:
        return c.active_members(group)


def plan_reset(
    settings: Settings, group: str, to_time: datetime, topics: list[str] | None = None
) -> list[PlanLine]:
    """Per partition: where the group is now and the first offset at or after `to_time`."""
    if to_time.tzinfo is None:
        raise Refused("the time needs an offset (e.g. +07:00 or Z): naive times are ambiguous")
    unknown = sorted(set(topics or ()) - set(settings.topics().change_topics()))
    if unknown:
        raise Refused(f"--topic: not a change topic: {', '.join(unknown)}")
    with cluster(settings.connection()) as c:
        partitions = c.partitions(topics or settings.topics().change_topics())
        if not partitions:  # else an empty plan, and `--yes` failed in the store
            raise Refused(
                "no partition to reset: the topics are not in the cluster, or this "
                "principal may not describe them"
            )
        ends = c.end_offsets(partitions)
        starts = c.beginning_offsets(partitions)
        found = c.offsets_at(partitions, to_time)
        committed = c.group_offsets([group], partitions).get(group, {})
        own = group == settings.group_id
        current = c.topic_ids({topic for topic, _ in partitions}) if own else {}
    stored, saved = _store_offsets(settings) if own else ({}, {})
    plan = []
    for tp in partitions:
        at = found.get(tp)
        target = ends[tp] if at is None else at
        line = (committed.get(tp), stored.get(tp), target, starts[tp], ends[tp], own)
        again = tp[0] in saved and tp[0] in current and saved[tp[0]] != current[tp[0]]
        plan.append(PlanLine(tp[0], tp[1], *line, created_again=again))
    return plan


def purges_undone(
    settings: Settings, group: str, plan: list[PlanLine], moment: datetime
) -> str | None:
    """A warning when the plan moves the reconciler back before a recorded `source purge`
    of an entity whose topic it moves: the purged source's events come back."""
    if group != settings.group_id:
        return None
    back = {
        line.topic
        for line in plan
        if line.store_applied is not None and line.target < line.store_applied
    }
    if not back:
        return None
    names = settings.topics()
    entities = {e for e in ENTITIES if names.change_topic(e) in back}
    store = Store(settings.store_url)
    try:
        # The events' times are their hosts' clocks: one read from a target a little after
        # a purge's start may still be from before it.
        since = moment - timedelta(seconds=settings.max_clock_skew_seconds)
        return purge_warning(purges_after(store, since, entities=entities))
    finally:
        store.close()


def _store_offsets(settings: Settings) -> tuple[dict[tuple[str, int], int], dict[str, str]]:
    """The store's offsets, and the ids of the topics they are in."""
    store = Store(settings.store_url)
    try:
        store.require_schema()  # a mistyped store: said so, and no empty SQLite file made
        return store.all_offsets(), store.topic_ids()
    finally:
        store.close()


def apply_reset(
    settings: Settings,
    group: str,
    plan: list[PlanLine],
    allow_skip: bool = False,
    operator: str | None = None,
    reason: str = "",
) -> None:
    """Carry out a plan; refuse when the group has active members, or when it would skip
    unapplied events without `allow_skip`."""
    who, why = who_and_why(operator, reason.strip() or "(no reason given)")
    skipped = sum(line.skipped for line in plan)
    if skipped and not allow_skip:
        unread = (
            "the store has not applied"
            if group == settings.group_id
            else f"group {group} has not consumed"
        )
        raise WouldSkip(
            f"the reset would skip {skipped} events {unread}: "
            "pass --allow-skip to skip them on purpose"
        )
    with cluster(settings.connection()) as c:
        if c.active_members(group):
            raise GroupActive(f"group {group} has active members: stop its consumers first")
        # The offsets are to be in these topics' logs: a topic created again is the
        # store's from here on (the worker refuses one whose id changed, `check_topic_ids`).
        # Read first: a failure leaves everything as it was.
        targets = {(p.topic, p.partition): p.target for p in plan}
        if group == settings.group_id:
            ids = c.topic_ids({p.topic for p in plan})
            # The store's offsets first: they are the reconciler's truth, and Kafka's are
            # its copy; a failure between the two leaves the copy behind, not the truth.
            store = Store(settings.store_url)
            try:
                store.require_schema()
                store.reset_offsets(targets, who, why, ids)
            finally:
                store.close()
        if group != settings.group_id:
            _reset_another_group(settings, c, group, plan, who, why)
            return
        try:
            c.alter_group_offsets(group, targets)
        except Refused as error:
            # The store's offsets moved: they are the truth, and the worker starts from
            # them. Kafka's copy (what `lag` and the lag exporter read) stays behind until
            # the worker copies them after a batch, or the reset is run again.
            log.warning("the store's offsets were reset, Kafka's copy of them not (%s): run "
                        "the reset again, or the worker copies them after its next batch",
                        error)  # fmt: skip


def _reset_another_group(
    settings: Settings, c: Cluster, group: str, plan: list[PlanLine], who: str, why: str
) -> None:
    """Move another group's offsets in Kafka (its truth), then record the move. The store
    is opened first: one it cannot reach refuses the reset before Kafka is touched (a
    move Kafka took and the store could not record would be missing from the audit, and a
    run again would record it as from and to the same offsets)."""
    moves = {(p.topic, p.partition): (p.kafka_committed, p.target) for p in plan}
    store = Store(settings.store_url)
    try:
        store.require_schema()
        c.alter_group_offsets(group, {place: to for place, (_, to) in moves.items()})
        try:
            store.record_group_reset(group, moves, who, why)
        except Exception as error:
            log.error(
                "group %s's offsets were reset in Kafka, but the reset was not recorded "
                "in the store (%s)", group, type(error).__name__,
            )  # fmt: skip
            raise
    finally:
        store.close()


def skip_message(
    settings: Settings,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    operator: str | None = None,
) -> None:
    """Copy the message at (topic, partition, offset) to the dead letters, reason
    `skipped_by_operator`, then move the store's offset past it (recorded). It must be the
    message the worker is at: the first one at or after the store's next offset (that
    offset may hold none: a transaction's marker, or an event the log cleaner removed)."""
    who, why = who_and_why(operator, reason)
    if topic not in settings.topics().change_topics():
        raise Refused(f"--topic: not a change topic: {topic}")
    group = settings.group_id
    with cluster(settings.connection()) as c:
        if c.active_members(group):
            raise GroupActive(f"group {group} has active members: stop its workers first")
        held = sorted(p for t, p in c.partitions([topic]))
        if partition not in held:  # asked for its offsets, the client waited 30 s, then failed
            raise Refused(
                f"--partition: {topic} has partitions {held[0]} to {held[-1]}, not {partition}"
                if held
                else f"--topic: {topic} has no partitions: run `portal-sync topics` first"
            )
        log_start = c.beginning_offsets([(topic, partition)]).get((topic, partition), 0)
    store = Store(settings.store_url)
    try:
        store.require_schema()  # a mistyped store: said so, and no empty SQLite file made
        stored = store.stored_offsets([(topic, partition)]).get((topic, partition))
    finally:
        store.close()
    expected = log_start if stored is None else stored
    message = None if offset < expected else first_message(settings, topic, partition,
                                                              expected, offset + 1)  # fmt: skip
    if message is None and offset >= expected:
        raise Refused(f"{topic}[{partition}] has no message at offset {offset}")
    if message is None or message.offset != offset:  # checked again when the offset moves
        raise Refused(
            f"{topic}[{partition}]: the next offset to apply is {expected}, not {offset}: "
            "only the message the worker is at can be skipped"
        )
    key, value, headers = fit_letter(  # a letter the topic takes, whatever the message
        message.key,
        message.value,
        dead_letter_headers(
            Reason.SKIPPED_BY_OPERATOR,
            "skipped by an operator (recorded in the store's offset changes)",
            topic,
            partition,
            offset,
            attempt=message.attempt,
        ),
        kept_headers(message.headers, message.timestamp_ms),
        (topic, partition, offset),
        DEAD_LETTER_MAX_MESSAGE_BYTES,
    )
    publisher = Publisher.for_dead_letters(
        settings.connection(), settings.topics(), client_id="portal-sync-skip"
    )

    def copy() -> None:  # in the dead letters before the offset moves past it
        publisher.send_dead_letter(key, value, headers)
        publisher.flush()

    store = Store(settings.store_url)
    try:  # copied only once the store's offset is checked again, under its lock
        store.skip_offset((topic, partition), offset, log_start, who, why, expected, copy)
    finally:
        store.close()
        publisher.close()


def first_message(
    settings: Settings, topic: str, partition: int, start: int, end: int
) -> Message | None:
    """The first message of the partition in [start, end), reading no further."""
    with RangeReader(settings.connection()) as reader:
        selection = Selection([topic], [partition], from_offset=start, to_offset=end)
        for batch in reader.read(reader.resolve(selection)):
            if batch:
                return batch[0]
    return None
