"""What the local broker needs to run secured (`portal-sync kafka up --secure`).

A CA and a broker certificate (SAN localhost, 127.0.0.1), one client certificate and one
SCRAM-SHA-512 password per principal, a client configuration per principal, and the ACLs
that StandardAuthorizer enforces. Everything lives in the broker's data dir:

    tls/ca.pem                 the CA's certificate: the truststore of broker and clients
    tls/ca.key                 the CA's private key (0600; issues client certificates)
    tls/broker.pem             the broker's PEM keystore: private key and chain (0600)
    clients/<name>.password    the principal's SCRAM password (0600, never printed)
    clients/<name>.key, .pem   its client certificate for mutual TLS (key 0600)
    clients/<name>.env         PORTAL_SYNC_KAFKA_* over SASL_SSL (no secret: a file path)
    clients/<name>.mtls.env    PORTAL_SYNC_KAFKA_* over SSL with the client certificate

Principals: `admin` (a super user), `reconciler`, and one per registered source, named by
the source id. A certificate's subject is `CN=<name>`; the broker maps it to the principal
`User:<name>`, so a principal has the same ACLs over SCRAM and over mutual TLS. The broker
itself is `User:broker` (a super user: its inter-broker and controller traffic is mutual
TLS with its own certificate).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.errors import ConfigurationError
from schemas.identifiers import SOURCE_ID
from transport.config import KafkaConnection
from transport.topics import Topics

ADMIN = "admin"
RECONCILER = "reconciler"
BROKER = "broker"
RESERVED = {ADMIN, RECONCILER, BROKER}
CERT_DAYS = 825
# A certificate subject `CN=<name>[,...]` is the principal `User:<name>`.
PRINCIPAL_MAPPING = "RULE:^CN=([^,]+)(,.*)?$/$1/,DEFAULT"


@dataclass(frozen=True)
class SecureSetup:
    """Who may connect to a secured local broker, and on which topics and group."""

    sources: tuple[str, ...]
    topics: Topics = field(default_factory=Topics)
    group_id: str = "portal-sync-reconciler"

    def principals(self) -> list[str]:
        for source in self.sources:
            if source in RESERVED or not SOURCE_ID.fullmatch(source):
                raise ConfigurationError(
                    f"source id {source!r} cannot be a Kafka principal "
                    f"(reserved: {', '.join(sorted(RESERVED))})"
                )
        return [ADMIN, RECONCILER, *sorted(set(self.sources))]


@dataclass(frozen=True)
class Grant:
    """One ACL: allow `principal` the `operation` on a resource (PREFIXED or LITERAL)."""

    principal: str
    operation: str  # READ, WRITE, DESCRIBE, IDEMPOTENT_WRITE
    resource: str  # TOPIC, GROUP, CLUSTER
    name: str
    prefixed: bool = False


def grants(setup: SecureSetup) -> list[Grant]:
    """The ACLs of the pipeline (docs/operations.md, "Secured Kafka"): a source may only
    write the change topics; the reconciler reads them with its group and writes the dead
    letters. Topics are created by the admin (a super user), no one else."""
    changes = f"{setup.topics.prefix}.changes."
    dead_letters = setup.topics.dead_letters
    result: list[Grant] = []
    for source in sorted(set(setup.sources)):
        result += [
            Grant(source, "WRITE", "TOPIC", changes, prefixed=True),
            Grant(source, "DESCRIBE", "TOPIC", changes, prefixed=True),
            Grant(source, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster"),
        ]
    result += [
        Grant(RECONCILER, "READ", "TOPIC", changes, prefixed=True),
        Grant(RECONCILER, "DESCRIBE", "TOPIC", changes, prefixed=True),
        Grant(RECONCILER, "READ", "GROUP", setup.group_id),
        Grant(RECONCILER, "DESCRIBE", "GROUP", setup.group_id),
        Grant(RECONCILER, "WRITE", "TOPIC", dead_letters),
        Grant(RECONCILER, "DESCRIBE", "TOPIC", dead_letters),
        Grant(RECONCILER, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster"),
    ]
    return result


# -- files ---------------------------------------------------------------------------------
def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: what Kafka's PEM keystore reads without a key password.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier] | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def new_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return _certificate(common_name, key, None, key), key


def issue(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by the CA: for a client (mutual TLS), or for the broker (server
    and client: its own inter-broker and controller connections), valid for localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = None
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        san = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    return _certificate(common_name, key, ca, ca_key, usages, san), key


class SecureFiles:
    """The secured broker's CA, certificates, passwords and client configurations."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.tls = data_dir / "tls"
        self.clients = data_dir / "clients"

    @property
    def ca_file(self) -> Path:
        return self.tls / "ca.pem"

    @property
    def keystore(self) -> Path:
        return self.tls / "broker.pem"

    def password_file(self, name: str) -> Path:
        return self.clients / f"{name}.password"

    def env_file(self, name: str, mtls: bool = False) -> Path:
        return self.clients / f"{name}{'.mtls' if mtls else ''}.env"

    def cert_files(self, name: str) -> tuple[Path, Path]:
        return self.clients / f"{name}.pem", self.clients / f"{name}.key"

    def ensure_tls(self) -> None:
        """A CA and the broker's keystore, once; later starts reuse them."""
        private_dir(self.data_dir)
        private_dir(self.tls)
        if self.ca_file.exists() and self.keystore.exists():
            return
        ca, ca_key = new_ca("portal-sync local Kafka CA")
        cert, key = issue(ca, ca_key, BROKER, server=True)
        write_private(self.tls / "ca.key", _pem_key(ca_key))
        write_private(self.keystore, _pem_key(key) + _pem_cert(cert) + _pem_cert(ca))
        self.ca_file.write_bytes(_pem_cert(ca))

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key((self.tls / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return ca, key

    def new_principals(self, names: list[str]) -> dict[str, str]:
        """Passwords and client certificates of principals that have none yet; returns the
        new passwords (by name) for the broker's SCRAM users."""
        private_dir(self.clients)
        ca, ca_key = self._ca()
        created: dict[str, str] = {}
        for name in names:
            if self.password_file(name).exists():
                continue
            cert, key = issue(ca, ca_key, name)
            cert_file, key_file = self.cert_files(name)
            write_private(key_file, _pem_key(key))
            write_private(cert_file, _pem_cert(cert))
            password = secrets.token_urlsafe(24)
            write_private(self.password_file(name), password.encode())
            created[name] = password
        return created

    def write_env_files(self, names: list[str], sasl_port: int, ssl_port: int) -> None:
        """One client configuration per principal and protocol: environment lines that
        point at files, never a secret."""
        for name in names:
            cert_file, key_file = self.cert_files(name)
            sasl = {
                "BOOTSTRAP": f"127.0.0.1:{sasl_port}",
                "SECURITY_PROTOCOL": "SASL_SSL",
                "SASL_MECHANISM": "SCRAM-SHA-512",
                "SASL_USERNAME": name,
                "SASL_PASSWORD_FILE": str(self.password_file(name)),
                "SSL_CAFILE": str(self.ca_file),
            }
            mtls = {
                "BOOTSTRAP": f"127.0.0.1:{ssl_port}",
                "SECURITY_PROTOCOL": "SSL",
                "SSL_CAFILE": str(self.ca_file),
                "SSL_CERTFILE": str(cert_file),
                "SSL_KEYFILE": str(key_file),
            }
            for values, mtls_file in ((sasl, False), (mtls, True)):
                lines = "".join(f"PORTAL_SYNC_KAFKA_{k}={v}\n" for k, v in values.items())
                write_private(self.env_file(name, mtls_file), lines.encode())

    def connection(self, name: str, sasl_port: int) -> KafkaConnection:
        """A principal's SASL_SSL connection (its password read from its file)."""
        return KafkaConnection(
            bootstrap=f"127.0.0.1:{sasl_port}",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username=name,
            sasl_password_file=self.password_file(name),
            ssl_cafile=self.ca_file,
        )

    def mtls_connection(self, name: str, ssl_port: int) -> KafkaConnection:
        """A principal's mutual-TLS connection (its client certificate)."""
        cert_file, key_file = self.cert_files(name)
        return KafkaConnection(
            bootstrap=f"127.0.0.1:{ssl_port}",
            security_protocol="SSL",
            ssl_cafile=self.ca_file,
            ssl_certfile=cert_file,
            ssl_keyfile=key_file,
        )


def broker_properties(files: SecureFiles, sasl_port: int, ssl_port: int, cport: int) -> list[str]:
    """server.properties lines of the secured listeners and the authorizer.

    SASL_SSL (SCRAM-SHA-512) and SSL (client certificate required) for clients; the
    inter-broker and controller traffic is SSL with client certificates too (the broker's
    own certificate, principal User:broker), so no listener is PLAINTEXT."""
    return [
        f"listeners=SASL_SSL://127.0.0.1:{sasl_port},SSL://127.0.0.1:{ssl_port},"
        f"CONTROLLER://127.0.0.1:{cport}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{sasl_port},SSL://127.0.0.1:{ssl_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=SSL",
        "listener.security.protocol.map=SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:SSL",
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.ssl.ssl.client.auth=required",
        "listener.name.controller.ssl.client.auth=required",
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={files.keystore}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={files.ca_file}",
        "ssl.endpoint.identification.algorithm=https",
        f"ssl.principal.mapping.rules={PRINCIPAL_MAPPING}",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users=User:{ADMIN};User:{BROKER}",
        "allow.everyone.if.no.acl.found=false",
    ]
