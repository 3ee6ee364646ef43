"""``ttft_repeats.png``: each repeat's control/warm TTFT ratio, the interval over repeats, the minimum effect."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from echo_env.cachetest.results import ServerRun, TestResult, TTFTEvidence
from echo_env.report import plot_style as style
from echo_env.report.plot_style import min_effect, server_label


def _finite_ratios(run: ServerRun) -> list[tuple[int, float]]:
    ttft = run.evidence.ttft
    if ttft is None:
        return []
    return [(i, r) for i, r in enumerate(ttft.ratios) if math.isfinite(r) and r > 0]


def _decision_words(ttft: TTFTEvidence | None, effect: float | None) -> str:
    if ttft is None or ttft.ci is None:
        return "no interval"
    if effect is None:
        return ttft.decision
    return {"above": f"CI above {effect:.2f}x", "below": f"CI below {effect:.2f}x"}.get(
        ttft.decision, f"CI includes {effect:.2f}x"
    )


_ORDER_MARKS = {"warm": "o", "control": "s"}


def plot_ttft_repeats(path: Path, result: TestResult) -> bool:
    """Each repeat's control/warm TTFT ratio as a dot, the interval over repeats as a band, per server.

    The y axis is logarithmic: the interval is computed on log ratios, so 2x faster and
    2x slower lie equally far from 1. The minimum effect is a dashed line, no effect a
    dotted one.

    Args:
        path: The PNG to write.
        result: The test; each server's TTFT evidence gives the ratios and the interval.

    Returns:
        False (nothing written) when no server has a usable ratio.
    """
    runs = [run for run in result.runs if _finite_ratios(run)]
    if not runs:
        return False
    plt = style.pyplot()
    effect = min_effect(result)
    fig, ax = plt.subplots(figsize=(max(5.6, 2.4 + 2.2 * len(runs)), 4.8), layout="constrained")
    try:
        seen_orders: set[str] = set()
        ys: list[float] = [1.0] + ([effect] if effect else [])
        for x, run in enumerate(runs):
            ys += _draw_repeats(ax, x, run, seen_orders)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="1x: no effect")
        if effect:
            ax.axhline(effect, color="#B22222", linestyle="--", linewidth=1.2, label=f"{effect:.2f}x: minimum effect")
        for order in ("warm", "control"):
            if order in seen_orders:
                ax.scatter(
                    [], [], marker=_ORDER_MARKS[order], color="white", edgecolors="black", label=f"{order} burst first"
                )
        _log_ratio_axis(ax, ys)
        ax.set_xlim(-0.6, len(runs) - 0.4 + 0.5)
        ax.set_xticks(range(len(runs)))
        labels = []
        for run in runs:
            n = len(_finite_ratios(run))
            words = _decision_words(run.evidence.ttft, effect)
            labels.append(f"{server_label(run)}\n{n} repeat{'s' if n != 1 else ''}, {words}")
        ax.set_xticklabels(labels)
        ax.set_ylabel("control TTFT / warm TTFT (log scale)")
        ax.set_title("Warm vs control TTFT, one ratio per repeat", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        # Below the axes: inside, it hides the interval's label of whichever server sits under it.
        fig.legend(loc="outside lower center", fontsize=8, ncol=2, frameon=False)
        if effect is None:
            ax.text(0.01, 0.01, "minimum effect not recorded", transform=ax.transAxes, fontsize=8, color="#666666")
        fig.savefig(path, dpi=style.DPI)
    finally:
        plt.close(fig)
    return True


def _draw_repeats(ax: Any, x: int, run: ServerRun, seen_orders: set[str]) -> list[float]:
    """One server's interval band and its repeats' ratios at ``x``; returns the y values drawn."""
    ttft = run.evidence.ttft
    assert ttft is not None  # _finite_ratios kept only runs with ratios
    color = style.SERVER_COLORS[x % len(style.SERVER_COLORS)]
    ys: list[float] = []
    ci = ttft.ci
    if ci is not None:
        ax.fill_between([x - 0.3, x + 0.3], ci.low, ci.high, color=color, alpha=0.18, linewidth=0)
        ax.hlines(ci.ratio, x - 0.3, x + 0.3, colors=color, linewidth=2)
        ax.annotate(
            f"{ci.ratio:.3g}x\n{ci.confidence:.0%} CI {ci.low:.3g}–{ci.high:.3g}",
            (x + 0.32, ci.ratio),
            va="center",
            fontsize=8,
        )
        ys += [ci.low, ci.high]
    ratios = _finite_ratios(run)
    jitter = style.jitter(len(ratios))
    for (i, r), dx in zip(ratios, jitter, strict=True):
        order = ttft.orders[i] if i < len(ttft.orders) else ""
        seen_orders.add(order)
        ax.scatter(
            x + dx * 0.6,
            r,
            s=30,
            color=color,
            marker=_ORDER_MARKS.get(order, "o"),
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
        )
        ys.append(r)
    return ys


def _log_ratio_axis(ax: Any, ys: Sequence[float]) -> None:
    """A log y axis spanning ``ys``, with plain-number ticks."""
    ax.set_yscale("log")
    low, high = min(ys), max(ys)
    ax.set_ylim(low / 1.35, high * 1.35)
    # Plain numbers on a log axis: "2" reads better than "2x10^0".
    sparse = (0.01, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    steps = sorted({*sparse, 0.75, 1.5, 3}) if high / low <= 30 else sparse
    ticks = [t for t in steps if low / 1.35 <= t <= high * 1.35]  # 1 is always in range
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.minorticks_off()
