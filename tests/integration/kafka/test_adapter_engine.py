"""The framework's side of the SDK on the real broker: error classes, checkpoint after ack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from producers.engine import AdapterRunner, RetryPolicy
from producers.sdk import (
    Checkpoint,
    ConfigurationError,
    FatalError,
    Item,
    Record,
    Reservation,
    RetriableError,
    State,
)
from producers.state import load_json_state, read_json_lines
from schemas import parse_event
from tests.integration.kafka.test_conformance import ListAdapter
from tests.support.adapter_helpers import published_events, read_topic, write_config
from tests.support.kafka_helpers import end_offsets, ensure_topics, publisher_for
from tests.support.pipeline_helpers import cli
from transport.local import free_port
from transport.publisher import Publisher

pytestmark = pytest.mark.kafka


def errors(source: str, kind: str) -> float:
    labels = {"source": source, "kind": kind}
    return REGISTRY.get_sample_value("portal_sync_source_errors_total", labels) or 0.0


def stopped_adapters(source: str) -> float:
    labels = {"source": source}
    return REGISTRY.get_sample_value("portal_sync_source_stopped", labels) or 0.0


@pytest.fixture
def publisher(settings_for: Any, sqlite_store_url: str) -> Iterator[Publisher]:
    settings = settings_for(sqlite_store_url)
    ensure_topics(settings)
    publisher = publisher_for(settings)
    publisher.settings = settings  # type: ignore[attr-defined]  # for reading the topics back
    yield publisher
    publisher.close()


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


class Flaky(ListAdapter):
    """Fails twice with a transient error, then works."""

    failures = 0

    def read(self, state: State) -> Iterator[Item]:
        if self.failures < 2:
            self.failures += 1
            raise RetriableError("connection reset")
        yield from super().read(state)


class DiesAfterTwo(ListAdapter):
    """Publishes two changes and a checkpoint, one more, then hits a fatal error."""

    def read(self, state: State) -> Iterator[Item]:
        if state:
            yield from super().read(state)
            return
        yield self.record(0)
        yield self.record(1)
        yield Checkpoint({"position": 2})
        yield self.record(2)
        raise FatalError("schema changed at the source")


def test_retriable_errors_are_retried_with_backoff(publisher: Publisher, tmp_path: Path) -> None:
    before = errors("province-01", "read_error")
    runner = AdapterRunner("flaky", Flaky(), publisher, tmp_path, RetryPolicy(3, 0.01))
    stats = runner.run_with_retries()
    assert stats.published == 4 and stats.checkpoints == 4
    assert errors("province-01", "read_error") - before == 2
    assert load_json_state(runner.state_path) == {"position": 4}


def test_an_adapter_s_own_errors_are_logged_by_message_without_long_numbers(
    publisher: Publisher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failed run logged its error's type only: an API's 503, a timeout and an answer
    that is not JSON all read "run failed (RetriableError)". An adapter's own errors carry
    no record values (docs/adapters.md); a long number is masked all the same."""

    class Answers503(Flaky):
        def read(self, state: State) -> Iterator[Item]:
            if self.failures < 2:
                self.failures += 1
                raise RetriableError("HTTP 503 from the API for ward 079305012345")
            yield from ListAdapter.read(self, state)

    runner = AdapterRunner("api", Answers503(), publisher, tmp_path, RetryPolicy(3, 0.01))
    with caplog.at_level("WARNING", logger="producers.engine"):
        runner.run_with_retries()
    said = [r.getMessage() for r in caplog.records if "run failed" in r.getMessage()]
    assert said == [
        f"api: run failed (RetriableError: HTTP 503 from the API for ward …), attempt {n}"
        for n in (1, 2)
    ]


def test_a_configuration_error_raised_while_reading_stops_the_source_at_once(
    publisher: Publisher, tmp_path: Path
) -> None:
    """A token the source refuses (HTTP 401) was retried as a transient error, five
    attempts a run and every run for ever. Retrying cannot mend it: the source stops as a
    fatal error stops it, its message logged."""

    class Refused401(ListAdapter):
        reads = 0

        def read(self, state: State) -> Iterator[Item]:
            self.reads += 1
            raise ConfigurationError("the API refused the token (HTTP 401): check `token`")
            yield from ()

    adapter = Refused401()
    before = errors("province-01", "read_error")
    runner = AdapterRunner("api", adapter, publisher, tmp_path, RetryPolicy(5, 0.01))
    with pytest.raises(FatalError, match=r"configuration: ConfigurationError: the API refused"):
        runner.run_with_retries()
    assert adapter.reads == 1 and errors("province-01", "read_error") == before


