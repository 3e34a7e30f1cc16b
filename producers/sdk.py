"""Adapter SDK: what a source adapter declares and implements, and the records it yields.

An adapter declares its entity, key, cursor (replication key), whether its output is sorted
and whether it emits deletes, and implements one generator, `read(state)`, of `Record`s and
`Checkpoint`s (and `Reservation`s: what must be on disk before the records after them are
sent). The framework (`producers.engine`) owns everything else: building and validating
contract events, publishing, saving the state of a checkpoint durably only after the
broker acknowledged every record before it, retries and metrics.

Errors an adapter raises are classified, each with one behaviour:

- `RetriableError` (and any unclassified exception): the run is retried with exponential
  backoff, from the last saved checkpoint.
- `SkippableRecord` (yielded, not raised): the record goes to the dead-letter topic with its
  reason code, the run continues.
- `FatalError`: that source stops, counted in `portal_sync_source_errors_total{kind="fatal"}`;
  the other sources go on.
- `ConfigurationError`: raised while constructing, the deployment refuses to start and says
  which source and option are wrong; raised while reading (the source refuses the
  adapter's credentials), that source stops as with `FatalError`.

Messages must never quote record values. Where an origin or a message must name a
record by a personal id or tax code, use `Adapter.reference(key)`: the deployment's keyed
reference (HMAC-SHA-256), or the masked key when no reference key is configured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

from schemas import build_event, errors
from schemas.dead_letter import DEAD_LETTER_REASONS
from schemas.events import Entity
from schemas.identifiers import ReferenceKey, key_reference

State = dict[str, Any]


class AdapterError(errors.PortalSyncError):
    """Base of the classified adapter errors (families of `schemas.errors`)."""


class RetriableError(AdapterError, errors.TransientError):
    """A transient failure (connection lost, lock timeout): retry the run later."""


class FatalError(AdapterError, errors.Refused):
    """The source cannot go on (schema changed, data corrupt): stop this source."""


class ConfigurationError(AdapterError, errors.ConfigurationError):
    """The adapter's configuration is wrong: refuse to start."""


@dataclass(frozen=True)
class Record:
    """One change of one record. `data=None` is a delete (when `op` is not given)."""

    key: str
    version: int
    occurred_at: datetime
    data: dict[str, Any] | None
    origin: str = ""  # where it came from (row id, file:line), for dead letters and reports
    entity: Entity | None = None  # None: the adapter's entity
    op: Literal["upsert", "delete"] | None = None

    def event(self, source: str, default_entity: Entity | None) -> dict[str, Any]:
        """The contract event (as JSON-ready dict); validation is the framework's job."""
        entity = self.entity or default_entity
        return build_event(
            source, str(entity), self.key, self.version, self.occurred_at, self.data, self.op
        )


@dataclass(frozen=True)
class SkippableRecord:
    """A record the adapter could not map: dead-lettered with its reason, the run goes on."""

    code: str
    message: str
    origin: str
    entity: Entity | None = None
    key: str | None = None
    raw: bytes = b""

    def __post_init__(self) -> None:
        # Operators filter, count and re-drive by these codes (README, "Dead letters"): an
        # adapter's own word would be a reason no one looks for.
        if self.code not in DEAD_LETTER_REASONS:
            raise ValueError(
                f"dead-letter reason {self.code!r} is not one of the contract's "
                "(schemas.dead_letter.Reason): use unmappable_record or invalid_json"
            )


@dataclass
class Checkpoint:
    """Everything yielded before this is complete. After the broker acknowledged it, the
    framework saves `state` durably, then calls `commit` (delete outbox rows, move a file).
    `state` alone must make the next run resume: `commit` is clean-up, and a check run
    (which never publishes) does not call it.

    `state` may also be a function that returns it, for a state that is large to copy: the
    framework calls it only for the checkpoint it saves (at most one an interval, always
    the newest reached), possibly after the generator went on reading, and it must then
    return the state as it was when this checkpoint was yielded."""

    state: State | Callable[[], State]
    commit: Callable[[], None] | None = None
    # Saved at once, before anything yielded after it is sent, as one with a `commit` is:
    # for a state that must be on disk before the events that follow leave (a version
    # reserved for them).
    at_once: bool = False

    def value(self) -> State:
        """The state to save."""
        return self.state() if callable(self.state) else self.state


@dataclass(frozen=True)
class Reservation:
    """On disk before anything yielded after it is sent: the framework appends `entry`
    (JSON) to the source's journal, one line synced to disk, far cheaper than saving a
    large state. For what a run must not forget if it dies before its next checkpoint is
    saved: the versions the records that follow are about to carry (the built-in `sql`
    adapter's, so that a row's next change is never given a version at or below one
    sent). The next run gets the journal's entries back through `Adapter.recover`; a saved
    checkpoint yielded after all of them removes them."""

    entry: Any


Item = Record | SkippableRecord | Checkpoint | Reservation


