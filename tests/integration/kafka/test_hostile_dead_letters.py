"""The `dlq` tools and `lag` survive any message an attacker or a broken client puts where
they read (real broker): every letter is listed with what could not be read of it, nothing
from the data reaches the terminal as markup or escape sequences, re-drive goes on."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text

from schemas.dead_letter import dead_letter_headers
from store.core import Store
from store.tables import source_freshness, source_views
from tests.support.kafka_helpers import (
    change_topic,
    commit_group_offsets,
    dead_letter_topic,
    end_offsets,
    ensure_topics,
    publisher_for,
)
from tests.support.pipeline_helpers import cli
from transport import admin

pytestmark = pytest.mark.kafka

MARKUP_SOURCE = "[/]x[link=https://evil.example]y[/link]"
# Raw bytes, as an attacker writes them: a hyperlink, clear-screen, clipboard write (OSC 52),
# a C1 control, a bidi override, around a legitimate Vietnamese name.
TERMINAL_ATTACK = (
    b'{"source": "province-01", "full_name": "\x1b]8;;https://evil.example\x1b\\click'
    b"\x1b]8;;\x1b\\ \x1b[2J \x1b]52;c;cm0gLXJmIH4=\x07 \xc2\x9b31m "
    + '\u202egnp.exe Nguyễn Thị Bích"}'.encode()
)


# A letter's value that reads as an event of its letter's key (`EVENT_KEY`): only such a
# letter is re-driven; every other one is published under `citizen:1`.
EVENT = {"source": "province-01", "entity": "citizen", "key": "1", "version": 1}
EVENT_KEY = b"citizen:1:province-01"


def _headers(settings: Any, changes: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    """Headers as portal-sync writes them, some replaced."""
    headers = dict(dead_letter_headers("invalid_field", "data.full_name: pattern",
                                       change_topic(settings, "citizen"), 0, 5))  # fmt: skip
    return list((headers | (changes or {})).items())


def _hostile_letters(settings: Any) -> dict[str, tuple[bytes | None, list[tuple[str, bytes]]]]:
    """Each kind of letter the tools must survive, by name, in the order published."""
    deep = b'{"source": "province-01", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    event = json.dumps(EVENT).encode()
    return {
        "deep": (deep, _headers(settings)),
        "bad time": (event, _headers(settings, {"ps.failed_at": b"yesterday"})),
        "binary": (
            b"\xff\xfe\x00\x1b[2J\x9b",
            _headers(settings, {"ps.reason.code": b"\xff\x1b[31m"}),
        ),
        "no headers": (event, []),
        "bad numbers": (
            event,
            _headers(
                settings,
                {"ps.attempt": b"two", "ps.origin.partition": b"p", "ps.origin.offset": b"-"},
            ),
        ),
        "array": (b"[1, 2, 3]", _headers(settings)),
        "scalar": (b'"province-01"', _headers(settings)),
        "markup source": (json.dumps({"source": MARKUP_SOURCE}).encode(), _headers(settings)),
        "terminal attack": (TERMINAL_ATTACK, _headers(settings)),
        "elsewhere": (event, _headers(settings, {"ps.origin.topic": b"not-a-change-topic"})),
        "good": (event, _headers(settings)),
    }


@pytest.fixture
def hostile(settings_for: Any, sqlite_store_url: str) -> Any:
    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    publisher = publisher_for(settings)
    for value, headers in _hostile_letters(settings).values():
        key = EVENT_KEY if value == json.dumps(EVENT).encode() else b"citizen:1"
        publisher.send(dead_letter_topic(settings), key, value, headers)
    publisher.flush()
    publisher.close()
    store = Store(settings.store_url)  # as a worker leaves it: the commands never create it
    store.create_schema()
    store.close()
    return settings


def run(settings: Any, *args: str, color: bool = False) -> Any:
    """The command line, wide, with Rich's colours on or off whatever the environment."""
    return cli(settings, *args, COLUMNS="400", TTY_COMPATIBLE="1" if color else "0",
               FORCE_COLOR="1" if color else "")  # fmt: skip


def _ids(settings: Any) -> dict[str, str]:
    return {name: f"0:{index}" for index, name in enumerate(_hostile_letters(settings))}


