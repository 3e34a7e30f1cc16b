"""`portal-sync keys new` (output format, file modes, never overwriting) and which key a
deployment's sources sign with (`signing_key_file`)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from consumers.signatures import TrustedKey, verify
from producers.deployment import load_deployment
from producers.produce import _signer
from producers.sdk import ConfigurationError
from producers.signing import load_signer
from schemas.errors import ConfigurationError as SettingsError
from schemas.signing import Signer, parse_public_key
from tests.unit.test_store_cli import run_cli

ENTRY = re.compile(
    r'\{ id = "(province-01-\d{8}-[0-9a-f]{6})", key = "(ed25519:[A-Za-z0-9+/]{43}=)" \}'
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_new_writes_a_private_key_0600_and_prints_only_the_registry_entry(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "keys"
    made = run_cli("keys", "new", "province-01", "--dir", str(directory))

    assert made.returncode == 0, made.stderr
    match = ENTRY.fullmatch(made.stdout.rstrip("\n"))
    assert match and made.stdout.count("\n") == 1, made.stdout  # the entry, alone
    key_file = directory / "province-01.key"
    assert _mode(key_file) == 0o600 and _mode(directory) == 0o700
    assert str(key_file) in made.stderr
    signer = load_signer(key_file, "province-01")
    assert signer.key_id == match[1]
    public = parse_public_key(match[2])
    keys = {signer.key_id: TrustedKey(signer.key_id, "province-01", public)}
    assert verify(b"value", signer.headers(b"value"), keys, 0, True) is not None
    assert match[2].split(":")[1] not in key_file.read_text()  # the file holds the private key

    again = run_cli("keys", "new", "province-01", "--dir", str(directory))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert load_signer(key_file).key_id == signer.key_id  # untouched
    other = run_cli("keys", "new", "province-01", "--dir", str(tmp_path / "more"))
    assert ENTRY.fullmatch(other.stdout.strip())[1] != signer.key_id  # type: ignore[index]


def test_keys_new_defaults_to_the_users_config_dir_and_checks_the_source(tmp_path: Path) -> None:
    made = run_cli("keys", "new", "ministry-btp", XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "cfg" / "portal-sync" / "keys" / "ministry-btp.key"
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    bad = run_cli("keys", "new", "../etc/x", "--dir", str(tmp_path / "k"))
    assert bad.returncode == 2 and not (tmp_path / "k").exists()


def _deployment(tmp_path: Path, producer: str, source: str) -> Path:
    path = tmp_path / "sources.toml"
    path.write_text(
        f"[producer]\nmetrics_port = 0\n{producer}\n"
        '[[sources]]\nid = "p1.citizen"\nsource = "province-01"\nadapter = "filedrop"\n'
        f'{source}\nconnection = {{ directory = "in" }}\n'
        'mapping = { entity = "citizen", key_field = "pid", occurred_at_field = "at" }\n',
        encoding="utf-8",
    )
    return path


def test_a_source_signs_with_its_own_key_else_the_producers(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    for name, source in (("shared", "province-01"), ("own", "province-01"), ("hcm", "province-79")):
        key = Signer.generate(source, f"{source}-20250801-{name}")
        (tmp_path / "k" / f"{name}.key").write_text(key.key_file_text())
        (tmp_path / "k" / f"{name}.key").chmod(0o600)
    shared = 'signing_key_file = "k/shared.key"'
    deployment = load_deployment(_deployment(tmp_path, shared, ""))
    signer = _signer(deployment, deployment.sources[0])
    assert signer is not None and signer.key_id.endswith("shared")
    deployment = load_deployment(_deployment(tmp_path, shared, 'signing_key_file = "k/own.key"'))
    signer = _signer(deployment, deployment.sources[0])
    assert signer is not None and signer.key_id.endswith("own")
    unsigned = load_deployment(_deployment(tmp_path, "", ""))
    assert _signer(unsigned, unsigned.sources[0]) is None

    wrong = load_deployment(_deployment(tmp_path, 'signing_key_file = "k/hcm.key"', ""))
    with pytest.raises(ConfigurationError, match="key of source province-79, not of province-01"):
        _signer(wrong, wrong.sources[0])
    missing = load_deployment(_deployment(tmp_path, 'signing_key_file = "k/none.key"', ""))
    with pytest.raises(ConfigurationError, match=r"source p1\.citizen: signing key file"):
        _signer(missing, missing.sources[0])


def test_a_signing_key_every_user_may_read_is_refused_and_one_its_group_may_read_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key any local user can copy signs as the source anywhere: it was used with a
    warning. A secret mounted 0440 (the chart's) is readable by the pod's group only."""
    made = run_cli("keys", "new", "province-01", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "province-01.key"
    for mode in (0o644, 0o604, 0o602):
        key_file.chmod(mode)
        with pytest.raises(SettingsError, match="every user may read or write it"):
            load_signer(key_file, "province-01")
    key_file.chmod(0o440)  # our own file: 0600 is ours to set
    with caplog.at_level("WARNING"):
        assert load_signer(key_file, "province-01").source == "province-01"
    assert "is open to its group (mode 440): make it 0600" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_a_mounted_secret_its_group_reads_is_used_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart mounts the key 0440, root's, for the pod's group (uid 10001 could not
    read a 0600 file of root's): every producer's start warned of what nobody could fix.
    A group that may write it is still warned of."""
    import os

    made = run_cli("keys", "new", "province-01", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "province-01.key"
    key_file.chmod(0o440)
    monkeypatch.setattr(os, "geteuid", lambda: key_file.stat().st_uid + 10001)  # not ours
    with caplog.at_level("WARNING"):
        assert load_signer(key_file, "province-01").source == "province-01"
    assert "open to its group" not in caplog.text
    key_file.chmod(0o460)
    with caplog.at_level("WARNING"):
        load_signer(key_file, "province-01")
    assert "is open to its group (mode 460)" in caplog.text
