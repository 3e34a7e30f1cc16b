"""The store's tables (SQLAlchemy Core). Only the `store` package uses them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
)
from sqlalchemy.engine.interfaces import Dialect

from store.times import aware_utc, naive_utc


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes stored as naive UTC on every backend, read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return naive_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else aware_utc(value)


def _json() -> Any:
    """JSON documents: text on SQLite, `json` on PostgreSQL (migration 0008). The store
    writes and reads whole documents and never queries inside one, and `json` keeps the
    text as written: PostgreSQL's work per event fell by a fifth against `jsonb`, which
    parses every document into its binary form on write and prints it back on read."""
    return JSON()


def _byte_ordered(length: int) -> Any:
    """An identifier compared byte by byte on every backend: on PostgreSQL the `C`
    collation (migration 0019), as SQLite's `BINARY`. The records' primary key then serves
    the reads in key order (`export`, `rebuild --compare`) page by page, where a database
    created with a locale sorted the whole table each time. Only the records' columns: a
    comparison of one with another table's key is made in `C`, which that table's index
    (the database's collation) cannot serve; today's queries look records up by theirs."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


metadata = MetaData()

source_views = Table(
    "source_views",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("data", _json()),
    Column("applied_at", UTCDateTime, nullable=False),
)

records = Table(
    "records",
    metadata,
    Column("entity", _byte_ordered(16), primary_key=True),
    Column("key", _byte_ordered(64), primary_key=True),
    Column("data", _json(), nullable=False),
    Column("sources", _json(), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # source -> the fields it gave (migration 0007; a field's version is its source's in
    # `sources`: readers expand it, `schemas.views.expand_provenance`); NULL only for
    # records written before migration 0002
    Column("provenance", _json()),
)

applied_offsets = Table(
    "applied_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Per source and partition, the newest `occurred_at` a live batch applied and when: the
# sources' freshness a worker starts from (`Store.freshness`), kept by each batch beside its
# offsets (a row per partition: two workers never wait for each other's). Migration 0011
# filled it from the views under topic "" and partition -1. Tombstones the retention purges
# leave it as it is; a `source purge` of all of a source's views removes the source's rows.
source_freshness = Table(
    "source_freshness",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("last_change", UTCDateTime, nullable=False),
    Column("last_applied", UTCDateTime, nullable=False),
)

# Records that may have been deleted by every source, and since when (at the latest): what
# the retention's tombstone purge checks, instead of grouping every view of the store. A
# batch adds the records it leaves with no canonical record (never moving an existing row);
# a `source purge` that leaves a record with tombstones only adds it as due at once; the
# retention job checks each due row against the views, purges or removes it, or moves it to
# its newest tombstone's time (migration 0012).
record_deletions = Table(
    "record_deletions",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("deleted_at", UTCDateTime, nullable=False),
    Index("ix_record_deletions_deleted_at", "deleted_at"),
)

# One row per partition per committed batch: [first_offset, next_offset) applied at
# committed_at. Contiguous, non-overlapping ranges prove nothing was lost or applied twice.
# Kept `PORTAL_SYNC_JOURNAL_RETENTION_DAYS` (30), then deleted by the retention job: a row a
# partition a batch is billions of rows a year at a national load.
apply_journal = Table(
    "apply_journal",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("first_offset", BigInteger, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("events", Integer, nullable=False),
    Column("committed_at", UTCDateTime, nullable=False),
)

# Every change to a canonical record: which event (or remerge) changed which fields.
record_history = Table(
    "record_history",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("entity", String(16), nullable=False),
    Column("key", String(64), nullable=False),
    Column("event_id", String(36)),
    Column("source", String(64), nullable=False),
    Column("version", BigInteger),
    Column("changes", _json(), nullable=False),  # field -> [old, new]
    Column("applied_at", UTCDateTime, nullable=False),
    # Set when the retention purge emptied the values of a deleted record's entry (the
    # fields stay named, every old and new value becomes null).
    Column("purged_at", UTCDateTime),
    Index("ix_record_history_record", "entity", "key", "id"),
    Index("ix_record_history_applied_at", "applied_at"),
)

# Fields on which the contributing sources currently disagree (resolved rows are deleted);
# `sources` holds the groups of sources that agree with each other.
field_conflicts = Table(
    "field_conflicts",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("field", String(64), primary_key=True),
    Column("sources", _json(), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
)

# Dossier status changes that the national lifecycle does not foresee (applied anyway).
dossier_anomalies = Table(
    "dossier_anomalies",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("key", String(64), nullable=False, index=True),
    Column("source", String(64), nullable=False),
    Column("from_status", Integer, nullable=False),
    Column("to_status", Integer, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("detected_at", UTCDateTime, nullable=False),
)

# The owner every document names. A document whose owner is not in the store is kept, never
# rejected, and shown as waiting for it: no record of the owner exists (`store.queries`;
# migration 0009 dropped the stored flag).
document_owners = Table(
    "document_owners",
    metadata,
    Column("entity", String(16), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("owner_entity", String(16), nullable=False),
    Column("owner_key", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Dead letters re-published to their original topic: each is re-driven once, and by whom
# (NULL: before migration 0016). A letter is known by its place in the dead-letter topic,
# whose id (KIP-516) tells a topic created again apart ('': recorded before migration
# 0014, or the id unknown: any topic's).
dead_letter_redrives = Table(
    "dead_letter_redrives",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("topic_id", String(64), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, primary_key=True),
    Column("reason_code", String(64), nullable=False),
    Column("target_topic", String(255), nullable=False),
    Column("redriven_at", UTCDateTime, nullable=False),
    Column("operator", String(128)),
)

# Every move of the store's offsets that an operator made (`offsets reset`, `offsets skip`):
# who, when, from where to where, and why. Append-only.
offset_changes = Table(
    "offset_changes",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("kind", String(16), nullable=False),  # reset, skip
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("from_offset", BigInteger),  # None: the store had no offset for it
    Column("to_offset", BigInteger, nullable=False),
    Column("operator", String(128), nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("changed_at", UTCDateTime, nullable=False),
    # NULL: the store's own offsets (the reconciler's group); else the group whose offsets
    # in Kafka an `offsets reset` moved, the store's untouched (migration 0015).
    Column("consumer_group", String(255)),
)

# The cluster's id of each change topic the store has applied events of (KIP-516), as it
# was when first assigned, or when an operator's `offsets reset` moved the topic's offsets:
# a topic deleted and created again gets a new id, and the store's offsets then point
# into another log (migration 0013).
topic_ids = Table(
    "topic_ids",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("topic_id", String(64), nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

# Facts about the store itself, e.g. the fingerprint of the rules the worker runs with.
store_meta = Table(
    "store_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(1000), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Who read personal data out of the store, when, with which command, what and why.
# Append-only: the store offers no update, and no delete but the retention purge (on
# PostgreSQL a trigger refuses any other UPDATE or DELETE: store/migrations 0005).
access_log = Table(
    "access_log",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("accessed_at", UTCDateTime, nullable=False),
    Column("operator", String(128), nullable=False),
    Column("command", String(64), nullable=False),
    Column("entity", String(16)),  # None: every entity (an export of all records)
    Column("reference", String(255)),  # a key reference or a dead letter's id, never a key
    Column("reason", String(1000), nullable=False),
    Index("ix_access_log_accessed_at", "accessed_at"),
)

# Every `source purge`: who removed which source's views (all, of one entity, or of one
# record, named by its key reference), when, why and what it changed. Written in the
# transaction of every chunk it commits, so its counts are what was committed;
# `finished_at` stays None when the command was interrupted.
source_purges = Table(
    "source_purges",
    metadata,
    Column("id", String(36), primary_key=True),  # the event id of its history entries
    Column("source", String(64), nullable=False),
    Column("entity", String(16)),  # None: every entity
    Column("reference", String(255)),  # the key's reference; None: every key
    Column("operator", String(128), nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("views", BigInteger, nullable=False),
    Column("tombstones", BigInteger, nullable=False),
    Column("records_remerged", BigInteger, nullable=False),
    Column("records_changed", BigInteger, nullable=False),
    Column("records_removed", BigInteger, nullable=False),
    Index("ix_source_purges_started_at", "started_at"),
)
# What a purge's row changes as it runs (its counts grow chunk by chunk, then it finishes):
# who purged what, when and why is written once, and never updated.
SOURCE_PURGE_PROGRESS = (
    "finished_at", "views", "tombstones", "records_remerged", "records_changed",
    "records_removed",
)  # fmt: skip
# What a redrive's claim changes when it takes over an earlier topic's letter at the same
# place: all but the place.
REDRIVE_CLAIM = ("reason_code", "target_topic", "redriven_at", "operator")
