"""The end-to-end bench's own gate on its stores: a throughput run whose stores differ
(views, history, provenance, conflicts: what the records' check does not see) fails."""

from __future__ import annotations

from bench.e2e import Result, digests_agree


def result(label: str, digest: str | None, ok: bool = True) -> Result:
    return Result(label, 100, 1.0, 1.0, None, ok, "", digest=digest)


def test_stores_of_one_run_must_hold_the_same_content() -> None:
    assert digests_agree([result("postgresql", "aaa"), result("sqlite", "aaa")])
    assert not digests_agree([result("postgresql", "aaa"), result("sqlite", "bbb")])
    # `--digest`: a one-worker run's, against a run with more workers
    assert digests_agree([result("postgresql x2", "aaa")], expected="aaa")
    assert not digests_agree([result("postgresql x2", "aaa")], expected="bbb")
    # a run that failed its own check has no digest: it fails on its own
    assert digests_agree([result("postgresql", None, ok=False)])
