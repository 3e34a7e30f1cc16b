"""`lag` and `lag-exporter`'s --group and --topic: regular expressions matched in full; one
that does not compile is refused at start (exit 2). Before, `lag` ended in a traceback and
the exporter started, failed every poll and paged as blind."""

from __future__ import annotations

import pytest

from observability.kafka_lag import Filters
from schemas.errors import ConfigurationError


def test_patterns_match_whole_names() -> None:
    filters = Filters(group=r"portal-sync(-\d+)?", topic=r"prod\.changes\..*")
    assert filters.group_ok("portal-sync") and filters.group_ok("portal-sync-2")
    assert not filters.group_ok("portal-sync-reconciler")
    assert filters.topic_ok("prod.changes.citizen")
    assert not filters.topic_ok("staging.prod.changes.citizen")
    assert Filters().group_ok("anything")


@pytest.mark.parametrize(
    ("group", "topic", "flag"), [("(", None, "--group"), (None, "[a-", "--topic")]
)
def test_a_pattern_that_does_not_compile_is_refused(
    group: str | None, topic: str | None, flag: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"{flag}: not a regular expression"):
        Filters(group=group, topic=topic)
