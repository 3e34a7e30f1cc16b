"""Configuration from flags, environment (`PORTAL_SYNC_*`) and defaults.

`Settings` holds values and hands each layer its own configuration (`connection()`,
`topics()`, `worker_config()`); its only I/O is reading the secret files it names: the
store URL's file (`PORTAL_SYNC_STORE_URL_FILE`, a mounted secret) and, when asked, the
reference key (`reference_key()`). "No bootstrap servers" is turned into "the local
development broker" by the CLI (`portal_sync.cli.options`) and by the demo, which starts
its own (`portal_sync.demo.run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumers.cache import DEFAULT_RECORDS
from observability.alerts import Thresholds
from schemas.errors import ConfigurationError
from schemas.identifiers import MIN_REFERENCE_KEY_BYTES, ReferenceKey
from transport.config import ClusterSecurity, KafkaConnection
from transport.topics import Topics

log = logging.getLogger(__name__)
# The stall alert's threshold (a batch waiting this long); a restart resets the wait.
STALL_ALERT_SECONDS = Thresholds().worker_stalled_seconds

# Types only: the worker's imports (store, merge, metrics) for the commands that run it, the
# producers' (kafka-python, SQLAlchemy's engine) for those that produce.
if TYPE_CHECKING:
    from consumers.processor import WorkerConfig
    from producers.deployment import Deployment


def user_data_dir() -> Path:
    """The user's data dir (XDG), where the local broker and default store live."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "portal-sync"


def default_store_url() -> str:
    """The embedded default store: a SQLite file in the user's data dir."""
    return f"sqlite:///{user_data_dir() / 'store.db'}"


def url_from(url: str | None, file: Path | None, names: tuple[str, str]) -> str | None:
    """A URL given directly or in a file (one line; a password in a URL on the command line
    is visible to every user in `ps`). Both may be given only if they agree; `names`
    are the two settings, for the message (which never shows a URL)."""
    if file is None:
        return url
    try:
        from_file = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigurationError(f"{names[1]}: cannot read {file}: {reason}") from None
    if not from_file or "\n" in from_file:
        raise ConfigurationError(f"{names[1]}: {file} must hold one line, the URL")
    if url is not None and url != from_file:
        raise ConfigurationError(
            f"{names[0]} and {names[1]} are both given and differ: give only one"
        )
    return from_file


