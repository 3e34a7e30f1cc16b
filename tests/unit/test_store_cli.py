"""The data-steward commands (`portal-sync show`, `history`, `conflicts`, `anomalies`,
`remerge`, `export --provenance`) as subprocesses against a real SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.merge import Authority
from store import queries
from store.core import Store
from tests.support.store_helpers import (
    CITIZEN,
    CITIZEN_2,
    DOSSIER,
    H26,
    REGISTRY,
    Feed,
    event,
    event_id,
    history_rows,
)

ROOT = Path(__file__).resolve().parents[2]
AUTHORITY = Authority.from_mapping(
    {"citizen": {"full_name": ["national-population"], "sex": ["national-population"]}},
    REGISTRY,
)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_SYNC_")}
    base.pop("FORCE_COLOR", None)
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
def filled(tmp_path: Path) -> str:
    """A store with a disagreement, a deleted view, an anomaly and a waiting document."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    feed = Feed(store, AUTHORITY)
    feed.apply(
        event(
            "citizen",
            CITIZEN,
            "national-population",
            3,
            {"full_name": "Nguyễn Văn An", "sex": "male"},
        ),
        event(
            "citizen",
            CITIZEN,
            "province-01",
            5,
            {"full_name": "Nguyen Van An", "phone": "0912345678"},
        ),
        event("citizen", CITIZEN, "province-79", 1, {"email": "an@example.vn"}),
    )
    feed.apply(event("citizen", CITIZEN, "province-79", 2, None))
    feed.apply(event("dossier", DOSSIER, "province-01", 1, {"agency_code": H26, "status": 2}))
    feed.apply(event("dossier", DOSSIER, "province-01", 2, {"agency_code": H26, "status": 1}))
    feed.apply(
        event(
            "document",
            "GKS-1",
            "province-01",
            1,
            {"owner_kind": "citizen", "owner_id": CITIZEN_2, "title": "Giấy khai sinh"},
        ),
    )
    store.close()
    return url


def test_show_prints_values_provenance_views_and_disagreements(filled: str) -> None:
    result = run_cli("show", "citizen", CITIZEN, "--store", filled, "--reason", "test")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    full_name = next(line for line in lines if "full_name" in line)
    # canonical value and its origin, then each source's view
    assert "Nguyễn Văn An" in full_name and "national-population v3" in full_name
    assert "Nguyen Van An" in full_name
    phone = next(line for line in lines if "phone" in line)
    assert "0912345678" in phone and "province-01 v5" in phone
    for source in ("national-population", "province-01", "province-79"):
        assert source in lines[2]  # the header row
    assert "(deleted)" in full_name  # province-79's tombstone
    version = next(line for line in lines if "version" in line and "│" in line)
    assert [cell.strip() for cell in version.split("│")[4:7]] == ["3", "5", "2"]
    assert "disagreements: full_name" in out
    assert "waiting for its owner" not in out


def test_show_highlights_the_disagreeing_fields(filled: str) -> None:
    result = run_cli(
        "show", "citizen", CITIZEN, "--store", filled, "--reason", "test", FORCE_COLOR="1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    full_name = next(line for line in lines if "full_name" in line and "│" in line)
    phone = next(line for line in lines if "phone" in line and "│" in line)
    assert "\x1b[1;31m" in full_name  # bold red
    assert "\x1b[1;31m" not in phone


def test_show_a_waiting_document_and_an_unknown_record(filled: str) -> None:
    result = run_cli("show", "document", "GKS-1", "--store", filled, "--reason", "test")
    assert result.returncode == 0, result.stderr
    assert "waiting for its owner citizen" in result.stdout
    assert "Giấy khai sinh" in result.stdout
    missing = run_cli("show", "citizen", CITIZEN_2, "--store", filled, "--reason", "test")
    assert missing.returncode == 1
    assert f"no citizen {CITIZEN_2} in the store" in missing.stdout


def test_show_a_deleted_record(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    feed = Feed(store)
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "An"}))
    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    store.close()
    result = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", "test")
    assert result.returncode == 0, result.stderr
    assert "no canonical record: every source deleted it" in result.stdout
    version = next(line for line in result.stdout.splitlines() if "version" in line)
    assert [cell.strip() for cell in version.split("│")[1:-1]] == ["version", "", "", "2"]
    assert "province-01" in result.stdout


