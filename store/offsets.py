"""The store's offsets: each partition's next offset to apply (written by the batches,
`store.batch`), an operator's resets and skips and who made them, the change topics' ids,
and the journal of applied ranges."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, delete, insert, select, tuple_, update

from store.base import StoreBase, TopicPartition, chunks, insert_missing, upsert, utcnow
from store.batch import batch_io
from store.failures import OffsetGap, translated
from store.tables import applied_offsets, apply_journal, offset_changes, topic_ids


class StoreOffsets(StoreBase):
    def _offsets(
        self, conn: Connection, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The stored offsets, locked for an operator's change (on PostgreSQL, with the
        partitions' own locks, which a batch takes too: a partition without a row yet)."""
        wanted = sorted(set(partitions))
        result: dict[TopicPartition, int] = {}
        if conn.dialect.name == "postgresql":
            batch_io(conn.dialect.name, conn.connection.driver_connection).lock((), wanted)
        for chunk in chunks(wanted):
            query = select(
                applied_offsets.c.topic, applied_offsets.c.partition, applied_offsets.c.next_offset
            ).where(tuple_(applied_offsets.c.topic, applied_offsets.c.partition).in_(chunk))
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            for topic, partition, next_offset in conn.execute(query):
                result[(topic, partition)] = next_offset
        return result

    def all_offsets(self) -> dict[TopicPartition, int]:
        """Every partition's next offset to apply."""
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(select(applied_offsets))
            return {(row.topic, row.partition): row.next_offset for row in rows}

    def stored_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to apply of these partitions (absent: none applied yet)."""
        with translated(), self.engine.connect() as conn:
            io = batch_io(conn.dialect.name, conn.connection.driver_connection)
            found = io.offsets(sorted(set(partitions)), lock=False)
            conn.rollback()
            return found

    def reset_offsets(
        self,
        targets: dict[TopicPartition, int],
        operator: str,
        reason: str,
        ids: Mapping[str, str] | None = None,
    ) -> None:
        """Set partitions' next offsets (an operator's reset) and record who did it, why,
        and from where, in one transaction; `ids`: the cluster's id of each topic reset,
        now the store's (the reset's offsets are in that topic's log)."""
        if not targets:  # nothing moved, nothing to record
            return
        now = utcnow()
        with translated(), self.write_transaction() as conn:
            if ids:
                rows = [{"topic": t, "topic_id": i, "recorded_at": now} for t, i in ids.items()]
                upsert(conn, topic_ids, rows, ["topic"])
            before = self._offsets(conn, targets)
            conn.execute(
                insert(offset_changes),
                [
                    {
                        "kind": "reset",
                        "topic": topic,
                        "partition": partition,
                        "from_offset": before.get((topic, partition)),
                        "to_offset": target,
                        "operator": operator,
                        "reason": reason,
                        "changed_at": now,
                    }
                    for (topic, partition), target in targets.items()
                ],
            )
            for (topic, partition), target in targets.items():
                conn.execute(
                    delete(applied_offsets).where(
                        applied_offsets.c.topic == topic, applied_offsets.c.partition == partition
                    )
                )
                conn.execute(
                    insert(applied_offsets).values(
                        topic=topic, partition=partition, next_offset=target, updated_at=now
                    )
                )
            batch_io(conn.dialect.name, conn.connection.driver_connection).count_write(now)

    def topic_ids(self) -> dict[str, str]:
        """The cluster's id of each change topic as the store first saw it (`topic_ids`)."""
        with translated(), self.engine.connect() as conn:
            rows = conn.execute(select(topic_ids.c.topic, topic_ids.c.topic_id))
            return {topic: found for topic, found in rows}

    def record_topic_ids(self, ids: Mapping[str, str]) -> None:
        """Record the ids of topics the store has none of yet; a recorded one is replaced
        only while no partition of its topic has an applied offset (the store holds no
        position in the earlier log: a topic created again before any event of it was
        applied)."""
        now = utcnow()
        rows = [{"topic": t, "topic_id": i, "recorded_at": now} for t, i in ids.items()]
        applied = select(applied_offsets.c.topic).where(
            applied_offsets.c.topic == topic_ids.c.topic, applied_offsets.c.next_offset > 0
        )
        with translated(), self.write_transaction() as conn:
            insert_missing(conn, topic_ids, rows, ["topic"])
            for topic, found in ids.items():
                conn.execute(
                    update(topic_ids)
                    .where(
                        topic_ids.c.topic == topic,
                        topic_ids.c.topic_id != found,
                        ~applied.exists(),
                    )
                    .values(topic_id=found, recorded_at=now)
                )

    def skip_offset(
        self,
        tp: TopicPartition,
        offset: int,
        log_start: int,
        operator: str,
        reason: str,
        next_offset: int | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Move a partition past the one message at `offset`, which must be the next one to
        apply (`log_start` when the store has none for it yet); journaled and recorded.
        `next_offset`: the store's next offset the caller read, when the message lies past
        it (the offsets between hold no message: a transaction's marker, or an event the
        log cleaner removed); it must still be the store's. `before` runs once that is
        checked, with the partition's offset locked and before anything is written (the
        message copied to the dead letters): a worker cannot apply it meanwhile, and if
        `before` fails nothing moves."""
        now = utcnow()
        first = offset if next_offset is None else next_offset
        with translated(), self.write_transaction() as conn:
            stored = self._offsets(conn, [tp]).get(tp)
            expected = log_start if stored is None else stored
            if first != expected or offset < first:
                raise OffsetGap(
                    f"{tp[0]}[{tp[1]}]: the next offset to apply is {expected}, not {offset}: "
                    "only the message the worker is at can be skipped"
                )
            if before is not None:
                before()
            conn.execute(
                insert(offset_changes).values(
                    kind="skip", topic=tp[0], partition=tp[1], from_offset=stored,
                    to_offset=offset + 1, operator=operator, reason=reason, changed_at=now,
                )
            )  # fmt: skip
            io = batch_io(conn.dialect.name, conn.connection.driver_connection)
            io.write_offsets({tp: (first, offset + 1, 1)}, now)
            io.count_write(now)

    def record_group_reset(
        self,
        group: str,
        moves: Mapping[TopicPartition, tuple[int | None, int]],
        operator: str,
        reason: str,
    ) -> None:
        """Record an operator's reset of another consumer group's offsets in Kafka (from,
        to per partition); the store's own offsets are not moved."""
        now = utcnow()
        if not moves:  # nothing moved, nothing to record
            return
        with translated(), self.write_transaction() as conn:
            conn.execute(
                insert(offset_changes),
                [
                    {
                        "kind": "reset",
                        "topic": topic,
                        "partition": partition,
                        "from_offset": before,
                        "to_offset": target,
                        "operator": operator,
                        "reason": reason,
                        "changed_at": now,
                        "consumer_group": group,
                    }
                    for (topic, partition), (before, target) in moves.items()
                ],
            )

    def offset_changes(self) -> list[dict[str, Any]]:
        """Every recorded reset and skip, oldest first."""
        query = select(offset_changes).order_by(offset_changes.c.id)
        with translated(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def journal(self) -> dict[TopicPartition, list[tuple[int, int]]]:
        """Every partition's applied ranges [first, next) in commit order."""
        query = select(
            apply_journal.c.topic,
            apply_journal.c.partition,
            apply_journal.c.first_offset,
            apply_journal.c.next_offset,
        ).order_by(apply_journal.c.id)
        result: dict[TopicPartition, list[tuple[int, int]]] = {}
        with translated(), self.engine.connect() as conn:
            for topic, partition, first, end in conn.execute(query):
                result.setdefault((topic, partition), []).append((first, end))
        return result
