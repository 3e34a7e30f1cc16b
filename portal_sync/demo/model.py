"""What one demo run holds: its settings, work dir, sample systems, producers, counts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from portal_sync.demo.feed import PortalFeed
from portal_sync.demo.systems import SampleSource
from portal_sync.settings import Settings
from producers.engine import AdapterRunner, RunStats
from producers.produce import SourceGroup
from schemas.errors import PortalSyncError, Refused
from transport.config import KafkaConnection
from transport.local import REPO_ROOT, LocalKafka
from transport.publisher import Publisher

console = Console()
DEFAULT_AUTHORITY = REPO_ROOT / "deploy" / "authority.toml"
DEFAULT_REGISTRY = REPO_ROOT / "deploy" / "registry.toml"
DEMO_PREFIX = "portal-sync-demo"
DEMO_MARK = "demo"  # store_meta: this store was made by the demo


class DemoError(Refused):
    """The demo refuses to run here: another cluster's topics, another store's data, a
    registry without its sources (exit 1, "refused")."""


class DemoFailed(PortalSyncError):
    """The demo's pipeline did not start, finish or behave as it must (exit 1, "error");
    the message says where to look."""


@dataclass(frozen=True)
class Injected:
    """An event the demo injects on purpose, and the reason the worker must give."""

    what: str
    entity: str  # its change topic
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    expected: str
    sender: str = "province-01"  # the Kafka principal that sends it (secured broker)


@dataclass
class DemoRun:
    settings: Settings
    workdir: Path
    sources: list[SampleSource] = field(default_factory=list)
    feed: PortalFeed | None = None
    groups: list[SourceGroup] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)
    published: int = 0
    producer_dead_letters: int = 0
    injected: int = 0
    signing_keys: dict[str, Path] = field(default_factory=dict)  # source -> key file
    refusals: list[Injected] = field(default_factory=list)  # what was injected, expected
    lock: threading.Lock = field(default_factory=threading.Lock)
    broker: LocalKafka | None = None  # the demo's own secured broker, when it runs on one
    acl_refusal: str | None = None  # what the broker said to a source reading the changes

    @property
    def secured(self) -> bool:
        return self.broker is not None and self.broker.secure

    def connection(self, principal: str) -> KafkaConnection:
        """A principal's connection on the demo's secured broker (its SCRAM password
        file); elsewhere the settings' one, whoever asks."""
        if self.broker is not None and self.secured:
            return self.broker.connection(principal)
        return self.settings.connection()

    def settings_as(self, principal: str) -> Settings:
        """The run's settings with a principal's Kafka connection (a child's environment)."""
        if not self.secured:
            return self.settings
        security = self.connection(principal).model_dump(exclude={"bootstrap"}, exclude_none=True)
        return self.settings.model_copy(update={"kafka_security": security})

    def runners(self) -> list[AdapterRunner]:
        return [runner for group in self.groups for _, runner in group.runners]

    def count(self, stats: RunStats) -> None:
        with self.lock:
            self.published += stats.published
            self.producer_dead_letters += stats.dead_lettered
