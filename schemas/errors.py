"""One error taxonomy for the whole project, sorted by how the program reacts.

| family               | reaction                                             | CLI exit |
|----------------------|------------------------------------------------------|----------|
| `ConfigurationError` | refuse to start; the message says which setting      | 2        |
| `Refused`            | an operation refused on purpose (a guard said no)    | 1        |
| `TransientError`     | retry with backoff: the store or the broker is away  | 1        |
| `RecordError`        | that one record goes to the dead letters (a reason)  | -        |

Drivers' errors (SQLAlchemy, kafka-python) are translated into these once, at the layer
that talks to the driver (the store, the transport); everything above branches only on
the families. Messages never quote a record's values (personal data).
"""

from __future__ import annotations


class PortalSyncError(Exception):
    """Root of every error the project raises on purpose."""

    exit_code = 1


class ConfigurationError(PortalSyncError):
    """A setting, file or deployment is wrong: refuse to start and say which."""

    exit_code = 2


class Refused(PortalSyncError):
    """An operation the program refuses to carry out as asked (a safety guard)."""


class TransientError(PortalSyncError):
    """The store or the broker is unavailable for now: retry the same work later."""


class RecordError(PortalSyncError):
    """One record cannot be accepted: dead-letter it with a reason code and go on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
