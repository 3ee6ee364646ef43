"""``report.html``: one self-contained page per prefix-cache test, to send to someone.

Built from ``summary.json`` (:meth:`~echo_env.cachetest.results.TestResult.to_json`), so a
fresh run and an old one (``echo-prefix report DIR``) get the same page. It reads top
down: the verdict and its reason (and why the run stopped, when it did); the headline
figures; the checks with their evidence; the plots (hit rate against its ceiling, TTFT
per phase, TTFT per repeat) as inline SVG; the server facts and the token plan; the
phases; the fleet's replicas and routing verdict; per-turn history reuse; cache on vs
off; then anything else the summary holds, rendered generically, the settings and files.
No script, no external style or image: it opens offline and in a mail attachment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from echo_env.errors import ConfigError
from echo_env.report.html_evidence import (
    fleet_section,
    generic,
    num,
    on_vs_off_section,
    pct,
    phases_section,
    section,
    server_section,
    table,
    text,
    turns_section,
)
from echo_env.report.html_plots import plots_section
from echo_env.report.redact import redact

REPORT_FILE = "report.html"
"""The page, next to ``summary.json``."""

_MARKS = {"pass": "✓", "fail": "✗", "unknown": "?", "skip": "·"}
_KNOWN_KEYS = frozenset(
    [
        "verdict",
        "reason",
        "reason_id",
        "exit_code",
        "partial",
        "error",
        "hit_rate",
        "hit_rate_source",
        "hit_rate_ceiling",
        "hit_rate_vs_ceiling",
        "checks",
        "fleet",
        "runs",
        "on_vs_off",
        "config",
        "rules",
        "started_at",
        "finished_at",
        "duration_s",
        "time_to_verdict_s",
        "out_dir",
        "files",
        "notes",
    ]
)
_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1000px;padding:16px 24px;
color:#222;line-height:1.4}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.1em;border-bottom:1px solid #ddd;margin-top:1.6em}
.verdict{padding:12px 16px;border-radius:6px;margin:8px 0;border-left:8px solid}
.v-PASS{background:#e8f5e9;border-color:#2e7d32}.v-FAIL{background:#fdecea;border-color:#c62828}
.v-UNKNOWN{background:#fff8e1;border-color:#f9a825}
.badge{font-size:1.6em;font-weight:bold;margin-right:.5em}.rid{color:#666;font-size:.85em}
.stopped{background:#fff3e0;border:1px solid #ef6c00;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;margin:6px 0;font-size:.9em}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.o-pass .m{color:#2e7d32}.o-fail .m{color:#c62828}.o-unknown .m{color:#f9a825}.o-skip{color:#888}
.m{font-weight:bold;font-size:1.1em}figure{margin:8px 0}figure svg{max-width:100%;height:auto}
.muted{color:#777}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.85em}
"""


# --------------------------------------------------------------------------------------
# Verdict, headline, checks
# --------------------------------------------------------------------------------------


def _verdict(summary: Mapping[str, Any]) -> str:
    verdict = str(summary.get("verdict") or "UNKNOWN")
    out = [
        f'<div id="verdict" class="verdict v-{escape(verdict)}" data-verdict="{escape(verdict)}">',
        f'<span class="badge">{escape(verdict)}</span> <span id="reason">{text(summary.get("reason"))}</span>',
        f'<div class="rid">reason id <code>{text(summary.get("reason_id"))}</code> · exit code '
        f"{text(summary.get('exit_code'))}</div></div>",
    ]
    if summary.get("error") or summary.get("partial"):
        why = summary.get("error") or "a phase is short of its evidence (see the checks)"
        runs = summary.get("runs") or []
        done = [
            f"{p.get('name')}" + ("" if p.get("repeat") is None else f" #{p['repeat']}")
            for r in runs
            for p in r.get("phases") or []
        ]
        what = f"{len(done)} phase{'s' if len(done) != 1 else ''} on {len(runs)} server(s)"
        if done:
            what += f" ({', '.join(done)})"
        out.append(
            f'<div id="stopped" class="stopped"><b>Run incomplete.</b> Stopped because: {text(why)}. '
            f"Measured before it stopped: {escape(what)}; everything below is what was measured.</div>"
        )
    return "\n".join(out)


def _headline(summary: Mapping[str, Any]) -> str:
    runs = summary.get("runs") or []
    rows = [
        ("hit rate (warm burst)", num(summary.get("hit_rate")), text(summary.get("hit_rate_source"))),
        ("its ceiling", num(summary.get("hit_rate_ceiling")), "the most these prompts allow"),
        ("share of the ceiling", pct(summary.get("hit_rate_vs_ceiling")), ""),
    ]
    ttft = (runs[0].get("ttft") if runs else None) or {}
    ci = ttft.get("ci") or {}
    if ci:
        what = f"{pct(ci.get('confidence'))} CI {num(ci.get('low'))}–{num(ci.get('high'))} over {ci.get('n')} repeats"
        rows.append(("control/warm TTFT", f"{num(ci.get('ratio'))}x", escape(what)))
    elif ttft.get("ratios"):
        rows.append(("control/warm TTFT per repeat", ", ".join(num(r) for r in ttft["ratios"]), "no interval"))
    for c in runs[0].get("comparisons") or [] if runs else []:
        if ci and (c.get("ratio"), c.get("low"), c.get("high")) == (ci.get("ratio"), ci.get("low"), ci.get("high")):
            continue  # the interval above, again
        rows.append((str(c.get("name")), f"{num(c.get('ratio'))}{escape(str(c.get('unit') or ''))}", ""))
    body = table(["figure", "value", ""], [(escape(a), b, c) for a, b, c in rows], "headline")
    return f'<div id="headline">{body}</div>'


