"""Signed events: Ed25519 over the exact message value bytes (pure: no I/O).

A producer signs the bytes it sends as the Kafka message value and adds two headers:

| header   | value                                        |
|----------|----------------------------------------------|
| `ps.sig` | base64 (standard alphabet, padded) of the 64-byte Ed25519 signature |
| `ps.kid` | the id of the key, as listed in the source registry's `public_keys` |

Key texts: a public key is `ed25519:<base64 of its 32 raw bytes>` (the registry's form); a
signing key file (written by `portal-sync keys new`) is TOML:

    source = "province-01"
    key_id = "province-01-20250801-3fa9c2"
    private_key = "ed25519:<base64 of the 32-byte private key>"

Verification is the worker's (`consumers.signatures`); producers only sign.
"""

from __future__ import annotations

import base64
import binascii
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from schemas.identifiers import SOURCE_ID, SOURCE_ID_RULE

SIGNATURE_HEADER = "ps.sig"
KEY_ID_HEADER = "ps.kid"
SIGNATURE_HEADERS = (SIGNATURE_HEADER, KEY_ID_HEADER)
KEY_PREFIX = "ed25519:"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,127}$")


class KeyFormatError(ValueError):
    """A key text that is not `ed25519:<base64 of 32 bytes>` (never quotes the text)."""


def _raw_key(text: str, what: str) -> bytes:
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise KeyFormatError(f"{what} must be written {KEY_PREFIX}<base64 of {KEY_BYTES} bytes>")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what}: not base64") from None
    if len(raw) != KEY_BYTES:
        raise KeyFormatError(f"{what}: {len(raw)} bytes, an Ed25519 key has {KEY_BYTES}")
    return raw


# Encodings (sign bit, bit 255, cleared) of the points of small order and of their
# non-canonical aliases (y = p, p + 1 for 0, 1): libsodium's blocklist. Under such a key
# a signature can be made without any private key (the identity: R = identity, S = 0
# verifies for every message), so no registry may list one.
_FIELD_PRIME = 2**255 - 19
_SMALL_ORDER = frozenset(
    bytes.fromhex(encoding)
    for encoding in (
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0100000000000000000000000000000000000000000000000000000000000000",  # order 1
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1
    )
)


def parse_public_key(text: str, what: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from its registry text `ed25519:<base64>`. Refused
    (`KeyFormatError`): a non-canonical encoding (y >= p) and a point of small order."""
    raw = _raw_key(text, what)
    y = raw[:31] + bytes([raw[31] & 0x7F])
    if y in _SMALL_ORDER:
        raise KeyFormatError(f"{what}: a point of small order, which forges signatures")
    if int.from_bytes(y, "little") >= _FIELD_PRIME:
        raise KeyFormatError(f"{what}: not canonical (y is not below 2**255 - 19)")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def new_key_id(source: str, today: date, suffix: str) -> str:
    """A key id unique per key: the source, the day it was made and a random suffix."""
    key_id = f"{source}-{today:%Y%m%d}-{suffix}"
    if not KEY_ID.fullmatch(key_id):
        raise KeyFormatError("a key id is [a-z0-9][a-z0-9._-]{1,127}")
    return key_id


def registry_entry(key_id: str, key: Ed25519PublicKey) -> str:
    """The TOML inline table of one key in a source's `public_keys`."""
    return f'{{ id = "{key_id}", key = "{public_key_text(key)}" }}'


@dataclass(frozen=True)
class Signer:
    """One source's signing key. Signs message values; its repr shows no key material."""

    source: str
    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def signature(self, value: bytes) -> bytes:
        return self.private_key.sign(value)

    def headers(self, value: bytes | None) -> list[tuple[str, bytes]]:
        """`ps.sig` and `ps.kid` for a message value (no value: the empty bytes)."""
        signature = base64.b64encode(self.signature(value or b""))
        return [(SIGNATURE_HEADER, signature), (KEY_ID_HEADER, self.key_id.encode("ascii"))]

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def registry_entry(self) -> str:
        return registry_entry(self.key_id, self.public_key())

    def key_file_text(self) -> str:
        """The signing key file (secret: write it 0600)."""
        raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        private = KEY_PREFIX + base64.b64encode(raw).decode("ascii")
        return (
            "# portal-sync signing key (Ed25519). SECRET: readable by its producer only.\n"
            "# The source registry lists its public key under the same key_id.\n"
            f'source = "{self.source}"\n'
            f'key_id = "{self.key_id}"\n'
            f'private_key = "{private}"\n'
        )

    @classmethod
    def generate(cls, source: str, key_id: str) -> Signer:
        if not SOURCE_ID.fullmatch(source):
            raise KeyFormatError(f"a source id is {SOURCE_ID_RULE}")
        if not KEY_ID.fullmatch(key_id):
            raise KeyFormatError("a key id is [a-z0-9][a-z0-9._-]{1,127}")
        return cls(source, key_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_key_file_text(cls, text: str) -> Signer:
        """Parse a signing key file; errors name the field, never its content."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            raise KeyFormatError("not a signing key file (TOML)") from None
        unknown = set(raw) - {"source", "key_id", "private_key"}
        if unknown:
            raise KeyFormatError("unknown fields; expected source, key_id, private_key")
        source, key_id = raw.get("source"), raw.get("key_id")
        if not isinstance(source, str) or not SOURCE_ID.fullmatch(source):
            raise KeyFormatError("source: missing or not a source id")
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise KeyFormatError("key_id: missing or not a key id")
        seed = _raw_key(raw.get("private_key"), "private_key")  # type: ignore[arg-type]
        return cls(source, key_id, Ed25519PrivateKey.from_private_bytes(seed))
