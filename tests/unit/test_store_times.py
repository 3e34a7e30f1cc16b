"""The store's one conversion of times (`store.times`): naive UTC stored, aware UTC read,
whatever the host's time zone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from store.tables import UTCDateTime
from store.times import aware_utc, naive_utc, utc_text

OFFSETS = st.integers(min_value=-12 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
INSTANTS = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=OFFSETS
)


@pytest.fixture
def vietnam_host() -> Iterator[None]:
    """The host's local time is Vietnam's (UTC+7), as a provincial server's may be."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Ho_Chi_Minh"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@given(INSTANTS)
def test_stored_and_read_back_is_the_same_instant(moment: datetime) -> None:
    stored = naive_utc(moment)
    assert stored.tzinfo is None
    assert aware_utc(stored) == moment
    assert aware_utc(stored).tzinfo is UTC
    assert aware_utc(utc_text(moment)) == moment  # SQLite's text, read back


@given(INSTANTS)
def test_the_text_is_sqlalchemys_form(moment: datetime) -> None:
    expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    assert utc_text(moment) == expected


@pytest.mark.usefixtures("vietnam_host")
@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()])
def test_a_naive_time_is_utc_on_a_host_in_another_zone(dialect: object) -> None:
    """Every path takes a naive time as UTC: the column type used to read it as the host's
    local time, seven hours off from the batch path's reading."""
    column = UTCDateTime()
    naive = datetime(2026, 12, 6, 8, 30)
    bound = column.process_bind_param(naive, dialect)  # type: ignore[arg-type]
    assert bound == naive
    assert utc_text(naive) == "2026-12-06 08:30:00.000000"
    aware = datetime(2026, 12, 6, 15, 30, tzinfo=timezone(timedelta(hours=7)))
    assert column.process_bind_param(aware, dialect) == naive  # type: ignore[arg-type]
    read = column.process_result_value(naive, dialect)  # type: ignore[arg-type]
    assert read == aware
