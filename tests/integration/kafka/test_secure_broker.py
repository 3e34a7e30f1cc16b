"""The pipeline on a secured local broker (`portal-sync kafka up --secure`): SASL_SSL with
SCRAM-SHA-512, mutual TLS, and the ACLs of each principal. One broker for the module."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumers.merge import Authority
from portal_sync.settings import Settings
from schemas import message_key
from schemas.dead_letter import DEAD_LETTER_REASONS, read_headers
from schemas.errors import ConfigurationError, Refused
from tests.support.pipeline_helpers import (
    citizen_events,
    cli,
    expected_export,
    exported,
    write_jsonl,
)
from transport import admin
from transport.group import GroupMember
from transport.local import KafkaSetupError, LocalKafka, free_port
from transport.local_secure import issue, new_ca, write_private
from transport.publisher import Publisher
from transport.reader import RangeReader, Selection

pytestmark = pytest.mark.kafka

SOURCES = ["national-population", "province-01", "province-79", "ministry-btp"]
PREFIX = "secure-test"
GROUP = "secure-test-reconciler"
SOURCE = "province-01"


@dataclass(frozen=True)
class Secured:
    local: LocalKafka
    output: str  # of `kafka up --secure`
    registry: Path

    def settings(
        self, principal: str, store_url: str = "sqlite://", mtls: bool = False
    ) -> Settings:
        """A principal's Settings, from its client settings file."""
        values = env_file(self.local.secure_files.env_file(principal, mtls))
        return Settings(
            kafka_bootstrap=values.pop("PORTAL_SYNC_KAFKA_BOOTSTRAP"),
            kafka_security={
                name.removeprefix("PORTAL_SYNC_KAFKA_").lower(): value
                for name, value in values.items()
            },
            store_url=store_url,
            topic_prefix=PREFIX,
            group_id=GROUP,
            change_partitions=2,
            metrics_port=0,
            registry=self.registry,
        )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kinds = {"national": "national", "province": "province", "ministry": "ministry"}
    path = tmp_path_factory.mktemp("registry") / "registry.toml"
    path.write_text(
        "".join(
            f'[sources.{s}]\nkind = "{kinds[s.split("-")[0]]}"\nname = "{s}"\n' for s in SOURCES
        )
    )
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, registry: Path) -> Iterator[Secured]:
    """`portal-sync kafka up --secure` as a user runs it; its output is kept for a test."""
    data_dir = tmp_path_factory.mktemp("secure-kafka") / "kafka"
    env = os.environ | {
        "PORTAL_SYNC_TOPIC_PREFIX": PREFIX,
        "PORTAL_SYNC_GROUP_ID": GROUP,
        "PORTAL_SYNC_CHANGE_PARTITIONS": "2",
        "COLUMNS": "300",
    }
    for name in list(env):
        if name.startswith("PORTAL_SYNC_KAFKA_"):
            del env[name]
    command = [sys.executable, "-m", "portal_sync", "kafka", "up", "--secure"]
    command += [
        "--data-dir",
        str(data_dir),
        "--port",
        str(free_port()),
        "--registry",
        str(registry),
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    local = LocalKafka(data_dir)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield Secured(local, started.stdout + started.stderr, registry)
    finally:
        local.down()


def env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kafka_up_secure_runs_no_plaintext_listener_and_keeps_its_secrets_private(
    broker: Secured,
) -> None:
    local, output = broker.local, broker.output
    files = local.secure_files
    properties = (local.data_dir / "server.properties").read_text()
    listeners = next(line for line in properties.splitlines() if line.startswith("listeners="))
    assert "SASL_SSL://127.0.0.1:" in listeners and "SSL://127.0.0.1:" in listeners
    assert "PLAINTEXT" not in listeners
    assert "listener.security.protocol.map=SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:SSL" in properties
    assert (
        "StandardAuthorizer" in properties and "allow.everyone.if.no.acl.found=false" in properties
    )
    # One principal per registered source, the admin and the reconciler; where their client
    # settings are is printed, never a password.
    for name in ["admin", "reconciler", *SOURCES]:
        assert str(files.env_file(name)) in output
        assert str(files.env_file(name, mtls=True)) in output
        password = files.password_file(name).read_text()
        assert password not in output
        assert password not in files.env_file(name).read_text()
        for private in (files.password_file(name), files.cert_files(name)[1]):
            assert _mode(private) == 0o600
    for directory in (local.data_dir, files.tls, files.clients):
        assert _mode(directory) == 0o700
    assert _mode(files.keystore) == 0o600 and _mode(files.tls / "ca.key") == 0o600
    status = subprocess.run(
        [sys.executable, "-m", "portal_sync", "kafka", "status", "--data-dir", str(local.data_dir)],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "300"},
    )
    assert status.returncode == 0
    assert str(files.env_file("reconciler")) in status.stdout + status.stderr


