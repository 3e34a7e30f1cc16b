"""The project's topics, created explicitly (the broker never auto-creates them).

| topic                       | partitions          | cleanup                                  |
|-----------------------------|---------------------|------------------------------------------|
| `<prefix>.changes.<entity>` | `change_partitions` | compact, after `change_retention_hours`  |
| `<prefix>.dead-letters`     | 1                   | delete, `dead_letter_retention_hours`    |

Change topics are keyed `<entity>:<key>:<source>` and placed by `<entity>:<key>`
(schemas.partitioning): all events of one record share a partition, and compaction keeps
the latest event of every (source, entity, key) forever, deletes included (they are delete
events, never null tombstones). Every event stays at least `change_retention_hours`
(`min.compaction.lag.ms`): the history a replay by time can reach. A rebuild reaches every
source's latest view of every record (docs/store.md, docs/operations.md). An event that a
later one of its key superseded goes at most `COMPACTION_GRACE_HOURS` after that
(`max.compaction.lag.ms`; the cleaner alone waits for half the log to be dirty, which in a
national topic whose every record's latest event stays can be years), so no superseded
event outlives the deleted-record retention (portal_sync.settings checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas import ENTITIES
from schemas.validation import MAX_EVENT_BYTES

HOUR_MS = 3_600_000
COMPACTION_GRACE_HOURS = 24  # after the change retention, for the cleaner to get there
# A change topic takes twice the contract's limit; a dead letter is the original bytes plus
# headers, so its topic takes twice that again: anything a change topic accepts fits.
CHANGE_MAX_MESSAGE_BYTES = 2 * MAX_EVENT_BYTES
DEAD_LETTER_MAX_MESSAGE_BYTES = 2 * CHANGE_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Topics:
    """Names and creation options of the project's topics."""

    prefix: str = "portal-sync"
    change_partitions: int = 6
    replication_factor: int = 1
    change_retention_hours: int = 24 * 30
    dead_letter_retention_hours: int = 24 * 90

    @property
    def superseded_kept_hours(self) -> int:
        """How long a superseded event may stay in a change topic at most."""
        return self.change_retention_hours + COMPACTION_GRACE_HOURS

    def change_topic(self, entity: str) -> str:
        return f"{self.prefix}.changes.{entity}"

    def change_topics(self) -> list[str]:
        return [self.change_topic(entity) for entity in ENTITIES]

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    def specs(self) -> dict[str, dict[str, Any]]:
        """Topic name to creation options (partitions, replication, configs)."""
        # With replicas, acks=all waits for at least two copies: with three, one may be
        # down; with two, none (three is production's, docs/deploy.md).
        in_sync = str(min(2, self.replication_factor))
        changes = {
            "cleanup.policy": "compact",
            "min.compaction.lag.ms": str(self.change_retention_hours * HOUR_MS),
            "max.compaction.lag.ms": str(self.superseded_kept_hours * HOUR_MS),
            # Only an operator's null tombstone (erasing a key) is a delete marker: kept a
            # day for readers behind, as Kafka's default.
            "delete.retention.ms": str(24 * HOUR_MS),
            # The broker's clock, never a producer's: a check against the time a message was
            # sent gives the same verdict on every read of it (consumers/signatures.py).
            "message.timestamp.type": "LogAppendTime",
            "max.message.bytes": str(CHANGE_MAX_MESSAGE_BYTES),
            "min.insync.replicas": in_sync,
        }
        dead_letters = {
            "cleanup.policy": "delete",
            "retention.ms": str(self.dead_letter_retention_hours * HOUR_MS),
            "max.message.bytes": str(DEAD_LETTER_MAX_MESSAGE_BYTES),
            "min.insync.replicas": in_sync,
        }
        specs: dict[str, dict[str, Any]] = {
            topic: {
                "num_partitions": self.change_partitions,
                "replication_factor": self.replication_factor,
                "configs": changes,
            }
            for topic in self.change_topics()
        }
        specs[self.dead_letters] = {
            "num_partitions": 1,
            "replication_factor": self.replication_factor,
            "configs": dead_letters,
        }
        return specs
