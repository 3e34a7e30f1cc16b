"""Vietnamese identifiers: hard format rules (reject) and soft structure checks (warn only).

Soft checks encode rules that circulate but are not verified against current law
(see docs/contract.md). They must never reject an event: a wrong rule would drop a
real person's record. They return warning codes that are counted and logged without values.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import re
from datetime import date
from functools import cache

# ASCII digits only (`\d` would take fullwidth, Arabic-Indic or Bengali look-alikes). The
# patterns are also the contract's (pydantic, Rust regex: `$` is the very end); in Python,
# check them with `fullmatch`, since `re`'s `$` also matches before a trailing newline.
PERSONAL_ID = re.compile(r"^[0-9]{12}$")
TAX_CODE = re.compile(r"^[0-9]{10}(-[0-9]{3})?$")
OWNER_ID = re.compile(r"^([0-9]{12}|[0-9]{10}(-[0-9]{3})?)$")  # a personal id or a tax code
# A Vietnamese number (`+84` or `0`, then 9 or 10 digits), or an international one in E.164
# (`+`, a country code other than 84, at most 15 digits): a citizen living abroad.
PHONE = re.compile(r"^((\+84|0)[0-9]{9,10}|\+([1-79][0-9]{7,14}|8[0-35-9][0-9]{6,13}))$")
# A legal representative: a personal id, or a foreign representative's passport number:
# one or two letters, 6 to 9 digits, perhaps a letter (Vietnam's C1234567, China's
# E12345678 and EA1234567, Japan's TK1234567, Korea's M12345678, Singapore's K1234567A).
# Never a word: a name in capitals (NGUYENVANAN) or a placeholder (UNKNOWN) is refused.
REPRESENTATIVE_ID = re.compile(r"^([0-9]{12}|[A-Z]{1,2}[0-9]{6,9}[A-Z]?)$")
UNIT_CODE = r"[0-9A-Z]{3}\.[0-9A-Z]{2}\.[0-9A-Z]{2}\.[A-Z][0-9]{2}"
DOSSIER_CODE = re.compile(rf"^(?P<unit>{UNIT_CODE})-(?P<day>[0-9]{{6}})-(?P<seq>[0-9]{{4}})$")
AGENCY_CODE = re.compile(rf"^{UNIT_CODE}$")
# A document id that names its issuer: `000.00.01.H26:GKS-000123` (the agency, a colon).
ISSUER_KEY = re.compile(rf"^(?P<unit>{UNIT_CODE}):.+$")
PROCEDURE_CODE = re.compile(r"^[0-9]\.[0-9]{6}$")
# A source's id (the contract's `source`): also the owner of its signing keys, its Kafka
# principal and the name of its state files. `SOURCE_ID_RULE` is the pattern as messages
# quote it.
SOURCE_ID_RULE = "[a-z0-9][a-z0-9._-]{1,63}"
SOURCE_ID = re.compile(rf"^{SOURCE_ID_RULE}$")
# Nine digits in a row: a personal id (12), a tax code (10 or 13), a phone number (10). A
# source id never has one: no registry lists such an id, development mode accepts no event
# from one, and a refused event's `source` that has one is never shown. The contract's
# pattern alone would let them into metric labels.
LONG_NUMBER = re.compile(r"[0-9]{9}")

# Province codes of birth registration used in personal ids before the 2025 merger:
# the 63 provinces of Decree 137/2015 and Circular 07/2016/TT-BCA.
OLD_PROVINCE_ID_CODES = frozenset(
    f"{n:03d}"
    for n in (
        1,
        2,
        4,
        6,
        8,
        10,
        11,
        12,
        14,
        15,
        17,
        19,
        20,
        22,
        24,
        25,
        26,
        27,
        30,
        31,
        33,
        34,
        35,
        36,
        37,
        38,
        40,
        42,
        44,
        45,
        46,
        48,
        49,
        51,
        52,
        54,
        56,
        58,
        60,
        62,
        64,
        66,
        67,
        68,
        70,
        72,
        74,
        75,
        77,
        79,
        80,
        82,
        83,
        84,
        86,
        87,
        89,
        91,
        92,
        93,
        94,
        95,
        96,
    )
)

TAX_CODE_WEIGHTS = (31, 29, 23, 19, 17, 13, 7, 5, 3)
_ASCII_ZERO_WEIGHT = ord("0") * sum(TAX_CODE_WEIGHTS)


def dossier_code_date(code: str) -> date | None:
    """The receiving date encoded in a dossier code, or None when the code is malformed."""
    match = DOSSIER_CODE.fullmatch(code)
    if not match:
        return None
    day = match["day"]
    try:
        return date(2000 + int(day[:2]), int(day[2:4]), int(day[4:6]))
    except ValueError:
        return None


def tax_code_check_digit(code: str) -> int | None:
    """The mod-11 check digit of a 10-digit tax code's first nine digits (unverified rule)."""
    # The digits are ASCII (the contract's pattern): each byte less b"0" is its value.
    weighted = sum(map(operator.mul, code[:9].encode("ascii"), TAX_CODE_WEIGHTS))
    remainder = (weighted - _ASCII_ZERO_WEIGHT) % 11
    check = 10 - remainder
    return check if check < 10 else None


