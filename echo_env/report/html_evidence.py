"""The evidence sections of ``report.html`` (server facts, phases, fleet, turns, cache on vs off), and the
small HTML pieces every section uses. Each section takes the ``summary.json`` dict and returns HTML.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

NA = "n/a"
_RUN_KEYS = frozenset(
    ["label", "verdict", "reason", "reason_id", "checks", "server", "prefix", "ttft", "run_error", "comparisons",
     "pooled", "phases", "fleet"]
)  # fmt: skip


# --------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------


def num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return NA if value is None else escape(str(value))
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def ms(seconds: Any) -> str:
    return num(seconds * 1000.0, 1) if isinstance(seconds, int | float) else NA


def pct(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) else NA


def text(value: Any) -> str:
    return NA if value is None else escape(str(value))


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested tables (for sections this page does not know yet)."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">(empty)</span>'
        rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{generic(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list):
        if not value:
            return '<span class="muted">(none)</span>'
        if all(not isinstance(v, Mapping | list) for v in value):
            return ", ".join(generic(v, depth + 1) for v in value)
        return "<ol>" + "".join(f"<li>{generic(v, depth + 1)}</li>" for v in value) + "</ol>"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else NA
    return text(value)


def section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def label(run: Mapping[str, Any]) -> str:
    """A run's label in words (``cache on``)."""
    return str(run.get("label") or "").replace("_", " ")


# --------------------------------------------------------------------------------------
# Server, phases, fleet, turns, cache on vs off
# --------------------------------------------------------------------------------------


def server_section(summary: Mapping[str, Any]) -> str:
    parts = []
    for run in summary.get("runs") or []:
        parts.append(f"<h3>{escape(label(run))}</h3>{generic(run.get('server') or {})}")
        if run.get("prefix"):
            parts.append(f"<h4>Token plan</h4>{generic(run['prefix'])}")
        extra = {k: v for k, v in run.items() if k not in _RUN_KEYS}
        if extra:
            parts.append(f"<h4>More evidence</h4>{generic(extra)}")
    if not parts:
        parts.append('<p class="muted">No server was reached.</p>')
    return section("server", "Server facts", "\n".join(parts))


_PHASE_COLUMNS = (
    "requests",
    "failed",
    "TTFT p50 ms",
    "p90",
    "p99",
    "e2e p50 ms",
    "req/s",
    "hit rate",
    "reported",
    "ceiling",
)


def _phase_row(p: Mapping[str, Any]) -> list[str]:
    name = escape(str(p.get("name"))) + ("" if p.get("repeat") is None else f" #{p.get('repeat')}")
    reset = " !" if p.get("counter_reset") else ""
    return [
        name,
        num(p.get("requests")),
        num(p.get("failed")),
        ms(p.get("ttft_p50_s")),
        ms(p.get("ttft_p90_s")),
        ms(p.get("ttft_p99_s")),
        ms(p.get("e2e_p50_s")),
        num(p.get("throughput_rps"), 1),
        num(p.get("hit_rate_counters")) + reset,
        num(p.get("hit_rate_reported")),
        num(p.get("hit_rate_ceiling")),
    ]


def phases_section(summary: Mapping[str, Any]) -> str:
    parts = []
    for run in summary.get("runs") or []:
        pooled, each = run.get("pooled") or [], run.get("phases") or []
        parts.append(f"<h3>{escape(label(run))}</h3>")
        parts.append(table(["phase", *_PHASE_COLUMNS], [_phase_row(p) for p in pooled or each], "phases"))
        if pooled and each:
            rows = table(["phase", *_PHASE_COLUMNS], [_phase_row(p) for p in each], "phases")
            parts.append(f"<details><summary>every repeat ({len(each)} bursts)</summary>{rows}</details>")
        errors = {str(p.get("name")): p.get("first_error") for p in each if p.get("first_error")}
        if errors:
            parts.append(
                "<p>First errors: " + "; ".join(f"{escape(k)}: {escape(str(v))}" for k, v in errors.items()) + "</p>"
            )
    if not parts:
        return section("phases", "Phases", '<p class="muted">No phase was measured.</p>')
    return section("phases", "Phases", "\n".join(parts))


