"""One error taxonomy for the whole project, sorted by how the program reacts.

| family               | reaction                                             | CLI exit |
|----------------------|------------------------------------------------------|----------|
| `ConfigurationError` | refuse to start; the message says which setting      | 2        |
| `Refused`            | an operation refused on purpose (a guard said no)    | 1        |
| `TransientError`     | retry with backoff: the store or the broker is away  | 1        |
| `RecordError`        | that one record goes to the dead letters (a reason)  | -        |
| other `PortalSyncError` | a command's own work failed (a broker that did not | 1        |
|                      | start, the demo's checks): say what, stop            |          |

Drivers' errors (SQLAlchemy, kafka-python) are translated into these once, at the layer
that talks to the driver (the store, the transport); everything above branches only on
the families. Messages never quote a record's values (personal data).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from schemas.dead_letter import Reason

T = TypeVar("T")


class PortalSyncError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigurationError(PortalSyncError):
    """A setting, file or deployment is wrong: refuse to start and say which."""


class Refused(PortalSyncError):
    """An operation the program refuses to carry out as asked (a safety guard)."""


class TransientError(PortalSyncError):
    """The store or the broker is unavailable for now: retry the same work later."""

    # The driver's error it was translated from (a class name, `KafkaConnectionError`),
    # if any: what the retries wait for, as /readyz and the worker's metrics say it.
    cause = ""

    @property
    def kind(self) -> str:
        """What the retries wait for: the driver's error, else this error's class."""
        return self.cause or type(self).__name__


class RecordError(PortalSyncError):
    """One record cannot be accepted: dead-letter it with a reason code and go on."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Never the data's: a batch that meets one of these is not halved to find the event that
# fails alone (every event would fail alone too: a store away, a guard, a setting, memory
# short). The worker and a replay both stop, or retry, on them; anything else in a batch
# is a record error or a bug met by some data, and is isolated to its one event.
NOT_THE_DATAS: tuple[type[BaseException], ...] = (
    TransientError,
    Refused,
    ConfigurationError,
    MemoryError,
)


@dataclass
class Backoff:
    """Waits between attempts: `first`, doubling, never above `longest`. Every retry loop
    of the project waits so (`until_available`, the worker's batches and store reads, the
    producers' sends)."""

    first: float
    longest: float
    attempts: int = 0

    def next(self) -> float:
        """The wait before the next attempt."""
        self.attempts += 1
        return self.nth(self.attempts)

    def nth(self, attempt: int) -> float:
        """The wait after the `attempt`-th failure (1 for the first)."""
        return min(self.longest, self.first * 2.0 ** min(max(attempt - 1, 0), 64))


# `until_available`'s first wait between two attempts, and its longest.
FIRST_START_WAIT_SECONDS = 1.0
MAX_START_WAIT_SECONDS = 30.0


def until_available(
    action: Callable[[], T],
    what: str,
    stop: threading.Event,
    log: logging.Logger,
    on_retry: Callable[[TransientError], object] | None = None,
) -> T | None:
    """`action` tried again while it raises TransientError, with backoff (1 s, doubling, up
    to 30 s); every other error goes up at once. For a long-running process's start: one
    that exited while the broker or the store was away would go into its supervisor's
    restart backoff (up to 5 minutes under Kubernetes) and start that much after they are
    back. `on_retry` hears each failure. None: `stop` was set meanwhile."""
    backoff = Backoff(FIRST_START_WAIT_SECONDS, MAX_START_WAIT_SECONDS)
    while not stop.is_set():
        try:
            return action()
        except TransientError as error:
            if stop.is_set():
                break
            wait = backoff.next()
            log.error("%s: %s; trying again in %.0f s", what, error, wait)
            if on_retry is not None:
                on_retry(error)
            if _pause(stop, wait):
                break
    return None


def _pause(stop: threading.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, or until `stop` is set: whether it was. Not `stop.wait`: a
    signal handler that sets `stop` on the thread waiting in it could find the event's
    lock held by that same thread, and hang it."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
    return stop.is_set()
