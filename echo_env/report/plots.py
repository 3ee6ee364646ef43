"""The plots of a prefix-cache test, drawn from one :class:`~echo_env.cachetest.results.TestResult`.

* ``ttft_by_phase.png``: every request's time to first token, by phase, one panel per server;
* ``hit_rate.png``: the warm burst's hit rate from the server's counters and from
  ``cached_tokens``, against its ceiling, per server (a missing figure reads n/a);
* ``ttft_repeats.png``: each repeat's control/warm TTFT ratio, the interval over
  repeats, and the minimum effect the verdict asks for.

Plots need the optional ``plots`` extra (matplotlib). Without it, or when one plot
fails, :func:`draw_plots` says why in its notes and the other files are unaffected.
What every plot shares lives in :mod:`echo_env.report.plot_style`, the repeats plot in
:mod:`echo_env.report.plot_repeats`; both are re-exported here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_env.cachetest.results import ServerRun, TestResult
from echo_env.measure.figures import HitRate
from echo_env.report import plot_style as style
from echo_env.report.plot_repeats import plot_ttft_repeats
from echo_env.report.plot_style import (
    PLOTS_INSTALL_HINT,
    PlotsUnavailable,
    hit_fraction,
    min_effect,
    server_label,
)

log = logging.getLogger(__name__)

__all__ = [
    "HIT_RATE_PLOT_FILE",
    "PLOTS",
    "PLOTS_INSTALL_HINT",
    "TTFT_PLOT_FILE",
    "TTFT_REPEATS_PLOT_FILE",
    "Plot",
    "PlotsUnavailable",
    "draw_plots",
    "hit_fraction",
    "min_effect",
    "plot_hit_rate",
    "plot_ttft_by_phase",
    "plot_ttft_repeats",
    "server_label",
]

TTFT_PLOT_FILE = "ttft_by_phase.png"
"""Per-request time to first token by phase, one panel per server."""
HIT_RATE_PLOT_FILE = "hit_rate.png"
"""The warm burst's hit rate, measured two ways, against its ceiling, per server."""
TTFT_REPEATS_PLOT_FILE = "ttft_repeats.png"
"""Control/warm TTFT ratio of each repeat, its interval, and the minimum effect."""


# --------------------------------------------------------------------------------------
# ttft_by_phase.png
# --------------------------------------------------------------------------------------


