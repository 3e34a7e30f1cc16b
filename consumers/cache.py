"""What the store holds for the records a live worker applied recently (pure, in memory).

A batch reads, under its records' locks, every source's view and the canonical data of
the records it touches, and after its commit those are exactly what it wrote. The next
batch that touches one of these records can take them from here instead of reading them
back: on a source's updates (three in four of the peer bench's events) the reads were a
quarter of a batch's time (docs/performance-log.md, sixteenth round). With them go their field
conflicts as the batch left them in the store (when it knows them: the records it changed
or took from here), which the next batch would otherwise compute again before changing a
record (seventeenth round).

Why this is safe: a record belongs to one partition (the key rule, `key_mismatch`), and a
partition to one worker at a time. The records held here can only have changed in the store
behind this worker's back in two ways, and each is caught inside the next batch's
transaction, once its records are locked, before anything held here is used:

- another worker applied the partition (a rebalance; a zombie's takeover): the stored next
  offset of the partition is not the one this worker committed last;
- anything else wrote records (replay, remerge, source purge, the retention purge, an
  offset reset or skip): the store counts such writes (`Store.batch` reports the count,
  `store_meta` `record_writes`, with the time it last changed) and it is not the one
  seen when these were held (the time as well: a store restored from a backup and counted
  again can be back at a count seen before).

Either way everything held is dropped and the batch reads its records. Nothing is held
from a batch that failed (rolled back, or its commit's outcome unknown): `drop` empties it;
entries are put only after a commit. `invalidate` (a partition revoked) may be called from
another thread: it only sets a flag the next batch acts on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from schemas.views import RecordKey, SourceView

TopicPartition = tuple[str, int]
Views = dict[str, SourceView]
Data = dict[str, Any]
FieldConflicts = dict[str, list[list[str]]]  # field -> groups of sources that agree

# The default bound, in records: 1.6-2 KB each (the worker's RSS with 20,000 kept: +32 MB
# on bench/e2e.py's mix, +36-40 MB to 266-276 MB growing a store to a million records,
# against a budget of 300 MB): half that keeps the worker near 250 MB (docs/performance-log.md,
# sixteenth round).
DEFAULT_RECORDS = 10_000


class RecordCache:
    """Up to `size` records' views, canonical data and field conflicts, the least recently
    applied dropped first (a dict keeps its keys in insertion order; `put` inserts again)."""

    def __init__(self, size: int = DEFAULT_RECORDS) -> None:
        self.size = size
        self._entries: dict[RecordKey, tuple[Views, Data | None, FieldConflicts | None]] = {}
        self._offsets: dict[TopicPartition, int | None] = {}  # next offset this worker left
        # the store's count of other writes when filled (`Store.batch`'s `tx.writes`:
        # compared, never read)
        self._writes: object = None
        self._stale = False

    def __len__(self) -> int:
        return len(self._entries)

    def invalidate(self) -> None:
        """Drop everything before the next batch (any thread)."""
        self._stale = True

    def drop(self) -> None:
        self._entries.clear()
        self._offsets.clear()
        self._writes = None

    def held(self, keys: Iterable[RecordKey]) -> set[RecordKey]:
        """The keys whose records are held (still to be confirmed by `usable`)."""
        if self._stale:  # cleared here only: a revocation during a batch waits for the next
            self._stale = False
            self.drop()
        entries = self._entries
        return {key for key in keys if key in entries}

    def usable(
        self,
        writes: object,
        partitions: Iterable[TopicPartition],
        stored: Mapping[TopicPartition, int],
    ) -> bool:
        """Whether what is held still is the store's, given the store's count of other
        writes and the stored next offsets of the batch's partitions (read under its
        locks). When not, everything is dropped."""
        offsets = self._offsets
        if writes == self._writes and all(
            offsets.get(tp, next_offset) == next_offset
            for tp in partitions
            for next_offset in (stored.get(tp),)
        ):
            return True
        self.drop()
        self._writes = writes
        return False

    def take(
        self,
        keys: Iterable[RecordKey],
        views: dict[RecordKey, Views],
        canonical: dict[RecordKey, Data],
        conflicts: dict[RecordKey, FieldConflicts],
    ) -> None:
        """Put the held records of `keys` into a batch's reads (and their conflicts as
        stored, where known). Not copied: the batch changes a record's views in place, and
        then either commits (and `put`s what it left) or fails (and everything is
        dropped)."""
        entries = self._entries
        for key in keys:
            held_views, data, found = entries[key]
            if held_views:
                views[key] = held_views
            if data is not None:
                canonical[key] = data
            if found is not None:
                conflicts[key] = found

    def put(
        self,
        keys: Iterable[RecordKey],
        views: Mapping[RecordKey, Views],
        canonical: Mapping[RecordKey, Data],
        offsets: Mapping[TopicPartition, int | None],
        conflicts: Mapping[RecordKey, FieldConflicts] | None = None,
    ) -> None:
        """After a commit: the batch's records as it left them (with their conflicts as
        stored, where the batch knows them), and the next offset of each of its partitions
        as stored now (None: no row)."""
        entries = self._entries
        pop = entries.pop
        found = conflicts or {}
        for key in keys:
            pop(key, None)
            entries[key] = (views.get(key) or {}, canonical.get(key), found.get(key))
        excess = len(entries) - self.size
        if excess > 0:
            for key in list(islice(entries, excess)):
                del entries[key]
        self._offsets.update(offsets)