def test_history_lists_each_change(filled: str) -> None:
    result = run_cli("history", "citizen", CITIZEN, "--store", filled, "--reason", "test")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert event_id("national-population", "citizen", CITIZEN, 3) in out
    assert event_id("province-79", "citizen", CITIZEN, 1) in out
    assert event_id("province-79", "citizen", CITIZEN, 2) in out
    # province-01's name loses to the population database: its entry shows only the phone
    assert event_id("province-01", "citizen", CITIZEN, 5) in out
    assert "full_name: null → Nguyễn Văn An" in out
    assert "phone: null → 0912345678" in out
    assert "email: an@example.vn → null" in out
    assert "Nguyen Van An" not in out
    assert out.count("national-population") == 1


def test_conflicts_report(filled: str) -> None:
    result = run_cli("conflicts", "--store", filled)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "full_name" in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells == ["citizen", "full_name", "national-population ↔ province-01", "1"]
    assert "no open conflicts" not in result.stdout
    none = run_cli("conflicts", "--entity", "organization", "--store", filled)
    assert none.returncode == 0, none.stderr
    assert "no open conflicts" in none.stdout


def test_anomalies_report(filled: str) -> None:
    result = run_cli("anomalies", "--store", filled)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if DOSSIER in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[1:] == [
        DOSSIER,
        "province-01",
        "2",
        "1",
        event_id("province-01", "dossier", DOSSIER, 2),
    ]


@pytest.mark.parametrize("command", ["conflicts", "anomalies"])
def test_a_limit_below_one_is_a_usage_error_on_every_backend(filled: str, command: str) -> None:
    """SQLite read `LIMIT -1` as no limit, PostgreSQL refused it with a traceback; the
    conflicts dropped their last line."""
    result = run_cli(command, "--limit", "-1", "--store", filled)
    assert result.returncode == 2 and "--limit" in result.stderr, result.stdout + result.stderr


def test_remerge_counts_a_record_whose_provenance_alone_moves(tmp_path: Path) -> None:
    """Two sources hold the same name: a new authority changes no value but the source
    `show` and `export --provenance` name. A dry run that said "0 would change" led an
    operator to skip the remerge, and the records kept naming the old source."""
    from consumers.reconciler import Reconciler

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_schema()
    try:
        name = {"full_name": "Nguyễn Văn An"}
        Feed(store, AUTHORITY).apply(
            event("citizen", CITIZEN, "national-population", 3, name),
            event("citizen", CITIZEN, "province-01", 5, name),
        )
        entries = len(history_rows(store))
        first = Authority.from_mapping({"citizen": {"full_name": ["province-01"]}}, REGISTRY)
        keys = [("citizen", CITIZEN)]
        assert Reconciler(store, first).remerge(keys, dry_run=True).total == 1
        assert next(store.iter_records("citizen"))[4] == {
            "full_name": {"source": "national-population", "version": 3}
        }
        assert Reconciler(store, first).remerge(keys).credit_only == 1
        assert next(store.iter_records("citizen"))[4] == {
            "full_name": {"source": "province-01", "version": 5}
        }
        assert len(history_rows(store)) == entries  # no value changed
        assert Reconciler(store, first).remerge(keys).total == 0
        assert Reconciler(store, AUTHORITY).remerge(keys).credit_only == 1
    finally:
        store.close()
    authority = tmp_path / "authority.toml"
    authority.write_text('[citizen]\nfull_name = ["province-01"]\n', encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    result = run_cli(
        "remerge", "--dry-run", "--store", url, PORTAL_SYNC_AUTHORITY_FILE=str(authority)
    )
    assert "re-merged 1 records, 1 would change (1 in provenance only)" in result.stdout


def test_remerge_counts_the_records_whose_conflicts_it_clears(tmp_path: Path) -> None:
    """A store reconciled under merge rules revision 1 lists "Hòa" and "Hoà" (one name, its
    tone mark placed two ways) as a conflict; `remerge` clears it and changes no value, and
    its dry run said "0 would change": a reason to skip the step the upgrade asks for."""
    from consumers.reconciler import Reconciler
    from store import utcnow
    from store.tables import field_conflicts

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    try:
        feed = Feed(store)
        feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "Lê Thị Hòa"}))
        feed.apply(event("citizen", CITIZEN, "province-79", 1, {"full_name": "Lê Thị Hoà"}))
        assert queries.open_conflicts(store) == 0
        with store.engine.begin() as conn:  # as the rules of revision 1 left it
            conn.execute(
                field_conflicts.insert().values(
                    entity="citizen", key=CITIZEN, field="full_name",
                    sources=[["province-01"], ["province-79"]], detected_at=utcnow(),
                )
            )  # fmt: skip
        keys = [("citizen", CITIZEN)]
        dry = Reconciler(store, Authority()).remerge(keys, dry_run=True)
        assert (dry.total, dry.conflicts) == (0, 1)
        assert queries.open_conflicts(store) == 1
    finally:
        store.close()
    result = run_cli("remerge", "--dry-run", "--store", url)
    assert "re-merged 1 records, 0 would change; 1 with other field conflicts" in result.stdout
    result = run_cli("remerge", "--yes", "--store", url)
    assert "re-merged 1 records, 0 changed; 1 with other field conflicts" in result.stdout
    again = run_cli("remerge", "--yes", "--store", url)
    assert "re-merged 1 records, 0 changed\n" in again.stdout
    store = Store(url)
    try:
        assert queries.open_conflicts(store) == 0
    finally:
        store.close()


