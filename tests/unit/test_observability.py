"""Unit and property tests of the observability pieces: lag math, the status window,
freshness and cursor-lag collectors, series removal, and the probes' HTTP server."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumers.freshness import Freshness, SourceFreshness
from consumers.loop import Liveness
from consumers.reconciler import BatchReport, EventOutcome
from observability.exporter import LagCollector, poll
from observability.http import serve
from observability.kafka_lag import GroupLag, PartitionLag
from observability.lag import (
    Sample,
    Status,
    Window,
    format_age,
    group_status,
    lag_seconds,
    partition_status,
    stale,
)
from producers.cursor_lag import CursorLag, cursor_lag


def window_of(samples: list[tuple[float, int, int]], seconds: float = 60.0) -> Window:
    window = Window(seconds)
    for at, committed, end in samples:
        window.push(Sample(at, committed, end))
    return window


# -- lag seconds --------------------------------------------------------------------------
def test_lag_seconds_is_the_age_of_the_oldest_unapplied_message() -> None:
    assert lag_seconds(1000.0, 5, 990_000) == 10.0
    assert lag_seconds(1000.0, 0, 990_000) == 0.0
    assert lag_seconds(1000.0, 5, None) is None


@given(
    now=st.floats(0, 2e9),
    later=st.floats(0, 1e6),
    lag=st.integers(1, 10**9),
    ts=st.integers(0, 2 * 10**12),
)
def test_lag_seconds_never_negative_and_keeps_rising_while_nothing_moves(
    now: float, later: float, lag: int, ts: int
) -> None:
    first = lag_seconds(now, lag, ts)
    second = lag_seconds(now + later, lag, ts)
    assert first is not None and second is not None
    assert 0.0 <= first <= second


# -- status window ------------------------------------------------------------------------
def test_window_keeps_the_sample_at_its_start_so_a_full_window_spans_it() -> None:
    window = window_of([(t, 0, 1) for t in range(0, 200, 10)], seconds=60)
    assert window.samples[0].at == 130 and window.samples[-1].at == 190
    assert window.full
    assert not window_of([(0, 0, 1), (30, 0, 1)], seconds=60).full


def test_stopped_group_with_lag_is_stop_at_once() -> None:
    assert partition_status(window_of([(0, 5, 9)]), has_members=False) is Status.STOP


def test_member_that_does_not_move_over_a_full_window_is_stall() -> None:
    window = window_of([(t, 5, 9 + t) for t in range(0, 70, 10)])
    assert partition_status(window, has_members=True) is Status.STALL


def test_moving_consumer_whose_lag_grows_every_step_is_warn() -> None:
    window = window_of([(t, t, 2 * t + 1) for t in range(0, 70, 10)])
    assert partition_status(window, has_members=True) is Status.WARN


def test_consumer_that_keeps_up_is_ok_and_a_short_window_is_not_enough_to_judge() -> None:
    keeping_up = window_of([(t, t, t + 3) for t in range(0, 70, 10)])
    assert partition_status(keeping_up, has_members=True) is Status.OK
    short = window_of([(0, 5, 9), (10, 5, 9)])
    assert partition_status(short, has_members=True) is Status.OK


def test_group_without_members_whose_offset_still_moves_is_not_stop() -> None:
    """Consumers that commit without joining a group (assign()) are not reported stopped."""
    window = window_of([(0, 5, 20), (10, 8, 20)])
    assert partition_status(window, has_members=False) is not Status.STOP


samples = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=20).map(
    lambda pairs: [(float(10 * i), c, c + d) for i, (c, d) in enumerate(pairs)]
)


@given(samples, st.booleans(), st.integers(1, 10**9), st.integers(0, 10**9))
def test_a_position_past_the_log_end_is_stop_whatever_came_before(
    points: list[tuple[float, int, int]], members: bool, past: int, end: int
) -> None:
    """A topic created again, or a cluster restored: the committed offset (the store's)
    is a position in another log. The worker refuses to go on there, so nothing consumes
    this log, though its lag reads 0."""
    at = points[-1][0]
    window = window_of([*points, (at + 1, end + past, end)])
    assert window.samples[-1].lag == 0
    assert partition_status(window, members) is Status.STOP


@given(samples, st.booleans())
def test_caught_up_now_is_always_ok(points: list[tuple[float, int, int]], members: bool) -> None:
    at, committed, _ = points[-1]
    window = window_of([*points, (at + 1, committed, committed)])
    assert partition_status(window, members) is Status.OK


@given(samples)
def test_a_window_that_touched_zero_lag_is_never_warn_or_stall(
    points: list[tuple[float, int, int]],
) -> None:
    window = window_of(points)
    if any(s.lag == 0 for s in window.samples):
        assert partition_status(window, has_members=True) is Status.OK


@given(st.lists(st.sampled_from(list(Status))))
def test_group_status_is_the_worst_partition(statuses: list[Status]) -> None:
    worst = group_status(statuses)
    assert all(worst >= s for s in statuses)
    assert worst in statuses or (not statuses and worst is Status.OK)


def test_stale_and_ages() -> None:
    assert stale(now=4000, last_change=1000, stale_after=1800)
    assert not stale(now=2000, last_change=1000, stale_after=1800)
    assert [format_age(s) for s in (0.25, 42, 425, 11520, 190000)] == [
        "250ms",
        "42s",
        "7m05s",
        "3h12m",
        "2d04h",
    ]


# -- collectors: values and series removal ------------------------------------------------
def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_lag_collector_exports_the_snapshot_and_drops_gone_groups() -> None:
    registry = CollectorRegistry()
    collector = LagCollector()
    registry.register(collector)
    stopped = PartitionLag("g1", "t", 0, 5, 9, 12.5, Status.STOP)
    collector.update([GroupLag("g1", 0, "Empty", [stopped])])
    values = scrape(registry)
    labels = (("group", "g1"), ("partition", "0"), ("topic", "t"))
    assert values[("portal_sync_consumer_lag_messages", labels)] == 4
    assert values[("portal_sync_consumer_lag_seconds", labels)] == 12.5
    assert values[("portal_sync_consumer_status", (("group", "g1"),))] == 3

    collector.update([GroupLag("g2", 1, "Stable", [])])

    assert set(scrape(registry)) == {
        ("portal_sync_consumer_status", (("group", "g2"),)),
        ("portal_sync_lag_exporter_last_success_timestamp_seconds", ()),
    }


def test_a_failed_poll_is_tried_again_at_once_and_drops_the_snapshot_only_if_that_fails() -> None:
    registry = CollectorRegistry()
    collector = LagCollector()
    registry.register(collector)
    old = GroupLag("g1", 1, "Stable", [PartitionLag("g1", "t", 0, 5, 9, 1.0, Status.OK)])
    new = GroupLag("g1", 1, "Stable", [PartitionLag("g1", "t", 0, 7, 9, 0.5, Status.OK)])
    collector.update([old])
    labels = (("group", "g1"), ("partition", "0"), ("topic", "t"))
    outcomes: list[Exception | list[GroupLag]] = [TimeoutError("offsets"), [new]]

    def read() -> list[GroupLag]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert poll(read, collector)
    assert scrape(registry)[("portal_sync_consumer_lag_messages", labels)] == 2
    assert not outcomes

    last = ("portal_sync_lag_exporter_last_success_timestamp_seconds", ())
    succeeded = scrape(registry)[last]
    assert succeeded == collector.last_success > 0
    outcomes[:] = [TimeoutError("offsets"), ConnectionError("node 3")]
    beats: list[int] = []  # /healthz's heartbeat: each attempt may take its whole timeout
    assert not poll(read, collector, beat=lambda: beats.append(len(outcomes)))
    assert not outcomes and beats == [2, 1]
    assert not any(name == "portal_sync_consumer_lag_messages" for name, _ in scrape(registry))
    assert scrape(registry)[last] == succeeded  # the blind exporter still says since when


def test_before_its_first_poll_reads_the_exporter_is_blind_since_its_start() -> None:
    """Not since 1970: the blind alert's text would say 56 years, for an exporter started a
    minute ago whose brokers do not answer yet."""
    registry = CollectorRegistry()
    before = time.time()
    collector = LagCollector()
    registry.register(collector)

    def unanswered() -> list[GroupLag]:
        raise TimeoutError("offsets")

    assert not poll(unanswered, collector)
    last = ("portal_sync_lag_exporter_last_success_timestamp_seconds", ())
    assert before <= scrape(registry)[last] <= time.time()
    assert collector.last_success is None  # what /readyz reads: not ready before a poll


def test_freshness_advances_with_applied_events_only() -> None:
    freshness = SourceFreshness()
    freshness.seed({"province-01": Freshness("province-01", 100.0, 200.0)})
    at = datetime(2025, 8, 1, 8, tzinfo=UTC)
    report = BatchReport(
        outcomes=[
            EventOutcome("province-01", "citizen", "applied", at),
            EventOutcome("province-01", "citizen", "applied", at - timedelta(hours=1)),
            EventOutcome("ministry-btp", "citizen", "duplicate", at),
        ],
        committed_at=at + timedelta(seconds=3),
    )
    assert report.committed_at is not None
    freshness.record(report.applied(), report.committed_at)
    registry = CollectorRegistry()
    registry.register(freshness)
    values = scrape(registry)
    source = (("source", "province-01"),)
    assert values[("portal_sync_source_last_change_timestamp_seconds", source)] == at.timestamp()
    assert values[("portal_sync_source_last_applied_timestamp_seconds", source)] == (
        at.timestamp() + 3
    )
    assert not any(labels == (("source", "ministry-btp"),) for _, labels in values)


def test_registered_sources_are_exported_beside_the_freshness_of_those_that_delivered() -> None:
    freshness = SourceFreshness()
    freshness.seed(
        {"province-01": Freshness("province-01", 100.0, 200.0)},
        ["province-79", "province-01", "province-79"],
    )
    registry = CollectorRegistry()
    registry.register(freshness)
    values = scrape(registry)
    registered = {
        dict(labels)["source"] for name, labels in values if name == "portal_sync_source_registered"
    }
    changed = {
        dict(labels)["source"]
        for name, labels in values
        if name == "portal_sync_source_last_change_timestamp_seconds"
    }
    assert registered == {"province-01", "province-79"}
    assert registered - changed == {"province-79"}  # what PortalSyncSourceNeverDelivered sees
    freshness.seed({})  # development mode: nothing registered, nothing expected
    assert not any(name == "portal_sync_source_registered" for name, _ in scrape(registry))


def test_cursor_lag_is_the_distance_to_the_newest_change_worst_adapter_per_source() -> None:
    newest = datetime(2025, 8, 1, 9, 0, 30)
    assert cursor_lag(newest, None, "2025-08-01T09:00:00.000000") == 30.0
    assert cursor_lag(newest, datetime(2025, 8, 1, 8), None) == 3630.0
    assert cursor_lag(None, None, None) == 0.0
    collector = CursorLag()
    collector.set("province-01", "citizen", 4.0)
    collector.set("province-01", "dossier", 9.0)
    registry = CollectorRegistry()
    registry.register(collector)
    assert scrape(registry) == {
        ("portal_sync_source_cursor_lag_seconds", (("source", "province-01"),)): 9.0
    }


# -- probes ---------------------------------------------------------------------------------
def status_of(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as error:
        return error.code


def test_probes_follow_readiness_and_the_heartbeat() -> None:
    liveness = Liveness(beat_timeout=0.5)
    registry = CollectorRegistry()
    server = serve(0, healthy=liveness.healthy, ready=liveness.ready, registry=registry)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert status_of(f"{base}/healthz") == 200
        assert status_of(f"{base}/readyz") == 503
        liveness.set_ready()
        assert status_of(f"{base}/readyz") == 200
        assert status_of(f"{base}/metrics") == 200
        assert status_of(f"{base}/nope") == 404
        import time

        time.sleep(0.6)  # no beat: the loop is stuck
        assert status_of(f"{base}/healthz") == 503
        assert status_of(f"{base}/readyz") == 503
    finally:
        server.shutdown()


def test_lag_view_says_how_many_partitions_it_could_not_read() -> None:
    from rich.console import Console

    from observability.table import lag_view

    groups = [GroupLag("g", 2, "Stable", [PartitionLag("g", "t", 0, 5, 9, 1.5)])]
    console = Console(width=200, record=True)
    console.print(lag_view(groups, {}, 0.0, 1800.0))
    whole = console.export_text()
    assert "not shown" not in whole and "group g: Stable, 2 members" in whole
    console.print(lag_view(groups, {}, 0.0, 1800.0, unread=4))
    assert "4 partitions not shown: their leader does not answer" in console.export_text()
    # A store it could not read (a wrong URL or password) showed an empty freshness table,
    # as a store with no source yet does, without a word.
    console.print(lag_view(groups, {}, 0.0, 1800.0, freshness_unread="StoreUnavailable"))
    assert "source freshness not read from the store (StoreUnavailable)" in console.export_text()


def test_every_section_a_runbook_names_is_a_heading_of_its_document() -> None:
    """A runbook read at night names a section, a heading or a paragraph's bold lead:
    `docs/security.md, "A compromised province"`. One named a heading that did not
    exist."""
    import re

    from observability.alerts import rules

    root = Path(__file__).resolve().parents[2]
    named = [
        (doc, section)
        for rule in rules()
        for doc, section in re.findall(r'(docs/[\w./-]+\.md), "([^"]+)"', rule.runbook)
    ]
    assert named, "no runbook names a section: the pattern is out of date"
    for doc, section in named:
        headings = [
            line.lstrip("#*").strip().lower()
            for line in (root / doc).read_text(encoding="utf-8").splitlines()
            if line.startswith(("#", "**"))
        ]
        assert any(section.lower() in h for h in headings), (doc, section)


def test_runbook_links_can_be_absolute(tmp_path: Path) -> None:
    """A page's `runbook_url` relative to the repository opens nowhere: `--runbook-base`
    writes absolute ones."""
    import yaml

    from observability.deploy import cli

    cli(["--alerts-only", "--runbook-base", "https://git.example/p/blob/main/", str(tmp_path)])
    rules = yaml.safe_load((tmp_path / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["annotations"]["runbook_url"] for r in rules} == {
        f"https://git.example/p/blob/main/docs/metrics.md#runbook-{r['alert'].lower()}"
        for r in rules
    }


def test_every_registered_writer_s_series_is_exported_at_zero_from_the_start() -> None:
    """A series born at its first batch holds that batch in its first sample, which
    `increase()` never counts: after each worker start the first late batch of a source
    was missed by the sync-lag alert (a review against a real Prometheus)."""
    from prometheus_client import REGISTRY

    from consumers.metrics import seed_series
    from consumers.registry import EntityRules, Registry, SourceInfo

    national = SourceInfo(kind="national", name="x", entities=("citizen",))
    province = SourceInfo(kind="province", name="y", agency_codes=("000.00.01.H26",))
    registry = Registry(
        {"national-seed": national, "province-seed": province},
        Path("registry.toml"),
        entity_rules={"organization": EntityRules(kinds=("national",))},
    )
    writers = registry.writers()
    assert ("national-seed", "citizen") in writers and ("province-seed", "dossier") in writers
    assert ("national-seed", "dossier") not in writers  # not its entities
    assert ("province-seed", "organization") not in writers  # not its kind's
    assert Registry().writers() == []  # development mode: none known
    seed_series(writers, 60.0)
    for source, entity in writers:
        labels = {"source": source, "entity": entity}
        assert REGISTRY.get_sample_value("portal_sync_sync_lag_seconds_count", labels) == 0
        for outcome in ("applied", "duplicate", "stale"):
            value = REGISTRY.get_sample_value(
                "portal_sync_events_total", labels | {"outcome": outcome}
            )
            assert value is not None
    unseeded = {"source": "national-seed", "entity": "dossier"}
    assert REGISTRY.get_sample_value("portal_sync_sync_lag_seconds_count", unseeded) is None
