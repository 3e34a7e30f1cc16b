"""The steady bench's search for the highest rate that keeps the lag's p99 within its
bound (`bench.e2e.highest_rate`): what it reports passed twice, and a rate that passes
once and then fails (a noisy shared machine) does not end the search with nothing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.e2e import highest_rate


class Machine:
    """Rates up to `limit` pass, except the trials `flaky` names (by their order)."""

    def __init__(self, limit: int, flaky: frozenset[int] = frozenset()) -> None:
        self.limit, self.flaky = limit, flaky
        self.trials: list[tuple[int, bool]] = []

    def __call__(self, rate: int) -> bool:
        ok = rate <= self.limit and len(self.trials) not in self.flaky
        self.trials.append((rate, ok))
        return ok


def test_a_steady_machine_gets_the_highest_rate_it_keeps_within_the_bisection_s_step() -> None:
    machine = Machine(limit=5_000)
    best = highest_rate(machine, first=500)
    assert best is not None and 4_500 <= best <= 5_000
    assert [rate for rate, _ in machine.trials][:5] == [500, 1_000, 2_000, 4_000, 8_000]


def test_a_rate_that_fails_its_second_trial_gives_way_to_the_next_one_below() -> None:
    # 1,000 2,000 4,000 8,000 (fails) 6,000 (fails) 5,000 5,500 (fails): 5,000 passed, its
    # second trial (the eighth) fails, and 4,000 is tried again
    machine = Machine(limit=5_300, flaky=frozenset({7}))
    assert highest_rate(machine, first=1_000) == 4_000
    assert [rate for rate, _ in machine.trials[:7]] == [1_000, 2_000, 4_000, 8_000, 6_000,
                                                        5_000, 5_500]  # fmt: skip
    assert machine.trials[7:] == [(5_000, False), (4_000, True)]


def test_nothing_passing_twice_is_none() -> None:
    assert highest_rate(Machine(limit=100), first=500) is None


@given(
    limit=st.integers(min_value=0, max_value=50_000),
    first=st.integers(min_value=250, max_value=4_000),
    flaky=st.frozensets(st.integers(min_value=0, max_value=20), max_size=4),
)
def test_what_is_reported_passed_twice_and_nothing_higher_did(
    limit: int, first: int, flaky: frozenset[int]
) -> None:
    machine = Machine(limit, flaky)
    best = highest_rate(machine, first)
    passes = [rate for rate, ok in machine.trials if ok]
    if best is None:
        assert all(passes.count(rate) < 2 for rate in passes)
    else:
        assert passes.count(best) >= 2  # passed twice
        assert best <= limit
        # no rate above it passed twice
        assert not any(rate > best and passes.count(rate) >= 2 for rate in passes)
    assert len(machine.trials) <= 7 + 7  # the search, then one more trial per passing rate
