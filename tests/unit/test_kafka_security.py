"""One Kafka security configuration for every client, without a broker: the environment,
a deployment file's [kafka] table, what a child process inherits, the secured local
broker's files and ACLs, and the messages of refused connections."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from kafka.errors import SaslAuthenticationFailedError, TopicAuthorizationFailedError
from pydantic import ValidationError

from portal_sync.settings import Settings, deployment_settings
from producers.adapters.debezium import DebeziumAdapter, DebeziumMapping
from producers.deployment import load_deployment
from schemas.errors import ConfigurationError, Refused
from transport.clients import quiet_client_debug, translate
from transport.config import KafkaConnection
from transport.local import format_command
from transport.local_secure import SecureFiles, SecureSetup, broker_properties, grants
from transport.topics import Topics

SECURITY_ENV = [
    "PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL",
    "PORTAL_SYNC_KAFKA_SASL_MECHANISM",
    "PORTAL_SYNC_KAFKA_SASL_USERNAME",
    "PORTAL_SYNC_KAFKA_SASL_PASSWORD",
    "PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE",
    "PORTAL_SYNC_KAFKA_SSL_CAFILE",
    "PORTAL_SYNC_KAFKA_SSL_CERTFILE",
    "PORTAL_SYNC_KAFKA_SSL_KEYFILE",
]


@pytest.fixture(autouse=True)
def _no_kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)


def test_the_environment_configures_sasl_ssl(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_USERNAME", "province-01")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    connection = Settings(kafka_bootstrap="k1:9093,k2:9093").connection()
    options = connection.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"  # the default over SASL
    assert options["sasl_plain_username"] == "province-01"
    assert options["sasl_plain_password"] == "s3cret"
    assert options["ssl_context"] is not None
    assert "s3cret" not in connection.redacted() + connection.principal()


def test_a_deployment_files_kafka_table_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD", "from-the-environment")
    config = tmp_path / "deploy.toml"
    config.write_text(
        """
[kafka]
bootstrap = "kafka.example:9094"
security_protocol = "SSL"
ssl_cafile = "tls/ca.pem"
ssl_certfile = "tls/province-01.pem"
ssl_keyfile = "tls/province-01.key"

[[sources]]
id = "province-01"
adapter = "filedrop"
"""
    )
    settings = deployment_settings(load_deployment(config), Settings())
    connection = settings.connection()
    assert connection.bootstrap == "kafka.example:9094"
    assert connection.security_protocol == "SSL"
    assert connection.ssl_cafile == tmp_path / "tls" / "ca.pem"  # relative to the file
    assert connection.ssl_keyfile == tmp_path / "tls" / "province-01.key"
    # A child process (a worker, a test's CLI run) inherits the same connection.
    env = settings.as_env()
    assert env["PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL"] == "SSL"
    assert env["PORTAL_SYNC_KAFKA_SSL_CERTFILE"] == str(tmp_path / "tls" / "province-01.pem")


@pytest.mark.parametrize("in_file", ["sasl_password", "sasl_password_file"])
def test_a_deployment_files_password_wins_over_the_environments_either_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_file: str
) -> None:
    """Key by key, the file wins: its password over the environment's password file (which
    a chart sets for every pod) too, and its password file over the environment's
    password. The environment's file won before: one principal's name, another's
    password."""
    (tmp_path / "env.pw").write_text("env-file-pw\n")
    (tmp_path / "file.pw").write_text("file-pw\n")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_USERNAME", "env-user")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "env.pw"))
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD", "env-pw")
    given = {"sasl_password": "file-pw", "sasl_password_file": tmp_path / "file.pw"}[in_file]
    security = {"sasl_username": "file-user", in_file: given}
    connection = Settings(kafka_bootstrap="kafka:9094", kafka_security=security).connection()
    assert (connection.sasl_username, connection.password()) == ("file-user", "file-pw")


def test_a_deployment_files_sasl_password_is_masked_when_shown(tmp_path: Path) -> None:
    config = tmp_path / "deploy.toml"
    config.write_text(
        """
[kafka]
security_protocol = "SASL_SSL"
sasl_username = "province-01"
sasl_password = "literal-secret"

