"""The access log of the commands that reveal personal data (`show`, `history`, `export`;
`dlq show --reveal` and `replay --show-values` in tests/integration/kafka): each needs
`--reason`, writes its row (operator, time, command, entity, key reference, reason) before it
prints anything, and prints nothing when the row cannot be written; `portal-sync access-log`
lists the log. Subprocesses against a real SQLite store."""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import update

from schemas.identifiers import key_reference
from store import schema
from store.core import Store
from store.tables import access_log
from tests.support.store_helpers import CITIZEN, CITIZEN_2, Feed, event
from tests.unit.test_store_cli import run_cli

NAME = "Nguyễn Văn An"


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A store with one citizen."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.create_schema()
    Feed(store).apply(event("citizen", CITIZEN, "province-01", 1, {"full_name": NAME}))
    store.close()
    return url


def entries(url: str) -> list[dict[str, object]]:
    store = Store(url)
    try:
        return store.access_entries()
    finally:
        store.close()


REVEALING = [
    ("show", "citizen", CITIZEN),
    ("history", "citizen", CITIZEN),
    ("export", "--entity", "citizen"),
]


@pytest.mark.parametrize("args", REVEALING, ids=[a[0] for a in REVEALING])
@pytest.mark.parametrize("reason", [None, "   "], ids=["missing", "blank"])
def test_revealing_commands_refuse_without_a_reason(
    url: str, args: tuple[str, ...], reason: str | None
) -> None:
    given = [] if reason is None else ["--reason", reason]
    result = run_cli(*args, "--store", url, *given)
    assert result.returncode == 1  # EXIT_CODES[Refused]
    assert "refused" in result.stderr and "--reason" in result.stderr
    assert "Traceback" not in result.stderr
    assert NAME not in result.stdout + result.stderr
    assert entries(url) == []


def test_each_revealing_command_writes_its_row(url: str) -> None:
    before = datetime.now(UTC)
    shown = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", "ticket 12")
    assert shown.returncode == 0, shown.stderr
    assert NAME in shown.stdout
    history = run_cli("history", "citizen", CITIZEN, "--store", url, "--reason", "complaint 7",
                      "--operator", "steward-a")  # fmt: skip
    assert history.returncode == 0, history.stderr
    exported = run_cli("export", "--store", url, "--reason", "yearly audit")
    assert exported.returncode == 0, exported.stderr
    missing = run_cli("show", "citizen", CITIZEN_2, "--store", url, "--reason", "lookup")
    assert missing.returncode == 1  # not in the store, but the look-up is recorded

    rows = entries(url)
    assert [(r["command"], r["entity"], r["reason"]) for r in rows] == [
        ("show", "citizen", "ticket 12"),
        ("history", "citizen", "complaint 7"),
        ("export", None, "yearly audit"),
        ("show", "citizen", "lookup"),
    ]
    assert [r["reference"] for r in rows] == [
        key_reference(CITIZEN, None),
        key_reference(CITIZEN, None),
        None,
        key_reference(CITIZEN_2, None),
    ]
    assert all(CITIZEN not in str(r["reference"]) for r in rows)  # never the key itself
    assert rows[1]["operator"] == "steward-a"
    assert rows[0]["operator"] and rows[0]["operator"] != "steward-a"  # the OS user
    for row in rows:
        assert isinstance(row["accessed_at"], datetime)
        assert before - timedelta(seconds=1) <= row["accessed_at"] <= datetime.now(UTC)


def test_nothing_is_revealed_when_the_row_cannot_be_written(url: str) -> None:
    store = Store(url)
    with store.engine.begin() as conn:  # the log refuses every new row
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON access_log BEGIN SELECT RAISE(FAIL, 'no'); END"
        )
    store.close()
    for args in (("show", "citizen", CITIZEN), ("history", "citizen", CITIZEN), ("export",)):
        result = run_cli(*args, "--store", url, "--reason", "ticket 12")
        assert result.returncode == 1, (args, result.stdout)
        assert NAME not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert entries(url) == []


