"""From request records (and a phase's counter deltas and token plan) to typed figures, once.

Every command, benchmark and adapter pools its requests here: latency percentiles, request
and token throughput, prompt and cached tokens, and the hit rate from both of its sources
against the ceiling. Pure functions; :mod:`echo_env.measure.phase` does the measuring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from echo_env.measure.stats import LatencySummary, summarize
from echo_env.measure.tokens import TokenPlan
from echo_env.wire.client import RequestRecord
from echo_env.wire.metrics import CounterDelta


@dataclass(frozen=True)
class HitRate:
    """A phase's prefix-cache hit rate from both sources, and the chosen one against its ceiling."""

    counters: float | None
    """``hits / queries`` from the server's counter deltas (None: no counters, or a reset)."""
    reported: float | None
    """``sum(cached_tokens) / sum(prompt_tokens)`` from the responses (None: not reported)."""
    ceiling: float | None
    """The most this phase's prompts allow, from the token plan (None: unknown)."""

    @property
    def value(self) -> float | None:
        """The rate the verdict uses: counters when present, else ``cached_tokens``."""
        return self.counters if self.counters is not None else self.reported

    @property
    def source(self) -> str | None:
        """Where :attr:`value` comes from: ``counters`` or ``cached_tokens``."""
        if self.counters is not None:
            return "counters"
        return "cached_tokens" if self.reported is not None else None

    @property
    def vs_ceiling(self) -> float | None:
        """:attr:`value` as a share of the ceiling."""
        if self.value is None or not self.ceiling:
            return None
        return self.value / self.ceiling


@dataclass(frozen=True)
class PhaseFigures:
    """One phase (one burst, or several pooled): what was sent, what came back, what the server counted."""

    name: str
    """The phase (``cold``, ``warm``, ``ttft_warm``, ``control``...)."""
    server: str = "cache_on"
    """Which server (``cache_on``, ``cache_off``, a replica's URL)."""
    repeat: int | None = None
    """Which repeat (None: pooled over repeats)."""
    requests: int = 0
    """Requests sent."""
    failed: int = 0
    """Requests that finally failed."""
    first_error: str | None = None
    """The first failure's reason."""
    wall_s: float = 0.0
    """From the first send to the last answer (summed when pooled)."""
    ttft: LatencySummary = field(default_factory=lambda: summarize([]))
    """Time to first token of the finished requests, seconds."""
    e2e: LatencySummary = field(default_factory=lambda: summarize([]))
    """End-to-end latency of the finished requests, seconds."""
    itl: LatencySummary = field(default_factory=lambda: summarize([]))
    """Gaps between streamed chunks, seconds."""
    completion_tokens: int = 0
    """Generated tokens the server reported."""
    prompt_tokens: int = 0
    """Prompt tokens the server reported for the finished requests."""
    cached_tokens: int | None = None
    """Cached prompt tokens the server reported (None: never reported)."""
    planned_prompt_tokens: int | None = None
    """Prompt tokens of the phase by the token plan (None: not tokenized)."""
    ceiling_tokens: int | None = None
    """The most tokens a cache could serve in this phase, by the token plan."""
    counters: CounterDelta | None = None
    """The server's counter deltas over the phase (None: not read)."""
    counters_note: str | None = None
    """Why there are no usable counters, when there are none."""
    hit: HitRate = field(default_factory=lambda: HitRate(None, None, None))
    """The hit rate from both sources, against the ceiling."""
    mean_reward: float | None = None
    """Mean env reward of the phase's graded agents."""
    ttft_samples: tuple[float, ...] = ()
    """Every finished request's TTFT, seconds (for plots and per-repeat medians)."""
    e2e_samples: tuple[float, ...] = ()
    """Every finished request's end-to-end latency, seconds."""
    itl_samples: tuple[float, ...] = ()
    """Every gap between streamed chunks, seconds."""

    @property
    def finished(self) -> int:
        """Requests that finished."""
        return self.requests - self.failed

    @property
    def throughput_rps(self) -> float | None:
        """Finished requests per second of wall time."""
        return self.finished / self.wall_s if self.wall_s > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        """Generated tokens per second of wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready row (``phases.csv`` and ``summary.json``); TTFT samples left out."""
        row: dict[str, Any] = {
            "name": self.name,
            "server": self.server,
            "repeat": self.repeat,
            "requests": self.requests,
            "failed": self.failed,
            "first_error": self.first_error,
            "wall_s": self.wall_s,
            "throughput_rps": self.throughput_rps,
            "tokens_per_s": self.tokens_per_s,
        }
        for key, lat in (("ttft", self.ttft), ("e2e", self.e2e), ("itl", self.itl)):
            row.update({f"{key}_p50_s": lat.p50, f"{key}_p90_s": lat.p90, f"{key}_p99_s": lat.p99})
        row.update(
            {
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens,
                "planned_prompt_tokens": self.planned_prompt_tokens,
                "ceiling_tokens": self.ceiling_tokens,
                "hit_rate": self.hit.value,
                "hit_rate_source": self.hit.source,
                "hit_rate_counters": self.hit.counters,
                "hit_rate_reported": self.hit.reported,
                "hit_rate_ceiling": self.hit.ceiling,
                "counter_queries": self.counters.queries if self.counters else None,
                "counter_hits": self.counters.hits if self.counters else None,
                "counter_reset": bool(self.counters and self.counters.reset),
                "counters_note": self.counters_note,
                "mean_reward": self.mean_reward,
            }
        )
        return row


