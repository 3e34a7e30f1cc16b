"""`portal-sync source purge` as a subprocess against a real SQLite store: what it refuses
(no reason, a key without its entity, another worker's rules), who it records, and how
it names a record (its reference, never the key). The purge itself on both backends:
tests/integration/postgres/test_source_purge.py."""

from __future__ import annotations

import getpass
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from consumers.config import RULES_FINGERPRINT
from schemas.identifiers import ReferenceKey, key_reference
from store.core import Store
from store.purge import purges
from store.tables import metadata
from tests.support.store_helpers import CITIZEN, CITIZEN_2, Feed, event

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    base.update(COLUMNS="200", **env)
    return subprocess.run(
        [sys.executable, "-m", "portal_sync", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    Feed(store).apply(
        event("citizen", CITIZEN, "province-01", 1, {"full_name": "Sai"}),
        event("citizen", CITIZEN, "province-79", 1, {"full_name": "Đúng"}, minute=0),
        event("citizen", CITIZEN_2, "province-01", 1, {"full_name": "Không"}),
    )
    store.close()
    return url


def snapshot(url: str) -> dict[str, list[str]]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            return {
                table.name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
                for table in metadata.sorted_tables
            }
    finally:
        store.close()


def audit(url: str) -> list[dict[str, object]]:
    store = Store(url)
    try:
        return purges(store)
    finally:
        store.close()


def test_a_reason_is_required(url: str) -> None:
    before = snapshot(url)
    missing = run_cli("source", "purge", "province-01", "--yes", "--store", url)
    assert missing.returncode == 2
    assert "--reason" in missing.stderr
    blank = run_cli("source", "purge", "province-01", "--yes", "--reason", "  ", "--store", url)
    assert blank.returncode == 1
    assert "say why with --reason" in blank.stderr
    assert snapshot(url) == before


def test_a_mistyped_store_url_creates_no_store(tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "store.db"
    result = run_cli("source", "purge", "province-01", "--reason", "wrong data",
                     "--store", f"sqlite:///{typo}")  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "holds no portal-sync schema" in result.stderr
    assert not typo.exists()


def test_without_yes_it_only_plans(url: str) -> None:
    before = snapshot(url)
    plan = run_cli("source", "purge", "province-01", "--reason", "wrong data", "--store", url)
    assert plan.returncode == 0, plan.stderr
    assert ("purge of province-01 (every entity): 2 views, 0 tombstones; 1 records to "
            "re-merge from other sources, 1 to remove") in plan.stdout  # fmt: skip
    assert "plan only: pass --yes" in plan.stdout
    assert snapshot(url) == before


def test_refusals_change_nothing(url: str) -> None:
    before = snapshot(url)
    no_entity = run_cli("source", "purge", "province-01", "--key", CITIZEN, "--yes",
                        "--reason", "x", "--store", url)  # fmt: skip
    assert no_entity.returncode == 1
    assert "--key needs --entity" in no_entity.stderr
    assert CITIZEN not in no_entity.stderr + no_entity.stdout
    bad_source = run_cli("source", "purge", "Province 01", "--yes", "--reason", "x",
                         "--store", url)  # fmt: skip
    assert bad_source.returncode == 1
    assert "not a source id" in bad_source.stderr
    bad_entity = run_cli("source", "purge", "province-01", "--entity", "person", "--yes",
                         "--reason", "x", "--store", url)  # fmt: skip
    assert bad_entity.returncode == 1
    assert snapshot(url) == before


def test_refuses_other_rules_than_the_workers_unless_told(url: str) -> None:
    store = Store(url)
    store.set_meta(RULES_FINGERPRINT, "the worker's rules")
    store.close()
    before = snapshot(url)
    refused = run_cli("source", "purge", "province-01", "--yes", "--reason", "x", "--store", url)
    assert refused.returncode == 1
    assert "--rules-mismatch-ok" in refused.stderr
    assert snapshot(url) == before
    done = run_cli("source", "purge", "province-01", "--yes", "--reason", "x",
                   "--rules-mismatch-ok", "--store", url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "removed 2 views and 0 tombstones" in done.stdout


def test_one_record_is_named_by_its_reference_and_the_os_user_recorded(
    url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "reference.key"
    secret.write_bytes(b"s" * 32)
    reference = key_reference(CITIZEN, ReferenceKey(b"s" * 32))
    result = run_cli("source", "purge", "province-01", "--entity", "citizen", "--key", CITIZEN,
                     "--yes", "--reason", "frozen view", "--store", url,
                     PORTAL_SYNC_REFERENCE_KEY_FILE=str(secret))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"purge of province-01 (citizen {reference}): 1 views" in result.stdout
    assert CITIZEN not in result.stdout + result.stderr
    (row,) = audit(url)
    assert (row["entity"], row["reference"], row["reason"]) == ("citizen", reference,
                                                                "frozen view")  # fmt: skip
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = getpass.getuser()
    assert row["operator"] == user


def test_the_purges_a_read_from_before_them_would_undo(url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from portal_sync.ops.purge import purge_warning, purges_after

    before = datetime.now(UTC) - timedelta(seconds=1)
    done = run_cli("source", "purge", "province-01", "--entity", "citizen", "--yes",
                   "--reason", "wrong data", "--store", url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    store = Store(url)
    try:
        found = purges_after(store, before)
        assert len(found) == 1 and found[0].startswith("province-01 (citizen, ")
        assert purges_after(store, None, "province-01", {"citizen"}) == found
        assert purges_after(store, datetime.now(UTC)) == []  # read from after it
        assert purges_after(store, before, "province-79") == []  # another source's read
        assert purges_after(store, before, entities={"document"}) == []  # another topic
    finally:
        store.close()
    everything = run_cli("source", "purge", "province-79", "--yes", "--reason", "wrong data",
                         "--store", url)  # fmt: skip
    assert everything.returncode == 0, everything.stderr
    store = Store(url)
    try:  # a purge of every entity touches every topic
        wide = purges_after(store, before, entities={"document"})
        assert len(wide) == 1 and wide[0].startswith("province-79 (every entity, ")
    finally:
        store.close()
    nothing = run_cli("source", "purge", "province-99", "--yes", "--reason", "misspelt",
                      "--store", url)  # fmt: skip
    assert nothing.returncode == 0, nothing.stderr
    store = Store(url)
    try:  # it removed nothing: nothing to undo, no warning at every reset after it
        assert len(audit(url)) == 3
        assert purges_after(store, before, "province-99") == []
    finally:
        store.close()
    warning = purge_warning(found)
    assert warning is not None and "province-01 (citizen" in warning
    assert purge_warning([]) is None
