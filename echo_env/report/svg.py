"""Small inline SVG charts for ``report.html``: grouped bars and dots against reference lines.

Hand-written SVG keeps the page self-contained (no script, no network, no matplotlib) and
the same on every machine. Values that are missing (None) are drawn as an ``n/a`` label,
never as a zero bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860", "#DA8BC3", "#8C8C8C")
"""Series colours, in order."""

_W, _H = 640, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 28, 58


@dataclass(frozen=True)
class RefLine:
    """A horizontal line across the plot (a ceiling, a threshold)."""

    value: float
    """Where, in the y unit."""
    label: str
    """What it is, written at its right end."""
    color: str = "#333333"
    """Its colour."""


@dataclass(frozen=True)
class Group:
    """One cluster of bars (or dots) under an x label."""

    label: str
    """The x label."""
    values: Sequence[float | None]
    """One value per series (None: not measured)."""
    band: tuple[float, float] | None = None
    """An interval drawn behind the group (low, high)."""


@dataclass(frozen=True)
class Chart:
    """A grouped bar or dot chart."""

    title: str
    """Above the plot."""
    series: Sequence[str]
    """The legend, one name per value of each group."""
    groups: Sequence[Group]
    """The x axis."""
    y_label: str
    """The y axis's unit."""
    refs: Sequence[RefLine] = field(default_factory=tuple)
    """Horizontal lines."""
    dots: bool = False
    """Dots instead of bars (ratios, where zero is no baseline)."""
    y_min: float = 0.0
    """Bottom of the y axis."""


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _top(chart: Chart) -> float:
    values = [v for g in chart.groups for v in g.values if v is not None]
    values += [r.value for r in chart.refs] + [g.band[1] for g in chart.groups if g.band]
    top = max(values, default=1.0)
    return top * 1.12 if top > chart.y_min else chart.y_min + 1.0


def width(chart: Chart) -> int:
    """The chart's width in pixels: wide enough for every bar's label."""
    bars = max((len(g.values) for g in chart.groups), default=1)
    return max(_W, _LEFT + _RIGHT + len(chart.groups) * (36 + 26 * bars))


def _y(value: float, chart: Chart, top: float) -> float:
    span = (top - chart.y_min) or 1.0
    return _TOP + (_H - _TOP - _BOTTOM) * (1 - (value - chart.y_min) / span)


def _axes(chart: Chart, top: float) -> list[str]:
    out = [f'<text x="{width(chart) / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(chart.title)}</text>']
    for i in range(5):
        value = chart.y_min + (top - chart.y_min) * i / 4
        y = _y(value, chart, top)
        out.append(f'<line x1="{_LEFT}" x2="{width(chart) - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
    mid = (_TOP + _H - _BOTTOM) / 2
    out.append(
        f'<text x="12" y="{mid:.1f}" transform="rotate(-90 12 {mid:.1f})" text-anchor="middle">'
        f"{escape(chart.y_label)}</text>"
    )
    return out


def _legend(chart: Chart) -> list[str]:
    out = []
    x = _LEFT
    for i, name in enumerate(chart.series):
        color = COLORS[i % len(COLORS)]
        out.append(f'<rect x="{x}" y="{_H - 16}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="{_H - 7}">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def _group(chart: Chart, index: int, group: Group, top: float) -> list[str]:
    slot = (width(chart) - _LEFT - _RIGHT) / max(len(chart.groups), 1)
    x0 = _LEFT + slot * index
    out = []
    if group.band is not None:
        y_hi, y_lo = _y(group.band[1], chart, top), _y(group.band[0], chart, top)
        out.append(
            f'<rect x="{x0 + slot * 0.1:.1f}" y="{y_hi:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{max(y_lo - y_hi, 1):.1f}" fill="#cfd8e8" opacity="0.7"/>'
        )
    n = max(len(group.values), 1)
    bar = min(slot * 0.7 / n, 64.0)
    start = x0 + (slot - bar * n) / 2  # the group's bars centred in its slot
    base = _y(chart.y_min, chart, top)
    for i, value in enumerate(group.values):
        x = start + bar * i
        color = COLORS[i % len(COLORS)]
        if value is None:
            out.append(f'<text x="{x + bar / 2:.1f}" y="{base - 4:.1f}" text-anchor="middle" fill="#999">n/a</text>')
            continue
        y = _y(value, chart, top)
        name = chart.series[i] if i < len(chart.series) else ""
        tip = f"<title>{escape(group.label)} {escape(name)}: {_fmt(value)}</title>"
        if chart.dots:
            out.append(f'<circle cx="{x + bar / 2:.1f}" cy="{y:.1f}" r="5" fill="{color}">{tip}</circle>')
        else:
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar * 0.92:.1f}" height="{max(base - y, 0.5):.1f}" '
                f'fill="{color}">{tip}</rect>'
            )
        out.append(f'<text x="{x + bar / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{_fmt(value)}</text>')
    for line, text in enumerate(group.label.split("\n")):
        y = _H - _BOTTOM + 16 + 13 * line
        out.append(f'<text x="{x0 + slot / 2:.1f}" y="{y}" text-anchor="middle">{escape(text)}</text>')
    return out


def render(chart: Chart) -> str:
    """The chart as one ``<svg>`` element with its own size (pixels), ready to inline in HTML.

    Args:
        chart: What to draw.

    Returns:
        SVG markup.
    """
    top = _top(chart)
    full = width(chart)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{full}" height="{_H}" viewBox="0 0 {full} {_H}" '
        f'role="img" aria-label="{escape(chart.title)}" font-family="sans-serif" font-size="11">',
        *_axes(chart, top),
    ]
    for i, group in enumerate(chart.groups):
        parts += _group(chart, i, group, top)
    for ref in chart.refs:
        y = _y(ref.value, chart, top)
        parts.append(
            f'<line x1="{_LEFT}" x2="{full - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{ref.color}" '
            'stroke-dasharray="5 3"/>'
        )
        parts.append(
            f'<text x="{full - _RIGHT - 2}" y="{y - 3:.1f}" text-anchor="end" fill="{ref.color}">'
            f"{escape(ref.label)}</text>"
        )
    base = _y(chart.y_min, chart, top)
    parts.append(f'<line x1="{_LEFT}" x2="{full - _RIGHT}" y1="{base:.1f}" y2="{base:.1f}" stroke="#333"/>')
    parts += _legend(chart)
    parts.append("</svg>")
    return "\n".join(parts)