def test_every_attempt_of_a_run_is_counted(publisher: Publisher, tmp_path: Path) -> None:
    """`produce --once` printed the last attempt's count only: a run that published three
    events, failed, and was retried from its checkpoint said "published 1"; one that then
    stopped fatally said nothing of what it had published."""
    from producers.deployment import SourceEntry
    from producers.produce import ProduceResult, SourceGroup

    class FailsOnceAfterThree(ListAdapter):
        failed = False

        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                yield item
                if not self.failed and item == Checkpoint({"position": 3}):
                    self.failed = True
                    raise RetriableError("connection reset")

    runner = AdapterRunner("twice", FailsOnceAfterThree(), publisher, tmp_path,
                           RetryPolicy(3, 0.01), None, 0.0)  # fmt: skip
    stats = runner.run_with_retries()
    assert (stats.published, stats.checkpoints) == (3 + 1, 3 + 1)  # resumed at position 3

    class Dies(DiesAfterTwo):
        pass

    entry = SourceEntry.model_construct(id="dies", contract_source="province-01")
    result = ProduceResult()
    dying = AdapterRunner("dies", Dies(), publisher, tmp_path, RetryPolicy(1, 0.01))
    assert not SourceGroup._run(entry, dying, result, None)  # fatal: stops the source
    assert result.stats["dies"].published == 3 and result.failed == {"dies": 1}


def test_a_source_stopped_for_good_keeps_its_thread_so_the_producer_stays_healthy(
    publisher: Publisher, tmp_path: Path
) -> None:
    """Each source has its thread: one that stopped on a fatal error ended it, /healthz
    (every thread alive) went 503, and the liveness probe restarted the producer in a loop,
    interrupting the province's other sources. It stays stopped, and alerted on."""
    from producers.deployment import SourceEntry
    from producers.produce import ProduceResult, SourceGroup

    entry = SourceEntry.model_construct(id="dies", contract_source="province-01",
                                        interval_seconds=0.1)  # fmt: skip
    dying = AdapterRunner("dies", DiesAfterTwo(), publisher, tmp_path, RetryPolicy(1, 0.01))
    group, stop, result = SourceGroup("dies", [(entry, dying)]), threading.Event(), ProduceResult()
    result.threads = [threading.Thread(target=group.run, args=(stop, result), daemon=True)]
    result.threads[0].start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not result.failed:
            time.sleep(0.05)
        assert result.failed == {"dies": 1}
        time.sleep(0.5)
        assert result.healthy()
    finally:
        stop.set()
        result.threads[0].join(10)
    assert not result.threads[0].is_alive()


