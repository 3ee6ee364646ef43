"""Statistics for latency samples: percentiles, summaries and bootstrap intervals.

Pure functions over plain sequences of floats (seconds, tokens, requests), so the report
can say "warm TTFT is 2.6x faster (95% CI 2.3-2.9)" rather than compare two medians
that might differ by chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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


def throughput(count: float, duration_s: float) -> float | None:
    """``count / duration_s`` (e.g. requests per second); None if the duration is not positive."""
    if not math.isfinite(duration_s) or duration_s <= 0:
        return None
    return count / duration_s


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


@dataclass(frozen=True)
class DiffCI:
    """A difference of two statistics with its bootstrap confidence interval."""

    diff: float
    """``stat(baseline) - stat(treatment)``: above 0 means the treatment is faster (for latencies)."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    confidence: float = 0.95
    """The interval's confidence level."""
    stat: str = "median"
    """Which statistic was compared."""

    def excludes(self, value: float = 0.0) -> bool:
        """True if ``value`` lies outside the interval (for 0.0: the difference is not chance)."""
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


def bootstrap_diff_ci(
    baseline: Sequence[float],
    treatment: Sequence[float],
    stat: str = "median",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> DiffCI:
    """``stat(baseline) - stat(treatment)`` with a percentile-bootstrap confidence interval.

    For latencies this is the time saved per request by the treatment.

    Args:
        baseline: Samples of the reference condition.
        treatment: Samples of the condition under test.
        stat: "median", "mean" or a percentile such as "p90".
        n_boot: Number of bootstrap resamples.
        confidence: Confidence level of the interval, e.g. 0.95.
        seed: Seed of numpy's random generator; the same seed gives the same interval.

    Returns:
        The difference and its interval.

    Raises:
        ValueError: A sample is empty or an argument is out of range.
    """
    base_stat, treat_stat, base_boot, treat_boot, lo_pct, hi_pct = _bootstrap_pair(
        baseline, treatment, stat, n_boot, confidence, seed
    )
    low, high = np.percentile(base_boot - treat_boot, [lo_pct, hi_pct])
    return DiffCI(diff=base_stat - treat_stat, low=float(low), high=float(high), confidence=confidence, stat=stat)