class Settings(BaseSettings):
    """Every setting can be given as env `PORTAL_SYNC_<NAME>`; CLI flags override."""

    model_config = SettingsConfigDict(env_prefix="PORTAL_SYNC_", extra="ignore")

    kafka_bootstrap: str | None = Field(
        default=None,
        description="Existing cluster's bootstrap servers; unset: the local broker",
    )
    kafka_security: dict[str, Any] = Field(
        default_factory=dict,
        description="Kafka security settings over PORTAL_SYNC_KAFKA_* (a deployment's [kafka])",
    )
    kafka_data_dir: Path = Field(default_factory=lambda: user_data_dir() / "kafka")
    store_url: str = Field(
        default_factory=default_store_url,
        description="SQLAlchemy URL of the national store",
    )
    store_url_file: Path | None = Field(
        default=None, description="file holding the store URL (a secret); instead of store_url"
    )
    topic_prefix: str = "portal-sync"
    change_partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(
        default=1,
        ge=1,
        description="replicas of the project's topics: 1 on the local broker, 3 in production",
    )
    change_retention_hours: int = Field(default=24 * 30, ge=1)
    dead_letter_retention_hours: int = Field(default=24 * 90, ge=1)
    group_id: str = "portal-sync-reconciler"
    authority_file: Path | None = None
    registry: Path | None = Field(
        default=None, description="source registry file; unset: development mode"
    )
    history_retention_days: int = Field(default=730, ge=1, description="audit history kept, days")
    deleted_retention_days: int = Field(
        default=180,
        ge=1,
        description="after every source deleted a record: its history values and tombstones "
        "kept, days (at least the change and dead-letter topics' retention)",
    )
    access_log_retention_days: int = Field(default=730, ge=1, description="access log kept, days")
    journal_retention_days: int = Field(
        default=30,
        ge=7,  # store.roles.JOURNAL_FLOOR_DAYS (not imported: it loads the whole store)
        description="the batches' journal (apply_journal) kept, days",
    )
    done_files_retention_days: float = Field(
        default=30,
        ge=0,
        allow_inf_nan=False,
        description="file adapters' processed files kept in done/, days",
    )
    batch_max_events: int = Field(default=2000, ge=1)
    batch_max_wait_seconds: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    validator_processes: int | None = Field(
        default=None,
        ge=0,
        description=(
            "processes that check batches beside the worker's (0: in the worker's own); "
            "default: the host's cores less one, at most 8 (0 on one core)"
        ),
    )
    record_cache_records: int = Field(
        default=DEFAULT_RECORDS,
        ge=0,
        description=(
            "records a worker keeps as it applied them, taken instead of read back while the "
            "store confirms nothing else wrote them (0: none)"
        ),
    )
    metrics_host: str = Field(default="127.0.0.1", description="bind address of /metrics")
    metrics_port: int = Field(
        default=9310, ge=0, le=65535, description="worker's /metrics port; 0: off"
    )
    metrics_web_config_file: Path | None = Field(
        default=None, description="TLS and basic auth of every process's HTTP endpoints"
    )
    freshness_objective_seconds: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    worker_stall_after_seconds: float = Field(
        default=300.0,
        gt=0,
        allow_inf_nan=False,
        description="/healthz fails after a batch retried, or took, this long",
    )
    max_clock_skew_seconds: float = Field(
        default=300.0,
        ge=0,
        allow_inf_nan=False,
        description="occurred_at further ahead: future_timestamp",
    )
    topic_check_seconds: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="the change topics' ids checked again this often",
    )
    reference_key_file: Path | None = Field(
        default=None,
        description="secret of the keyed references (HMAC-SHA-256) that stand for personal "
        "ids and tax codes in logs, dead letters and reports; unset: masked keys only",
    )

    @model_validator(mode="after")
    def _store_url_from_file(self) -> Settings:
        given = self.store_url if "store_url" in self.model_fields_set else None
        names = ("PORTAL_SYNC_STORE_URL (--store)", "PORTAL_SYNC_STORE_URL_FILE")
        self.store_url = url_from(given, self.store_url_file, names) or self.store_url
        return self

    @classmethod
    def from_flags(cls, bootstrap: str | None = None, store: str | None = None) -> Settings:
        """Settings from the environment, with the CLI's --bootstrap and --store on top."""
        overrides: dict[str, object] = {}
        if bootstrap:
            overrides["kafka_bootstrap"] = bootstrap
        if store:
            overrides["store_url"] = store
        return cls(**overrides)  # type: ignore[arg-type]

    def connection(self) -> KafkaConnection:
        """The Kafka connection: security settings from `PORTAL_SYNC_KAFKA_*`, those of
        `kafka_security` (a deployment file's [kafka] table) on top."""
        if not self.kafka_bootstrap:
            raise ConfigurationError(
                "no Kafka bootstrap servers (set PORTAL_SYNC_KAFKA_BOOTSTRAP or --bootstrap)"
            )
        unknown = sorted(set(self.kafka_security) - set(ClusterSecurity.model_fields))
        if unknown:  # a misspelt protocol would otherwise leave the connection in clear
            raise ConfigurationError(
                f"Kafka connection settings: unknown {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(ClusterSecurity.model_fields)}"
            )
        given = dict(self.kafka_security)
        # The file's password replaces the environment's whichever way each gives it: the
        # environment's password file (which a chart sets for every pod) would otherwise
        # win over the file's password (`password()` prefers a file).
        for key, other in (("sasl_password", "sasl_password_file"),
                           ("sasl_password_file", "sasl_password")):  # fmt: skip
            if key in given:
                given.setdefault(other, None)
        try:
            return KafkaConnection(bootstrap=self.kafka_bootstrap, **given)
        except ValidationError as error:
            problems = setting_problems(error, lambda f: f"{f} (PORTAL_SYNC_KAFKA_{f.upper()})")
            raise ConfigurationError(f"Kafka connection settings: {problems}") from None

    def reference_key(self) -> ReferenceKey | None:
        """The secret of keyed references, read from `reference_key_file`; None when no file
        is configured (references are then masked keys). A configured file that cannot be
        read or is too short refuses the start; the message never shows its content."""
        return load_reference_key(self.reference_key_file)

    def topics(self) -> Topics:
        return Topics(
            prefix=self.topic_prefix,
            change_partitions=self.change_partitions,
            replication_factor=self.replication_factor,
            change_retention_hours=self.change_retention_hours,
            dead_letter_retention_hours=self.dead_letter_retention_hours,
        )

    def worker_config(self) -> WorkerConfig:
        from consumers.processor import WorkerConfig

        kept = max(self.topics().superseded_kept_hours, self.dead_letter_retention_hours)
        replayable = kept / 24
        if self.deleted_retention_days < replayable:
            raise ConfigurationError(
                f"PORTAL_SYNC_DELETED_RETENTION_DAYS ({self.deleted_retention_days}) must be at "
                f"least what the change and dead-letter topics keep ({replayable:g} days: "
                "a change topic's superseded events a day past its retention at most): "
                "an older event replayed or re-driven after a record's tombstone is gone "
                "would bring the record back"
            )
        if self.worker_stall_after_seconds < STALL_ALERT_SECONDS + 30:
            log.warning(
                "PORTAL_SYNC_WORKER_STALL_AFTER_SECONDS (%g) is below %g: the worker's /healthz "
                "fails (and a supervisor restarts it) before PortalSyncWorkerStalled can fire "
                "at %g s of waiting",
                self.worker_stall_after_seconds,
                STALL_ALERT_SECONDS + 30,
                STALL_ALERT_SECONDS,
            )
        return WorkerConfig(
            connection=self.connection(),
            topics=self.topics(),
            group_id=self.group_id,
            store_url=self.store_url,
            registry_file=self.registry,
            authority_file=self.authority_file,
            history_retention_days=self.history_retention_days,
            deleted_retention_days=self.deleted_retention_days,
            access_log_retention_days=self.access_log_retention_days,
            journal_retention_days=self.journal_retention_days,
            reference_key=self.reference_key(),
            batch_max_events=self.batch_max_events,
            batch_max_wait_seconds=self.batch_max_wait_seconds,
            validator_processes=(
                default_validator_processes()
                if self.validator_processes is None
                else self.validator_processes
            ),
            record_cache_records=self.record_cache_records,
            metrics_host=self.metrics_host,
            metrics_port=self.metrics_port,
            metrics_web_config=self.metrics_web_config_file,
            freshness_objective_seconds=self.freshness_objective_seconds,
            stall_after_seconds=self.worker_stall_after_seconds,
            max_clock_skew_seconds=self.max_clock_skew_seconds,
            topic_check_seconds=self.topic_check_seconds,
        )

    def as_env(self) -> dict[str, str]:
        """Environment that gives a child process (a worker, a test's CLI run) what it
        needs of these settings: the connection, the store, the topics (names, partitions,
        replicas), the group, the metrics port, the rules' files, the reference key's file,
        the validator processes and the batch size; any other setting is the child's own
        environment's."""
        env = self.connection().environment() | {
            "PORTAL_SYNC_STORE_URL": self.store_url,
            "PORTAL_SYNC_TOPIC_PREFIX": self.topic_prefix,
            "PORTAL_SYNC_GROUP_ID": self.group_id,
            "PORTAL_SYNC_CHANGE_PARTITIONS": str(self.change_partitions),
            "PORTAL_SYNC_METRICS_PORT": str(self.metrics_port),
        }
        if self.authority_file is not None:
            env["PORTAL_SYNC_AUTHORITY_FILE"] = str(self.authority_file)
        if self.registry is not None:
            env["PORTAL_SYNC_REGISTRY"] = str(self.registry)
        if self.reference_key_file is not None:
            env["PORTAL_SYNC_REFERENCE_KEY_FILE"] = str(self.reference_key_file)
        if self.validator_processes is not None:
            env["PORTAL_SYNC_VALIDATOR_PROCESSES"] = str(self.validator_processes)
        if "batch_max_events" in self.model_fields_set:
            env["PORTAL_SYNC_BATCH_MAX_EVENTS"] = str(self.batch_max_events)
        if "replication_factor" in self.model_fields_set:  # `kafka up --nodes 3`'s
            env["PORTAL_SYNC_REPLICATION_FACTOR"] = str(self.replication_factor)
        return env


