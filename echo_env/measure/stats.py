"""Statistics for latency samples: percentiles, summaries and confidence intervals.

Pure functions over plain sequences of floats (seconds, tokens, ratios), so the report
can say "warm TTFT is 2.6x faster (95% CI 2.3-2.9 over 5 repeats)" rather than compare
two medians that might differ by chance.

Every interval names its unit. Requests of one burst share queueing and batching, so
they are not independent samples: :func:`bootstrap_ratio_ci` resamples requests and is
for spreads within one run, while a comparison across bursts (warm vs control TTFT)
goes through :func:`repeat_ratio_ci` and :func:`sequential_decision`, with one ratio
per independent repeat.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from echo_env.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

# Resampling draws an (n_boot, n) index matrix; cap its size so a large sample does not
# allocate gigabytes, by resampling in chunks of rows.
_MAX_DRAWS_PER_CHUNK = 4_000_000


def _as_array(values: Sequence[float] | npt.ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _percentile_key(q: float) -> str:
    return f"p{q:g}"


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    """Percentiles of ``values`` (linear interpolation, as ``numpy.percentile``).

    Args:
        values: The samples.
        qs: Percentiles to compute, each from 0 to 100.

    Returns:
        ``{"p50": ..., "p90": ..., "p99": ...}`` (keys from ``qs``, e.g. ``"p99.9"``); every
        value is None when ``values`` is empty.

    Raises:
        ValueError: A percentile is outside [0, 100].
    """
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentiles must be between 0 and 100, got {q}")
    data = _as_array(values)
    if data.size == 0:
        return {_percentile_key(q): None for q in qs}
    results = np.percentile(data, list(qs))
    return {_percentile_key(q): float(r) for q, r in zip(qs, results, strict=True)}


@dataclass(frozen=True)
class LatencySummary:
    """The usual summary of a latency sample (all in the samples' unit, None when empty)."""

    count: int
    """Number of samples."""
    mean: float | None
    """Arithmetic mean."""
    p50: float | None
    """Median."""
    p90: float | None
    """90th percentile."""
    p99: float | None
    """99th percentile."""
    min: float | None
    """Smallest sample."""
    max: float | None
    """Largest sample."""

    def as_dict(self) -> dict[str, float | int | None]:
        """The fields as a plain dict, for JSON reports."""
        return {
            "count": self.count,
            "mean": self.mean,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "min": self.min,
            "max": self.max,
        }


def summarize(values: Sequence[float]) -> LatencySummary:
    """Count, mean, p50/p90/p99, min and max of ``values``.

    Args:
        values: The samples, e.g. time to first token of each request in seconds.

    Returns:
        The summary; every statistic is None when ``values`` is empty.
    """
    data = _as_array(values)
    if data.size == 0:
        return LatencySummary(count=0, mean=None, p50=None, p90=None, p99=None, min=None, max=None)
    p = percentiles(data.tolist(), (50, 90, 99))
    return LatencySummary(
        count=int(data.size),
        mean=float(data.mean()),
        p50=p["p50"],
        p90=p["p90"],
        p99=p["p99"],
        min=float(data.min()),
        max=float(data.max()),
    )


# --------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------

StatFn = Callable[[FloatArray], FloatArray]
"""Reduces each row of a 2-D array to one number (``axis=-1``)."""


def _stat_function(stat: str) -> StatFn:
    """The row-wise statistic named ``stat``: "median", "mean" or a percentile such as "p90"."""
    if stat == "median":
        return lambda a: np.median(a, axis=-1)
    if stat == "mean":
        return lambda a: np.mean(a, axis=-1)
    if stat.startswith("p"):
        try:
            q = float(stat[1:])
        except ValueError:
            q = math.nan
        if 0 <= q <= 100:
            return lambda a: np.percentile(a, q, axis=-1)
    raise ValueError(f'stat must be "median", "mean" or a percentile such as "p90", got {stat!r}')


def _bootstrap(data: FloatArray, stat_fn: StatFn, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """``stat_fn`` of ``n_boot`` resamples (with replacement) of ``data``."""
    n = data.size
    rows = max(1, _MAX_DRAWS_PER_CHUNK // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = stat_fn(data[idx])
    return out


def _check_bootstrap_args(
    baseline: FloatArray, treatment: FloatArray, n_boot: int, confidence: float
) -> tuple[float, float]:
    if baseline.size == 0 or treatment.size == 0:
        raise ValueError(
            f"both samples need at least one value (baseline has {baseline.size}, treatment {treatment.size})"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    tail = (1 - confidence) / 2 * 100
    return tail, 100 - tail


@dataclass(frozen=True)
class RatioCI:
    """A ratio of two statistics with its bootstrap confidence interval."""

    ratio: float
    """``stat(baseline) / stat(treatment)``: above 1 means the treatment is faster (for latencies)."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    confidence: float = 0.95
    """The interval's confidence level."""
    stat: str = "median"
    """Which statistic was compared."""

    def excludes(self, value: float = 1.0) -> bool:
        """True if ``value`` lies outside the interval (for 1.0: the difference is not chance)."""
        return value < self.low or value > self.high


def _bootstrap_pair(
    baseline: Sequence[float],
    treatment: Sequence[float],
    stat: str,
    n_boot: int,
    confidence: float,
    seed: int | None,
) -> tuple[float, float, FloatArray, FloatArray, float, float]:
    """Point statistics, bootstrap distributions and percentile bounds for both samples."""
    base, treat = _as_array(baseline), _as_array(treatment)
    lo_pct, hi_pct = _check_bootstrap_args(base, treat, n_boot, confidence)
    stat_fn = _stat_function(stat)
    rng = np.random.default_rng(seed)
    # The two samples are independent runs, so each is resampled on its own.
    base_boot = _bootstrap(base, stat_fn, n_boot, rng)
    treat_boot = _bootstrap(treat, stat_fn, n_boot, rng)
    base_stat = float(stat_fn(base[np.newaxis, :])[0])
    treat_stat = float(stat_fn(treat[np.newaxis, :])[0])
    return base_stat, treat_stat, base_boot, treat_boot, lo_pct, hi_pct


def bootstrap_ratio_ci(
    baseline: Sequence[float],
    treatment: Sequence[float],
    stat: str = "median",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> RatioCI:
    """``stat(baseline) / stat(treatment)`` with a percentile-bootstrap confidence interval.

    For latencies this is the speedup: with cold requests as ``baseline`` and cached ones
    as ``treatment``, a ratio of 2.6 means cached requests take 2.6x less time.

    The resampled unit is the single value, so the interval is only as honest as the
    values are independent. Requests of one burst are not (they share queueing and
    batching): pooled over a few bursts, this interval ignores the burst-to-burst spread
    and calls chance a gain (``benchmarks/ttft_false_positive.py``). To compare
    conditions across bursts, take one ratio per repeat and use :func:`repeat_ratio_ci`.

    Args:
        baseline: Samples of the reference condition (e.g. cache off, or cold TTFTs).
        treatment: Samples of the condition under test (e.g. cache on, or warm TTFTs).
        stat: "median", "mean" or a percentile such as "p90".
        n_boot: Number of bootstrap resamples.
        confidence: Confidence level of the interval, e.g. 0.95.
        seed: Seed of numpy's random generator; the same seed gives the same interval.

    Returns:
        The ratio and its interval.

    Raises:
        ValueError: A sample is empty, ``stat(treatment)`` is 0, or an argument is out
            of range.
    """
    base_stat, treat_stat, base_boot, treat_boot, lo_pct, hi_pct = _bootstrap_pair(
        baseline, treatment, stat, n_boot, confidence, seed
    )
    if treat_stat == 0:
        raise ValueError(f"the treatment's {stat} is 0, so the ratio is undefined; compare differences instead")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = base_boot / treat_boot
    ratios = ratios[~np.isnan(ratios)]
    low, high = np.percentile(ratios, [lo_pct, hi_pct]) if ratios.size else (math.nan, math.nan)
    return RatioCI(ratio=base_stat / treat_stat, low=float(low), high=float(high), confidence=confidence, stat=stat)


# --------------------------------------------------------------------------------------
# Intervals over independent repeats
# --------------------------------------------------------------------------------------


def _t_central_mass(theta: float, df: int) -> float:
    """``P(|T| <= sqrt(df) * tan(theta))`` for Student's t with ``df`` degrees of freedom.

    The finite series of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even):
    exact for whole degrees of freedom, which is all an interval over ``n`` repeats needs
    (``n - 1``), and it keeps scipy out of the dependencies.
    """
    sin, cos = math.sin(theta), math.cos(theta)
    cos2 = cos * cos
    term, total = 1.0, 1.0
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (sin * cos * total if df > 1 else 0.0))
    for k in range(1, df // 2):
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return sin * total


@functools.lru_cache(maxsize=256)
def _t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence``: the half-width of a two-sided interval in standard errors."""
    # The central mass rises monotonically with theta on (0, pi/2): bisect down to the last bit.
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _t_central_mass(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def _usable_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """The finite, positive ratios in order: a repeat whose bursts failed gives none."""
    return tuple(float(r) for r in ratios if math.isfinite(r) and r > 0)


@dataclass(frozen=True)
class RepeatRatioCI:
    """The typical ratio over independent repeats (e.g. control/warm TTFT), with its interval."""

    ratio: float
    """Geometric mean of the per-repeat ratios: the point estimate of the typical ratio."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    n: int
    """Number of repeats the interval rests on (the usable ratios)."""
    confidence: float
    """Confidence level the interval was computed at (per look, when from :func:`sequential_decision`)."""
    per_repeat: tuple[float, ...]
    """The usable per-repeat ratios, in the order run."""


def repeat_ratio_ci(ratios: Sequence[float], confidence: float = 0.95) -> RepeatRatioCI | None:
    """Interval for the typical ratio over independent repeats, one ratio per repeat.

    Each repeat gives one ratio (e.g. ``median(control TTFT) / median(warm TTFT)`` of its
    pair of bursts), so the interval's unit is the repeat, not the request. Ratios are
    multiplicative, so the interval is Student's t-interval on the mean log ratio, taken
    back with ``exp``: the point is the geometric mean, and 2x faster and 2x slower are
    equally far from 1.

    Args:
        ratios: One ratio per repeat. Values that are not finite and positive (a repeat
            whose bursts failed) are left out.
        confidence: Two-sided confidence level, e.g. 0.95.

    Returns:
        The interval, or None with fewer than two usable ratios (no spread to estimate).
        Identical ratios give a zero-width interval at that value.

    Raises:
        ConfigError: ``confidence`` is not between 0 and 1.
    """
    _check_confidence(confidence)
    usable = _usable_ratios(ratios)
    n = len(usable)
    if n < 2:
        return None
    logs = np.log(np.asarray(usable, dtype=np.float64))
    mean = float(logs.mean())
    half = _t_quantile(confidence, n - 1) * float(logs.std(ddof=1)) / math.sqrt(n)
    return RepeatRatioCI(
        ratio=math.exp(mean),
        low=math.exp(mean - half),
        high=math.exp(mean + half),
        n=n,
        confidence=confidence,
        per_repeat=usable,
    )


EffectDecision = Literal["above", "below", "undecided"]
"""Where an interval lies against a minimum effect: wholly above, wholly below, or across it."""


def decide_effect(ci: RepeatRatioCI | None, min_effect: float) -> EffectDecision:
    """Whether the interval shows the ratio above or below ``min_effect``, or cannot tell.

    Args:
        ci: The interval (None: too few repeats, which decides nothing).
        min_effect: The smallest ratio that counts as a real effect, e.g. 1.2 for "warm
            TTFT at least 1.2x faster than control".

    Returns:
        ``"above"`` when the interval's low end is above ``min_effect``, ``"below"`` when
        its high end is below it, else ``"undecided"``.

    Raises:
        ConfigError: ``min_effect`` is not a positive number.
    """
    if not (math.isfinite(min_effect) and min_effect > 0):
        raise ConfigError(f"min_effect must be a positive ratio (e.g. 1.2), got {min_effect}")
    if ci is None:
        return "undecided"
    if ci.low > min_effect:
        return "above"
    if ci.high < min_effect:
        return "below"
    return "undecided"


def looks_confidence(confidence: float, planned_looks: int) -> float:
    """The confidence each of ``planned_looks`` looks must use so that all of them together keep ``confidence``.

    Bonferroni: each look may err with ``(1 - confidence) / planned_looks``, so the chance
    that any look errs is at most ``1 - confidence``, whatever the looks' correlation.

    Args:
        confidence: The overall confidence, e.g. 0.95.
        planned_looks: How many looks at the data there can be, at most.

    Returns:
        The per-look confidence, e.g. 0.99 for 0.95 over 5 looks.

    Raises:
        ConfigError: ``confidence`` is not between 0 and 1, or ``planned_looks`` is below 1.
    """
    _check_confidence(confidence)
    if planned_looks < 1:
        raise ConfigError(f"planned_looks must be at least 1, got {planned_looks}")
    return 1 - (1 - confidence) / planned_looks


def _planned_usable_ratios(ratios: Sequence[float], min_repeats: int, max_repeats: int) -> tuple[float, ...]:
    """The usable ratios, once the looks ``min_repeats .. max_repeats`` are a valid plan that covers them."""
    if min_repeats < 2:
        raise ConfigError(f"min_repeats must be at least 2 (an interval needs two repeats), got {min_repeats}")
    if max_repeats < min_repeats:
        raise ConfigError(f"max_repeats ({max_repeats}) must be at least min_repeats ({min_repeats})")
    usable = _usable_ratios(ratios)
    if len(usable) > max_repeats:
        raise ValueError(
            f"{len(usable)} usable repeats but max_repeats is {max_repeats}: stop at max_repeats, "
            "or raise it before the run so the looks are planned for"
        )
    return usable


def sequential_decision(
    ratios: Sequence[float],
    min_effect: float,
    confidence: float = 0.95,
    min_repeats: int = 3,
    max_repeats: int = 8,
) -> tuple[EffectDecision, RepeatRatioCI | None]:
    """The decision after the latest repeat, for a runner that may stop as soon as one is reached.

    The runner calls this after each repeat with every ratio so far and stops on
    ``"above"`` or ``"below"``, or after ``max_repeats`` usable repeats. The looks are at
    ``n = min_repeats .. max_repeats`` usable ratios, and each uses the interval at
    :func:`looks_confidence` of ``confidence`` over those ``max_repeats - min_repeats + 1``
    planned looks. Below ``min_repeats`` nothing is decided.

    Error guarantee: if the per-repeat log ratios are independent draws from one normal
    distribution whose mean is the log of the true typical ratio ``rho`` (which repeats
    in alternating order and bursts with nothing shared between repeats are there to
    make true), then over all looks together, whenever the runner stops:

    - when ``rho <= min_effect``, the chance that any look says ``"above"`` is at most
      ``(1 - confidence) / 2`` (2.5% at 0.95);
    - when ``rho >= min_effect``, the chance that any look says ``"below"`` is at most
      ``(1 - confidence) / 2``;
    - the chance that any look's interval misses ``rho`` is at most ``1 - confidence``.

    Bonferroni ignores that the looks share repeats, so the true error rates are lower
    (and the intervals wider) than the bounds. A repeat that gave no usable ratio is not
    a look: the same usable ratios give the same decision.

    Args:
        ratios: One ratio per repeat so far, in the order run (non-finite or non-positive
            values, from failed repeats, are left out).
        min_effect: The smallest ratio that counts as a real effect, e.g. 1.2.
        confidence: Overall confidence over all planned looks, e.g. 0.95.
        min_repeats: The first look; at least 2.
        max_repeats: The last look; the runner must not take more usable repeats.

    Returns:
        The decision and the interval it rests on (at the per-look confidence; None with
        fewer than two usable ratios). With fewer than ``min_repeats`` usable ratios the
        decision is ``"undecided"``, whatever the interval says.

    Raises:
        ConfigError: An argument is out of range (``min_repeats`` below 2 or above
            ``max_repeats``, ``confidence`` or ``min_effect`` invalid).
        ValueError: There are more usable ratios than ``max_repeats``: a look the error
            guarantee did not plan for.
    """
    usable = _planned_usable_ratios(ratios, min_repeats, max_repeats)
    ci = repeat_ratio_ci(usable, looks_confidence(confidence, max_repeats - min_repeats + 1))
    decision = decide_effect(ci, min_effect)
    if len(usable) < min_repeats:
        return "undecided", ci
    return decision, ci
