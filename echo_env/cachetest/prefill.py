"""What prefill costs on the server at hand, and whether the TTFT interval is wide by noise of the machine.

A prefix cache saves prefill. Where prefill is cheap (a small model on a big GPU, or any
server whose per-step cost dwarfs its per-token cost) a cache that hits every shared token
still buys little TTFT, and comparing warm with control TTFT cannot show it works. So the
runner measures the prefill cost in the very bursts it compares: beside the control bursts
of the first :data:`SHORT_REPEATS` repeats it sends a burst of the same size with short,
uncached prompts (:func:`echo_env.cachetest.workload.short_prompts`). The slope of median
TTFT over prompt tokens is the prefill cost per token; times the tokens the warm bursts got
from the cache, it is the TTFT the hits save, and ``control / (control - saved)`` the gain they can buy
(:func:`prefill_evidence`). The verdict judges TTFT only where that gain reaches the
minimum effect.

:func:`repeat_spread` says whether a wide interval comes from repeats that disagree with
each other beyond what their bursts' own spread explains (the machine changed between
repeats: a quieter machine helps) or from the bursts themselves (more repeats help).

Pure functions over phase figures; the runner sends, the verdict reads the results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from echo_env.cachetest.results import PrefillEvidence, RepeatSpread
from echo_env.measure.figures import PhaseFigures, pool

SHORT_PHASE = "ttft_short"
"""The phase name of a short control burst."""

SHORT_REPEATS = 3
"""Repeats that get a short control burst (each is one burst of ``ttft_burst`` short prompts): as
many as the default ``min_repeats``, so a run that stops there has them all, and the lowest slope of three."""

NOISY_MACHINE_FACTOR = 2.0
"""Repeats disagree beyond their bursts' spread when their spread is above this many times it.

Were the bursts' own spread all there is, the repeat spread would estimate the burst spread;
twice it is far in the tail even with three repeats."""

_MEDIAN_SE = math.sqrt(math.pi / 2)
"""The standard error of a sample median is about this times the mean's (normal samples)."""


def _median(phases: Sequence[PhaseFigures]) -> float | None:
    samples = [t for p in phases for t in p.ttft_samples]
    return statistics.median(samples) if samples else None


def _mean_prompt_tokens(phases: Sequence[PhaseFigures]) -> float | None:
    finished = sum(p.finished for p in phases)
    return sum(p.prompt_tokens for p in phases) / finished if finished else None


def _slope(control: PhaseFigures, short: PhaseFigures) -> float | None:
    """One repeat's TTFT added per prompt token (None: a burst without a finished request)."""
    tc, ts = _median([control]), _median([short])
    lc, ls = _mean_prompt_tokens([control]), _mean_prompt_tokens([short])
    if tc is None or ts is None or lc is None or ls is None or lc <= ls:
        return None
    return max(0.0, (tc - ts) / (lc - ls))


def prefill_evidence(
    controls: Sequence[PhaseFigures], shorts: Sequence[PhaseFigures], warm: PhaseFigures | None
) -> PrefillEvidence | None:
    """The prefill cost and the TTFT gain the warm bursts' hits can buy.

    Each repeat with a short burst gives a slope (its control burst's median TTFT over its
    short burst's, per prompt token); the cost taken is the smallest of them, so the verdict
    FAILs on TTFT only where even the lowest measured cost says the hits should have bought
    the minimum effect. The TTFT it is set against is the median of every control burst.

    Args:
        controls: Every control burst.
        shorts: Every short control burst.
        warm: The warm TTFT bursts pooled (their hit rate and prompt tokens).

    Returns:
        The evidence, or None when a figure is missing (no short burst finished, no hit
        rate, short prompts no shorter than the control's).
    """
    control_of = {p.repeat: p for p in controls}
    slopes = [s for p in shorts if p.repeat in control_of and (s := _slope(control_of[p.repeat], p)) is not None]
    control, short = _median(controls), _median(shorts)
    control_tokens, short_tokens = _mean_prompt_tokens(controls), _mean_prompt_tokens(shorts)
    if warm is None or warm.hit.value is None or not warm.finished or not slopes:
        return None
    if control is None or short is None or control_tokens is None or short_tokens is None or control <= 0:
        return None
    per_token = min(slopes)
    cached = warm.hit.value * warm.prompt_tokens / warm.finished
    # A warm request still computes its own uncached tail: it cannot beat a short prompt.
    saved = min(per_token * cached, max(0.0, control - short))
    return PrefillEvidence(
        control_ttft_s=control,
        short_ttft_s=short,
        control_prompt_tokens=control_tokens,
        short_prompt_tokens=short_tokens,
        prefill_per_token_s=per_token,
        cached_tokens=cached,
        saved_s=saved,
        expected_gain=control / (control - saved),
        repeats=len(slopes),
    )


def below_min_effect(
    controls: Sequence[PhaseFigures], shorts: Sequence[PhaseFigures], warms: Sequence[PhaseFigures], min_effect: float
) -> bool:
    """Whether the hits measured so far can buy less than ``min_effect`` (more repeats cannot change the verdict)."""
    prefill = prefill_evidence(controls, shorts, pool("ttft_warm", warms) if warms else None)
    return prefill is not None and prefill.expected_gain < min_effect


def _log_median_variance(samples: Sequence[float]) -> float | None:
    logs = [math.log(t) for t in samples if t > 0]
    if len(logs) < 2:
        return None
    return _MEDIAN_SE**2 * statistics.variance(logs) / len(logs)


def repeat_spread(
    ratios: Sequence[float], pairs: Sequence[tuple[PhaseFigures, PhaseFigures]], orders: Sequence[str] = ()
) -> RepeatSpread | None:
    """Whether the repeats disagree more than their bursts' own spread explains, and whether by their order.

    Args:
        ratios: One control/warm TTFT ratio per repeat.
        pairs: Each repeat's (control, warm) bursts.
        orders: Which burst of each repeat ran first, as ``ratios`` (empty: not known).

    Returns:
        The spreads; ``noisy_machine`` when the repeats' is wider than :data:`NOISY_MACHINE_FACTOR`
        times the bursts' even within each order; ``order_effect`` when it is only across orders.
        None with fewer than two usable ratios or no burst of two requests.
    """
    logs = [math.log(r) for r in ratios if r > 0]
    variances = []
    for control, warm in pairs:
        vc, vw = _log_median_variance(control.ttft_samples), _log_median_variance(warm.ttft_samples)
        if vc is not None and vw is not None:
            variances.append(vc + vw)
    if len(logs) < 2 or not variances:
        return None
    between = statistics.stdev(logs)
    within = math.sqrt(statistics.fmean(variances))
    wide = between > NOISY_MACHINE_FACTOR * within
    by_order = _within_order_spread(logs, orders) if len(orders) == len(logs) else None
    order_effect = wide and by_order is not None and by_order <= NOISY_MACHINE_FACTOR * within
    return RepeatSpread(between, within, wide and not order_effect, order_effect)


def _within_order_spread(logs: Sequence[float], orders: Sequence[str]) -> float | None:
    """The pooled standard deviation of log ratios around each order's own mean (None: an order has one repeat)."""
    groups = [[x for x, o in zip(logs, orders, strict=True) if o == first] for first in sorted(set(orders))]
    if len(groups) < 2 or any(len(g) < 2 for g in groups):
        return None
    squares = sum((x - statistics.fmean(g)) ** 2 for g in groups for x in g)
    return math.sqrt(squares / (len(logs) - len(groups)))
