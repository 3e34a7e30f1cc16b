"""One connection model for every Kafka client of the project.

`KafkaConnection` holds where the cluster is and how to authenticate to it; every client
(producer, consumer, admin, the reconciler's group member) is built from it in `transport`.
Environment variables `PORTAL_SYNC_KAFKA_<NAME>`; secrets are `SecretStr` and never printed.

| security_protocol | what it needs                                                   |
|-------------------|-----------------------------------------------------------------|
| PLAINTEXT         | nothing (development, a closed network)                         |
| SSL               | `ssl_cafile`; with `ssl_certfile`/`ssl_keyfile`: mutual TLS     |
| SASL_PLAINTEXT    | `sasl_mechanism`, `sasl_username`, a password                   |
| SASL_SSL          | both of the above (production: SCRAM-SHA-512 over TLS)          |
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import ConfigurationError
from schemas.redaction import redacted_text

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class ClusterSecurity(BaseModel):
    """How to authenticate to a Kafka cluster: ours (`KafkaConnection`), or a province's
    that an adapter reads (the `debezium` adapter's mapping)."""

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                self.sasl_mechanism = "SCRAM-SHA-512"
            if not self.sasl_username:
                raise ValueError(f"{self.security_protocol} needs sasl_username")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    f"{self.security_protocol} needs sasl_password or sasl_password_file"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        # Files for TLS without it are refused, not dropped: the connection (a PLAIN
        # password with it) would go in clear. So is a SASL user on a connection with
        # neither SASL nor TLS; SSL authenticates by the client certificate, and a
        # deployment file that switches to it leaves the environment's SASL user unused.
        protocol = self.security_protocol
        unused = [name for name in SSL_FIELDS if getattr(self, name) is not None]
        if protocol == "PLAINTEXT":
            unused += [name for name in SASL_FIELDS if getattr(self, name) is not None]
        if unused and "SSL" not in protocol:
            raise ValueError(
                f"{', '.join(unused)} given, but security_protocol {protocol} does not use "
                "them (SSL or SASL_SSL for TLS files, SASL_* for a SASL user)"
            )
        return self

    def security(self, base_dir: Path) -> dict[str, Any]:
        """These settings as keyword arguments, files relative to `base_dir` (a
        configuration file's directory) made absolute."""
        values = {name: getattr(self, name) for name in ClusterSecurity.model_fields}
        for name in FILE_FIELDS:
            if values[name] is not None:
                values[name] = base_dir / values[name]
        return values


FILE_FIELDS = ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile")
SASL_FIELDS = ("sasl_username", "sasl_password", "sasl_password_file")
SSL_FIELDS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


class KafkaConnection(BaseSettings, ClusterSecurity):
    """Where the cluster is and how to authenticate; shared by every client."""

    model_config = SettingsConfigDict(env_prefix="PORTAL_SYNC_KAFKA_", extra="ignore")

    bootstrap: str = Field(default="", description="host:port[,host:port...]")

    def servers(self) -> list[str]:
        if not self.bootstrap.strip():
            raise ConfigurationError(
                "no Kafka bootstrap servers configured (PORTAL_SYNC_KAFKA_BOOTSTRAP)"
            )
        return [server.strip() for server in self.bootstrap.split(",") if server.strip()]

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    def password(self) -> str | None:
        """The SASL password, read from its file when one is given (a mounted secret)."""
        if self.sasl_password_file is not None:
            try:
                return self.sasl_password_file.read_text().rstrip("\n")
            except OSError as error:
                raise ConfigurationError(
                    f"Kafka SASL password file {self.sasl_password_file}: {error.strerror}"
                ) from None
        return None if self.sasl_password is None else self.sasl_password.get_secret_value()

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context (the cluster's CA; a client certificate for mTLS)."""
        if not self.uses_ssl:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
            if self.ssl_certfile is not None and self.ssl_keyfile is not None:
                context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError(f"Kafka TLS files: {error}") from None
        return context

    def client_options(self) -> dict[str, Any]:
        """The options kafka-python's clients take for this connection."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.servers(),
            "security_protocol": self.security_protocol,
        }
        if self.uses_ssl:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.password()
        return options

    def environment(self) -> dict[str, str]:
        """`PORTAL_SYNC_KAFKA_*` variables that give a child process this connection (a
        password only as given: its file's path, or the value itself)."""
        env = {"PORTAL_SYNC_KAFKA_BOOTSTRAP": self.bootstrap}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name != "bootstrap" and value is not None:
                if isinstance(value, SecretStr):
                    value = value.get_secret_value()
                env[f"PORTAL_SYNC_KAFKA_{name.upper()}"] = str(value)
        return env

    def principal(self) -> str:
        """Who the cluster sees, for messages: the SASL user, else the client certificate."""
        if self.uses_sasl:
            return f"User:{self.sasl_username} ({self.sasl_mechanism})"
        if self.ssl_certfile is not None:
            return f"the holder of client certificate {self.ssl_certfile}"
        return "User:ANONYMOUS"

    def redacted(self) -> str:
        """For logs and status lines: servers and protocol, never a secret."""
        user = f" as {self.sasl_username}" if self.uses_sasl else ""
        return f"{redacted_text(self.bootstrap)} ({self.security_protocol}{user})"
