"""The file a producer keeps the dead letters in that its cluster does not let it write
(`<state_dir>/<entry id>.dead-letters.jsonl`), read back by `portal-sync dlq import`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producers.state import append_json_line
from schemas.dead_letter import letter_from_line, letter_line

maybe_bytes = st.none() | st.binary(max_size=64)
headers = st.lists(st.tuples(st.text(max_size=12), st.binary(max_size=32)), max_size=6)


@given(maybe_bytes, maybe_bytes, headers)
def test_a_kept_letter_reads_back_byte_for_byte(
    key: bytes | None, value: bytes | None, kept: list[tuple[str, bytes]]
) -> None:
    line = json.loads(json.dumps(letter_line(key, value, kept), ensure_ascii=False))
    assert letter_from_line(line) == (key, value, kept)


@pytest.mark.parametrize(
    "line",
    [{}, {"key": None, "value": "not base64!", "headers": []}, {"key": 1, "value": None}],
)
def test_a_line_that_is_no_kept_letter_is_refused(line: dict[str, object]) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        letter_from_line(line)


def test_letters_are_appended_durably_to_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "hcm.dead-letters.jsonl"
    append_json_line(path, letter_line(b"k", b"{}", [("ps.reason.code", b"invalid_json")]))
    append_json_line(path, letter_line(None, "Nguyễn".encode(), []))
    assert path.stat().st_mode & 0o777 == 0o600
    lines = [letter_from_line(json.loads(line)) for line in path.read_text().splitlines()]
    assert lines == [
        (b"k", b"{}", [("ps.reason.code", b"invalid_json")]),
        (None, "Nguyễn".encode(), []),
    ]


def _producers_letter(**extra: bytes) -> dict[str, object]:
    from schemas.dead_letter import dead_letter_headers

    headers = dead_letter_headers("invalid_json", "payload is not JSON", "source:province-79",
                                  "hcm-outbox", "portal_sync_outbox:7")  # fmt: skip
    return letter_line(b"k", b"{", [*headers, *extra.items()])


def test_only_letters_a_producer_keeps_are_imported() -> None:
    from portal_sync.ops.dlq import NotKept, _kept_letter

    assert _kept_letter(_producers_letter())[1] == b"{"
    forged = _producers_letter(**{"ps.sig": b"c2ln"})
    with pytest.raises(NotKept, match="signature"):
        _kept_letter(forged)
    line = _producers_letter()
    line["headers"] = [
        [name, value if name != "ps.origin.topic" else "cG9ydGFsLXN5bmMuY2hhbmdlcy5jaXRpemVu"]
        for name, value in line["headers"]  # type: ignore[attr-defined]
    ]  # ps.origin.topic = portal-sync.changes.citizen: a redrive would send it there
    with pytest.raises(NotKept, match="no source"):
        _kept_letter(line)
    line["headers"] = [h for h in line["headers"] if h[0] != "ps.failed_at"]  # type: ignore[attr-defined]
    with pytest.raises(NotKept, match="missing"):
        _kept_letter(line)


def test_a_line_torn_by_a_crash_stays_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "hcm.dead-letters.jsonl"
    path.write_bytes(b'{"key": null, "val')  # the crash
    append_json_line(path, _producers_letter())
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == '{"key": null, "val'
    assert letter_from_line(json.loads(lines[1]))[1] == b"{"


def _kept(collector: object) -> dict[str, float]:
    from producers.metrics import KeptDeadLetters

    assert isinstance(collector, KeptDeadLetters)
    [family] = collector.collect()
    return {s.labels["source"]: s.value for s in family.samples}


def test_the_gauge_counts_the_letters_waiting_in_each_sources_files(tmp_path: Path) -> None:
    """Missing: 0; each letter appended counts; a torn line counts once its line ends; the
    file renamed aside for its import counts 0, and the new one from its start; the files of
    a source's adapters add up."""
    from producers.metrics import KeptDeadLetters

    gauge = KeptDeadLetters()
    cits, docs = (
        tmp_path / "hcm-citizens.dead-letters.jsonl",
        tmp_path / "hcm-docs.dead-letters.jsonl",
    )
    gauge.watch("province-79", cits)
    gauge.watch("province-79", docs)
    gauge.watch("province-01", tmp_path / "hn.dead-letters.jsonl")
    assert _kept(gauge) == {"province-01": 0, "province-79": 0}
    letter = letter_line(b"k", b"{}", [("ps.reason.code", b"invalid_json")])
    append_json_line(cits, letter)
    append_json_line(cits, letter)
    assert _kept(gauge)["province-79"] == 2
    with cits.open("ab") as handle:  # a crash in the middle of a line
        handle.write(b'{"key": ')
    assert _kept(gauge)["province-79"] == 2
    append_json_line(cits, letter)  # ends the torn line, then its own
    append_json_line(docs, letter)
    assert _kept(gauge)["province-79"] == 5
    cits.rename(tmp_path / "importing.jsonl")
    assert _kept(gauge)["province-79"] == 1
    append_json_line(cits, letter)
    assert _kept(gauge) == {"province-01": 0, "province-79": 2}
    # cut where it is and written again past its old size: counted again from its start
    size_before = cits.stat().st_size
    with cits.open("r+b") as handle:
        handle.truncate(0)
    for _ in range(4):  # shorter lines: as many bytes as before hold more of them
        append_json_line(cits, letter_line(None, b"", []))
    assert cits.stat().st_size > size_before
    assert _kept(gauge)["province-79"] == 5
    # replaced by a file of the same size but other lines: counted again from its start
    size = cits.stat().st_size
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"\n" * size)
    replacement.replace(cits)
    assert _kept(gauge)["province-79"] == size + 1