def personal_id_warnings(pid: str, year_of_birth: int | None, sex: str | None) -> list[str]:
    """Soft checks of the historic 12-digit structure: province, century/sex, birth year."""
    warnings: list[str] = []
    if pid[:3] not in OLD_PROVINCE_ID_CODES:
        warnings.append("personal_id_province")
    century_sex = int(pid[3])
    if century_sex > 5:
        warnings.append("personal_id_century")
        return warnings
    century = 1900 + 100 * (century_sex // 2)
    if year_of_birth is not None and year_of_birth != century + int(pid[4:6]):
        warnings.append("personal_id_birth_year")
    if sex is not None and sex != ("male" if century_sex % 2 == 0 else "female"):
        warnings.append("personal_id_sex")
    return warnings


def tax_code_warnings(code: str) -> list[str]:
    """Soft check of the circulating mod-11 check digit of a tax code."""
    return [] if tax_code_check_digit(code) == int(code[9]) else ["tax_code_check_digit"]


def mask_key(key: str) -> str:
    """Enough of a key for a person to recognise a record on screen, not enough to
    identify anyone: for human displays (tables), never for logs or headers."""
    if len(key) <= 6:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 5)}{key[-2:]}"


# RFC 2104: an HMAC key shorter than the hash's output weakens it.
MIN_REFERENCE_KEY_BYTES = 32
REFERENCE_PREFIX = "ref:"
REFERENCE_HEX_DIGITS = 16  # 64 bits: no collision to expect among 10^8 identifiers


class ReferenceKey:
    """The secret of keyed references (the bytes of `PORTAL_SYNC_REFERENCE_KEY_FILE`).

    Its repr and str never show the secret, so a configuration object that holds one can
    be printed or logged."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_REFERENCE_KEY_BYTES:
            raise ValueError(
                f"a reference key needs at least {MIN_REFERENCE_KEY_BYTES} bytes, "
                f"this one has {len(secret)}"
            )
        self._secret = secret

    def __repr__(self) -> str:
        return "ReferenceKey(<hidden>)"

    __str__ = __repr__

    def digest(self, value: str) -> str:
        """HMAC-SHA-256 of the value's UTF-8 bytes, hex."""
        return hmac.new(self._secret, value.encode("utf-8"), hashlib.sha256).hexdigest()


def key_reference(key: str, secret: ReferenceKey | None) -> str:
    """How a personal id, tax code or other record key may appear outside the store (log
    lines, dead-letter headers, origins, reports).

    With a secret: `ref:` and 16 hex digits of HMAC-SHA-256 under it. The same key always
    gets the same reference, so log lines and dead letters can be matched, but without the
    secret no one can tell which key it is: an unkeyed hash of a 12-digit personal id is
    reversed by hashing every possible id (the masked digits shown beside the old 10-digit
    SHA-256 prefix cut that to seconds). No digit of the key is shown, even with a secret:
    to whoever holds the secret, visible digits would make the search trivial.

    Without a secret: the masked key only, no hash at all."""
    if secret is None:
        return mask_key(key)
    return REFERENCE_PREFIX + secret.digest(key)[:REFERENCE_HEX_DIGITS]


# The 63 provinces' codes of addresses before 1 July 2025: a personal id's province code
# without its leading zero (Decree 137/2015 numbers both alike).
OLD_PROVINCE_CODES = frozenset(code[1:] for code in OLD_PROVINCE_ID_CODES)


@cache
def current_province_codes() -> frozenset[str]:
    """The 34 province-level codes in force since 1 July 2025, from vietnam-provinces."""
    from vietnam_provinces import Province

    return frozenset(f"{int(p.code):02d}" for p in Province.iter_all())


@cache
def current_wards(province_code: str) -> frozenset[str]:
    """The 5-digit codes of a current province's communes and wards (vietnam-provinces);
    empty for a code that is not one of the 34."""
    from vietnam_provinces import Province, ProvinceCode, Ward

    if province_code not in current_province_codes():
        return frozenset()
    province = Province.from_code(ProvinceCode(int(province_code)))
    return frozenset(f"{int(w.code):05d}" for w in Ward.iter_by_province(province.code))