def test_a_store_without_the_access_log_is_refused_until_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    config = schema._config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    store.close()
    result = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", "ticket 12")
    assert result.returncode == 2  # EXIT_CODES[ConfigurationError]
    assert "portal-sync store upgrade" in result.stderr


def test_access_log_lists_and_filters(url: str) -> None:
    for operator, reason in (("alice", "ticket 1"), ("bob", "ticket 2"), ("alice", "ticket 3")):
        result = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", reason,
                         "--operator", operator)  # fmt: skip
        assert result.returncode == 0, result.stderr
    store = Store(url)
    with store.engine.begin() as conn:  # the first read was three days ago
        conn.execute(
            update(access_log)
            .where(access_log.c.reason == "ticket 1")
            .values(accessed_at=datetime.now(UTC) - timedelta(days=3))
        )
    store.close()

    listed = run_cli("access-log", "--store", url)
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "ticket" in line]
    assert [("alice" in line, "bob" in line) for line in lines] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    assert all("show" in line and "citizen" in line for line in lines)
    assert CITIZEN not in listed.stdout

    alice = run_cli("access-log", "--store", url, "--operator", "alice", "--json")
    assert alice.returncode == 0, alice.stderr
    rows = [json.loads(line) for line in alice.stdout.splitlines()]
    assert [(r["operator"], r["reason"]) for r in rows] == [
        ("alice", "ticket 1"),
        ("alice", "ticket 3"),
    ]
    assert set(rows[0]) == {
        "id", "accessed_at", "operator", "command", "entity", "reference", "reason",
    }  # fmt: skip
    assert rows[0]["reference"] == key_reference(CITIZEN, None)

    recent = run_cli("access-log", "--store", url, "--since", "1d", "--json")
    assert [json.loads(line)["reason"] for line in recent.stdout.splitlines()] == [
        "ticket 2",
        "ticket 3",
    ]
    both = run_cli("access-log", "--store", url, "--since", "2d", "--operator", "bob", "--json")
    assert [json.loads(line)["reason"] for line in both.stdout.splitlines()] == ["ticket 2"]
    naive = run_cli("access-log", "--store", url, "--since", "2025-08-01T08:00:00")
    assert naive.returncode == 2 and "offset" in naive.stderr


def test_an_operator_s_name_is_one_whatever_its_unicode_form(url: str) -> None:
    """A terminal (macOS's) may give a name decomposed (NFD): recorded as typed, it was
    another operator than the same name composed, for `access-log --operator`."""
    composed = "Trần Thị Ánh"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    result = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", "ticket 4",
                     "--operator", decomposed)  # fmt: skip
    assert result.returncode == 0, result.stderr
    store = Store(url)  # an earlier release recorded the name as typed
    store.log_access(decomposed, "show", "ticket 5", [("citizen", None)])
    store.close()
    for name in (composed, decomposed):
        found = run_cli("access-log", "--store", url, "--operator", name, "--json")
        rows = [json.loads(line) for line in found.stdout.splitlines()]
        assert [(r["operator"], r["reason"]) for r in rows] == [
            (composed, "ticket 4"),
            (decomposed, "ticket 5"),
        ], name


def test_the_operator_is_the_os_user_not_the_environment(url: str) -> None:
    import os
    import pwd

    result = run_cli("show", "citizen", CITIZEN, "--store", url, "--reason", "ticket 12",
                     USER="mallory", LOGNAME="mallory")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["operator"] for r in entries(url)] == [pwd.getpwuid(os.getuid()).pw_name]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "person", CITIZEN, "--reason", "x"), "entity"),
        (("history", "citizen", "1" * 65, "--reason", "x"), "key"),
        (("export", "--entity", "people", "--reason", "x"), "entity"),
        (("show", "citizen", CITIZEN, "--reason", "x\x1b[2J"), "printable"),
        (("show", "citizen", CITIZEN, "--reason", "x" * 1001), "1000"),
        (("show", "citizen", CITIZEN, "--reason", "x", "--operator", "o" * 129), "128"),
    ],
)
def test_what_the_log_cannot_hold_is_refused(url: str, args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args, "--store", url)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and NAME not in result.stdout
    assert entries(url) == []


