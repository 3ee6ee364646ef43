"""TTFT false positives: requests pooled over bursts vs one ratio per repeat, simulated.

The prefix-cache test compares the time to first token of warm requests (prefix cached)
with control requests (same lengths, nothing to hit). Requests of one burst share
queueing and batching, so a burst's TTFTs move together: the independent unit is the
repeat, not the request. This script simulates bursts of TTFTs, with no server, and
counts how often each analysis says "warm is faster" (PASS):

- under no true effect: the false-positive rate;
- under true effects of 1.1x, 1.2x, 1.5x and 3x (control/warm): the power.

The simulated machine: every burst gets its own slowdown factor (lognormal, sigma
``--burst-sigma``, 0.10 by default: bursts 10% apart), and every request in it its own
spread around that (lognormal, sigma ``--request-sigma``). Each repeat runs one warm
burst and one control burst, in alternating order (warm first in even repeats, control
first in odd ones); ``--order-effect`` slows the second burst of each repeat, to see
that the alternation cancels it. The methods:

- ``old``: as the old runner did, on bursts of ``--old-burst`` requests (128): the
  TTFTs of 3 repeats pooled per side, ``bootstrap_ratio_ci`` of control over warm
  medians; PASS when the interval's low end is above 1.0;
- ``old_small``: the same analysis on the new method's small bursts (the same simulated
  bursts as the two below), so burst size and method are told apart;
- ``new``: small bursts of ``--burst`` requests (16), one ratio per repeat,
  ``median(control) / median(warm)``, and ``sequential_decision`` after each repeat
  (min_effect 1.2, confidence 0.95, looks at 3..8 repeats, stopping at the first
  decision); PASS when it says ``above``;
- ``new_no_min``: the same with min_effect 1.0, to show what the change of unit alone does.

The old analyses use 500 bootstrap resamples, not the runner's 2000: the slow part is
resampling 384 requests a side, and over 400 trials under no effect both counts gave
the same false-positive rate (29.75%).

Full: 2000 trials per effect for the new methods, 400 for the old ones, about 35 s of
CPU (85 s on the busy 2-core machine). ``--quick``: 300 and 40, about 5 s of CPU.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from common import fmt, machine_facts, markdown_table, table, write_result

from echo_env.measure.stats import EffectDecision, bootstrap_ratio_ci, sequential_decision

NAME = "ttft_false_positive"
EFFECTS = (1.0, 1.1, 1.2, 1.5, 3.0)
"""True control/warm TTFT ratios simulated; 1.0 is no effect."""
OLD_REPEATS = 3
"""Repeats the old test pooled."""
CONTROL_TTFT_S = 0.18
"""Median control TTFT of a quiet burst (the scale does not matter: every figure is a ratio)."""


@dataclass(frozen=True)
class Machine:
    """How simulated TTFTs spread."""

    burst: int
    """Requests per burst of the new methods (and ``old_small``)."""
    old_burst: int
    """Requests per burst of the old method, as the old runner sent them."""
    burst_sigma: float
    """Lognormal sigma of each burst's own slowdown factor."""
    request_sigma: float
    """Lognormal sigma of each request around its burst."""
    order_effect: float
    """Factor on the second burst of every repeat (1.0: none)."""


@dataclass(frozen=True)
class Design:
    """The new method's settings (the prefix test's defaults unless overridden)."""

    confidence: float
    """Overall confidence over the looks."""
    min_effect: float
    """Minimum control/warm ratio that counts."""
    min_repeats: int
    """First look."""
    max_repeats: int
    """Last look."""


@dataclass(frozen=True)
class Method:
    """One analysis of the simulated bursts."""

    key: str
    """Stable id in the JSON."""
    label: str
    """Row name in the table."""
    min_effect: float | None
    """The new methods' minimum effect; None for the old pooled bootstrap."""


def methods(machine: Machine, design: Design) -> tuple[Method, ...]:
    """The four analyses, labelled with their settings."""
    looks = f"looks at {design.min_repeats}-{design.max_repeats} repeats"
    pooled = f"requests pooled over {OLD_REPEATS} bursts a side, bootstrap, low > 1.0"
    return (
        Method("old", f"old: {pooled} ({machine.old_burst}-request bursts)", None),
        Method("old_small", f"old analysis on {machine.burst}-request bursts", None),
        Method("new", f"new: one ratio per repeat, {looks}, min_effect {design.min_effect:g}", design.min_effect),
        Method("new_no_min", f"new with min_effect 1.0 (the change of unit alone), {looks}", 1.0),
    )