def _counter_rate(delta: CounterDelta | None) -> float | None:
    if delta is None or delta.reset or delta.hits is None or delta.queries is None or delta.queries <= 0:
        return None
    return delta.hits / delta.queries


def _counters_note(delta: CounterDelta | None, note: str | None) -> str | None:
    if delta is None:
        return note or "counters not read"
    if delta.reset:
        return "the server restarted during the phase (its counters went back)"
    if delta.hits is None or delta.queries is None:
        return "the server exposes no prefix-cache hit counters"
    if delta.queries <= 0:
        return "the counters did not move"
    return None


def _hit_rate(counters: CounterDelta | None, cached: Sequence[int], prompt: int, plan: TokenPlan | None) -> HitRate:
    """The phase's hit rate by the server's counters, by ``usage.cached_tokens``, and its ceiling."""
    return HitRate(
        counters=_counter_rate(counters),
        reported=sum(cached) / prompt if cached and prompt else None,
        ceiling=plan.hit_rate_ceiling if plan else None,
    )


def phase_figures(
    name: str,
    records: Sequence[RequestRecord],
    wall_s: float,
    *,
    server: str = "cache_on",
    repeat: int | None = None,
    counters: CounterDelta | None = None,
    counters_note: str | None = None,
    plan: TokenPlan | None = None,
    rewards: Sequence[float] = (),
) -> PhaseFigures:
    """Pool one phase's requests with its counter deltas and token plan.

    Args:
        name: The phase.
        records: Its requests, finished or failed.
        wall_s: From its first send to its last answer.
        server: Which server it ran on.
        repeat: Which repeat (None when not repeated).
        counters: The server's counter deltas over the phase (None: not read).
        counters_note: Why ``counters`` is None, when it is.
        plan: The phase's token plan (for the ceiling).
        rewards: Env rewards of the phase's graded agents.

    Returns:
        The figures.
    """
    ok = [r for r in records if r.ok]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    ttfts = tuple(r.ttft_s for r in ok if r.ttft_s is not None)
    e2es = tuple(r.e2e_s for r in ok if r.e2e_s is not None)
    itls = tuple(gap for r in ok for gap in r.itl_s)
    return PhaseFigures(
        name=name,
        server=server,
        repeat=repeat,
        requests=len(records),
        failed=len(records) - len(ok),
        first_error=next((r.error for r in records if not r.ok), None),
        wall_s=wall_s,
        ttft=summarize(ttfts),
        e2e=summarize(e2es),
        itl=summarize(itls),
        completion_tokens=sum(r.completion_tokens or 0 for r in ok),
        prompt_tokens=prompt,
        cached_tokens=sum(cached) if cached else None,
        planned_prompt_tokens=plan.prompt_tokens if plan else None,
        ceiling_tokens=plan.max_hit_tokens if plan else None,
        counters=counters,
        counters_note=_counters_note(counters, counters_note),
        hit=_hit_rate(counters, cached, prompt, plan),
        mean_reward=math.fsum(rewards) / len(rewards) if rewards else None,
        ttft_samples=ttfts,
        e2e_samples=e2es,
        itl_samples=itls,
    )