[[sources]]
id = "province-01"
adapter = "filedrop"
"""
    )
    deployment = load_deployment(config)
    assert "literal-secret" not in deployment.redacted()
    assert "literal-secret" not in repr(deployment.kafka)
    settings = deployment_settings(deployment, Settings(kafka_bootstrap="k:9093"))
    assert settings.connection().password() == "literal-secret"


def test_an_incomplete_security_setting_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigurationError, match="sasl_username"):
        Settings(kafka_bootstrap="k:9093").connection()


def test_refusals_name_the_principal_never_the_password() -> None:
    connection = KafkaConnection(
        bootstrap="k:9093",
        security_protocol="SASL_SSL",
        sasl_username="province-01",
        sasl_password="hunter2-secret",
    )
    refused = translate(TopicAuthorizationFailedError({"p.changes.citizen"}), "read", connection)
    assert isinstance(refused, Refused)
    assert "User:province-01" in str(refused) and "p.changes.citizen" in str(refused)
    failed = translate(SaslAuthenticationFailedError("invalid credentials"), "connect", connection)
    assert isinstance(failed, ConfigurationError)
    assert "User:province-01" in str(failed)
    assert "hunter2-secret" not in str(refused) + str(failed)


def test_a_batch_no_codec_reads_stops_the_worker_instead_of_retrying_forever() -> None:
    from aiokafka.errors import UnsupportedCodecError

    from transport.clients import translate

    stopped = translate(UnsupportedCodecError("Libraries for zstd not found"), "fetch records")
    assert isinstance(stopped, ConfigurationError) and "codec" in str(stopped)


def test_the_acls_let_a_source_write_changes_and_the_reconciler_read_them() -> None:
    setup = SecureSetup(sources=("province-01",), topics=Topics(prefix="p"), group_id="g")
    table = {(g.principal, g.operation, g.resource, g.name, g.prefixed) for g in grants(setup)}
    assert ("province-01", "WRITE", "TOPIC", "p.changes.", True) in table
    assert ("reconciler", "READ", "TOPIC", "p.changes.", True) in table
    assert ("reconciler", "READ", "GROUP", "g", False) in table
    assert ("reconciler", "WRITE", "TOPIC", "p.dead-letters", False) in table
    source_rights = {(op, name) for who, op, _, name, _ in table if who == "province-01"}
    assert not {op for op, name in source_rights if name.startswith("p.changes")} & {"READ"}
    assert not any("dead-letters" in name for _, name in source_rights)
    assert not any(g.operation == "CREATE" for g in grants(setup))  # the admin creates topics
    with pytest.raises(ConfigurationError, match="reserved"):
        SecureSetup(sources=("admin",)).principals()
    # `re`'s `$` matches before a final newline: a principal "x\n" would break the
    # broker's password file
    with pytest.raises(ConfigurationError, match="cannot be a Kafka principal"):
        SecureSetup(sources=("province-01\n",)).principals()


def test_the_secured_broker_files_are_private_and_hold_no_plaintext_listener(
    tmp_path: Path,
) -> None:
    files = SecureFiles(tmp_path / "kafka")
    files.ensure_tls()
    created = files.new_principals(["admin", "province-01"])
    files.write_env_files(["admin", "province-01"], 9093, 9094)
    assert set(created) == {"admin", "province-01"}
    assert files.new_principals(["admin", "province-01"]) == {}  # kept across starts
    for path in (files.tls / "ca.key", files.keystore, files.password_file("admin")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (files.data_dir, files.tls, files.clients):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    env = files.env_file("province-01").read_text()
    assert created["province-01"] not in env
    assert "PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE=" in env
    properties = "\n".join(broker_properties(files, 9093, 9094, 9095))
    assert "PLAINTEXT" not in properties
    assert "super.users=User:admin;User:broker" in properties


def test_scram_users_go_to_the_format_command(tmp_path: Path) -> None:
    user = "SCRAM-SHA-512=[name=admin,password=x]"
    command = format_command("java", tmp_path, tmp_path / "p", "id", (user,))
    assert f"--add-scram={user}" in command


def test_client_info_lines_stay_out_of_a_quiet_root_logger() -> None:
    root = logging.getLogger()
    saved = root.level, logging.getLogger("kafka").level
    try:
        root.setLevel(logging.WARNING)
        logging.getLogger("kafka").setLevel(logging.NOTSET)
        quiet_client_debug()
        assert not logging.getLogger("kafka.net.manager").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        logging.getLogger("kafka").setLevel(saved[1])


def test_the_command_line_asks_for_a_principal_on_the_secured_local_broker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from portal_sync.cli.options import settings_from

    (tmp_path / "broker.json").write_text('{"port": 9092, "secure": 1, "ssl_port": 9093}')
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("PORTAL_SYNC_KAFKA_BOOTSTRAP", raising=False)
    with pytest.raises(ConfigurationError, match=r"runs secured.*clients/admin\.env"):
        settings_from()
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_USERNAME", "reconciler")
    monkeypatch.setenv("PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "pw"))
    assert settings_from().connection().bootstrap == "127.0.0.1:9092"


def test_a_provinces_cluster_is_configured_with_the_same_security_rules(tmp_path: Path) -> None:
    # The debezium adapter's mapping carries the same security settings as our cluster's
    # connection (one definition): the same checks refuse a bad combination at load, and
    # its files are relative to the deployment file.
    base = {"bootstrap": "kafka.hcm:9093", "topics": ["hcm.public.cong_dan"],
            "entity": "citizen", "key_column": "so_dinh_danh",
            "fields": {"full_name": "ho_ten"}}  # fmt: skip
    with pytest.raises(ValidationError, match="SASL_SSL needs sasl_username"):
        DebeziumMapping(**base, security_protocol="SASL_SSL")
    with pytest.raises(ValidationError, match="go together"):
        DebeziumMapping(**base, security_protocol="SSL", ssl_certfile=Path("client.crt"))
    mapping = DebeziumMapping(
        **base, security_protocol="SASL_SSL", sasl_username="sync-hcm",
        sasl_password_file=Path("secrets/hcm.pw"), ssl_cafile=Path("ca.crt"),
    )  # fmt: skip
    assert mapping.sasl_mechanism == "SCRAM-SHA-512"
    connection = DebeziumAdapter("province-79", mapping, tmp_path).connection()
    assert connection.bootstrap == "kafka.hcm:9093"
    assert connection.sasl_password_file == tmp_path / "secrets/hcm.pw"
    assert connection.ssl_cafile == tmp_path / "ca.crt"
    assert (connection.sasl_username, connection.security_protocol) == ("sync-hcm", "SASL_SSL")


@pytest.mark.parametrize(
    ("security", "said"),
    [
        # TLS files without TLS: the connection, a PLAIN password with it, would go in clear
        ({"security_protocol": "PLAINTEXT", "ssl_cafile": "ca.pem"}, "ssl_cafile given"),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_username": "province-01",
                "sasl_password": "Tr0ub4dor&3",
                "ssl_cafile": "ca.pem",
            },
            "ssl_cafile given, but security_protocol SASL_PLAINTEXT",
        ),
        ({"ssl_certfile": "c.pem", "ssl_keyfile": "c.key"}, "ssl_certfile, ssl_keyfile given"),
        # a SASL user on a connection with neither SASL nor TLS
        ({"sasl_username": "province-01", "sasl_password": "Tr0ub4dor&3"}, "sasl_username"),
        # a misspelt key (the protocol then PLAINTEXT) and one that is not a security setting
        ({"security_protcol": "SASL_SSL"}, "unknown 'security_protcol'"),
        ({"bootstrap": "elsewhere:9092"}, "unknown 'bootstrap'"),
        # the reviewer's case: the password was shown as the input of the refused model
        (
            {"security_protocol": "SSL", "ssl_keyfile": "c.key", "sasl_password": "Tr0ub4dor&3"},
            "ssl_certfile and ssl_keyfile go together",
        ),
        (
            {"security_protocol": "TLS", "sasl_password": "Tr0ub4dor&3"},
            "security_protocol (PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL): Input should be",
        ),
    ],
)
def test_kafka_security_that_would_not_be_used_is_a_configuration_error_without_values(
    security: dict[str, str], said: str
) -> None:
    settings = Settings(kafka_bootstrap="localhost:9092", kafka_security=security)
    with pytest.raises(ConfigurationError) as refused:
        settings.connection()
    message = str(refused.value)
    assert said in message, message
    assert "Tr0ub4" not in message and "input_value" not in message
