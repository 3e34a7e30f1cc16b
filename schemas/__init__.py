"""Event contracts of portal-sync (contract v1): models, validation, JSON Schema export."""

from schemas.events import CHANGE_EVENT, ENTITIES, SCHEMA_VERSION, ChangeEvent
from schemas.validation import (
    InvalidEvent,
    ValidEvent,
    derive_event_id,
    message_key,
    parse_event,
)

__all__ = [
    "CHANGE_EVENT",
    "ENTITIES",
    "SCHEMA_VERSION",
    "ChangeEvent",
    "InvalidEvent",
    "ValidEvent",
    "derive_event_id",
    "message_key",
    "parse_event",
]
