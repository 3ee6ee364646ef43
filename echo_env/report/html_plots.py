"""The plots of ``report.html``, as inline SVG charts built from the ``summary.json`` dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from echo_env.report.html_evidence import label, section
from echo_env.report.svg import Chart, Group, RefLine, render


def _hit_phases(run: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pooled phases whose hit rate the verdict (or the reader) compares with a ceiling: warm, the turns."""
    return [p for p in run.get("pooled") or [] if p.get("name") == "warm" or str(p.get("name", "")).startswith("turn")]


def _hit_chart(summary: Mapping[str, Any]) -> Chart | None:
    runs = summary.get("runs") or []
    many = len(runs) > 1
    groups = [
        Group(
            f"{label(run)}\n{p.get('name')}" if many else str(p.get("name")),
            [p.get("hit_rate_counters"), p.get("hit_rate_reported"), p.get("hit_rate_ceiling")],
        )
        for run in runs
        for p in _hit_phases(run)
    ]
    if not groups:
        return None
    rules = summary.get("rules") or {}
    ceiling, fraction = summary.get("hit_rate_ceiling"), rules.get("hit_fraction")
    refs = []
    if isinstance(ceiling, int | float) and isinstance(fraction, int | float):
        refs.append(
            RefLine(
                ceiling * fraction, f"PASS needs ≥ {ceiling * fraction:.2f} ({fraction:.0%} of the ceiling)", "#2e7d32"
            )
        )
    series = ["server counters", "usage.cached_tokens", "ceiling"]
    return Chart("Hit rate against its ceiling", series, groups, "hit rate", refs)


def _ttft_phase_chart(summary: Mapping[str, Any]) -> Chart | None:
    runs = summary.get("runs") or []
    many = len(runs) > 1
    groups = []
    for run in runs:
        for p in run.get("pooled") or run.get("phases") or []:
            p50, p90 = p.get("ttft_p50_s"), p.get("ttft_p90_s")
            name = str(p.get("name")) + ("" if p.get("repeat") is None else f" #{p.get('repeat')}")
            groups.append(
                Group(
                    f"{label(run)}\n{name}" if many else name,
                    [p50 * 1000 if p50 is not None else None, p90 * 1000 if p90 is not None else None],
                )
            )
    if not groups:
        return None
    return Chart("Time to first token per phase", ["p50", "p90"], groups, "TTFT, ms")


def _repeat_chart(summary: Mapping[str, Any]) -> Chart | None:
    runs = summary.get("runs") or []
    ttft = (runs[0].get("ttft") if runs else None) or {}
    ratios = ttft.get("ratios") or []
    if not ratios:
        return None
    orders = ttft.get("orders") or []
    ci = ttft.get("ci") or {}
    band = (ci["low"], ci["high"]) if ci.get("low") is not None and ci.get("high") is not None else None
    groups = [
        Group(f"repeat {i}" + (f" ({orders[i]} first)" if i < len(orders) else ""), [r], band)
        for i, r in enumerate(ratios)
    ]
    effect = (summary.get("rules") or {}).get("min_effect")
    refs = []
    if isinstance(effect, int | float):
        refs.append(RefLine(effect, f"PASS needs the interval above {effect:.2f}x", "#2e7d32"))
    title = "Control/warm TTFT per repeat" + (" (band: the interval over repeats)" if band else "")
    return Chart(title, ["control/warm TTFT ratio"], groups, "ratio", refs, dots=True)


def _repeat_ttft_chart(summary: Mapping[str, Any]) -> Chart | None:
    runs = summary.get("runs") or []
    phases = [p for p in (runs[0].get("phases") or [] if runs else []) if p.get("repeat") is not None]
    names = sorted({str(p.get("name")) for p in phases if str(p.get("name")).startswith("ttft_")})
    repeats = sorted({int(p["repeat"]) for p in phases})
    if not names or not repeats:
        return None
    p50 = {(str(p.get("name")), p["repeat"]): p.get("ttft_p50_s") for p in phases}
    groups = [
        Group(f"repeat {r}", [None if p50.get((n, r)) is None else p50[(n, r)] * 1000 for n in names]) for r in repeats
    ]
    return Chart("TTFT p50 of each repeat's bursts", names, groups, "TTFT p50, ms")


def plots_section(summary: Mapping[str, Any]) -> str:
    charts = {
        "hit_rate": _hit_chart(summary),
        "ttft_by_phase": _ttft_phase_chart(summary),
        "ttft_repeats": _repeat_chart(summary),
        "ttft_per_repeat": _repeat_ttft_chart(summary),
    }
    parts = []
    for name, chart in charts.items():
        if chart is None:
            parts.append(
                f'<p class="noplot muted" data-plot="{name}">No {name.replace("_", " ")} plot: not measured.</p>'
            )
        else:
            parts.append(f'<figure class="plot" data-plot="{name}">{render(chart)}</figure>')
    return section("plots", "Plots", "\n".join(parts))