def test_remerge_applies_a_new_authority_file(filled: str, tmp_path: Path) -> None:
    authority = tmp_path / "authority.toml"
    authority.write_text('[citizen]\nfull_name = ["province-01"]\n', encoding="utf-8")
    result = run_cli(
        "remerge", "--yes", "--store", filled, PORTAL_SYNC_AUTHORITY_FILE=str(authority)
    )
    assert result.returncode == 0, result.stderr
    assert "re-merging" in result.stdout and "3/3" in result.stdout  # the progress bar
    assert "re-merged 3 records, 1 changed" in result.stdout
    store = Store(filled)
    try:
        citizen = next(store.iter_records("citizen"))
        assert citizen[2]["full_name"] == "Nguyen Van An"
        assert citizen[4]["full_name"] == {"source": "province-01", "version": 5}
        assert history_rows(store)[-1] == (
            "citizen",
            CITIZEN,
            None,
            "remerge",
            None,
            {"full_name": ["Nguyễn Văn An", "Nguyen Van An"]},
        )
        # the sources still disagree: remerge does not hide the conflict
        assert queries.open_conflicts(store) == 1
    finally:
        store.close()
    shown = run_cli("history", "citizen", CITIZEN, "--store", filled, "--reason", "test")
    assert "remerge" in shown.stdout
    assert "full_name: Nguyễn Văn An → Nguyen Van An" in shown.stdout

    only = run_cli(
        "remerge",
        "--yes",
        "--entity",
        "dossier",
        "--store",
        filled,
        PORTAL_SYNC_AUTHORITY_FILE=str(authority),
    )
    assert only.returncode == 0, only.stderr
    assert "re-merged 1 records, 0 changed" in only.stdout


def test_export_with_provenance(filled: str, tmp_path: Path) -> None:
    result = run_cli("export", "--provenance", "--store", filled, "--reason", "test")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["entity"], line["key"]) for line in lines] == [
        ("citizen", CITIZEN),
        ("document", "GKS-1"),
        ("dossier", DOSSIER),
    ]
    assert lines[0]["provenance"] == {
        "full_name": {"source": "national-population", "version": 3},
        "sex": {"source": "national-population", "version": 3},
        "phone": {"source": "province-01", "version": 5},
    }
    assert lines[0]["data"] == {"full_name": "Nguyễn Văn An", "sex": "male", "phone": "0912345678"}
    assert lines[2]["provenance"] == {
        "agency_code": {"source": "province-01", "version": 2},
        "status": {"source": "province-01", "version": 2},
    }
    assert "exported 3 records" in result.stderr

    out = tmp_path / "records.jsonl"
    plain = run_cli("export", "--store", filled, "-o", str(out), "--reason", "test")
    assert plain.returncode == 0, plain.stderr
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 3 and all("provenance" not in line for line in written)


def test_a_missing_or_malformed_registry_is_a_clear_error(tmp_path: Path) -> None:
    missing = run_cli("remerge", PORTAL_SYNC_REGISTRY=str(tmp_path / "none.toml"))
    assert missing.returncode == 2
    assert "source registry" in missing.stderr and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "registry.toml"
    bad.write_text('[sources.x]\nkind = "planet"\nname = "x"\n')
    malformed = run_cli("remerge", PORTAL_SYNC_REGISTRY=str(bad))
    assert malformed.returncode == 2
    assert "kind" in malformed.stderr and "Traceback" not in malformed.stderr


