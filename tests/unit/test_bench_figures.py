"""How scripts/bench turns samples into figures: nearest-rank p99, medians, the suite's wall
time read from a flake run's JSON, and ratios to an earlier run."""

from __future__ import annotations

import json

import pytest

from harness.bench import percentile, ratios, suite_from_flake, summarize


def test_p99_is_nearest_rank_and_only_from_20_samples():
    samples = [float(n) for n in range(1, 101)]  # 1..100: the 99th smallest is 99
    assert percentile(samples, 0.99) == 99.0
    assert summarize(samples, "s").p99 == 99.0
    assert summarize(samples[:19], "s").p99 is None


def test_suite_wall_time_from_flake_runs(tmp_path):
    flake = tmp_path / "flake.json"
    flake.write_text(json.dumps({"runs": [{"run": 1, "status": 0, "seconds": 300.0},
                                          {"run": 2, "status": 0, "seconds": 280.0},
                                          {"run": 3, "status": 1, "seconds": 410.0}], "tests": {}}))
    figure = suite_from_flake(flake)
    assert (figure.value, figure.unit, figure.n) == (300.0, "s", 3)


def test_suite_from_a_file_without_runs_says_so(tmp_path):
    flake = tmp_path / "flake.json"
    flake.write_text(json.dumps({"tests": {}}))
    with pytest.raises(ValueError, match="no runs"):
        suite_from_flake(flake)


def test_ratios_compare_what_both_runs_have():
    current = {"boot": {"value": 3.0, "median": 3.0}, "new": {"value": 1.0}}
    previous = {"boot": {"value": 2.0, "median": 1.5}, "old": {"value": 1.0}}
    assert ratios(current, previous) == {"boot": {"value": 1.5, "median": 2.0}}