def simulate(
    rng: np.random.Generator, trials: int, repeats: int, burst: int, effect: float, machine: Machine
) -> tuple[Any, Any]:
    """Warm and control TTFTs, each shaped ``(trials, repeats, burst)``."""
    shape = (trials, repeats)

    def bursts(median: float) -> Any:
        factor = rng.lognormal(0.0, machine.burst_sigma, shape)[..., np.newaxis]
        spread = rng.lognormal(0.0, machine.request_sigma, (*shape, burst))
        return median * factor * spread

    warm, control = bursts(CONTROL_TTFT_S / effect), bursts(CONTROL_TTFT_S)
    # Warm first in even repeats, control first in odd ones: the second burst carries the order effect.
    second_is_control = (np.arange(repeats) % 2 == 0)[np.newaxis, :, np.newaxis]
    control = control * np.where(second_is_control, machine.order_effect, 1.0)
    warm = warm * np.where(second_is_control, 1.0, machine.order_effect)
    return warm, control


def old_pass(warm: Any, control: Any, n_boot: int, seed: int) -> bool:
    """The old verdict: pooled requests of the first repeats, PASS when the bootstrap interval's low end is above 1."""
    ci = bootstrap_ratio_ci(
        control[:OLD_REPEATS].ravel().tolist(), warm[:OLD_REPEATS].ravel().tolist(), n_boot=n_boot, seed=seed
    )
    return ci.low > 1.0


def new_decision(warm: Any, control: Any, min_effect: float, design: Design) -> tuple[EffectDecision, int]:
    """The new verdict: a look after each repeat from ``min_repeats`` on, stopping at the first decision."""
    ratios = (np.median(control, axis=-1) / np.median(warm, axis=-1)).tolist()
    decision: EffectDecision = "undecided"
    n = design.min_repeats
    for n in range(design.min_repeats, design.max_repeats + 1):
        decision, _ = sequential_decision(
            ratios[:n], min_effect, design.confidence, design.min_repeats, design.max_repeats
        )
        if decision != "undecided":
            break
    return decision, n


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson interval of a rate ``k / n``: honest near 0 and 1, where the false-positive rates live."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict[str, Any]:
    """A rate with its count and Wilson interval, for the JSON."""
    low, high = wilson(k, n)
    return {"rate": k / n if n else None, "count": k, "trials": n, "low": low, "high": high}


def run_effect(
    effect: float, index: int, trials: int, old_trials: int, n_boot: int, machine: Machine, design: Design, seed: int
) -> dict[str, Any]:
    """Every method at one true effect (``old_small`` and the new ones on the same simulated bursts)."""
    rng = np.random.default_rng([seed, index])
    out: dict[str, Any] = {"effect": effect}
    big_warm, big_control = simulate(rng, old_trials, OLD_REPEATS, machine.old_burst, effect, machine)
    passes = sum(old_pass(big_warm[t], big_control[t], n_boot, seed=t) for t in range(old_trials))
    out["old"] = {"pass": rate(passes, old_trials)}
    warm, control = simulate(rng, trials, design.max_repeats, machine.burst, effect, machine)
    passes = sum(old_pass(warm[t], control[t], n_boot, seed=t) for t in range(old_trials))
    out["old_small"] = {"pass": rate(passes, old_trials)}
    for method in methods(machine, design):
        if method.min_effect is None:
            continue
        counts = {"above": 0, "below": 0, "undecided": 0}
        repeats_used = 0
        for t in range(trials):
            decision, n = new_decision(warm[t], control[t], method.min_effect, design)
            counts[decision] += 1
            repeats_used += n
        out[method.key] = {
            "pass": rate(counts["above"], trials),
            "fail": rate(counts["below"], trials),
            "undecided": rate(counts["undecided"], trials),
            "mean_repeats": repeats_used / trials,
        }
    return out


def pct(r: dict[str, Any]) -> str:
    """``12.3% (11.0-13.7)``."""
    return f"{100 * r['rate']:.1f}% ({100 * r['low']:.1f}-{100 * r['high']:.1f})"


def effect_label(effect: float) -> str:
    return "no effect" if effect == 1.0 else f"{effect:g}x"