class Adapter(ABC):
    """Base class of source adapters. Subclasses set the class attributes and `read`."""

    #: contract entity of the records (None: each record names its own)
    entity: Entity | None = None
    #: the source column or field the record key comes from (documentation for readers)
    key: ClassVar[str] = ""
    #: the replication key: what the state's position is made of
    cursor: ClassVar[str] = ""
    #: records come in cursor order (versions of one key then rise in output order)
    sorted_output: ClassVar[bool] = True
    #: the adapter emits deletes; the conformance check then expects to see one
    emits_deletes: bool = False
    #: the pydantic model of `connection` and `mapping` merged
    Config: ClassVar[type[BaseModel]]
    #: the secret of keyed references, set by the framework (None: masked keys)
    reference_key: ReferenceKey | None = None

    def __init__(self, source: str, config: BaseModel, base_dir: Path) -> None:
        self.source = source
        self.config = config
        self.base_dir = base_dir

    @classmethod
    def from_settings(cls, source: str, options: dict[str, Any], base_dir: Path) -> Adapter:
        """Validate the options against `Config`; errors become ConfigurationError."""
        try:
            config = cls.Config.model_validate(options)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in error.errors(include_input=False, include_url=False)
            )
            raise ConfigurationError(problems) from None
        return cls(source, config, base_dir)

    def reference(self, key: str) -> str:
        """How a personal id or tax code may appear in an origin, a log line or a dead
        letter: a keyed reference, never the key itself."""
        return key_reference(key, self.reference_key)

    @abstractmethod
    def read(self, state: State) -> Iterator[Item]:
        """Yield records from the position in `state` on, with checkpoints between them."""

    def recover(self, state: State, journal: list[Any]) -> State:
        """The state to resume from (the framework saves it at once): the saved one with
        the entries of the `Reservation`s journaled since a save last removed the journal
        (`journal`, oldest first; empty when there are none) taken in. Some may be older
        than the state (a failed run saved what it reached on its way out): taking an
        entry in twice, or after the state moved on, must change nothing. An adapter that
        yields reservations overrides it."""
        return state

    def cursor_lag_seconds(self, state: State) -> float | None:
        """How far the cursor in `state` is behind the newest change in the source, for
        `portal_sync_source_cursor_lag_seconds`; None where the adapter cannot tell."""
        return None

    def check_warnings(self) -> list[str]:
        """What `adapters check` should point out about the source without failing it (a
        cursor of coarse precision, a risky option); never record values."""
        return []

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    def rejected(self, origin: str, code: str, message: str) -> None:  # noqa: B027
        """Called for each record of this adapter that went to the dead letters."""


# A source database that drops packets held a connection attempt for the kernel's two
# minutes or more, a run and its stop with it (the store's engine likewise).
SOURCE_CONNECT_TIMEOUT_SECONDS = 10
# On PostgreSQL, what the adapters' sessions ask of the province's server: a statement
# cancelled after 10 minutes (a page is a fraction of a second on an index; a query that
# runs longer loads the province's database and is retried as a failed run), a session
# idle inside a transaction ended after 5, and TCP keepalives that give a connection to a
# server gone silent up in about 25 s instead of the kernel's two hours. A URL's own
# `options`, `keepalives*` (or PGOPTIONS, a service file) win.
SOURCE_SESSION_OPTIONS = "-c statement_timeout=600000 -c idle_in_transaction_session_timeout=300000"
SOURCE_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def source_engine(url: str) -> Any:
    """A SQLAlchemy engine for a source database: its row values never in errors or SQL
    logging (`hide_parameters`); a pooled connection checked before use (a database
    restarted or failed over meanwhile); on PostgreSQL a connection attempt given up after
    10 s, unless the URL (`connect_timeout`) or PGCONNECT_TIMEOUT says otherwise, and the
    session settings above."""
    import os

    from sqlalchemy import create_engine

    parsed = source_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        query = parsed.query
        if "connect_timeout" not in query and not os.environ.get("PGCONNECT_TIMEOUT"):
            connect_args["connect_timeout"] = SOURCE_CONNECT_TIMEOUT_SECONDS
        own = "service" in query or os.environ.get("PGSERVICE")
        if "options" not in query and not os.environ.get("PGOPTIONS") and not own:
            connect_args["options"] = SOURCE_SESSION_OPTIONS
        if not own and not set(SOURCE_KEEPALIVES) & set(query):
            connect_args.update(SOURCE_KEEPALIVES)
    return create_engine(
        parsed, hide_parameters=True, pool_pre_ping=True, connect_args=connect_args
    )


def source_url(url: str) -> Any:
    """A source database's URL read (SQLAlchemy's `URL`), `postgres://` (libpq's and most
    tools' spelling, which SQLAlchemy does not know) as `postgresql://`."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend, plus, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        return parsed.set(drivername=f"postgresql{plus}{driver}")
    return parsed