def test_dlq_list_lists_every_letter_and_what_could_not_be_read(hostile: Any) -> None:
    result = run(hostile, "dlq", "list")

    assert result.returncode == 0, result.stderr  # was: RecursionError, ValueError, MarkupError
    out = result.stdout
    assert "\x1b" not in out and "\x9b" not in out
    assert f"dead letters ({len(_ids(hostile))})" in out
    for letter_id in _ids(hostile).values():
        assert f"│ {letter_id} " in out
    for problem in (
        "value: nested over 1024 levels", "ps.failed_at: not a time", "value: not UTF-8",
        "ps.reason.code: not UTF-8", "ps.reason.code: missing", "ps.failed_at: missing",
        "ps.attempt: not an integer", "ps.origin.partition: not an integer",
        "value: JSON array, not an object", "value: JSON string, not an object",
    ):  # fmt: skip
        assert problem in out, problem
    assert "evil.example" not in out  # not a source id: never shown (nor interpreted)
    assert "\\xff\\x1b[31m" in out  # the binary reason code, visible
    # deep, bad time, binary, no headers, bad numbers, array, scalar, terminal attack (raw
    # control characters in a JSON string: not JSON)
    assert "8 with parts that could not be read" in out


def test_dlq_list_filters_still_work(hostile: Any) -> None:
    # bad time, no headers, bad numbers, elsewhere, good: a source id that can be read
    result = run(hostile, "dlq", "list", "--source", "province-01")
    assert result.returncode == 0, result.stderr
    assert "dead letters (5)" in result.stdout
    # A source that is no source id is never shown, nor matched.
    markup = run(hostile, "dlq", "list", "--source", MARKUP_SOURCE)
    assert markup.returncode == 0 and "dead letters (0)" in markup.stdout, markup.stderr


def test_dlq_show_reveal_prints_escapes_never_raw_controls(hostile: Any) -> None:
    ids = _ids(hostile)
    attack = run(hostile, "dlq", "show", ids["terminal attack"], "--reveal", "--reason", "test")

    assert attack.returncode == 0, attack.stderr
    out = attack.stdout
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in out, repr(raw)
    assert "\\x1b]8;;https://evil.example\\x1b\\click" in out
    assert "\\x1b[2J" in out and "\\x1b]52;c;cm0gLXJmIH4=\\x07" in out
    assert "\\x9b31m" in out and "\\u202egnp.exe" in out
    assert "Nguyễn Thị Bích" in out  # legitimate text intact

    for name, problem in [("deep", "value: nested over 1024 levels"),
                          ("bad time", "ps.failed_at: not a time"),
                          ("binary", "value: not UTF-8")]:  # fmt: skip
        shown = run(hostile, "dlq", "show", ids[name], "--reveal", "--reason", "test")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert problem in next(line for line in lines if line.startswith("unreadable: "))
        assert "\x1b" not in shown.stdout
    binary = run(hostile, "dlq", "show", ids["binary"], "--reveal", "--reason", "test").stdout
    assert "\\xff\\xfe\\x00\\x1b[2J\\x9b" in binary  # each byte that is not UTF-8


def test_dlq_redrive_re_drives_what_it_can_and_goes_on(hostile: Any) -> None:
    ids = _ids(hostile)
    before = sum(end_offsets(hostile).values())

    result = run(hostile, "dlq", "redrive", *ids.values())

    # It goes on past the letters that cannot go back, and, as they were named by their
    # IDs, says so by its exit code.
    assert result.returncode == 1, result.stderr
    said = " ".join(result.stdout.split())
    assert f"selected {len(ids)}: " in said, said
    # An event of its key, from a change topic: bad time, bad numbers, good, three letters
    # of one event: sent once, the others superseded by it. No origin (no headers),
    # another topic, or a value that is no event of the letter's key: not re-drivable.
    assert "re-driven 1, already re-driven 0" in said, said
    assert "or not an event of its key) 8" in said and "newer one) 2" in said, said
    assert sum(end_offsets(hostile).values()) == before + 1
    again = run(hostile, "dlq", "redrive", *ids.values())  # all three recorded: none again
    said = " ".join(again.stdout.split())
    assert again.returncode == 1 and "re-driven 0, already re-driven 3" in said, said
    assert sum(end_offsets(hostile).values()) == before + 1