def test_pipeline_runs_with_a_source_the_reconciler_and_the_admin(
    broker: Secured, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    source = broker.settings(SOURCE, store)
    reconciler = broker.settings("reconciler", store)
    operator = broker.settings("admin", store)
    events = [e for e in citizen_events(keys=15, versions=2) if e["source"] == SOURCE]

    published = cli(source, "publish", str(write_jsonl(tmp_path / "e.jsonl", events)))
    assert published.returncode == 0, published.stderr
    # A message the worker must refuse, written by the source: it ends in the dead letters.
    publisher = Publisher(source.connection(), source.topics(), client_id="secure-test")
    publisher.send(source.topics().change_topic("citizen"), b"citizen:001090000001", b"{no json")
    assert publisher.flush() == 1
    publisher.close()

    worker = cli(reconciler, "worker", "--until-caught-up")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert exported(reconciler) == expected_export(events, Authority())

    with RangeReader(operator.connection()) as reader:
        ranges = reader.resolve(Selection([operator.topics().dead_letters]))
        letters = [m for batch in reader.read(ranges) for m in batch]
    ours = [read_headers(m.headers)["ps.reason.code"] for m in letters if m.value == b"{no json"]
    assert ours == ["invalid_json"]
    listed = cli(operator, "dlq", "list", COLUMNS="300")
    assert listed.returncode == 0, listed.stderr
    assert "invalid_json" in listed.stdout
    lag = cli(operator, "lag", "--topic", ".*citizen", COLUMNS="300")
    assert lag.returncode == 0, lag.stderr
    assert f"{PREFIX}.changes.citizen" in lag.stdout


@pytest.mark.parametrize("sees_the_topic", [False, True])
def test_a_deployment_files_kafka_table_connects_a_producer_as_its_source(
    broker: Secured, tmp_path: Path, sees_the_topic: bool
) -> None:
    """`produce` with the source's credentials in the deployment file's [kafka] table and no
    PORTAL_SYNC_KAFKA_* in the environment; a rejected row stays out of the dead letters
    (a source may not write them) and in the file's rejection report. Also where the
    cluster lets the source see the dead-letter topic (DESCRIBE) and refuses only the
    write: the letter is kept on disk all the same, and the file done."""
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )

    operator = broker.settings("admin")
    dead_letters = operator.topics().dead_letters
    describe = ACL(
        "User:province-79", "*", ACLOperation.DESCRIBE, ACLPermissionType.ALLOW,
        ResourcePattern(ResourceType.TOPIC, dead_letters, ACLResourcePatternType.LITERAL),
    )  # fmt: skip
    if sees_the_topic:
        with admin.cluster(operator.connection()) as cluster:
            assert not cluster.admin.create_acls([describe])["failed"]
    entry = "hcm-exports-describe" if sees_the_topic else "hcm-exports"
    try:
        _produce_and_import(broker, tmp_path, entry)
    finally:
        if sees_the_topic:
            pattern = ResourcePatternFilter(
                ResourceType.TOPIC, dead_letters, ACLResourcePatternType.LITERAL
            )
            found = ACLFilter(
                "User:province-79", "*", ACLOperation.DESCRIBE, ACLPermissionType.ALLOW, pattern
            )
            with admin.cluster(operator.connection()) as cluster:
                cluster.admin.delete_acls([found])


