"""Percentiles, summaries, bootstrap intervals and intervals over repeats, on synthetic latencies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echo_env.errors import ConfigError
from echo_env.measure.stats import (
    EffectDecision,
    LatencySummary,
    RatioCI,
    RepeatRatioCI,
    bootstrap_ratio_ci,
    decide_effect,
    looks_confidence,
    percentiles,
    repeat_ratio_ci,
    sequential_decision,
    summarize,
)


def lognormal(median: float, n: int, seed: int, sigma: float = 0.2) -> list[float]:
    """Latency-like samples whose true median is ``median``."""
    return np.random.default_rng(seed).lognormal(math.log(median), sigma, n).tolist()


# --------------------------------------------------------------------------------------
# percentiles, summarize
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
# repeat_ratio_ci: one ratio per independent repeat
# --------------------------------------------------------------------------------------


def test_repeat_interval_matches_a_hand_computation() -> None:
    # Logs of 2, 4, 8 are ln2 * (1, 2, 3): mean 2 ln2 (geometric mean 4), standard deviation ln2.
    # Student's t for 95% and 2 degrees of freedom is 4.302653 (any t table), so the interval
    # is 4 * 2 ** (-/+ 4.302653 / sqrt(3)).
    ci = repeat_ratio_ci([2.0, 4.0, 8.0])
    assert isinstance(ci, RepeatRatioCI)
    half = 4.302653 / math.sqrt(3)
    assert ci.ratio == pytest.approx(4.0)
    assert ci.low == pytest.approx(4.0 * 2.0**-half, rel=1e-6)
    assert ci.high == pytest.approx(4.0 * 2.0**half, rel=1e-6)
    assert (ci.n, ci.confidence, ci.per_repeat) == (3, 0.95, (2.0, 4.0, 8.0))


@pytest.mark.parametrize(
    ("confidence", "n", "t_table"),
    [
        (0.95, 2, 12.706205),
        (0.95, 3, 4.302653),
        (0.95, 6, 2.570582),
        (0.95, 11, 2.228139),
        (0.95, 31, 2.042272),
        (0.99, 5, 4.604095),
        (0.90, 21, 1.724718),
        (0.999, 2, 636.619249),
    ],
)
def test_repeat_interval_half_width_is_student_t(confidence: float, n: int, t_table: float) -> None:
    logs = np.arange(n, dtype=float) * 0.1
    ci = repeat_ratio_ci(np.exp(logs).tolist(), confidence)
    assert ci is not None
    half_in_standard_errors = math.log(ci.high / ci.ratio) * math.sqrt(n) / logs.std(ddof=1)
    assert half_in_standard_errors == pytest.approx(t_table, rel=1e-6)
    assert math.log(ci.ratio / ci.low) == pytest.approx(math.log(ci.high / ci.ratio))  # symmetric in logs


def test_repeat_interval_covers_the_true_ratio_at_its_confidence() -> None:
    rng = np.random.default_rng(20)
    trials, covered = 2000, 0
    for _ in range(trials):
        ci = repeat_ratio_ci(np.exp(rng.normal(math.log(1.5), 0.2, 4)).tolist())
        assert ci is not None
        covered += ci.low <= 1.5 <= ci.high
    assert 0.93 <= covered / trials <= 0.97


@pytest.mark.parametrize("ratios", [[], [2.0], [2.0, math.nan], [2.0, 0.0, -1.0, math.inf]])
def test_repeat_interval_needs_two_usable_ratios(ratios: list[float]) -> None:
    assert repeat_ratio_ci(ratios) is None


def test_repeat_interval_leaves_out_failed_repeats() -> None:
    ci = repeat_ratio_ci([2.0, math.nan, 8.0, 0.0])
    assert ci is not None
    assert (ci.n, ci.per_repeat, ci.ratio) == (2, (2.0, 8.0), pytest.approx(4.0))


def test_identical_repeats_give_a_point_interval() -> None:
    ci = repeat_ratio_ci([1.5, 1.5, 1.5])
    assert ci is not None
    assert (ci.ratio, ci.low, ci.high) == pytest.approx((1.5, 1.5, 1.5))


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_repeat_interval_rejects_bad_confidence(confidence: float) -> None:
    with pytest.raises(ConfigError, match="confidence must be between 0 and 1"):
        repeat_ratio_ci([2.0, 3.0], confidence)


# --------------------------------------------------------------------------------------
# decide_effect
# --------------------------------------------------------------------------------------


def interval(low: float, high: float) -> RepeatRatioCI:
    return RepeatRatioCI(ratio=math.sqrt(low * high), low=low, high=high, n=3, confidence=0.95, per_repeat=(low, high))


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (1.3, 2.0, "above"),
        (0.8, 1.1, "below"),
        (1.1, 1.5, "undecided"),
        (1.2, 1.5, "undecided"),  # touching the minimum effect is not beyond it
        (0.9, 1.2, "undecided"),
        (0.5, 3.0, "undecided"),
    ],
)
def test_decide_effect(low: float, high: float, expected: EffectDecision) -> None:
    assert decide_effect(interval(low, high), 1.2) == expected


def test_no_interval_decides_nothing() -> None:
    assert decide_effect(None, 1.2) == "undecided"


@pytest.mark.parametrize("min_effect", [0.0, -1.0, math.nan, math.inf])
def test_decide_effect_rejects_bad_minimum(min_effect: float) -> None:
    with pytest.raises(ConfigError, match="min_effect must be a positive ratio"):
        decide_effect(interval(1.3, 2.0), min_effect)


# --------------------------------------------------------------------------------------
# looks_confidence, sequential_decision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "looks", "expected"), [(0.95, 1, 0.95), (0.95, 5, 0.99), (0.90, 2, 0.95)])
def test_looks_confidence_splits_the_error(confidence: float, looks: int, expected: float) -> None:
    assert looks_confidence(confidence, looks) == pytest.approx(expected)


def test_looks_confidence_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="planned_looks"):
        looks_confidence(0.95, 0)
    with pytest.raises(ConfigError, match="confidence"):
        looks_confidence(1.0, 3)


@pytest.mark.parametrize(
    ("ratios", "min_repeats"),
    [([], 3), ([10.0], 3), ([10.0, 10.5], 3), ([10.0, 10.5, 10.2], 4), ([10.0, math.nan, 10.5, 10.2], 4)],
)
def test_sequential_never_decides_before_min_repeats(ratios: list[float], min_repeats: int) -> None:
    decision, ci = sequential_decision(ratios, 1.2, min_repeats=min_repeats, max_repeats=8)
    assert decision == "undecided"
    if ci is not None:
        assert ci.low > 1.2  # the interval alone would have said "above"


def test_sequential_decides_clear_cases_at_the_first_look() -> None:
    above, ci = sequential_decision([3.0, 3.1, 2.9], 1.2)
    assert above == "above" and ci is not None and ci.n == 3
    below, _ = sequential_decision([1.0, 1.02, 0.98], 1.2)
    assert below == "below"


def test_sequential_intervals_pay_for_the_planned_looks() -> None:
    ratios = [1.5, 1.6, 1.4]
    one_look = repeat_ratio_ci(ratios, 0.95)
    assert one_look is not None and decide_effect(one_look, 1.2) == "above"
    decision, ci = sequential_decision(ratios, 1.2, confidence=0.95, min_repeats=3, max_repeats=8)
    assert decision == "undecided"
    assert ci is not None and ci.confidence == pytest.approx(looks_confidence(0.95, 6))
    assert ci.low < one_look.low and ci.high > one_look.high


def test_sequential_failed_repeat_is_not_a_look() -> None:
    assert sequential_decision([3.0, 3.1, math.nan], 1.2) == sequential_decision([3.0, 3.1], 1.2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_repeats": 1}, ConfigError, "min_repeats must be at least 2"),
        ({"min_repeats": 5, "max_repeats": 4}, ConfigError, "max_repeats"),
        ({"confidence": 1.0}, ConfigError, "confidence"),
        ({"min_effect": 0.0}, ConfigError, "min_effect"),
        ({"ratios": [2.0] * 9}, ValueError, "9 usable repeats but max_repeats is 8"),
    ],
)
def test_sequential_rejects_bad_input(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args: dict[str, object] = {"ratios": [2.0, 2.1, 2.2], "min_effect": 1.2, "max_repeats": 8, **kwargs}
    with pytest.raises(error, match=match):
        sequential_decision(**args)  # type: ignore[arg-type]


def simulated_runs(true_ratio: float, trials: int, seed: int) -> list[EffectDecision]:
    """The runner's loop on simulated bursts: 8 requests each, bursts 10% apart, stop at the first decision."""
    rng = np.random.default_rng(seed)
    shape = (trials, 8, 2)  # trials x repeats x (warm, control)
    bursts = rng.lognormal(0.0, 0.10, shape)[..., np.newaxis] * rng.lognormal(0.0, 0.25, (*shape, 8))
    medians = np.median(bursts, axis=-1)
    ratios = (true_ratio * medians[..., 1] / medians[..., 0]).tolist()
    decisions: list[EffectDecision] = []
    for trial in ratios:
        decision: EffectDecision = "undecided"
        for n in range(3, 9):
            decision, _ = sequential_decision(trial[:n], 1.2, confidence=0.95, min_repeats=3, max_repeats=8)
            if decision != "undecided":
                break
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize("true_ratio", [1.0, 1.2])
def test_sequential_false_positives_stay_under_five_percent(true_ratio: float) -> None:
    # No effect at all, and a true effect exactly at the minimum (the hardest case): both must pass
    # under 5% of the time, though the runner looks after every repeat and stops when decided.
    decisions = simulated_runs(true_ratio, trials=400, seed=21)
    assert decisions.count("above") / len(decisions) < 0.05


def test_sequential_finds_a_large_effect() -> None:
    decisions = simulated_runs(3.0, trials=100, seed=22)
    assert decisions.count("above") == len(decisions)