def test_dlq_redrive_sends_each_letter_before_it_reads_the_next(hostile: Any) -> None:
    """A broad selection is never held: each letter is published and recorded as it is
    read from the topic."""
    from portal_sync.ops.dlq import iter_dead_letters, redrive

    store = Store(hostile.store_url)
    store.create_schema()
    recorded_when_read: list[int] = []
    topic = dead_letter_topic(hostile)
    topic_id = admin.topic_ids(hostile.connection(), [topic])[topic]

    def letters() -> Any:
        for letter in iter_dead_letters(hostile):
            recorded_when_read.append(len(store.redriven(topic, topic_id)))
            yield letter

    try:
        summary = redrive(hostile, store, letters())
    finally:
        store.close()
    assert (summary.selected, summary.redriven, summary.not_redrivable) == (11, 1, 8)
    assert summary.superseded == 2  # bad numbers and good: the same event as bad time
    # deep not re-driven, bad time re-driven (recorded before binary is read), binary and
    # no headers not, bad numbers superseded by the letter this run sent (and recorded
    # as part of its redrive before array is read), ...
    assert recorded_when_read[:6] == [0, 0, 1, 1, 1, 2]


def test_two_redrives_at_once_send_a_letter_once(
    hostile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second operator's redrive read the list of redriven letters before the first
    recorded anything: it used to send the letter again, then stop on the store's refusal
    of a second row for it (exit 1, its other letters left)."""
    from portal_sync.ops.dlq import iter_dead_letters, redrive

    store = Store(hostile.store_url)
    store.create_schema()
    before = sum(end_offsets(hostile).values())
    try:
        first = redrive(hostile, store, iter_dead_letters(hostile))
        # As if begun before the first sent anything: the list of redriven letters read
        # then, the worker caught up then.
        monkeypatch.setattr(store, "redriven", lambda *_: {})
        monkeypatch.setattr("portal_sync.ops.dlq.CaughtUp.__call__", lambda *_: True)
        second = redrive(hostile, store, iter_dead_letters(hostile))
    finally:
        store.close()
    assert (first.redriven, first.superseded, second.redriven) == (1, 2, 0)
    assert second.already_redriven == 3  # the one sent and the two it superseded
    assert sum(end_offsets(hostile).values()) == before + 1


def test_dlq_redrive_sends_back_only_an_event_of_the_letters_key(
    settings_for: Any, sqlite_store_url: str
) -> None:
    """Anything else sent back under a letter's key becomes that key's last message on a
    compacted change topic (an empty value a tombstone): the log cleaner would remove the
    key's valid events, which a rebuild then lacks. Such letters are not re-drivable."""
    from portal_sync.ops.dlq import iter_dead_letters, redrive
    from schemas.validation import MAX_EVENT_BYTES

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    event = json.dumps(EVENT).encode()
    reference = json.dumps({"value_omitted": "too_large", "size": 3_000_000}).encode()
    other = json.dumps(EVENT | {"key": "2"}).encode()
    dossier = json.dumps(EVENT | {"entity": "dossier"}).encode()
    huge = json.dumps(EVENT | {"data": {"note": "x" * MAX_EVENT_BYTES}}).encode()
    letters = {
        "empty": (EVENT_KEY, None),
        "not UTF-8": (EVENT_KEY, b"\xff\xfe"),
        "reference": (EVENT_KEY, reference),
        "version as text": (EVENT_KEY, json.dumps(EVENT | {"version": "1"}).encode()),
        "another record's key": (EVENT_KEY, other),
        "no key": (None, event),
        "another entity's topic": (b"dossier:1:province-01", dossier),
        "over the contract's size": (EVENT_KEY, huge),
        "good": (EVENT_KEY, event),
    }
    publisher = publisher_for(settings)
    for key, value in letters.values():
        publisher.send(dead_letter_topic(settings), key, value, _headers(settings))
    publisher.flush()
    publisher.close()
    before = end_offsets(settings)
    store = Store(settings.store_url)
    store.create_schema()
    try:
        summary = redrive(settings, store, iter_dead_letters(settings))
    finally:
        store.close()
    assert (summary.selected, summary.redriven, summary.not_redrivable) == (len(letters), 1, 8)
    after = end_offsets(settings)
    assert sum(after.values()) == sum(before.values()) + 1
    assert after[(change_topic(settings, "citizen"), 0)] == 1
    # Named by its ID, a letter that cannot go back is no success (it exited 0).
    named = cli(settings, "dlq", "redrive", "0:0", "--store", settings.store_url)
    assert named.returncode == 1, named.stdout + named.stderr
    assert "not re-drivable (rejected at a source" in " ".join(named.stdout.split())


def test_lag_prints_group_and_source_names_as_text(hostile: Any) -> None:
    group = f"{hostile.topic_prefix}-[/]evil[link=https://evil.example]x[/link]"
    topic = change_topic(hostile, "citizen")
    commit_group_offsets(hostile, group, {(topic, 0): 0})
    store = Store(hostile.store_url)
    store.create_schema()
    now = datetime.now(UTC)
    with store.write_transaction() as conn:  # as a batch writes them
        conn.execute(insert(source_views).values(
            entity="citizen", key="001090012345", source="[/]\x1b[2Jsource", version=1,
            event_id="00000000-0000-0000-0000-000000000000", occurred_at=now, deleted=False,
            data={}, applied_at=now,
        ))  # fmt: skip
        conn.execute(insert(source_freshness).values(
            source="[/]\x1b[2Jsource", topic=topic, partition=0, last_change=now,
            last_applied=now,
        ))  # fmt: skip
    store.close()

    result = run(hostile, "lag", "--topic", f"{hostile.topic_prefix}.*")

    assert result.returncode == 0, result.stderr  # was: MarkupError
    assert "\x1b" not in result.stdout
    assert group in result.stdout
    assert "[/]\\x1b[2Jsource" in result.stdout
    colored = run(hostile, "lag", "--topic", f"{hostile.topic_prefix}.*", color=True)
    assert colored.returncode == 0, colored.stderr
    assert "\x1b]8;" not in colored.stdout and "\x1b[2J" not in colored.stdout


@pytest.mark.parametrize("recorded", ["with the topic's id", "without an id"])
def test_a_letter_of_a_dead_letter_topic_created_again_is_not_taken_as_re_driven(
    settings_for: Any, sqlite_store_url: str, recorded: str
) -> None:
    """The dead-letter topic deleted and created again numbers its letters from 0 again:
    a new letter at a place an earlier topic's letter was re-driven from is still sent.
    A redrive recorded without the topic's id (before migration 0014) still stands for the
    letter it re-drove, which failed well before it, and not for one that failed after it
    (nor for one that failed within the clocks' allowed skew of it: sent again, at worst a
    duplicate)."""
    from portal_sync.ops.dlq import iter_dead_letters, redrive

    settings = settings_for(sqlite_store_url, change_partitions=1)
    ensure_topics(settings)
    store = Store(settings.store_url)
    store.create_schema()

    def one_letter(version: int, failed: datetime | None = None) -> Any:
        publisher = publisher_for(settings)
        value = json.dumps(EVENT | {"version": version}).encode()
        at = {"ps.failed_at": failed.isoformat().encode()} if failed else None
        publisher.send(dead_letter_topic(settings), EVENT_KEY, value, _headers(settings, at))
        publisher.flush()
        publisher.close()
        return redrive(settings, store, iter_dead_letters(settings))

    try:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        assert one_letter(1, failed=an_hour_ago).redriven == 1
        if recorded == "without an id":
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE dead_letter_redrives SET topic_id = ''"))
        again = redrive(settings, store, iter_dead_letters(settings))
        assert (again.selected, again.redriven, again.already_redriven) == (1, 0, 1)
        with admin.cluster(settings.connection()) as cluster:
            cluster.delete_topics([dead_letter_topic(settings)])
        deadline = time.monotonic() + 60
        while True:  # the deletion completes in the background
            try:
                ensure_topics(settings)
                with admin.cluster(settings.connection()) as cluster:
                    ends = cluster.end_offsets([(dead_letter_topic(settings), 0)])
                if ends.get((dead_letter_topic(settings), 0)) == 0:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "the dead-letter topic was not created again"
            time.sleep(0.5)
        # The re-driven event applied, as a worker would have: its partition caught up.
        store.reset_offsets(end_offsets(settings), "test", "the re-driven event applied")
        again = one_letter(2)  # at 0:0 again
        assert (again.selected, again.redriven, again.already_redriven) == (1, 1, 0)
        assert sum(end_offsets(settings).values()) == 2
    finally:
        store.close()
