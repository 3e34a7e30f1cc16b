"""Weak Ed25519 public keys: the registry refuses non-canonical encodings and the points of
small order (libsodium's blocklist), under which signatures can be forged without any
private key. The list is checked here against RFC 8032's point arithmetic, written out in
pure Python (test only: the project itself only compares bytes)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from consumers.config import RulesError, load_rules
from consumers.registry import Registry
from schemas.errors import ConfigurationError
from schemas.signing import KEY_PREFIX, KeyFormatError, parse_public_key

# -- RFC 8032, section 5.1 (edwards25519), extended coordinates (X, Y, Z, T) -------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int, int, int]
IDENTITY: Point = (0, 1, 1, 0)


def add(a: Point, b: Point) -> Point:
    pa, pb = (a[1] - a[0]) * (b[1] - b[0]) % P, (a[1] + a[0]) * (b[1] + b[0]) % P
    c, d = 2 * a[3] * b[3] * D % P, 2 * a[2] * b[2] % P
    e, f, g, h = pb - pa, d - c, d + c, pb + pa
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def mul(scalar: int, point: Point) -> Point:
    result = IDENTITY
    while scalar > 0:
        if scalar & 1:
            result = add(result, point)
        point, scalar = add(point, point), scalar >> 1
    return result


def equal(a: Point, b: Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


def decode(encoding: bytes) -> Point | None:
    """The point of a 32-byte encoding, None where RFC 8032 says decoding fails."""
    number = int.from_bytes(encoding, "little")
    y, sign = number & ((1 << 255) - 1), number >> 255
    if y >= P:
        return None  # non-canonical
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None  # not on the curve
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


def encode(point: Point) -> bytes:
    z_inv = pow(point[2], -1, P)
    x, y = point[0] * z_inv % P, point[1] * z_inv % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def small_order(point: Point) -> bool:
    return equal(mul(8, point), IDENTITY)


# -- the blocklist -----------------------------------------------------------------------

BLOCKLIST = [
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0100000000000000000000000000000000000000000000000000000000000000",  # identity
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p-1, order 2
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p: 0
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p+1: 1
    )
]
IDENTITY_KEY = BLOCKLIST[1]
FORGED_SIGNATURE = IDENTITY_KEY + bytes(32)  # R = the identity, S = 0


def with_sign_bit(encoding: bytes) -> bytes:
    return encoding[:31] + bytes([encoding[31] | 0x80])


def key_text(raw: bytes) -> str:
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def test_every_blocklisted_encoding_is_of_small_order_or_not_canonical() -> None:
    for encoding in BLOCKLIST:
        y = int.from_bytes(encoding, "little")
        point = decode(encoding)
        if y >= P:  # p and p+1: y = 0 and y = 1 written a second way
            assert point is None and y - P in (0, 1)
            assert (y - P).to_bytes(32, "little") in BLOCKLIST
            continue
        assert point is not None and encode(point) == encoding
        assert small_order(point), encoding.hex()
        signed = decode(with_sign_bit(encoding))  # None where x = 0 (identity, order 2)
        assert signed is None or small_order(signed)


def test_the_blocklist_holds_every_point_of_small_order() -> None:
    """[L]Q, for points Q of the whole curve, runs through the 8 points of small order
    (the curve's group is cyclic of order 8L): all of them are on the list."""
    torsion: set[bytes] = set()
    for y in range(2, 400):
        point = decode(y.to_bytes(32, "little"))
        if point is not None:
            torsion.add(encode(mul(L, point)))
        if len(torsion) == 8:
            break
    assert len(torsion) == 8
    assert all(small_order(p) for p in map(decode, torsion) if p is not None)
    assert {t[:31] + bytes([t[31] & 0x7F]) for t in torsion} == {
        e for e in BLOCKLIST if int.from_bytes(e, "little") < P
    }


@pytest.mark.parametrize(
    "raw",
    BLOCKLIST + [with_sign_bit(e) for e in BLOCKLIST],
    ids=lambda raw: raw.hex()[:4] + raw.hex()[-2:],
)
def test_a_small_order_or_non_canonical_public_key_is_refused(raw: bytes) -> None:
    with pytest.raises(KeyFormatError) as caught:
        parse_public_key(key_text(raw))
    assert key_text(raw)[len(KEY_PREFIX) :] not in str(caught.value)


def test_every_non_canonical_encoding_is_refused() -> None:
    for y in range(P, 2**255):  # 19 of them
        for raw in (y.to_bytes(32, "little"), with_sign_bit(y.to_bytes(32, "little"))):
            with pytest.raises(KeyFormatError):
                parse_public_key(key_text(raw))


def test_generated_keys_are_accepted_and_of_prime_order() -> None:
    for _ in range(8):
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes_raw()
        assert parse_public_key(key_text(raw)).public_bytes_raw() == raw
        point = decode(raw)
        assert point is not None and not small_order(point)
        assert equal(mul(L, point), IDENTITY)


def test_why_the_identity_key_forges_every_signature() -> None:
    """Under the identity A, [S]B = R + [k]A is R = [0]B for every message: the 64 bytes
    (identity, 0) verify for all of them. Under the all-zero key (order 4), whenever
    k = H(R, A, M) is a multiple of 4: a message in four."""
    identity = Ed25519PublicKey.from_public_bytes(IDENTITY_KEY)
    for message in (b"", b"any event", b'{"source": "province-01"}' * 10):
        identity.verify(FORGED_SIGNATURE, message)  # no InvalidSignature
    zero_key = BLOCKLIST[0]
    zero = Ed25519PublicKey.from_public_bytes(zero_key)
    outcomes = []
    for n in range(32):
        message = f"event {n}".encode()
        digest = hashlib.sha512(IDENTITY_KEY + zero_key + message).digest()
        k = int.from_bytes(digest, "little") % L
        try:
            zero.verify(FORGED_SIGNATURE, message)
            verified = True
        except InvalidSignature:
            verified = False
        assert verified == (k % 4 == 0)
        outcomes.append(verified)
    assert any(outcomes) and not all(outcomes)


@pytest.mark.parametrize("raw", [BLOCKLIST[0], IDENTITY_KEY, BLOCKLIST[5]], ids=["zero", "id", "p"])
def test_a_registry_naming_a_weak_key_refuses_to_load(tmp_path: Path, raw: bytes) -> None:
    good = key_text(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    path = tmp_path / "registry.toml"
    path.write_text(
        "require_signatures = true\n"
        '[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n'
        f'public_keys = [{{ id = "province-01-20250801-aaaaaa", key = "{good}" }}, '
        f'{{ id = "province-01-20260801-bbbbbb", key = "{key_text(raw)}" }}]\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError):
        Registry.load(path)
    with pytest.raises(RulesError) as caught:
        load_rules(path, None)
    assert isinstance(caught.value, ConfigurationError)
    message = str(caught.value)
    assert "province-01" in message and "province-01-20260801-bbbbbb" in message
    assert "small order" in message or "not canonical" in message
    for text in (key_text(raw)[len(KEY_PREFIX) :], good[len(KEY_PREFIX) :]):
        assert text not in message
