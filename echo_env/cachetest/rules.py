"""The verdict's thresholds: one frozen config, each field a ``key=value`` of ``echo-prefix test``
(bare, or dotted as ``rules.<key>=``), validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass

from echo_env.errors import ConfigError


@dataclass(frozen=True)
class Rules:
    """The thresholds the verdict applies; each is a ``key=value`` of ``echo-prefix test`` (or ``rules.<key>=``)."""

    hit_fraction: float = 0.9
    """PASS needs the warm hit rate at or above this share of its ceiling."""
    min_shared_fraction: float = 0.5
    """FAIL when the prefix every prompt shares, in whole cache units, is under this share of a prompt."""
    control_tolerance: float = 0.05
    """The control phase may hit this much above its own ceiling before it stops being a baseline."""
    sources_tolerance: float = 0.05
    """Counters and ``cached_tokens`` may differ by this much (absolute hit rate) and still agree."""
    ceiling_tolerance: float = 0.02
    """A hit rate this far above the ceiling is still taken as at the ceiling (rounding, a token or two)."""
    traffic_tolerance: float = 0.10
    """Counted prompt tokens may exceed the tokens this test sent by this share before counting as other traffic."""
    min_effect: float = 1.2
    """PASS needs control/warm TTFT above this ratio beyond the confidence interval."""
    confidence: float = 0.95
    """Confidence of the TTFT interval over repeats."""
    min_repeats: int = 3
    """Fewer TTFT repeats than this give UNKNOWN, whatever the ratios say."""
    max_failed_fraction: float = 0.0
    """A phase that feeds the verdict with more failed requests than this share is short of evidence."""
    logprob_tolerance: float = 0.25
    """Answer checks: a logprob gap (nats) between cached and fresh answers still taken as the same
    computation (or 3x the measured noise floor, if larger); see :mod:`echo_env.cachetest.answers`."""

    def __post_init__(self) -> None:
        for key in ("hit_fraction", "min_shared_fraction", "max_failed_fraction", *_TOLERANCES):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value} must be a share from 0 to 1: e.g. {key}={getattr(Rules, key)}")
        if not self.min_effect >= 1.0:
            raise ConfigError(f"min_effect={self.min_effect} must be at least 1.0 (a TTFT ratio): e.g. min_effect=1.2")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"confidence={self.confidence} must be from 0.5 to below 1: e.g. confidence=0.95")
        if self.min_repeats < 2:
            raise ConfigError(f"min_repeats={self.min_repeats}: an interval over repeats needs min_repeats=2 or more")
        if not 0.0 < self.logprob_tolerance <= 10.0:
            raise ConfigError(f"logprob_tolerance={self.logprob_tolerance} must be above 0 (nats): e.g. 0.25")


_TOLERANCES = ("control_tolerance", "sources_tolerance", "ceiling_tolerance", "traffic_tolerance")