def test_a_revealed_dead_letter_is_logged_under_its_record_s_reference() -> None:
    """A dead letter's message key is `<entity>:<key>:<source>`: an audit of who read a
    record finds `dlq show --reveal` of its letters under the reference `show` writes."""
    from portal_sync.ops.access import dead_letter_key, record_key
    from schemas import message_key
    from schemas.identifiers import ReferenceKey

    secret = ReferenceKey(b"s" * 32)
    entity, reference = record_key("citizen", "079305012345", secret)
    assert reference is not None
    for key in (message_key("citizen", "079305012345", "province-01"), b"citizen:079305012345"):
        named = dead_letter_key("0:41", key, secret)
        assert named == (entity, f"dead letter 0:41: {reference}")


def test_a_revealed_letter_whose_value_names_another_record_logs_that_record_too() -> None:
    """A `key_mismatch` or forged letter: its key names one citizen, its value (what
    `--reveal` prints) another. The access log named only the first."""
    import json

    from portal_sync.ops.access import dead_letter_targets, record_key
    from schemas import message_key
    from schemas.identifiers import ReferenceKey

    secret = ReferenceKey(b"s" * 32)
    keyed = record_key("citizen", "001090012345", secret)[1]
    shown = record_key("citizen", "079305012345", secret)[1]
    key = message_key("citizen", "001090012345", "province-01")
    value = json.dumps({"entity": "citizen", "key": "079305012345", "data": {}}).encode()
    assert dead_letter_targets("0:9", key, value, secret) == [
        ("citizen", f"dead letter 0:9: {keyed}"),
        ("citizen", f"dead letter 0:9: {shown}"),
    ]
    same = json.dumps({"entity": "citizen", "key": "001090012345"}).encode()
    assert dead_letter_targets("0:9", key, same, secret) == [
        ("citizen", f"dead letter 0:9: {keyed}")
    ]
    # What orjson refuses and the worker's parser reads: the record is still named.
    lenient = b'{"entity": "citizen", "key": "079305012345", "n": 1e400}'
    assert dead_letter_targets("0:9", key, lenient, secret)[1:] == [
        ("citizen", f"dead letter 0:9: {shown}")
    ]
    # A key named twice: `dlq show` shows the value whole, so both records are logged
    # (orjson and json keep the last; another reader may take the first).
    twice = b'{"entity": "citizen", "key": "079305012345", "key": "001090012345"}'
    assert dead_letter_targets("0:9", key, twice, secret) == [
        ("citizen", f"dead letter 0:9: {keyed}"),
        ("citizen", f"dead letter 0:9: {shown}"),
    ]
    # A key named thousands of times: each once, ten at most (it took minutes and as many
    # access log rows).
    many = (
        b'{"entity": "citizen", '
        + b", ".join(b'"key": "0793050%05d"' % n for n in range(20_000))
        + b"}"
    )
    assert len(dead_letter_targets("0:9", key, many, secret)) == 1 + 10
    surrogate = b'{"entity": "citizen", "key": "\\ud800079305012345"}'  # read leniently
    for unreadable in (b"\xff", b"[1]", b'{"entity": "citizen", "key": 7}', surrogate, None):
        assert dead_letter_targets("0:9", key, unreadable, secret) == [
            ("citizen", f"dead letter 0:9: {keyed}")
        ]


def test_a_database_without_the_store_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A wrong --store (another application's database): the revealing commands and the
    access log refuse it, and create nothing in it (they created every table of the
    store beside the other application's)."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    url = f"sqlite:///{path}"
    for args in (
        ("show", "citizen", CITIZEN, "--reason", "ticket 12"),
        ("history", "citizen", CITIZEN, "--reason", "ticket 12"),
        ("export", "--reason", "ticket 12"),
        ("access-log",),
    ):
        result = run_cli(*args, "--store", url)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    with sqlite3.connect(path) as other:
        tables = [row[0] for row in other.execute("SELECT name FROM sqlite_master")]
    assert tables == ["invoices"]