KEY_HOWTO = "head -c 32 /dev/urandom > FILE; chmod 600 FILE"


def load_reference_key(path: Path | None) -> ReferenceKey | None:
    """The reference key in `path` (its bytes, as they are); None without a path."""
    if path is None:
        return None
    setting = f"reference key file {path} (PORTAL_SYNC_REFERENCE_KEY_FILE)"
    try:
        secret = path.read_bytes()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigurationError(f"{setting}: {reason}; make one with: {KEY_HOWTO}") from None
    if len(secret) < MIN_REFERENCE_KEY_BYTES:
        raise ConfigurationError(
            f"{setting}: {len(secret)} bytes, at least {MIN_REFERENCE_KEY_BYTES} needed; "
            f"make one with: {KEY_HOWTO}"
        )
    return ReferenceKey(secret)


def setting_problems(error: ValidationError, label: Callable[[str], str]) -> str:
    """Which settings are wrong and why, never the values given (a URL or a password may
    be one): each problem as `label(field): message`, the message alone for a problem of
    the whole model."""
    return "; ".join(
        (f"{label('_'.join(map(str, found['loc'])))}: " if found["loc"] else "")
        + found["msg"].removeprefix("Value error, ")
        for found in error.errors(include_input=False, include_url=False)
    )


def deployment_settings(deployment: Deployment, settings: Settings) -> Settings:
    """A deployment file's [kafka] section and `[producer] reference_key_file` override
    the environment and defaults."""
    update: dict[str, object] = {}
    if deployment.kafka.bootstrap:
        update["kafka_bootstrap"] = deployment.kafka.bootstrap
    if deployment.kafka.topic_prefix:
        update["topic_prefix"] = deployment.kafka.topic_prefix
    if security := deployment.kafka.security(deployment.base_dir):
        update["kafka_security"] = security
    key_file = deployment.producer.reference_key_file
    if key_file is not None:
        update["reference_key_file"] = deployment.base_dir / key_file
    return settings.model_copy(update=update)


def default_validator_processes() -> int:
    """Validator processes when not set: one per core beside the worker's own, at most 8.
    Since a child hands the worker each valid event's fields (`consumers.validators`), one
    child took one worker from 8,586-10,487 to 12,180-12,733 events/s on PostgreSQL on
    this project's 2-core machine, with the broker and the database beside it
    (docs/performance-log.md, tenth round); the worker alone is bound by its one core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min((cores or 1) - 1, 8))