def test_a_kept_file_cut_and_written_again_with_the_same_first_bytes_is_counted_anew(
    tmp_path: Path,
) -> None:
    """Letters of one table's messages can share their first hundreds of bytes."""
    from producers.metrics import KeptDeadLetters

    gauge = KeptDeadLetters()
    path = tmp_path / "p79-citizens.dead-letters.jsonl"
    gauge.watch("province-79", path)
    common = b'{"schema": {"type": "struct", "fields": [' + b'{"field": "ho_ten"},' * 30
    for end in (b"1]}}", b"2]}}", b"3]}}"):
        append_json_line(path, letter_line(None, common + end, []))
    assert _kept(gauge) == {"province-79": 3}
    with path.open("r+b") as handle:
        handle.truncate(0)
    append_json_line(path, letter_line(None, common + b"x" * 3000 + b"]}}", []))  # longer
    assert _kept(gauge) == {"province-79": 1}


def test_an_entry_starting_never_waits_for_a_scrape_that_counts(tmp_path: Path) -> None:
    """A scrape reading a slow file (a large one the first time, or a slow disk: here a
    pipe no one writes to yet) does not hold up an adapter entry that starts meanwhile."""
    import os
    import threading

    from producers.metrics import KeptDeadLetters

    gauge = KeptDeadLetters()
    slow = tmp_path / "slow.dead-letters.jsonl"
    os.mkfifo(slow)
    gauge.watch("province-79", slow)
    counts: list[dict[str, float]] = []
    scrape = threading.Thread(target=lambda: counts.append(_kept(gauge)), daemon=True)
    scrape.start()
    scrape.join(0.3)
    assert scrape.is_alive()  # blocked in the read

    watched = threading.Thread(
        target=gauge.watch, args=("province-01", tmp_path / "hn.jsonl"), daemon=True
    )
    watched.start()
    watched.join(5)
    unblocked = not watched.is_alive()
    with slow.open("wb"):  # the slow file answers: the scrape ends
        pass
    scrape.join(5)
    assert unblocked
    assert counts == [{"province-79": 0}]  # a pipe has no size: nothing counted in it
    slow.unlink()
    slow.write_bytes(b"{}\n")
    assert _kept(gauge) == {"province-01": 0, "province-79": 1}


Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


@given(maybe_bytes, maybe_bytes, headers, maybe_bytes, maybe_bytes, headers)
def test_two_letters_share_a_digest_only_when_the_topic_would_hold_them_the_same(
    key: bytes | None,
    value: bytes | None,
    kept: list[tuple[str, bytes]],
    other_key: bytes | None,
    other_value: bytes | None,
    other_kept: list[tuple[str, bytes]],
) -> None:
    """`dlq import` sends a letter only when the topic holds no letter of the same digest:
    equal digests for the same record as published (no key and no value is published with
    an empty value), different ones for any other (lengths keep the parts apart)."""
    from portal_sync.ops.dlq import letter_digest

    def published(letter: Letter) -> Letter:
        k, v, h = letter
        return (k, b"" if k is None and v is None else v, h)

    one: Letter = (key, value, kept)
    two: Letter = (other_key, other_value, other_kept)
    assert (letter_digest(*one) == letter_digest(*two)) == (published(one) == published(two))
    assert letter_digest(*one) == letter_digest(*published(one))


def test_a_digest_tells_where_the_bytes_belong() -> None:
    from portal_sync.ops.dlq import letter_digest

    assert letter_digest(b"ab", b"c", []) != letter_digest(b"a", b"bc", [])
    assert letter_digest(None, b"x", []) != letter_digest(b"", b"x", [])
    assert letter_digest(b"k", None, []) != letter_digest(b"k", b"", [])
    a, b = ("ps.a", b"1"), ("ps.b", b"2")
    assert letter_digest(b"k", b"v", [a, b]) != letter_digest(b"k", b"v", [b, a])
    assert letter_digest(b"k", b"v", [("ps.a1", b"")]) != letter_digest(b"k", b"v", [a])


