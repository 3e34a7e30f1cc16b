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


def test_the_bench_s_wards_are_wards_of_their_provinces_since_2025() -> None:
    """Three of its ten ward codes were no wards of their provinces in the 2025 list."""
    from vietnam_provinces import Province, ProvinceCode, Ward

    from bench.e2e import PROVINCES

    for _, code, wards, _ in PROVINCES:
        province = Province.from_code(ProvinceCode(int(code)))
        known = {f"{int(w.code):05d}" for w in Ward.iter_by_province(province.code)}
        assert set(wards) <= known, (code, set(wards) - known)
