"""The times the operators' commands take (`--since`, `--until`, `--to-time`): RFC 3339
with an offset, or an age. Python's `fromisoformat` takes any character between date and
time, so the suggestion once given for a date alone, `2025-08-01+07:00`, read as 07:00
without an offset, and with another `+07:00` as 07:00 of Vietnam: seven hours off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import typer

from portal_sync.cli.options import parse_time

VN = timezone(timedelta(hours=7))


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2025-08-01T00:00:00+07:00", datetime(2025, 8, 1, tzinfo=VN)),
        ("2025-08-01 08:30Z", datetime(2025, 8, 1, 8, 30, tzinfo=UTC)),
        ("2025-08-01t08:30:05.25-01:00", datetime(2025, 8, 1, 9, 30, 5, 250000, tzinfo=UTC)),
        ("2025-08-01t08:00:00z", datetime(2025, 8, 1, 8, tzinfo=UTC)),
        # nanoseconds (Go's RFC3339Nano, `kubectl logs --timestamps`, `date --rfc-3339=ns`)
        ("2025-08-01T08:00:00.123456789Z", datetime(2025, 8, 1, 8, 0, 0, 123456, tzinfo=UTC)),
        ("2025-08-01 08:00:00.123456789+07:00", datetime(2025, 8, 1, 1, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_times(text: str, moment: datetime) -> None:
    assert parse_time(text) == moment


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("2025-08-01", "write e.g. 2025-08-01T00:00:00+07:00 (Vietnam) or 2025-08-01T00:00:00Z"),
        ("2025-08-01T08:00", "write e.g. 2025-08-01T08:00+07:00 (Vietnam) or 2025-08-01T08:00Z"),
        ("2025-08-01+07:00", "not a time"),  # was 07:00, offset-less
        ("2025-08-01+07:00+07:00", "not a time"),  # was 07:00 of Vietnam, not midnight
        ("2025-08-01x08:00+07:00", "not a time"),
        ("2025-08-01Z", "not a time"),
        ("2025-02-30T00:00Z", "not a time"),
        ("yesterday", "not a time"),
        # Kafka's times count ms from 1970: the client refused with a traceback
        ("1970-01-01T00:00:00+07:00", "is before 1970-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00Z", "is before 1970-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "is past the year 9998"),
        ("9999-12-31T23:00:00-05:00", "is past the year 9998"),  # past the calendar in UTC
        ("0001-01-01T00:00:00+07:00", "is before 1970-01-01T00:00:00Z"),
        ("99999999999d", "reaches before 1970-01-01T00:00:00Z"),
        ("30000d", "is before 1970-01-01T00:00:00Z"),
    ],
)
def test_everything_else_is_refused_with_a_form_that_reads(text: str, said: str) -> None:
    with pytest.raises(typer.BadParameter, match=said.replace("+", r"\+").replace("(", r"\(")
                       .replace(")", r"\)")) as refused:  # fmt: skip
        parse_time(text)
    suggested = str(refused.value).partition("write e.g. ")[2].split(" ")[0]
    if suggested:  # the form it suggests reads as the midnight or the time asked
        assert parse_time(suggested) is not None


def test_ages() -> None:
    before = datetime.now(UTC)
    moment = parse_time("90m")
    after = datetime.now(UTC)
    assert moment is not None
    assert before - timedelta(minutes=90) <= moment <= after - timedelta(minutes=90)
