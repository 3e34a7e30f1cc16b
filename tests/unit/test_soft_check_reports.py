"""The soft checks a committed batch failed: counted by entity and check, and logged a line
per check and partition that names the events by their offsets, never by what they hold."""

from __future__ import annotations

import json
import logging
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from consumers.checks import Checked
from consumers.processor import BatchProcessor, offset_spans
from schemas.validation import parse_event
from tests.support.pipeline_helpers import citizen_events
from transport.reader import Message


def test_offset_spans_joins_runs_in_order() -> None:
    assert offset_spans([]) == ""
    assert offset_spans([7]) == "7"
    assert offset_spans([12, 3, 4, 5, 9, 13, 4]) == "3-5,9,12-13"
    assert offset_spans(range(1000, 3000)) == "1000-2999"


@given(st.lists(st.integers(min_value=0, max_value=10**12), max_size=300))
def test_offset_spans_name_every_offset_once_in_runs_that_do_not_touch(offsets: list[int]) -> None:
    text = offset_spans(offsets)
    runs = [tuple(map(int, part.split("-"))) if "-" in part else (int(part),) * 2
            for part in text.split(",") if part]  # fmt: skip
    named = [n for first, last in runs for n in range(first, last + 1)]
    assert named == sorted(set(offsets))
    assert all(later[0] > earlier[1] + 1 for earlier, later in pairwise(runs))


def _counted(check: str) -> float:
    labels = {"entity": "citizen", "check": check}
    return REGISTRY.get_sample_value("portal_sync_soft_check_warnings_total", labels) or 0.0


def test_soft_checks_are_counted_per_event_and_logged_per_check_and_partition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = citizen_events(1, 1, seed=5)[0]
    parsed = parse_event(json.dumps(event).encode()).event
    key = event["key"]

    def checked(partition: int, offset: int, warnings: list[str]) -> Checked:
        return Checked(Message("t.citizen", partition, offset, b"{}"), parsed, warnings)

    warned = [
        checked(0, 10, ["personal_id_sex"]),
        checked(0, 11, ["personal_id_sex", "ward_code_not_of_province"]),
        checked(0, 12, ["personal_id_sex"]),
        checked(0, 15, ["personal_id_sex"]),
        checked(3, 4, ["personal_id_sex"]),
    ]
    before = _counted("personal_id_sex"), _counted("ward_code_not_of_province")
    with caplog.at_level(logging.INFO, logger="consumers.processor"):
        BatchProcessor._soft_checks(warned)
    after = _counted("personal_id_sex"), _counted("ward_code_not_of_province")
    assert (after[0] - before[0], after[1] - before[1]) == (5, 1)
    assert sorted(r.getMessage() for r in caplog.records) == [
        "soft check personal_id_sex failed for 1 event(s) at t.citizen:3, offsets 4",
        "soft check personal_id_sex failed for 4 event(s) at t.citizen:0, offsets 10-12,15",
        "soft check ward_code_not_of_province failed for 1 event(s) at t.citizen:0, offsets 11",
    ]
    assert not any(key in r.getMessage() for r in caplog.records)


def test_soft_checks_are_counted_when_info_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    parsed = parse_event(json.dumps(citizen_events(1, 1, seed=6)[0]).encode()).event
    warned = [
        Checked(Message("t.citizen", 1, n, b"{}"), parsed, ["personal_id_sex"]) for n in range(3)
    ]
    before = _counted("personal_id_sex")
    with caplog.at_level(logging.WARNING, logger="consumers.processor"):
        BatchProcessor._soft_checks(warned)
    assert _counted("personal_id_sex") - before == 3
    assert not caplog.records
