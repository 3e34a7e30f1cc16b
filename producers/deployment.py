"""One deployment configuration file (TOML) listing a province's or ministry's sources.

Strings may reference environment variables as `${NAME}`; they are resolved at load and
never printed: `redacted()` shows the file's text form (`${NAME}` stays as written) with
every literal secret masked (`schemas.redaction`). Relative paths are relative to the
file's directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationError,
)

from producers.adapters import load as load_adapter
from producers.adapters.debezium import group_of
from producers.engine import CHECKPOINT_INTERVAL_SECONDS
from producers.sdk import Adapter, ConfigurationError
from schemas.identifiers import SOURCE_ID, ReferenceKey
from schemas.redaction import redacted_text

# `${NAME}`: an environment variable; `${file:PATH}`: a file's content (a Kubernetes or
# systemd secret mounted as a file), its last line break taken off.
_REFERENCE = re.compile(r"\$\{(?:([A-Za-z_][A-Za-z0-9_]*)|file:([^}]+))\}")
# `://` then a user (and password) before an `@`: where a reference is part of a URL's
# credentials, its value is percent-encoded.
_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*\$\{")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceEntry(StrictModel):
    id: Annotated[str, StringConstraints(pattern=SOURCE_ID.pattern)] = Field(
        description="unique in this file; names the state file and log lines"
    )
    adapter: str = Field(description="entry-point name in group portal_sync.adapters")
    source: Annotated[str, StringConstraints(pattern=SOURCE_ID.pattern)] | None = Field(
        default=None, description="contract source id of the events; default: id"
    )
    interval_seconds: float = Field(default=30.0, gt=0, description="poll interval")
    enabled: bool = True
    connection: dict[str, Any] = Field(default_factory=dict)
    mapping: dict[str, Any] = Field(default_factory=dict)
    signing_key_file: Path | None = Field(
        default=None, description="this source's signing key (over [producer]'s)"
    )

    @property
    def contract_source(self) -> str:
        return self.source or self.id

    def options(self) -> dict[str, Any]:
        return {**self.connection, **self.mapping}


class ProducerSection(StrictModel):
    state_dir: Path = Path("state")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(
        default=9312,
        ge=0,
        le=65535,
        description="/metrics of `produce` (worker 9310, lag exporter 9311); 0: off",
    )
    reference_key_file: Path | None = Field(
        default=None,
        description="secret of keyed references (overrides PORTAL_SYNC_REFERENCE_KEY_FILE)",
    )
    signing_key_file: Path | None = Field(
        default=None, description="signing key of the events (`portal-sync keys new`)"
    )
    checkpoint_interval_seconds: float = Field(
        default=CHECKPOINT_INTERVAL_SECONDS,
        ge=0,
        description="a source's state saved at most this often while it publishes (0: at "
        "every checkpoint; one with a clean-up, as the outbox's, is always saved at once); "
        "a crash re-sends at most this long's events",
    )


class KafkaSection(StrictModel):
    """Where the cluster is and how to authenticate: the keys of `PORTAL_SYNC_KAFKA_*`
    (over the environment's); relative files are relative to the deployment file."""

    bootstrap: str | None = None
    topic_prefix: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def security(self, base_dir: Path) -> dict[str, Any]:
        """The security keys the file sets, files made absolute."""
        given = self.model_dump(exclude_none=True, exclude={"bootstrap", "topic_prefix"})
        return {
            name: base_dir / value if isinstance(value, Path) else value
            for name, value in given.items()
        }


class Deployment(StrictModel):
    producer: ProducerSection = Field(default_factory=ProducerSection)
    kafka: KafkaSection = Field(default_factory=KafkaSection)
    sources: list[SourceEntry]

    _base_dir: Path = PrivateAttr(default=Path("."))
    _text: str = PrivateAttr(default="")
    _adapter_defaults: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        """The file's directory: relative paths in the file are relative to it."""
        return self._base_dir

    @property
    def state_dir(self) -> Path:
        return self.base_dir / self.producer.state_dir

    def enabled(self, only: str | None = None) -> list[SourceEntry]:
        chosen = [s for s in self.sources if s.enabled and (only is None or s.id == only)]
        if only is not None and not chosen:
            raise ConfigurationError(f"no enabled source with id {only!r} in the configuration")
        return chosen

    def signing_key_file(self, entry: SourceEntry) -> Path | None:
        """The key that signs a source's events: its own, else [producer]'s (relative
        paths from the file's directory); None: its events go unsigned."""
        path = entry.signing_key_file or self.producer.signing_key_file
        return None if path is None else self.base_dir / path

    def use_defaults(self, **options: Any) -> None:
        """Options every adapter that declares them gets unless its source sets them
        (settings such as the done/ retention of the file adapters)."""
        self._adapter_defaults.update(options)

    def adapter(self, entry: SourceEntry, reference_key: ReferenceKey | None = None) -> Adapter:
        """The configured adapter of one source (ConfigurationError if it is wrong), naming
        records in its origins by keyed references under `reference_key`."""
        try:
            adapter_class = load_adapter(entry.adapter)
            options = entry.options()
            for name, value in self._adapter_defaults.items():
                if name in adapter_class.Config.model_fields:
                    options.setdefault(name, value)
            adapter = adapter_class.from_settings(entry.contract_source, options, self.base_dir)
        except ConfigurationError as error:
            raise ConfigurationError(f"source {entry.id} ({entry.adapter}): {error}") from None
        adapter.reference_key = reference_key
        return adapter

    def redacted(self) -> str:
        """The file as written, safe to print: `${NAME}` references stay unresolved; URL
        passwords, key=value passwords and the values of keys named like password, secret
        or token (bare, quoted or dotted, in inline tables too) are masked."""
        return redacted_text(self._text)


def load_deployment(path: Path, environ: dict[str, str] | None = None) -> Deployment:
    """Read, resolve `${NAME}` references, validate; every problem is a ConfigurationError."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{path} is not valid TOML: {error}") from None
    resolved = _resolve(raw, os.environ if environ is None else environ, path.parent)
    try:
        deployment = Deployment.model_validate(resolved)
    except ValidationError as error:
        raise ConfigurationError(f"{path}: {_problems(error)}") from None
    ids = [s.id for s in deployment.sources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigurationError(f"{path}: duplicate source ids: {', '.join(duplicates)}")
    shared = _shared_positions(deployment.sources)
    if shared:
        raise ConfigurationError(f"{path}: {shared}")
    deployment._base_dir = path.resolve().parent
    deployment._text = text
    return deployment


def _shared_positions(sources: list[SourceEntry]) -> str | None:
    """Two `debezium` entries that would read one topic under one consumer group: each
    commits the group's offsets, and the other then starts past messages it never read."""
    readers: dict[tuple[str, str, str], str] = {}
    for entry in sources:
        if entry.adapter != "debezium" or not entry.enabled:
            continue
        options = entry.options()
        group = group_of(entry.contract_source, options.get("group_id"))
        servers = str(options.get("bootstrap") or "").lower().split(",")
        cluster = ",".join(sorted(server.strip() for server in servers))  # one, however listed
        topics = options.get("topics")
        for topic in topics if isinstance(topics, list) else []:
            first = readers.setdefault((cluster, group, str(topic)), entry.id)
            if first != entry.id:
                return (
                    f"sources {first} and {entry.id} read topic {topic} under one consumer "
                    f"group, {group}: each would skip what the other read; give one a "
                    "group_id of its own"
                )
    return None


def _resolve(value: Any, environ: Any, base: Path) -> Any:
    """`${NAME}` replaced by the environment's value, `${file:PATH}` by the file's (a path
    relative to the deployment file's directory). Inside a URL's user and password
    (`postgresql://sync:${PASSWORD}@db/tthc`) the value is percent-encoded: a password
    `p@ss` made the host `ss@db`, and its tail went to the DNS resolver and the driver's
    error; a value already percent-encoded stays as it is, and so does a whole URL given
    by one reference."""
    if isinstance(value, str):
        in_credentials = _URL_USERINFO.match(value) is not None and "@" in value

        def lookup(match: re.Match[str]) -> str:
            name, file = match.group(1), match.group(2)
            if file is not None:
                found = _secret_file(base / file)
            elif name not in environ:
                raise ConfigurationError(f"environment variable {name} is not set")
            else:
                found = str(environ[name])
            credentials = in_credentials and match.start() < value.rindex("@")
            # `%` kept: a value written percent-encoded already stays as it was
            return quote(found, safe="%") if credentials else found

        return _REFERENCE.sub(lookup, value)
    if isinstance(value, dict):
        return {k: _resolve(v, environ, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, environ, base) for v in value]
    return value


def _secret_file(path: Path) -> str:
    """A secret file's content, its last line break taken off; its path named if it cannot
    be read, never its content."""
    try:
        return path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except OSError as error:
        raise ConfigurationError(f"cannot read the secret file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"the secret file {path} is not UTF-8") from None


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
        for e in error.errors(include_input=False, include_url=False)
    )