def fleet_section(summary: Mapping[str, Any]) -> str:
    fleet = summary.get("fleet")
    if not fleet:
        return ""
    verdict = str(fleet.get("verdict") or "UNKNOWN")
    head = (
        f'<div id="routing-verdict" class="verdict v-{escape(verdict)}" data-verdict="{escape(verdict)}">'
        f'<span class="badge">routing {escape(verdict)}</span> {text(fleet.get("reason"))}</div>'
        f"<p>router policy {text(fleet.get('policy'))} · counters read from {text(fleet.get('metrics_source'))} · "
        f"requests sent {text(fleet.get('requests_sent'))} · fleet hit rate {num(fleet.get('fleet_hit_rate'))}</p>"
    )
    shares = fleet.get("request_shares") or []
    rows = [
        [
            escape(str(r.get("url"))),
            num(r.get("requests")),
            pct(shares[i]) if i < len(shares) else NA,
            num(r.get("hit_rate")),
            text(r.get("note") or ""),
        ]
        for i, r in enumerate(fleet.get("replicas") or [])
    ]
    replicas = table(["replica", "requests", "share", "hit rate", "note"], rows, "replicas")
    ceilings = fleet.get("ceilings")
    ceil = (
        f"<h4>Fleet ceilings</h4>{generic(ceilings)}"
        if ceilings
        else '<p class="muted">Ceilings n/a (prompts not tokenized).</p>'
    )
    known = {"policy", "metrics_source", "requests_sent", "fleet_hit_rate", "request_shares", "replicas", "ceilings",
             "verdict", "reason", "reason_id", "checks"}  # fmt: skip
    extra = {k: v for k, v in fleet.items() if k not in known}
    return section("fleet", "Fleet: each replica and the routing verdict", head + replicas + ceil + generic(extra))


def turns_section(summary: Mapping[str, Any]) -> str:
    parts = []
    for run in summary.get("runs") or []:
        turns = [p for p in run.get("pooled") or [] if str(p.get("name", "")).startswith("turn")]
        if not turns:
            continue
        rows = [
            [
                escape(str(p.get("name"))),
                num(p.get("requests")),
                num(p.get("hit_rate")),
                num(p.get("hit_rate_ceiling")),
                pct(p["hit_rate"] / p["hit_rate_ceiling"])
                if p.get("hit_rate") is not None and p.get("hit_rate_ceiling")
                else NA,
                ms(p.get("ttft_p50_s")),
            ]
            for p in turns
        ]
        header = ["turn", "requests", "hit rate", "ceiling", "of ceiling", "TTFT p50 ms"]
        parts.append(f"<h3>{escape(label(run))}</h3>" + table(header, rows, "turns"))
    if not parts:
        return ""
    intro = "<p>Later turns resend the episode's history: the hit rate shows how much of it the cache served.</p>"
    return section("turns", "Per-turn history reuse", intro + "\n".join(parts))


def on_vs_off_section(summary: Mapping[str, Any]) -> str:
    runs = summary.get("runs") or []
    comparisons = summary.get("on_vs_off") or []
    if len(runs) < 2 and not comparisons:
        return ""
    rows = [
        [
            escape(label(r)),
            text(r.get("verdict")),
            text(r.get("reason")),
            num(_warm(r).get("hit_rate")),
            ms(_warm(r).get("ttft_p50_s")),
        ]
        for r in runs
    ]
    body = table(["server", "verdict", "reason", "warm hit rate", "warm TTFT p50 ms"], rows, "onoff")
    crow = [
        [
            text(c.get("name")),
            num(c.get("ratio")) + escape(str(c.get("unit") or "")),
            num(c.get("low")),
            num(c.get("high")),
        ]
        for c in comparisons
    ]
    if crow:
        body += table(["cache on vs off", "ratio", "low", "high"], crow, "comparisons")
    return section("on-vs-off", "Cache on vs off", body)


def _warm(run: Mapping[str, Any]) -> Mapping[str, Any]:
    return next((p for p in run.get("pooled") or [] if p.get("name") == "warm"), {})