def _checks_table(checks: Sequence[Mapping[str, Any]], reason_id: Any, table_id: str) -> str:
    if not checks:
        return '<p class="muted">No checks were made.</p>'
    rows = []
    for c in checks:
        outcome = str(c.get("outcome") or "unknown")
        decisive = " <b>(decided the verdict)</b>" if c.get("name") == reason_id else ""
        extra = {k: v for k, v in c.items() if k not in ("name", "title", "outcome", "detail")}
        more = f"<div>{generic(extra)}</div>" if extra else ""
        rows.append(
            f'<tr class="check o-{escape(outcome)}" data-check="{escape(str(c.get("name")))}" '
            f'data-outcome="{escape(outcome)}"><td class="m">{_MARKS.get(outcome, "?")}</td>'
            f'<td>{text(c.get("title"))}<br><code class="muted">{text(c.get("name"))}</code></td>'
            f"<td>{text(outcome)}{decisive}</td><td>{text(c.get('detail'))}{more}</td></tr>"
        )
    head = "<tr><th></th><th>check</th><th>outcome</th><th>evidence</th></tr>"
    return f'<table id="{table_id}" class="checks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _checks(summary: Mapping[str, Any]) -> str:
    fleet = summary.get("fleet") or {}
    routing = {c.get("name") for c in fleet.get("checks") or []}
    cache = [c for c in summary.get("checks") or [] if c.get("name") not in routing]
    body = _checks_table(cache, summary.get("reason_id"), "checks-main")
    if fleet:
        body += "<h3>Routing checks</h3>" + _checks_table(
            fleet.get("checks") or [], fleet.get("reason_id"), "checks-routing"
        )
    for run in (summary.get("runs") or [])[1:]:
        label = str(run.get("label") or "").replace("_", " ")
        body += f"<h3>{escape(label)}: {text(run.get('verdict'))} ({text(run.get('reason'))})</h3>"
        body += _checks_table(run.get("checks") or [], run.get("reason_id"), f"checks-{escape(str(run.get('label')))}")
    return section("checks", "Checks and their evidence", body)


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


def _settings(summary: Mapping[str, Any]) -> str:
    times = [
        ("started", text(summary.get("started_at"))),
        ("finished", text(summary.get("finished_at"))),
        ("whole run, s", num(summary.get("duration_s"), 1)),
        ("verdict after the server was healthy, s", num(summary.get("time_to_verdict_s"), 1)),
        ("folder", text(summary.get("out_dir"))),
    ]
    body = table(["", ""], [(escape(a), b) for a, b in times], "times")
    files = summary.get("files") or []
    if files:
        body += "<p>Files: " + " ".join(f"<code>{escape(Path(str(f)).name)}</code>" for f in files) + "</p>"
    for note in summary.get("notes") or []:
        body += f'<p class="note">Note: {escape(str(note))}</p>'
    body += f"<h3>Rules</h3>{generic(summary.get('rules') or {})}"
    body += f"<details><summary>Settings</summary>{generic(summary.get('config') or {})}</details>"
    return section("settings", "Run, rules and settings", body)


def render_html(summary: Mapping[str, Any]) -> str:
    """The report page of one test, from its ``summary.json``.

    Unknown keys (evidence other parts of the package add later) are not dropped: they
    are rendered generically in a "More evidence" section, so the page never hides a
    figure the summary has.

    Args:
        summary: ``TestResult.to_json()``, or ``summary.json`` as loaded; secrets are
            redacted again before anything is written into the page.

    Returns:
        The whole HTML document.
    """
    summary = redact(dict(summary))
    verdict = str(summary.get("verdict") or "UNKNOWN")
    extra = {k: v for k, v in summary.items() if k not in _KNOWN_KEYS}
    sections = [
        _verdict(summary),
        _headline(summary),
        _checks(summary),
        plots_section(summary),
        server_section(summary),
        phases_section(summary),
        fleet_section(summary),
        turns_section(summary),
        on_vs_off_section(summary),
        section("more", "More evidence", generic(extra)) if extra else "",
        _settings(summary),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>echo-prefix test: {escape(verdict)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>Prefix-cache test report</h1>\n{body}\n"
        '<p class="muted">Made by echo-prefix from summary.json; '
        "<code>echo-prefix report DIR</code> rebuilds it.</p></body></html>\n"
    )


def load_summary(run_dir: Path | str) -> dict[str, Any]:
    """``run_dir/summary.json``, loaded.

    Raises:
        ConfigError: The folder has no ``summary.json``, or it is not a summary.
    """
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        where = "that folder does not exist" if not Path(run_dir).is_dir() else "it has no summary.json"
        raise ConfigError(
            f"cannot build a report from {run_dir}: {where}; pass the out_dir of an `echo-prefix test` run "
            "(the folder holding its summary.json)"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}): rerun `echo-prefix test` to write it again") from exc
    if not isinstance(summary, dict) or "verdict" not in summary:
        raise ConfigError(f"{path} is not the summary of an `echo-prefix test` run (no verdict in it)")
    return summary
