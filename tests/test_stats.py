"""Percentiles, summaries and bootstrap intervals on synthetic latencies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echo_env.measure.stats import (
    DiffCI,
    LatencySummary,
    RatioCI,
    bootstrap_diff_ci,
    bootstrap_ratio_ci,
    percentiles,
    summarize,
    throughput,
)


def lognormal(median: float, n: int, seed: int, sigma: float = 0.2) -> list[float]:
    """Latency-like samples whose true median is ``median``."""
    return np.random.default_rng(seed).lognormal(math.log(median), sigma, n).tolist()


# --------------------------------------------------------------------------------------
# percentiles, summarize, throughput
# --------------------------------------------------------------------------------------


def test_percentiles_interpolate_linearly() -> None:
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50.5, "p90": pytest.approx(90.1), "p99": pytest.approx(99.01)}


def test_percentile_keys_follow_qs() -> None:
    assert set(percentiles([1.0, 2.0], qs=(0, 99.9, 100))) == {"p0", "p99.9", "p100"}
    assert percentiles([1.0, 2.0], qs=(0, 100)) == {"p0": 1.0, "p100": 2.0}


def test_percentiles_of_nothing_are_none() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


@pytest.mark.parametrize("q", [-1, 101])
def test_percentiles_reject_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentiles([1.0], qs=(q,))


def test_summarize() -> None:
    s = summarize([0.3, 0.1, 0.2])
    assert s.count == 3
    assert s.mean == pytest.approx(0.2)
    assert s.p50 == pytest.approx(0.2)
    assert (s.min, s.max) == (0.1, 0.3)
    assert s.p90 is not None and s.p99 is not None and s.p50 <= s.p90 <= s.p99 <= s.max  # type: ignore[operator]
    assert s.as_dict()["count"] == 3


def test_summarize_single_and_empty() -> None:
    assert summarize([0.5]) == LatencySummary(count=1, mean=0.5, p50=0.5, p90=0.5, p99=0.5, min=0.5, max=0.5)
    empty = summarize([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None and empty.max is None


def test_throughput() -> None:
    assert throughput(34, 3.4) == pytest.approx(10.0)
    assert throughput(0, 2.0) == 0.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        assert throughput(10, bad) is None


# --------------------------------------------------------------------------------------
# bootstrap_ratio_ci
# --------------------------------------------------------------------------------------


def test_ratio_ci_contains_the_true_speedup() -> None:
    # Cold TTFT median 0.18 s, warm 0.072 s: a true speedup of 2.5 (ENGINE.md's numbers).
    cold, warm = lognormal(0.18, 200, seed=1), lognormal(0.072, 200, seed=2)
    ci = bootstrap_ratio_ci(cold, warm)
    assert isinstance(ci, RatioCI)
    assert ci.low <= ci.ratio <= ci.high
    assert ci.low < 2.5 < ci.high
    assert ci.excludes(1.0)
    assert (ci.confidence, ci.stat) == (0.95, "median")


def test_ratio_ci_covers_the_truth_most_of_the_time() -> None:
    covered = 0
    trials = 40
    for k in range(trials):
        ci = bootstrap_ratio_ci(lognormal(0.2, 60, seed=2 * k), lognormal(0.1, 60, seed=2 * k + 1), n_boot=400, seed=k)
        covered += ci.low <= 2.0 <= ci.high
    assert covered >= 0.8 * trials  # nominally 95%; the percentile bootstrap runs a bit low on small n


def test_ratio_ci_of_equal_distributions_contains_one() -> None:
    ci = bootstrap_ratio_ci(lognormal(0.1, 300, seed=3), lognormal(0.1, 300, seed=4))
    assert ci.low < 1.0 < ci.high
    assert not ci.excludes(1.0)


def test_ratio_ci_is_deterministic_for_a_seed() -> None:
    a, b = lognormal(0.2, 50, seed=5), lognormal(0.1, 50, seed=6)
    assert bootstrap_ratio_ci(a, b, seed=7) == bootstrap_ratio_ci(a, b, seed=7)
    assert bootstrap_ratio_ci(a, b, seed=7) != bootstrap_ratio_ci(a, b, seed=8)


@pytest.mark.parametrize("stat", ["mean", "p90", "p99.5"])
def test_ratio_ci_other_statistics(stat: str) -> None:
    ci = bootstrap_ratio_ci(lognormal(0.3, 300, seed=9), lognormal(0.1, 300, seed=10), stat=stat)
    assert ci.stat == stat
    assert ci.low <= ci.ratio <= ci.high
    assert ci.ratio == pytest.approx(3.0, rel=0.1)  # every quantile of a lognormal scales alike


def test_wider_confidence_gives_wider_interval() -> None:
    a, b = lognormal(0.2, 80, seed=11), lognormal(0.1, 80, seed=12)
    narrow, wide = bootstrap_ratio_ci(a, b, confidence=0.5), bootstrap_ratio_ci(a, b, confidence=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_single_value_samples_give_a_point_interval() -> None:
    ci = bootstrap_ratio_ci([0.2], [0.1])
    assert (ci.ratio, ci.low, ci.high) == pytest.approx((2.0, 2.0, 2.0))


def test_large_samples_are_resampled_in_chunks() -> None:
    ci = bootstrap_ratio_ci(lognormal(0.2, 5000, seed=13), lognormal(0.1, 5000, seed=14), n_boot=1000)
    assert ci.low < 2.0 < ci.high
    assert ci.high - ci.low < 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"baseline": []}, "at least one value"),
        ({"treatment": []}, "at least one value"),
        ({"treatment": [0.0, 0.0, 0.0]}, "ratio is undefined"),
        ({"stat": "mode"}, "stat must be"),
        ({"stat": "p101"}, "stat must be"),
        ({"stat": "pxx"}, "stat must be"),
        ({"n_boot": 0}, "n_boot"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_ratio_ci_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"baseline": [0.2, 0.3], "treatment": [0.1, 0.15], **kwargs}
    with pytest.raises(ValueError, match=match):
        bootstrap_ratio_ci(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# bootstrap_diff_ci
# --------------------------------------------------------------------------------------


def test_diff_ci_contains_the_true_saving() -> None:
    rng = np.random.default_rng(15)
    cold = rng.normal(0.18, 0.01, 200).tolist()
    warm = rng.normal(0.072, 0.006, 200).tolist()
    ci = bootstrap_diff_ci(cold, warm)
    assert isinstance(ci, DiffCI)
    assert ci.low <= ci.diff <= ci.high
    assert ci.low < 0.108 < ci.high
    assert ci.excludes(0.0)


def test_diff_ci_sign_and_determinism() -> None:
    a, b = lognormal(0.1, 100, seed=16), lognormal(0.2, 100, seed=17)
    ci = bootstrap_diff_ci(a, b, stat="mean", seed=3)
    assert ci.high < 0  # the treatment is slower
    assert ci == bootstrap_diff_ci(a, b, stat="mean", seed=3)


def test_diff_ci_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_diff_ci([], [1.0])