def _sum_deltas(deltas: Sequence[CounterDelta | None]) -> CounterDelta | None:
    """Field-wise sum of several phases' deltas; None if any is missing, reset if any reset."""
    if not deltas or any(d is None for d in deltas):
        return None
    present = [d for d in deltas if d is not None]
    if any(d.reset for d in present):
        return CounterDelta(source=present[-1].source, reset=True)

    def total(name: str) -> float | None:
        values = [getattr(d, name) for d in present]
        return None if any(v is None for v in values) else math.fsum(values)

    return CounterDelta(
        source=present[-1].source,
        reset=False,
        queries=total("queries"),
        hits=total("hits"),
        prompt_tokens=total("prompt_tokens"),
        cached_prompt_tokens=total("cached_prompt_tokens"),
        requests=total("requests"),
    )


def pool(name: str, phases: Sequence[PhaseFigures], server: str | None = None) -> PhaseFigures:
    """Several phases' figures as one (pooled over repeats): sums, and percentiles of the union of samples.

    Counter deltas add up only when every phase has them; one reset makes the pooled
    counters unusable, and the note says so.
    """
    if not phases:
        return PhaseFigures(name=name, server=server or "cache_on")
    counters = _sum_deltas([p.counters for p in phases])
    notes = [p.counters_note for p in phases if p.counters_note]
    ttfts = tuple(t for p in phases for t in p.ttft_samples)
    e2es = tuple(t for p in phases for t in p.e2e_samples)
    itls = tuple(t for p in phases for t in p.itl_samples)
    cached = [p.cached_tokens for p in phases if p.cached_tokens is not None]
    prompt = sum(p.prompt_tokens for p in phases)
    planned = [p.planned_prompt_tokens for p in phases]
    ceilings = [p.ceiling_tokens for p in phases]
    plan_known = all(x is not None for x in planned) and all(x is not None for x in ceilings)
    planned_total = sum(x for x in planned if x is not None) if plan_known else None
    ceiling_total = sum(x for x in ceilings if x is not None) if plan_known else None
    rewards = [(p.mean_reward, p.finished) for p in phases if p.mean_reward is not None]
    reward_n = sum(n for _, n in rewards)
    return PhaseFigures(
        name=name,
        server=server or phases[0].server,
        repeat=None,
        requests=sum(p.requests for p in phases),
        failed=sum(p.failed for p in phases),
        first_error=next((p.first_error for p in phases if p.first_error), None),
        wall_s=math.fsum(p.wall_s for p in phases),
        ttft=summarize(ttfts),
        e2e=summarize(e2es),
        itl=summarize(itls),
        completion_tokens=sum(p.completion_tokens for p in phases),
        prompt_tokens=prompt,
        cached_tokens=sum(cached) if cached else None,
        planned_prompt_tokens=planned_total,
        ceiling_tokens=ceiling_total,
        counters=counters,
        counters_note=_counters_note(counters, notes[0] if notes else None),
        hit=HitRate(
            counters=_counter_rate(counters),
            reported=sum(cached) / prompt if cached and prompt else None,
            ceiling=ceiling_total / planned_total if ceiling_total is not None and planned_total else None,
        ),
        mean_reward=math.fsum(m * n for m, n in rewards) / reward_n if reward_n else None,
        ttft_samples=ttfts,
        e2e_samples=e2es,
        itl_samples=itls,
    )