def _produce_and_import(broker: Secured, tmp_path: Path, entry: str) -> None:
    files = broker.local.secure_files
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.csv").write_text(
        "pid,name,at\n079090000101,Nguyễn Văn An,2025-08-01T08:00:00+07:00\n,Lê Văn Cường,x\n"
        "079090000102,Trần Thị Bình,2025-08-01T08:00:01+07:00\n"
    )
    (inbox / "b.csv").write_text(  # read after a.csv's checkpoint: after the refusal
        "pid,name,at\n079090000103,Lê Văn Cường,2025-08-01T08:00:02+07:00\n"
    )
    os.utime(inbox / "a.csv", (time.time() - 60,) * 2)
    os.utime(inbox / "b.csv", (time.time() - 30,) * 2)
    config = tmp_path / "sources.toml"
    config.write_text(
        f"""
[producer]
state_dir = "state"
metrics_port = 0

[kafka]
bootstrap = "{broker.local.bootstrap()}"
topic_prefix = "{PREFIX}"
security_protocol = "SASL_SSL"
sasl_username = "province-79"
sasl_password_file = "{files.password_file("province-79")}"
ssl_cafile = "{files.ca_file}"

[[sources]]
id = "{entry}"
source = "province-79"
adapter = "filedrop"

[sources.connection]
directory = "inbox"
settle_seconds = 0

[sources.mapping]
entity = "citizen"
key_field = "pid"
occurred_at_field = "at"
fields = {{ full_name = "name" }}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_KAFKA_")}
    produced = subprocess.run(
        [sys.executable, "-m", "portal_sync", "produce", "--config", str(config), "--once"],
        env=env | {"COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert produced.returncode == 0, produced.stdout + produced.stderr
    assert "kept out of the dead letters" in produced.stderr
    assert (inbox / "done" / "a.csv.rejected.jsonl").exists()
    reconciler = broker.settings("reconciler")
    with RangeReader(reconciler.connection()) as reader:
        ranges = reader.resolve(Selection([reconciler.topics().change_topic("citizen")]))
        keys = [m.key for batch in reader.read(ranges) for m in batch]
    assert message_key("citizen", "079090000101", "province-79") in keys
    assert message_key("citizen", "079090000102", "province-79") in keys
    assert message_key("citizen", "079090000103", "province-79") in keys

    # The letter the cluster refused is on disk, owner-only, until an operator imports it.
    kept = tmp_path / "state" / f"{entry}.dead-letters.jsonl"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert len(kept.read_text().splitlines()) == 1
    operator = broker.settings("admin")
    refused = cli(broker.settings("province-79"), "dlq", "import", str(kept))
    assert refused.returncode != 0  # a source may not read (nor write) the dead letters
    said = " ".join((refused.stdout + refused.stderr).split())
    assert "User:province-79" in said and operator.topics().dead_letters in said, said
    imported = cli(operator, "dlq", "import", str(kept), COLUMNS="300")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported 1 dead letters" in imported.stdout
    again = cli(operator, "dlq", "import", str(kept), COLUMNS="300")  # run twice: added once
    assert again.returncode == 0, again.stdout + again.stderr
    assert "imported 0 dead letters" in again.stdout and "1 already there" in again.stdout
    with RangeReader(operator.connection()) as reader:
        ranges = reader.resolve(Selection([operator.topics().dead_letters]))
        letters = [m for batch in reader.read(ranges) for m in batch]
    origins = [read_headers(m.headers) for m in letters]
    ours = [h for h in origins if h.get("ps.origin.partition") == entry]
    assert len(ours) == 1 and ours[0]["ps.origin.topic"] == "source:province-79"
    assert ours[0]["ps.reason.code"] in DEAD_LETTER_REASONS


def test_a_source_can_neither_read_the_change_topics_nor_write_the_dead_letters(
    broker: Secured,
) -> None:
    source = broker.settings(SOURCE)
    citizen = source.topics().change_topic("citizen")

    publisher = Publisher(source.connection(), source.topics(), client_id="secure-test")
    try:
        publisher.send(citizen, message_key("citizen", "001090000002", SOURCE), b"{}")
        assert publisher.flush() == 1  # it may write the change topics
        with pytest.raises(Refused) as write:
            publisher.send_dead_letter(message_key("citizen", "001090000001", SOURCE), b"{}", [])
            publisher.flush()
    finally:
        publisher.close()
    assert f"User:{SOURCE}" in str(write.value)
    assert source.topics().dead_letters in str(write.value)

    with pytest.raises(Refused) as read, RangeReader(source.connection()) as reader:
        ranges = reader.resolve(Selection([citizen]))  # describing the topic is allowed
        assert ranges
        list(reader.read(ranges))
    assert f"User:{SOURCE}" in str(read.value)
    assert citizen in str(read.value) and "ACLs" in str(read.value)

    async def join() -> None:
        async def assigned(_: Any) -> dict[Any, int]:
            return {}

        async def revoked(_: Any) -> None:
            return None

        member = GroupMember(
            source.connection(), source.topics().change_topics(), GROUP, assigned, revoked
        )
        await member.start()
        try:
            await member.batch(10, 2.0)
        finally:
            await member.stop()

    with pytest.raises(Refused) as group:
        asyncio.run(join())
    assert f"User:{SOURCE}" in str(group.value)


def test_a_wrong_password_is_refused_naming_the_principal_never_the_password(
    broker: Secured, tmp_path: Path
) -> None:
    settings = broker.settings(SOURCE)
    wrong = "not-the-password-0123456789"
    security = settings.kafka_security | {"sasl_password": wrong}
    del security["sasl_password_file"]
    settings = settings.model_copy(update={"kafka_security": security})
    events = [e for e in citizen_events(keys=2, versions=1) if e["source"] == SOURCE][:1]

    result = cli(settings, "publish", str(write_jsonl(tmp_path / "e.jsonl", events)), timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "SASL SCRAM-SHA-512 authentication failed" in message
    assert f"'{SOURCE}'" in message
    assert wrong not in result.stdout + result.stderr
    with pytest.raises(ConfigurationError) as refused:
        admin.ensure_topics(settings.connection(), settings.topics())
    assert SOURCE in str(refused.value) and wrong not in str(refused.value)


def test_a_client_certificate_of_another_ca_is_refused(broker: Secured, tmp_path: Path) -> None:
    local = broker.local
    good = local.mtls_connection("reconciler")
    ca, ca_key = new_ca("somebody else's CA")
    cert, key = issue(ca, ca_key, "reconciler")  # the right name, the wrong issuer
    from cryptography.hazmat.primitives import serialization

    write_private(tmp_path / "c.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        tmp_path / "c.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    untrusted = good.model_copy(
        update={"ssl_certfile": tmp_path / "c.pem", "ssl_keyfile": tmp_path / "c.key"}
    )
    with pytest.raises(ConfigurationError) as refused:
        admin.ensure_topics(untrusted, broker.settings("admin").topics())
    assert "does not trust the client certificate" in str(refused.value)
    assert str(tmp_path / "c.pem") in str(refused.value)

    anonymous = good.model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(ConfigurationError) as missing:
        Publisher(anonymous, broker.settings("admin").topics())
    assert "requires a client certificate" in str(missing.value)

    # Nor does a client trust a broker whose CA it was not given.
    with pytest.raises(ConfigurationError) as untrusting:
        RangeReader(good.model_copy(update={"ssl_cafile": tmp_path / "c.pem"}))
    assert "broker's certificate is not trusted" in str(untrusting.value)


def test_mutual_tls_with_a_good_certificate_has_the_principals_rights(
    broker: Secured, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    source = broker.settings("province-79", store, mtls=True)
    reconciler = broker.settings("reconciler", store, mtls=True)
    events = [
        e for e in citizen_events(keys=15, versions=1, seed=9) if e["source"] == "province-79"
    ]
    published = cli(source, "publish", str(write_jsonl(tmp_path / "e.jsonl", events)))
    assert published.returncode == 0, published.stderr

    with RangeReader(reconciler.connection()) as reader:
        ranges = reader.resolve(Selection(reconciler.topics().change_topics()))
        values = [m.value or b"" for batch in reader.read(ranges) for m in batch]
    ids = {json.loads(v).get("event_id") for v in values if v.startswith(b'{"')}
    assert {e["event_id"] for e in events} <= ids
    # The certificate's subject is the principal: the same ACLs as over SCRAM.
    with pytest.raises(Refused) as refused, RangeReader(source.connection()) as reader:
        list(reader.read(reader.resolve(Selection(source.topics().change_topics()))))
    assert "province-79.pem" in str(refused.value)


def test_a_secured_data_dir_is_not_started_plain(broker: Secured) -> None:
    local = broker.local
    with pytest.raises(KafkaSetupError, match="secured broker"):
        LocalKafka(local.data_dir).up()