def tables(
    rows: Sequence[dict[str, Any]], chosen: Sequence[Method]
) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The PASS table (methods x effects) and the new methods' detail table."""
    headers = ["method", *(f"PASS at {effect_label(r['effect'])}" for r in rows), "trials per effect"]
    body = [[m.label, *(pct(r[m.key]["pass"]) for r in rows), str(rows[0][m.key]["pass"]["trials"])] for m in chosen]
    detail_headers = ["method", "true effect", "PASS (above)", "FAIL (below)", "UNKNOWN (undecided)", "mean repeats"]
    detail = [
        [
            m.key,
            effect_label(r["effect"]),
            pct(r[m.key]["pass"]),
            pct(r[m.key]["fail"]),
            pct(r[m.key]["undecided"]),
            fmt(r[m.key]["mean_repeats"], 2),
        ]
        for m in chosen
        if m.min_effect is not None
        for r in rows
    ]
    return headers, body, detail_headers, detail


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 trials per effect (40 for the old methods)")
    parser.add_argument("--trials", type=int, help="trials per effect for the new methods (default 2000; quick 300)")
    parser.add_argument("--old-trials", type=int, help="trials per effect for the old methods (default 400; quick 40)")
    parser.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples of the old methods")
    parser.add_argument("--burst", type=int, default=16, help="requests per burst of the new method")
    parser.add_argument("--old-burst", type=int, default=128, help="requests per burst of the old method")
    parser.add_argument("--burst-sigma", type=float, default=0.10, help="lognormal sigma between bursts")
    parser.add_argument("--request-sigma", type=float, default=0.25, help="lognormal sigma within a burst")
    parser.add_argument("--order-effect", type=float, default=1.0, help="slowdown of each repeat's second burst")
    parser.add_argument("--confidence", type=float, default=0.95, help="the new method's overall confidence")
    parser.add_argument("--min-effect", type=float, default=1.2, help="the new method's minimum effect")
    parser.add_argument("--min-repeats", type=int, default=3, help="the new method's first look")
    parser.add_argument("--max-repeats", type=int, default=8, help="the new method's last look")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _print_tables(
    rows: Sequence[dict[str, Any]], chosen: Sequence[Method], machine: Machine, design: Design
) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Print the PASS table and the new methods' detail table; returns both."""
    headers, body, detail_headers, detail = tables(rows, chosen)
    print(
        f"\nHow often each analysis says 'warm TTFT is faster' (PASS), with 95% Wilson intervals: "
        f"{machine.burst_sigma:.2f} lognormal sigma between bursts, {machine.request_sigma:.2f} within; "
        "the 'no effect' column is the false-positive rate"
    )
    print(table(headers, body))
    print(
        f"\nThe new methods' verdicts (confidence {design.confidence:g} over the looks at "
        f"{design.min_repeats}..{design.max_repeats} repeats of {machine.burst}-request bursts)"
    )
    print(table(detail_headers, detail))
    return headers, body, detail_headers, detail


def main(argv: Sequence[str] | None = None) -> int:
    """Simulate every effect, print the PASS rates of each method, write the JSON."""
    args = _parse_args(argv)
    trials = args.trials or (300 if args.quick else 2000)
    old_trials = min(trials, args.old_trials or (40 if args.quick else 400))
    machine = Machine(args.burst, args.old_burst, args.burst_sigma, args.request_sigma, args.order_effect)
    design = Design(args.confidence, args.min_effect, args.min_repeats, args.max_repeats)
    chosen = methods(machine, design)

    start = time.perf_counter()
    rows = []
    for index, effect in enumerate(EFFECTS):
        rows.append(run_effect(effect, index, trials, old_trials, args.n_boot, machine, design, args.seed))
        print(f"  {effect_label(effect)}: done after {time.perf_counter() - start:.1f} s", flush=True)
    elapsed = time.perf_counter() - start

    headers, body, detail_headers, detail = _print_tables(rows, chosen, machine, design)
    path = write_result(
        NAME,
        args.quick,
        {
            "what": "simulated PASS rate of the TTFT check: requests pooled over bursts (old) vs one ratio per "
            "repeat with sequential looks and a minimum effect (new), under no effect and true effects",
            "settings": {
                "trials": trials,
                "old_trials": old_trials,
                "n_boot": args.n_boot,
                "burst": machine.burst,
                "old_burst": machine.old_burst,
                "burst_sigma": machine.burst_sigma,
                "request_sigma": machine.request_sigma,
                "order_effect": machine.order_effect,
                "seed": args.seed,
                "effects": list(EFFECTS),
                "old_repeats": OLD_REPEATS,
                "confidence": design.confidence,
                "min_effect": design.min_effect,
                "min_repeats": design.min_repeats,
                "max_repeats": design.max_repeats,
            },
            "machine": machine_facts(),
            "elapsed_s": elapsed,
            "rows": rows,
            "markdown": markdown_table(headers, body),
            "markdown_detail": markdown_table(detail_headers, detail),
        },
    )
    print(f"\nwrote {path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
