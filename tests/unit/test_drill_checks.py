"""The broker drill's verdict on the metrics it sampled (bench/faults.py `drill_checks`)."""

from __future__ import annotations

from bench.faults import Sample, drill_checks


def sample(at: float, phase: str, lag: float | None) -> Sample:
    return Sample(at, phase, "123", 0, 0, {}, 0.0, lag, None, None, 200)


def run(down: list[float | None], back: list[float | None]) -> list[Sample]:
    phases = [("steady", [5.0, 0.0]), ("1: node 2 down", down), ("1: node 2 back", back)]
    phases.append(("drain", [0.0]))
    samples, at = [], 0.0
    for phase, lags in phases:
        for lag in lags:
            samples.append(sample(at, phase, lag))
            at += 1
    return samples


def test_a_drill_whose_exporter_answered_throughout_passes() -> None:
    assert drill_checks(run([None, 3.0], [None, 0.0])) == []


def test_no_lag_while_a_node_is_down_is_a_problem() -> None:
    assert drill_checks(run([None, None], [0.0])) == [
        "the lag exporter reports no lag while '1: node 2 down'"
    ]


def test_no_lag_at_the_end_of_a_restart_is_a_problem() -> None:
    assert drill_checks(run([1.0], [0.0, None])) == [
        "the lag exporter reports no lag at the end of '1: node 2 back'"
    ]