def test_a_producer_that_keeps_failing_still_reports_how_far_behind_it_is(
    publisher: Publisher, tmp_path: Path
) -> None:
    """PortalSyncSourceCursorBehind covers a producer that keeps failing: the cursor lag
    was measured after successful runs only, and kept its last value (often 0)."""

    class Failing(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            raise RetriableError("the publish path fails, the source still answers")
            yield  # a generator

        def cursor_lag_seconds(self, state: State) -> float | None:
            return 7 * 86400.0

    runner = AdapterRunner("failing", Failing(), publisher, tmp_path, RetryPolicy(2, 0.01))
    with pytest.raises(RetriableError):
        runner.run_with_retries()
    labels = {"source": Failing().source}
    assert REGISTRY.get_sample_value("portal_sync_source_cursor_lag_seconds", labels) == (
        7 * 86400.0
    )


def test_the_cursor_lag_is_measured_inside_a_long_run(
    publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first snapshot is one run of an hour: the lag was measured at its end only, so
    the panel an operator follows a first load on showed nothing while it ran."""
    import producers.engine as engine
    from producers.cursor_lag import CURSOR_LAG

    monkeypatch.setattr(engine, "CURSOR_LAG_INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(CURSOR_LAG, "_lags", {})  # not the other tests' adapters of the source
    measured: list[float] = []

    class Backfill(ListAdapter):
        def cursor_lag_seconds(self, state: State) -> float | None:
            left = len(self.changes) - int(state.get("position", 0))
            return left * 3600.0

        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                labels = {"source": self.source}
                value = REGISTRY.get_sample_value("portal_sync_source_cursor_lag_seconds", labels)
                if isinstance(item, Checkpoint) and value is not None:
                    measured.append(value)
                yield item

    runner = AdapterRunner("backfill", Backfill(), publisher, tmp_path, RetryPolicy(1, 0.01),
                           None, 0.0)  # fmt: skip
    runner.run_once()
    # each checkpoint saved (interval 0) measured it: 4 changes, 3 left after the first...
    assert measured[-3:] == [3 * 3600.0, 2 * 3600.0, 1 * 3600.0], measured
    labels = {"source": Backfill().source}
    assert REGISTRY.get_sample_value("portal_sync_source_cursor_lag_seconds", labels) == 0.0


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_state_is_saved_only_at_checkpoints_after_the_broker_acknowledged(
    publisher: Publisher, tmp_path: Path, interval: float
) -> None:
    seen_at_commit: list[tuple[State, int]] = []

    class Observed(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                if isinstance(item, Checkpoint):
                    item.commit = lambda: seen_at_commit.append(
                        (load_json_state(runner.state_path), len(events()))
                    )
                yield item

    def events() -> list[dict[str, Any]]:
        return published_events(publisher.settings, "citizen")

    runner = AdapterRunner(
        "observed", Observed(), publisher, tmp_path, checkpoint_interval=interval
    )
    assert runner.run_once().checkpoints == 4
    # at each commit the state is on disk and every event before it is in the topic: a
    # checkpoint with a clean-up is saved at once, however long the interval
    assert seen_at_commit == [({"position": n}, n) for n in range(1, 5)]


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_checkpoints_without_a_commit_are_saved_once_an_interval(
    publisher: Publisher, tmp_path: Path, interval: float
) -> None:
    on_disk: list[State] = []  # the state file as each record after a checkpoint is read

    class Watched(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                if isinstance(item, Record) and item.origin != "#0":
                    on_disk.append(load_json_state(runner.state_path))
                if isinstance(item, Checkpoint) and item.value() == {"position": 2}:
                    item.at_once = True  # saved before the next record is sent, always
                yield item

    runner = AdapterRunner("watched", Watched(), publisher, tmp_path, checkpoint_interval=interval)
    assert runner.run_once().checkpoints == 4
    if interval == 0:  # every checkpoint saved as it comes
        assert on_disk == [{"position": n} for n in range(1, 4)]
    else:  # none saved before the run's end, then the newest; one `at_once` saved at once
        assert on_disk == [{}, {"position": 2}, {"position": 2}]
    assert load_json_state(runner.state_path) == {"position": 4}
    assert len(published_events(publisher.settings, "citizen")) == 4


class Reserving(ListAdapter):
    """Journals each change's position before it is sent (a `Reservation`), checks that
    it is on disk when the record is sent, and fails once after the third change's
    journal line, before the checkpoint after it; the retry gets back what it journaled
    after the last checkpoint saved (`recover`)."""

    def __init__(self, journal: Path) -> None:
        super().__init__()
        self.journal = journal
        self.on_disk: list[list[Any]] = []
        self.recovered: list[tuple[State, list[Any]]] = []
        self.failed = False

    def recover(self, state: State, journal: list[Any]) -> State:
        self.recovered.append((state, journal))
        return state

    def read(self, state: State) -> Iterator[Item]:
        for position in range(int(state.get("position", 0)), len(self.changes)):
            yield Reservation({"position": position})
            self.on_disk.append(read_json_lines(self.journal))
            yield self.record(position)
            if position == 2 and not self.failed:
                self.failed = True
                raise RetriableError("the source's connection dropped")
            yield Checkpoint(self.next_state(position))


def test_a_reservation_is_on_disk_before_what_follows_is_sent_until_a_later_save(
    publisher: Publisher, tmp_path: Path
) -> None:
    journal = tmp_path / "reserving.journal.jsonl"
    adapter = Reserving(journal)
    killed_while_saving = tmp_path / "reserving.state.jsonq1w2e3r4.tmp"
    killed_while_saving.write_bytes(b'{"position"')
    runner = AdapterRunner(
        "reserving", adapter, publisher, tmp_path, RetryPolicy(2, 0.01), None, 3600.0
    )
    assert runner.journal_path == journal
    assert not killed_while_saving.exists()  # removed before the runner's first save
    runner.run_with_retries()
    # nothing saved before the failure (the interval): the journal kept every line; the
    # failed run saved position 2 on its way out, its third line was after that
    assert adapter.on_disk[:3] == [[{"position": n} for n in range(k + 1)] for k in range(3)]
    assert adapter.recovered == [
        ({}, []),
        ({"position": 2}, [{"position": n} for n in range(3)]),
    ]
    # the retry saved the state it recovered at once, in the journal's place
    assert adapter.on_disk[3] == [{"position": 2}]
    assert load_json_state(runner.state_path) == {"position": 4}
    assert not journal.exists()  # the last save came after every line


def test_a_journal_taken_in_is_saved_with_the_state_not_piled_up_by_failing_runs(
    publisher: Publisher, tmp_path: Path
) -> None:
    """Runs that fail before their first checkpoint (a broker away for a day, retried
    every minute) each added a page's line, and none was ever removed: the journal grew
    without bound, and each run read it all."""

    class FailsAtOnce(Reserving):
        def recover(self, state: State, journal: list[Any]) -> State:
            super().recover(state, journal)
            return state | {"reserved": len(journal)}  # as an adapter takes them in

        def read(self, state: State) -> Iterator[Item]:
            yield Reservation({"position": 0})
            raise RetriableError("the broker does not acknowledge")

    adapter = FailsAtOnce(tmp_path / "failing.journal.jsonl")
    runner = AdapterRunner("failing", adapter, publisher, tmp_path, RetryPolicy(1, 0.01))
    for _ in range(3):
        with pytest.raises(RetriableError):
            runner.run_once()
    # each run found the one line the run before left, never more
    assert [journal for _, journal in adapter.recovered] == [
        [],
        [{"position": 0}],
        [{"position": 0}],
    ]
    assert read_json_lines(runner.journal_path) == [{"position": 0}]
    assert load_json_state(runner.state_path) == {"reserved": 1}


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_fatal_error_stops_the_source_and_resumes_from_the_last_checkpoint(
    publisher: Publisher, tmp_path: Path, interval: float
) -> None:
    before = errors("province-01", "fatal")
    retry = RetryPolicy(3, 0.01)
    runner = AdapterRunner("dies", DiesAfterTwo(), publisher, tmp_path, retry, None, interval)
    stopped = stopped_adapters("province-01")
    with pytest.raises(FatalError):
        runner.run_with_retries()  # not retried
    runner.stop_fatally(FatalError("schema changed at the source"))
    assert errors("province-01", "fatal") - before == 1
    # stays up (and alerts) until produce restarts; counted once per adapter
    assert stopped_adapters("province-01") - stopped == 1
    runner.stop_fatally(FatalError("schema changed at the source"))
    assert stopped_adapters("province-01") - stopped == 1
    # saved as the run failed, when not before: the checkpoint reached is not lost
    assert load_json_state(runner.state_path) == {"position": 2}
    publisher.flush()
    first = published_events(publisher.settings, "citizen")
    assert len(first) == 3  # the third was sent, but not checkpointed

    runner.run_once()  # after the fix: from position 2, the third is sent again
    after = [e["event_id"] for e in published_events(publisher.settings, "citizen")]
    assert load_json_state(runner.state_path) == {"position": 4}
    (third,) = [e["event_id"] for e in first if e["version"] == 2 and e["key"] == "001090000001"]
    # five sends of four changes: the uncheckpointed one twice, with the same event id
    assert len(after) == 5 and len(set(after)) == 4 and after.count(third) == 2


CONFIG = """
[[sources]]
id = "hn-citizens"
source = "province-01"
adapter = "{adapter}"

[sources.connection]
url = "postgresql+psycopg://sync:${{HN_DB_PASSWORD}}@127.0.0.1:9/tthc"

[sources.mapping]
entity = "citizen"
table = "cong_dan"
key_column = "so_dinh_danh"
fields = {{ full_name = "ho_ten" }}
{extra}
"""


class Decomposed(ListAdapter):
    """One name as the source holds it in NFD (combining marks), one already in NFC."""

    changes = (
        ("001090000001", 1, {"full_name": unicodedata.normalize("NFD", "Nguyễn Văn Ân")}),
        ("001190000002", 1, {"full_name": "Trần Thị Bình"}),
    )


def test_the_bytes_sent_are_the_bytes_validated_and_nfc(
    publisher: Publisher, tmp_path: Path
) -> None:
    # Bytes that validate as they are go out unchanged (no second dump of the model);
    # others (here NFD) go out as the normalised model. Either way the worker's parse of
    # the wire bytes is the producer's.
    runner = AdapterRunner("nfd", Decomposed(), publisher, tmp_path)
    assert runner.run_once().published == 2
    settings = publisher.settings  # type: ignore[attr-defined]
    values = {
        json.loads(r.value)["key"]: r.value
        for r in read_topic(settings, settings.topics().change_topic("citizen"))
    }
    for value in values.values():
        text = value.decode()
        assert unicodedata.is_normalized("NFC", text) and "\\u" not in text
        assert parse_event(value).as_sent
    names = {key: json.loads(v)["data"]["full_name"] for key, v in values.items()}
    assert names == {"001090000001": "Nguyễn Văn Ân", "001190000002": "Trần Thị Bình"}


class Surrogates(ListAdapter):
    """Text with a lone surrogate (a file name or file read with `surrogateescape`), in a
    field and in a key, between two good records; one origin holds one too."""

    changes = (
        ("001090000001", 1, {"full_name": "Nguyễn Văn An"}),
        ("001190000002", 1, {"full_name": "Trần Thị B\udce9nh"}),
        ("00109000000\udc33", 1, {"full_name": "Lê Văn Cường"}),
        ("001190000004", 1, {"full_name": "Phạm Thị Dung"}),
    )

    def record(self, position: int) -> Record:
        record = super().record(position)
        return replace(record, origin=f"t\udcea-{position}") if position == 2 else record


def test_text_that_is_no_utf8_is_dead_lettered_and_the_source_goes_on(
    publisher: Publisher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = AdapterRunner("surrogates", Surrogates(), publisher, tmp_path)
    stats = runner.run_once()
    assert (stats.published, stats.dead_lettered) == (2, 2)
    assert load_json_state(tmp_path / "surrogates.state.json") == {"position": 4}
    from schemas.dead_letter import read_headers
    from tests.support.kafka_helpers import dead_letter_topic

    settings = publisher.settings  # type: ignore[attr-defined]
    letters = read_topic(settings, dead_letter_topic(settings))
    assert [read_headers(letter.headers)["ps.reason.code"] for letter in letters] == [
        "not_utf8",
        "not_utf8",
    ]
    assert [read_headers(letter.headers)["ps.origin.offset"] for letter in letters] == [
        "#1",
        "t\\udcea-2",
    ]
    assert [letter.key for letter in letters] == [b"citizen:001190000002:province-01", None]
    # The log names the origin as the header does: a handler writing UTF-8 can write it.
    assert "record t\\udcea-2 rejected" in caplog.text
    caplog.text.encode("utf-8")


class Unwritable(ListAdapter):
    """Values no JSON holds (bytes, a time of day, an infinite decimal, nesting deeper
    than the encoder goes) between two good records."""

    changes = (
        ("001090000001", 1, {"full_name": "Nguyễn Văn An"}),
        ("001190000002", 1, {"full_name": b"\x89PNG"}),
        ("001090000003", 1, {"full_name": dt_time(8, 30)}),
        ("001190000004", 1, {"full_name": Decimal("Infinity")}),
        ("001090000005", 1, {"full_name": _nested(100_000)}),
        ("001190000006", 1, {"full_name": "Phạm Thị Dung"}),
    )


def test_values_no_json_holds_are_dead_lettered_and_the_source_goes_on(
    publisher: Publisher, tmp_path: Path
) -> None:
    runner = AdapterRunner("unwritable", Unwritable(), publisher, tmp_path)
    stats = runner.run_once()
    assert (stats.published, stats.dead_lettered) == (2, 4)
    assert load_json_state(tmp_path / "unwritable.state.json") == {"position": 6}
    from schemas.dead_letter import read_headers
    from tests.support.kafka_helpers import dead_letter_topic

    settings = publisher.settings  # type: ignore[attr-defined]
    letters = [read_headers(letter.headers)
               for letter in read_topic(settings, dead_letter_topic(settings))]  # fmt: skip
    assert [h["ps.reason.code"] for h in letters] == ["unmappable_record"] * 4
    assert [h["ps.origin.offset"] for h in letters] == ["#1", "#2", "#3", "#4"]
    assert all("PNG" not in h["ps.reason.message"] for h in letters)
    published = {e["key"] for e in published_events(settings, "citizen")}
    assert published == {"001090000001", "001190000006"}


@pytest.mark.parametrize(
    ("adapter", "extra", "env", "message"),
    [
        ("sql", "", {}, "environment variable HN_DB_PASSWORD is not set"),
        ("sql", 'colour = "blue"', {"HN_DB_PASSWORD": "s3cr3t"}, "colour: Extra inputs"),
        ("sqll", "", {"HN_DB_PASSWORD": "s3cr3t"}, "no adapter named 'sqll' is installed"),
    ],
)
def test_configuration_errors_refuse_to_start_with_a_clear_message(
    tmp_path: Path,
    settings_for: Any,
    sqlite_store_url: str,
    adapter: str,
    extra: str,
    env: dict[str, str],
    message: str,
) -> None:
    settings = settings_for(sqlite_store_url)
    config = write_config(tmp_path, CONFIG.format(adapter=adapter, extra=extra))
    result = cli(settings, "produce", "--config", str(config), "--once", **env)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "s3cr3t" not in result.stdout + result.stderr
    assert not (tmp_path / "state").exists()


def test_show_config_masks_secrets_and_publishes_nothing(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """A look at the file: it went on to run the sources (publishing, moving their
    states), for ever without `--once`."""
    body = CONFIG.format(adapter="sql", extra="") + '\n[sources.mapping.extra]\napi_token = "t0k3n"'
    config = write_config(tmp_path, body.replace("${HN_DB_PASSWORD}", "literal-pw"))
    from producers.deployment import load_deployment

    text = load_deployment(config).redacted()
    assert "literal-pw" not in text and "t0k3n" not in text
    assert "sync:***@" in text and 'api_token = "***"' in text
    shown = cli(settings_for(sqlite_store_url), "produce", "--config", str(config),
                "--show-config", timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "sync:***@" in shown.stdout and "literal-pw" not in shown.stdout
    assert not (tmp_path / "state").exists()


def test_a_state_file_that_does_not_read_stops_the_source_naming_the_file(
    publisher: Publisher, tmp_path: Path
) -> None:
    """Cut short by a disk's damage: each run failed as a source's read error, retried for
    ever, and the log named neither the file nor what to do."""
    from producers.sdk import FatalError

    runner = AdapterRunner("cut", ListAdapter(), publisher, tmp_path)
    assert runner.run_once().published == 4
    state = tmp_path / "cut.state.json"
    state.write_bytes(state.read_bytes()[:-3])
    with pytest.raises(FatalError, match=f"the state file {state} is not a JSON object"):
        runner.run_once()


def test_dead_letter_of_a_skipped_record_names_reason_and_origin(
    publisher: Publisher, tmp_path: Path
) -> None:
    from producers.sdk import SkippableRecord

    class Skips(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            yield SkippableRecord("missing_field", "row has no key column", "cong_dan:7")
            yield Checkpoint({"position": 1})

    runner = AdapterRunner("skips", Skips(), publisher, tmp_path)
    assert runner.run_once().dead_lettered == 1
    from schemas.dead_letter import read_headers
    from tests.support.kafka_helpers import dead_letter_topic

    (letter,) = read_topic(publisher.settings, dead_letter_topic(publisher.settings))
    headers = read_headers(letter.headers)
    assert headers["ps.reason.code"] == "missing_field"
    assert headers["ps.origin.offset"] == "cong_dan:7"
    assert json.loads(letter.value) == {"origin": "cong_dan:7"}


def test_produce_runs_on_its_schedule_serves_metrics_and_stops_on_sigterm(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = write_config(
        tmp_path, FILES.replace("interval_seconds = 30", "interval_seconds = 0.2")
    )
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "portal_sync",
            "produce",
            "-c",
            str(config),
            "--metrics-port",
            str(port),
        ],
        env=os.environ | settings.as_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # running and polling an empty directory
        (inbox / "a.jsonl").write_text(json.dumps(ROW) + "\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (inbox / "done" / "a.jsonl").exists():
            time.sleep(0.2)
        assert (inbox / "done" / "a.jsonl").exists()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert (
            'portal_sync_produced_events_total{entity="citizen",source="province-02"} 1.0'
            in body.decode()
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "files: published 1, dead-lettered 0" in stderr
    assert len(published_events(settings, "citizen")) == 1


FILES = """
[[sources]]
id = "files"
source = "province-02"
adapter = "filedrop"
interval_seconds = 30

[sources.connection]
directory = "inbox"

[sources.mapping]
entity = "citizen"
key_field = "pid"
occurred_at_field = "at"
fields = { full_name = "name" }
"""
ROW = {"pid": "001090000001", "name": "Nguyễn Văn An", "at": "2025-08-01T08:00:00+07:00"}


def test_a_commit_that_fails_ends_the_run_once_and_is_not_run_again(
    publisher: Publisher, tmp_path: Path
) -> None:
    calls: list[State] = []

    def refused() -> None:
        calls.append(load_json_state(runner.state_path))
        raise PermissionError("clean-up refused")

    class CleanUpRefused(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                if isinstance(item, Checkpoint):
                    item.commit = refused
                yield item

    runner = AdapterRunner(
        "refused", CleanUpRefused(), publisher, tmp_path, checkpoint_interval=3600
    )
    with pytest.raises(PermissionError):
        runner.run_once()
    # saved, cleaned up once (refused), and the run stopped there: not saved or run again
    assert calls == [{"position": 1}]


@pytest.mark.parametrize("after", ["checkpoint", "record"])
def test_a_stop_ends_a_run_at_the_next_item_with_what_was_reached_saved(
    publisher: Publisher, tmp_path: Path, after: str
) -> None:
    """A SIGTERM (the stop event) during a long run: the run ended only when the source
    had nothing more to read (a first snapshot: hours). Now it ends at the next item, saves
    the checkpoints it reached once acknowledged (the next item itself when it is one: all
    before it was sent), and the next run goes on from there."""
    stop = threading.Event()

    class Long(ListAdapter):
        changes = tuple((f"0010900{n:05d}", 1, {"full_name": "Lê Thị Hoa"}) for n in range(12))

        def read(self, state: State) -> Iterator[Item]:
            for item in super().read(state):
                yield item
                if after == "checkpoint" and isinstance(item, Checkpoint):
                    if item.state == {"position": 5}:
                        stop.set()  # the signal arrives while the run goes on
                elif after == "record" and isinstance(item, Record) and item.origin == "#5":
                    stop.set()  # the next item is the checkpoint after it

    runner = AdapterRunner("long", Long(), publisher, tmp_path, checkpoint_interval=3600.0)
    stats = runner.run_once(stop)
    sent = 5 if after == "checkpoint" else 6
    assert stats.published == sent
    assert load_json_state(runner.state_path) == {"position": sent}
    assert runner.run_once().published == 12 - sent
    keys = sorted(e["key"] for e in published_events(publisher.settings, "citizen"))
    assert keys == sorted(key for key, _, _ in Long.changes)


def test_produce_once_stopped_by_ctrl_c_ends_early_and_says_it_is_not_complete(
    tmp_path: Path, settings_for: Any, sqlite_store_url: str
) -> None:
    """`produce --once` interrupted: it ended where it was (the file's checkpoint, at its
    end, not reached: the file stays for the next pass) and exits 130, not 0, so that a
    script does not take the pass for a complete one."""
    settings = settings_for(sqlite_store_url)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lines = (json.dumps(ROW | {"pid": f"0010900{n:05d}"}) for n in range(100_000))
    (inbox / "a.jsonl").write_text("\n".join(lines) + "\n")
    config = write_config(
        tmp_path, FILES.replace('directory = "inbox"', 'directory = "inbox"\nsettle_seconds = 0')
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "portal_sync", "produce", "-c", str(config), "--once",
         "--metrics-port", "0"],
        env=os.environ | settings.as_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not sum(end_offsets(settings).values()):
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out + err
    assert "stopped before the pass was complete" in err, out + err
    assert (inbox / "a.jsonl").exists() and not (inbox / "done" / "a.jsonl").exists()
    assert 0 < sum(end_offsets(settings).values()) < 100_000


def test_a_journal_an_adapter_cannot_take_back_stops_the_source(
    publisher: Publisher, tmp_path: Path
) -> None:
    """A plug-in that yields reservations but keeps `Adapter.recover` as it is would have
    had its journal dropped unread after a crash: the source stops instead, saying so."""

    class Forgetful(ListAdapter):
        def read(self, state: State) -> Iterator[Item]:
            yield Reservation({"position": 0})
            yield from super().read(state)

    runner = AdapterRunner("forgetful", Forgetful(), publisher, tmp_path)
    runner.journal_path.write_text('{"position": 0}\n')  # a run that died after sending
    with pytest.raises(FatalError, match="does not take them back in"):
        runner.run_once()
    assert read_json_lines(runner.journal_path) == [{"position": 0}]  # kept