class _Topic:
    """The dead-letter topic as `import_letters` reads and writes it (no broker): what it
    holds, and what was sent to it."""

    def __init__(self, held: list[Letter], retention_ms: int | None = None) -> None:
        self.held = held
        self.retention_ms = retention_ms
        self.sent: list[Letter] = []
        self.reads = 0

    def reader(self, *_: object, **__: object) -> Any:
        from transport.message import Message

        topic = self

        class Reader:
            def __enter__(self) -> Reader:
                topic.reads += 1
                return self

            def __exit__(self, *_: object) -> None:
                pass

            def resolve(self, selection: object) -> list[object]:
                return []

            def read(self, ranges: object) -> Iterator[list[Message]]:
                yield [
                    Message("portal-sync.dead-letters", 0, offset, value, key, 0, tuple(headers))
                    for offset, (key, value, headers) in enumerate(topic.held)
                ]

        return Reader()

    def publisher(self, *_: object, **__: object) -> Any:
        topic = self

        class Publisher:
            def send_dead_letter(self, key: Any, value: Any, headers: Any) -> None:
                topic.sent.append((key, value, list(headers)))

            def flush(self) -> int:
                return len(topic.sent)

            def close(self) -> None:
                pass

        return Publisher()


def _import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, topic: _Topic,
            lines: list[dict[str, object]]) -> Any:  # fmt: skip
    from portal_sync.ops import dlq
    from portal_sync.settings import Settings

    monkeypatch.setattr(dlq, "RangeReader", topic.reader)
    monkeypatch.setattr(dlq, "Publisher", topic.publisher)
    monkeypatch.setattr(dlq, "_retention_ms", lambda _: topic.retention_ms)
    path = tmp_path / "hcm.dead-letters.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return dlq.import_letters(Settings(kafka_bootstrap="127.0.0.1:1"), path)


def test_an_import_sends_each_letter_once_whatever_the_topic_and_the_file_hold_already(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = (_producers_letter(**{"x-n": str(n).encode()}) for n in range(3))
    as_sent = [letter_from_line(line) for line in (first, second, third)]
    # The topic holds the first (an earlier import) and, from a change topic, a letter of
    # the same bytes as the second: only a producer's letter (origin source:) counts.
    key, value, headers = as_sent[1]
    from_a_change_topic = (key, value, [(n, b"portal-sync.changes.citizen" if n ==
                           "ps.origin.topic" else v) for n, v in headers])  # fmt: skip
    topic = _Topic([as_sent[0], from_a_change_topic])
    summary = _import(tmp_path, monkeypatch, topic, [first, second, second, third])
    assert topic.sent == as_sent[1:]
    assert (summary.imported, summary.present, summary.repeated) == (2, 1, 1)

    topic.held.extend(topic.sent)  # run again: nothing left to send
    topic.sent = []
    summary = _import(tmp_path, monkeypatch, topic, [first, second, second, third])
    assert topic.sent == []
    assert (summary.imported, summary.present, summary.repeated) == (0, 3, 1)


def test_a_letter_older_than_the_topics_retention_is_not_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imported 90 days ago and since removed by the topic's retention, it would be sent
    again, and its record kept another 90 days, for ever if the file stays."""
    from datetime import UTC, datetime, timedelta

    def failed(days: float) -> dict[str, object]:
        at = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds")
        line = _producers_letter(**{"x-days": str(days).encode()})
        line["headers"] = [
            [name, base64.b64encode(at.encode()).decode() if name == "ps.failed_at" else value]
            for name, value in line["headers"]  # type: ignore[attr-defined]
        ]
        return line

    lines = [failed(0), failed(89.9), failed(90.1), failed(400)]
    topic = _Topic([], retention_ms=90 * 86_400_000)
    summary = _import(tmp_path, monkeypatch, topic, lines)
    assert topic.sent == [letter_from_line(line) for line in lines[:2]]
    assert (summary.imported, summary.expired, summary.repeated) == (2, 2, 0)

    forever = _Topic([], retention_ms=None)  # retention.ms = -1
    assert _import(tmp_path, monkeypatch, forever, lines).imported == 4


def test_an_empty_file_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = _Topic([])
    summary = _import(tmp_path, monkeypatch, topic, [])
    assert (summary.imported, topic.reads, topic.sent) == (0, 0, [])


def test_a_header_name_the_client_cannot_send_refuses_the_file_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from schemas.errors import Refused

    line = _producers_letter()
    line["headers"] = [*cast(list[list[str]], line["headers"]), ["x-\ud800", ""]]
    topic = _Topic([])
    with pytest.raises(Refused, match="line 2: a header's name is not UTF-8"):
        _import(tmp_path, monkeypatch, topic, [_producers_letter(), line])
    assert topic.sent == []