def _draw_ttft_panel(ax: Any, names: Sequence[str], data: Sequence[Sequence[float]]) -> None:
    """One server's panel: a box per phase with enough samples, every request as a dot."""
    present = [i for i, d in enumerate(data) if d]
    if not present:
        ax.text(0.5, 0.5, "no request finished", ha="center", va="center", transform=ax.transAxes, color="#666666")
    boxed = [i for i in present if len(data[i]) >= style.MIN_BOX_SAMPLES]
    if boxed:
        box = ax.boxplot(
            [data[i] for i in boxed],
            positions=[i + 1 for i in boxed],
            widths=0.55,
            showfliers=False,  # the dots already show every outlier
            patch_artist=True,
            medianprops={"color": "black", "linewidth": 1.5},
        )
        for patch, i in zip(box["boxes"], boxed, strict=True):
            patch.set_facecolor(style.phase_color(names[i], i))
            patch.set_alpha(0.35)
    for i in present:
        color = style.phase_color(names[i], i)
        xs = [i + 1 + dx for dx in style.jitter(len(data[i]))]
        ax.scatter(xs, data[i], s=9 if i in boxed else 16, alpha=0.7, color=color, linewidths=0, zorder=3)
        median = statistics.median(data[i])
        if i not in boxed:
            ax.hlines(median, i + 0.75, i + 1.25, colors="black", linewidth=1.5, zorder=4)
        ax.annotate(
            f"p50 {style.ms_label(median)}",
            (i + 1, max(data[i])),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=8,
        )
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([f"{n}\n(n={len(d)})" for n, d in zip(names, data, strict=True)], fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_ttft_by_phase(path: Path, result: TestResult) -> bool:
    """Per-request TTFT by phase, one panel per server, sharing the y axis.

    Args:
        path: The PNG to write.
        result: The test; each server's pooled phases give the samples.

    Returns:
        False (nothing written) when no request finished with a TTFT.
    """
    panels = [
        (run, [p.name for p in run.pooled], [[t * 1000 for t in p.ttft_samples] for p in run.pooled])
        for run in result.runs
        if run.pooled
    ]
    samples = [t for _, _, data in panels for d in data for t in d]
    if not samples:
        return False
    plt = style.pyplot()
    positive = [t for t in samples if t > 0]
    # Linear from zero reads honestly; log only when cold dwarfs warm so much that the
    # warm box would be a flat line at the bottom.
    log_scale = bool(positive) and max(positive) / min(positive) > 50
    widest = max(len(names) for _, names, _ in panels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.4 + 1.25 * widest * len(panels), 4.8), sharey=True, squeeze=False
    )
    try:
        for ax, (run, names, data) in zip(axes[0], panels, strict=True):
            _draw_ttft_panel(ax, names, data)
            ax.set_title(server_label(run), fontsize=10)
        ax0 = axes[0][0]
        if log_scale:
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax0.set_yscale("log")
            # 20, 50, 100, 200 ms read at a glance; 10^2 does not.
            ax0.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax0.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax0.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax0.set_ylabel("time to first token (ms, log scale)")
        else:
            ax0.set_ylim(bottom=0)
            ax0.set_ylabel("time to first token (ms)")
        bottom, top = ax0.get_ylim()
        ax0.set_ylim(bottom, top * (1.6 if log_scale else 1.1))  # room for the p50 labels
        main = result.main
        model = main.evidence.server.model if main else ""
        fig.suptitle("Time to first token of each request, by phase" + (f"\n{model}" if model else ""), fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=style.DPI)
    finally:
        plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# hit_rate.png
# --------------------------------------------------------------------------------------


def _warm_hit(run: ServerRun) -> HitRate | None:
    warm = run.evidence.warm
    return warm.hit if warm is not None else None


_HIT_SERIES = ("server counters", "usage.cached_tokens", "ceiling (whole cache units)")
_HIT_COLORS = ("#4C72B0", "#8172B2", "#BBBBBB")
_HIT_BAR_WIDTH = 0.26
_HitTriple = tuple[float | None, float | None, float | None]


def plot_hit_rate(path: Path, result: TestResult) -> bool:
    """Grouped bars per server: the warm hit rate from counters, from ``cached_tokens``, and its ceiling.

    A missing figure is written "n/a" where its bar would be, never drawn as a zero bar.

    Args:
        path: The PNG to write.
        result: The test; each server's warm evidence gives the figures.

    Returns:
        False (nothing written) when no server has any of the three figures.
    """
    runs = result.runs
    values: list[_HitTriple] = []
    for run in runs:
        hit = _warm_hit(run)
        values.append((hit.counters, hit.reported, hit.ceiling) if hit else (None, None, None))
    if all(v is None for triple in values for v in triple):
        return False
    plt = style.pyplot()
    fraction = hit_fraction(result)
    fig, ax = plt.subplots(figsize=(max(6.4, 2.0 + 2.6 * len(runs)), 4.8), layout="constrained")
    try:
        handles = _pass_lines(ax, values, fraction)
        _hit_rate_bars(ax, values)
        ax.set_xlim(-0.75, len(runs) - 0.25)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{server_label(r)}\n{r.decision.verdict}" for r in runs])
        ax.set_ylim(0, 1.15)  # room for the value labels above a full bar
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("hit rate (cached / prompt tokens)")
        ax.set_title(
            "Prefix-cache hit rate of the warm burst, measured vs ceiling\n(in brackets: share of the ceiling)",
            fontsize=11,
        )
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncol=2, frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(path, dpi=style.DPI)
    finally:
        plt.close(fig)
    return True