def test_a_missing_rules_file_stops_replay_and_rebuild_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """Replay and rebuild compare the rules' fingerprint with the one the store's worker
    recorded: a registry or authority file that could not be read ended both in a traceback
    (FileNotFoundError), not in a configuration error."""
    from consumers.config import RULES_FILES, RULES_FINGERPRINT

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    store.set_meta(RULES_FINGERPRINT, "0" * 64)
    store.set_meta(RULES_FILES, "registry deploy/registry.toml, authority (none)")
    store.close()
    missing = str(tmp_path / "none.toml")
    for env in ({"PORTAL_SYNC_REGISTRY": missing},
                {"PORTAL_SYNC_AUTHORITY_FILE": missing,
                 "PORTAL_SYNC_REGISTRY": str(ROOT / "deploy" / "registry.toml")}):  # fmt: skip
        for command in (("replay", "--store", url, "--reason", "test"),
                        ("rebuild", "--store", f"sqlite:///{tmp_path / 'new.db'}",
                         "--reason", "test")):  # fmt: skip
            result = run_cli(*command, PORTAL_SYNC_STORE_URL=url, **env)
            assert result.returncode == 2, (command, result.stderr)
            assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_history_of_a_deleted_record_past_its_retention_shows_no_values(tmp_path: Path) -> None:
    from datetime import timedelta

    from consumers.retention import Retention, purge
    from store import utcnow

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    feed = Feed(store)
    from schemas.identifiers import ReferenceKey

    key_file = tmp_path / "reference.key"
    key_file.write_bytes(b"k" * 32)
    feed.apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": "Nguyễn Văn An"}))
    feed.apply(event("citizen", CITIZEN, "province-01", 2, None))
    # Another citizen whose masked key is the same (the last two digits), forgotten too.
    other = CITIZEN[:-3] + "9" + CITIZEN[-2:]
    feed.apply(event("citizen", other, "province-01", 1, {"full_name": "Trần Thị Bình"}))
    feed.apply(event("citizen", other, "province-01", 2, None))
    retention = Retention(deleted_days=180, reference_key=ReferenceKey(b"k" * 32))
    purge(store, retention, utcnow() + timedelta(days=181))
    store.close()
    result = run_cli("history", "citizen", CITIZEN, "--store", url, "--reason", "test",
                     PORTAL_SYNC_REFERENCE_KEY_FILE=str(key_file))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("full_name: values purged") == 2  # its own, not the other's
    assert "Nguyễn Văn An" not in result.stdout
    # The entries stay (under the key's reference); the event ids, derived from the key
    # without a secret, go with the values.
    assert event_id("province-01", "citizen", CITIZEN, 2) not in result.stdout
    import sqlite3

    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("SELECT count(*) FROM record_history WHERE key = ?", (CITIZEN,)
                            ).fetchone() == (0,)  # fmt: skip


@pytest.mark.parametrize("command", [["conflicts"], ["anomalies"], ["remerge", "--yes"]])
def test_a_command_on_the_store_refuses_a_database_without_the_schema(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'not-a-store.db'}"
    result = run_cli(*command, "--store", url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds no portal-sync schema" in result.stderr
    assert "Traceback" not in result.stderr
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []  # nothing created
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", ["missing.jsonl", "."])
def test_publish_of_a_file_it_cannot_read_is_one_line(tmp_path: Path, name: str) -> None:
    result = run_cli("publish", str(tmp_path / name))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_an_argument_that_is_not_utf8_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """A key typed in another encoding ended in a 140-line traceback (UnicodeEncodeError)
    where `show`, `history`, `source purge --key` and `replay --source` first wrote it. It
    is refused by its position, never echoed: it may be a personal id."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    key = "079123456789\udcff"  # the byte 0xff, as the command line hands it over
    for command in (("show", "citizen", key, "--reason", "test"),
                    ("history", "citizen", key, "--reason", "test"),
                    ("replay", "--source", key, "--store", url)):  # fmt: skip
        result = run_cli(*command, PORTAL_SYNC_STORE_URL=url)
        assert result.returncode == 1, (command, result.stderr)
        assert "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
        assert "079123456789" not in result.stderr
