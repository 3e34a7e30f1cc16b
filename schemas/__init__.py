"""Event contracts of portal-sync (contract v1): models, validation, JSON Schema export."""

from schemas.builder import build_event
from schemas.errors import (
    ConfigurationError,
    PortalSyncError,
    RecordError,
    Refused,
    TransientError,
)
from schemas.events import CHANGE_EVENT, ENTITIES, SCHEMA_VERSION, ChangeEvent
from schemas.partitioning import message_key, partition_for
from schemas.validation import (
    InvalidEvent,
    ValidEvent,
    derive_event_id,
    parse_event,
)

__all__ = [
    "CHANGE_EVENT",
    "ENTITIES",
    "SCHEMA_VERSION",
    "ChangeEvent",
    "ConfigurationError",
    "InvalidEvent",
    "PortalSyncError",
    "RecordError",
    "Refused",
    "TransientError",
    "ValidEvent",
    "build_event",
    "derive_event_id",
    "message_key",
    "parse_event",
    "partition_for",
]