def _pass_lines(ax: Any, values: Sequence[_HitTriple], fraction: float | None) -> list[Any]:
    """The line PASS needs over each server's bars; returns the legend's handles (series, then that line)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    width = _HIT_BAR_WIDTH
    handles: list[Any] = [
        Patch(facecolor=color, edgecolor="black", linewidth=0.5, label=label)
        for label, color in zip(_HIT_SERIES, _HIT_COLORS, strict=True)
    ]
    for i, (_, _, ceiling) in enumerate(values):
        if fraction is not None and ceiling:
            ax.hlines(
                fraction * ceiling,
                i - 1.5 * width,
                i + 1.5 * width,
                colors="#B22222",
                linestyles="--",
                linewidth=1.2,
                zorder=4,
            )
    if fraction is not None and any(triple[2] for triple in values):
        handles.append(Line2D([], [], color="#B22222", linestyle="--", label=f"PASS needs {fraction:.0%} of ceiling"))
    return handles


def _hit_rate_bars(ax: Any, values: Sequence[_HitTriple]) -> None:
    """One bar per figure and server, labelled with its value (and share of the ceiling), or "n/a"."""
    width = _HIT_BAR_WIDTH
    for j, (label, color) in enumerate(zip(_HIT_SERIES, _HIT_COLORS, strict=True)):
        xs = [i + (j - 1) * width for i in range(len(values))]
        heights = [triple[j] for triple in values]
        drawn = [(x, h) for x, h in zip(xs, heights, strict=True) if h is not None]
        ax.bar(
            [x for x, _ in drawn],
            [h for _, h in drawn],
            width,
            label=label,
            color=color,
            edgecolor="black",
            linewidth=0.5,
        )
        for x, h, triple in zip(xs, heights, values, strict=True):
            if h is None:
                ax.annotate(
                    style.NA,
                    (x, 0),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=9,
                    color="#B22222",
                    style="italic",
                )
                continue
            text = f"{h:.2f}"
            ceiling = triple[2]
            if j < 2 and ceiling:
                text += f"\n({h / ceiling:.0%})"
            ax.annotate(text, (x, h), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)


# --------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One plot of the report."""

    file: str
    """Its file name in the run's folder."""
    draw: Callable[[Path, TestResult], bool]
    """Draws it; False when there is nothing to draw."""
    empty_reason: str
    """Why it is not drawn when ``draw`` returns False."""


PLOTS: tuple[Plot, ...] = (
    Plot(TTFT_PLOT_FILE, plot_ttft_by_phase, "no request finished with a time to first token"),
    Plot(HIT_RATE_PLOT_FILE, plot_hit_rate, "no hit rate or ceiling was measured"),
    Plot(TTFT_REPEATS_PLOT_FILE, plot_ttft_repeats, "no TTFT repeat finished"),
)
"""Every plot, in the order drawn."""


def draw_plots(out_dir: Path, result: TestResult) -> tuple[list[Path], list[str]]:
    """Draw every plot into ``out_dir``; one failing never stops the others.

    Args:
        out_dir: The run's folder.
        result: The test.

    Returns:
        The files written, and a note for each plot not drawn (why), or one note when
        matplotlib is missing.
    """
    written: list[Path] = []
    notes: list[str] = []
    for plot in PLOTS:
        start = time.perf_counter()
        target = out_dir / plot.file
        # A plot left by an earlier run in a reused folder would pass for this run's.
        target.unlink(missing_ok=True)
        try:
            if plot.draw(target, result):
                written.append(target)
            else:
                notes.append(f"{plot.file} not drawn: {plot.empty_reason}")
        except PlotsUnavailable as exc:
            log.warning("plots skipped: %s", exc)
            notes.append(f"plots skipped: {exc}")
            break
        except Exception as exc:  # a plot is a convenience; never let it lose the data
            log.warning("could not draw %s", plot.file, exc_info=True)
            target.unlink(missing_ok=True)
            notes.append(f"{plot.file} not drawn: {type(exc).__name__}: {exc}")
        log.debug("time/report/%s: %.4f s", plot.file, time.perf_counter() - start)
    return written, notes
