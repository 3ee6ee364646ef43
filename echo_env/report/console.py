"""The console summary of a prefix-cache test, derived from one :class:`~echo_env.cachetest.results.TestResult`.

Verdict and reason first (a user acts on them), then the headline figures, the server
and the token plan, a table of the phases, the checks, and where the files are. A
missing figure reads ``n/a``, never ``0``. Secrets in URLs and error texts are redacted,
since console output gets pasted into bug reports.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from echo_env.cachetest.results import Check, Comparison, ServerRun, TestResult, TTFTEvidence
from echo_env.measure.figures import HitRate, PhaseFigures
from echo_env.report.answers_console import answer_lines
from echo_env.report.files import PHASES_FILE
from echo_env.report.fleet_console import fleet_lines
from echo_env.report.plots import min_effect, server_label
from echo_env.report.redact import redact_text

_NA = "n/a"
_MARKS = {"pass": "✓", "fail": "✗", "unknown": "?", "skip": "·"}
_ASCII_MARKS = {"pass": "+", "fail": "x", "unknown": "?", "skip": "-"}
_ASCII = str.maketrans({"✓": "+", "✗": "x", "·": "|", "–": "-", "…": "...", "≥": ">=", "×": "x", "’": "'"})
_MAX_PHASE_ROWS = 14
_MAX_DETAIL_LINES = 3


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return _NA if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return _NA
    ms = seconds * 1000.0
    # Three significant figures at most: sub-millisecond noise is not evidence.
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def _pack(parts: Sequence[str], width: int) -> list[str]:
    """Join ``parts`` with `` · `` into as few lines of at most ``width`` as they fit."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return lines


def _labelled(label: str, parts: Sequence[str], width: int) -> list[str]:
    """``parts`` packed under a left label column of 8 characters."""
    packed = _pack(parts, width - 8)
    return [(f"{label:<8}" if i == 0 else " " * 8) + line for i, line in enumerate(packed)]


# --------------------------------------------------------------------------------------
# Headline
# --------------------------------------------------------------------------------------


def _hit_text(warm: PhaseFigures | None) -> str:
    if warm is None:
        return f"hit rate {_NA} (no warm burst)"
    hit: HitRate = warm.hit
    if hit.value is None:
        return f"hit rate {_NA}" + (f" (ceiling {hit.ceiling:.2f})" if hit.ceiling is not None else "")
    source = " from cached_tokens" if hit.source == "cached_tokens" else ""
    if hit.ceiling is None:
        return f"hit rate {hit.value:.2f}{source} (ceiling {_NA})"
    share = f" ({hit.vs_ceiling:.0%})" if hit.vs_ceiling is not None else ""
    return f"hit rate {hit.value:.2f}{source} of a {hit.ceiling:.2f} ceiling{share}"


def _ttft_text(ttft: TTFTEvidence | None, effect: float | None) -> str:
    if ttft is None or not ttft.ratios:
        return f"control/warm TTFT {_NA}"
    per = " ".join(f"{r:.2f}" for r in ttft.ratios)
    ci = ttft.ci
    if ci is None:
        n = len(ttft.ratios)
        return f"control/warm TTFT per repeat {per} (no interval from {n} repeat{'s' if n != 1 else ''})"
    needs = f"; needs > {effect:.2f}x" if effect is not None else ""
    return (
        f"control/warm TTFT {_x(ci.ratio)} ({ci.confidence:.0%} CI {ci.low:.2f}–{ci.high:.2f} over {ci.n} "
        f"repeats: {per}{needs})"
    )


def _comparison_text(c: Comparison) -> str:
    if c.ratio is None:
        return f"{c.name} {_NA}"
    text = f"{c.name} {c.ratio:.2f}{c.unit}"
    if c.low is not None and c.high is not None:
        text += f" (CI {c.low:.2f}–{c.high:.2f})"
    return text


def _same_as_ttft(c: Comparison, ttft: TTFTEvidence | None) -> bool:
    """Whether ``c`` only repeats the TTFT interval, which the headline shows with each repeat's ratio."""
    ci = ttft.ci if ttft else None
    return ci is not None and (c.ratio, c.low, c.high) == (ci.ratio, ci.low, ci.high)


def _headline(result: TestResult, width: int) -> list[str]:
    main = result.main
    if main is None:
        return []
    ev = main.evidence
    parts = [_hit_text(ev.warm), _ttft_text(ev.ttft, min_effect(result))]
    parts += [_comparison_text(c) for c in main.comparisons if not _same_as_ttft(c, ev.ttft)]
    lines = _pack(parts, width)
    for run in result.runs[1:]:
        parts = [
            f"{server_label(run)}: {run.decision.verdict} ({run.decision.reason})",
            _hit_text(run.evidence.warm),
        ]
        lines += _pack(parts, width)
    lines += _pack([_comparison_text(c) for c in result.on_vs_off], width)
    return lines


# --------------------------------------------------------------------------------------
# Server and tokens
# --------------------------------------------------------------------------------------


def _server_parts(run: ServerRun) -> list[str]:
    s = run.evidence.server
    caching = {True: "on", False: "OFF", None: "unknown"}[s.caching_enabled]
    source = f" ({s.caching_enabled_source})" if s.caching_enabled is not None and s.caching_enabled_source else ""
    unit = f"block {s.unit_tokens}" + (f" ({s.unit_source})" if s.unit_source else "")
    if s.unit_tokens is None and run.evidence.prefix is not None:
        p = run.evidence.prefix
        unit = f"block {p.unit_tokens} ({p.unit_source})"
    elif s.unit_tokens is None:
        unit = f"block {_NA}"
    parts = [
        " ".join(x for x in (s.kind, s.version) if x),
        s.model or f"model {_NA}",
        f"prefix caching {caching}{source}",
        unit,
    ]
    if s.slots is not None:
        parts.append(f"{s.slots} slots")
    if s.embedded:
        parts.append("embedded")
    parts.append(s.base_url)
    if s.metrics_error:
        parts.append(f"no counters: {s.metrics_error}")
    return parts


def _server_lines(result: TestResult, width: int) -> list[str]:
    lines: list[str] = []
    many = len(result.runs) > 1
    for i, run in enumerate(result.runs):
        parts = _server_parts(run)
        if many:
            parts[0] = f"{server_label(run)}: {parts[0]}"
        lines += _labelled("server" if i == 0 else "", parts, width)
    return lines


def _token_lines(result: TestResult, width: int) -> list[str]:
    main = result.main
    p = main.evidence.prefix if main else None
    if p is None:
        return [f"tokens  {_NA}: the prompts were not tokenized"] if main else []
    lo, hi = p.prompt_tokens_min, p.prompt_tokens_max
    parts = [
        f"prompts {lo if lo == hi else f'{lo}–{hi}'} tokens",
        f"shared prefix {p.shared_tokens} ({p.cacheable_shared_tokens} in whole {p.unit_tokens}-token units)",
        # The whole workload's ceiling counts each prefix's cold first request; the warm
        # burst's own ceiling (the table, the verdict) leaves it out, so it is higher.
        f"workload ceiling {p.workload_ceiling:.2f} (cold requests included)",
        f"tokenized by the {p.tokenized_by}",
    ]
    lines = _labelled("tokens", parts, width)
    d = p.first_difference
    if d is not None:
        lines.append(f"        prompts first differ at token {d.position} (prompt #{d.prompt_index}): {d.context!r}")
    return lines


# --------------------------------------------------------------------------------------
# Phase table
# --------------------------------------------------------------------------------------

# (header, unit line) of each column; the last three are the hit rate from the server's
# counters, from usage.cached_tokens, and its ceiling.
_TABLE_COLUMNS = (
    ("", ""),
    ("reqs", ""),
    ("fail", ""),
    ("TTFT p50", "ms"),
    ("p90", "ms"),
    ("p99", "ms"),
    ("e2e p50", "ms"),
    ("req/s", ""),
    ("tok/s", ""),
    ("hit rate", "counters"),
    ("reported", "usage"),
    ("ceiling", ""),
)


def _row(label: str, p: PhaseFigures) -> tuple[str, ...]:
    reset = "!" if p.counters is not None and p.counters.reset else ""
    return (
        label,
        str(p.requests),
        str(p.failed),
        _ms(p.ttft.p50),
        _ms(p.ttft.p90),
        _ms(p.ttft.p99),
        _ms(p.e2e.p50),
        _f(p.throughput_rps, 1),
        _f(p.tokens_per_s, 0),
        _f(p.hit.counters) + reset,
        _f(p.hit.reported),
        _f(p.hit.ceiling),
    )


def _table_rows(result: TestResult) -> list[tuple[str, ...]]:
    many = len(result.runs) > 1
    rows: list[tuple[str, ...]] = []
    for run in result.runs:
        # A run cut short before pooling still has its per-repeat phases.
        phases = run.pooled or run.phases
        for i, p in enumerate(phases):
            name = p.name if p.repeat is None else f"{p.name} #{p.repeat}"
            # The server's name once per block keeps the column quiet but unambiguous.
            label = f"{server_label(run) if i == 0 else '':<10}{name}" if many else name
            rows.append(_row(label, p))
    return rows


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    header = tuple(name for name, _ in _TABLE_COLUMNS)
    units = tuple(unit for _, unit in _TABLE_COLUMNS)
    widths = [max(len(r[i]) for r in (header, units, *rows)) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"  {first}  {rest}".rstrip()

    return [fmt(header), fmt(units), *(fmt(r) for r in rows)]


def _phase_lines(result: TestResult) -> list[str]:
    rows = _table_rows(result)
    if not rows:
        return ["phases  none measured"]
    lines = _table(rows[:_MAX_PHASE_ROWS])
    if len(rows) > _MAX_PHASE_ROWS:
        lines.append(f"  … {len(rows) - _MAX_PHASE_ROWS} more rows in {PHASES_FILE}")
    if any(r[9].endswith("!") for r in rows):
        lines.append("  ! the server's counters went back during that phase (a restart?), so its hit rate is unknown")
    return lines


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _check_lines(result: TestResult, marks: dict[str, str], width: int) -> list[str]:
    decision = result.decision
    fleet = result.main.fleet if result.main else None
    if fleet is None:
        return _check_block("checks", decision.checks, decision.reason_id, marks, width)
    # Behind a router the routing checks follow the cache's, each block cut at its own decisive check.
    routing = {c.name for c in fleet.decision.checks}
    cache = [c for c in decision.checks if c.name not in routing]
    lines = _check_block("checks", cache, decision.reason_id, marks, width)
    return lines + _check_block("routing", fleet.decision.checks, fleet.decision.reason_id, marks, width)


def _check_block(head: str, checks: Sequence[Check], reason_id: str, marks: dict[str, str], width: int) -> list[str]:
    if not checks:
        return []
    # The checks after the decisive one were not made: one line names them.
    names = [c.name for c in checks]
    cut = names.index(reason_id) + 1 if reason_id in names else len(checks)
    made, not_made = checks[:cut], checks[cut:]
    title_width = max(len(c.title) for c in made)
    lines = [head]
    for c in made:
        head = f"  {marks[c.outcome]} {c.title:<{title_width}}  "
        # The detail holds the figures a user acts on: wrapped under itself, not cut.
        detail = textwrap.wrap(c.detail, max(width - len(head), 30), break_on_hyphens=False) or [""]
        if len(detail) > _MAX_DETAIL_LINES:
            detail = [*detail[: _MAX_DETAIL_LINES - 1], " ".join(detail[_MAX_DETAIL_LINES - 1 :])]
        lines.append((head + detail[0]).rstrip())
        lines += [" " * len(head) + more for more in detail[1:]]
    if not_made:
        titles = ", ".join(c.title for c in not_made)
        lines.append(f"  {marks['skip']} {len(not_made)} more not checked, decided above: {titles}")
    return lines


# --------------------------------------------------------------------------------------
# Files, notes, times
# --------------------------------------------------------------------------------------


def _file_lines(result: TestResult) -> list[str]:
    lines: list[str] = []
    names = " ".join(Path(f).name for f in result.files)
    if result.out_dir:
        lines.append(f"files   {result.out_dir}/")
        if names:
            lines.append(f"        {names}")
    elif names:
        lines.append(f"files   {names}")
    lines += [f"note    {note}" for note in result.notes]
    times = []
    if result.time_to_verdict_s is not None:
        times.append(f"verdict {result.time_to_verdict_s:.1f} s after the server was healthy")
    if result.duration_s is not None:
        times.append(f"whole run {result.duration_s:.1f} s")
    if times:
        lines.append("time    " + " · ".join(times))
    return lines


def _wants_ascii() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗·–…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def _clip(line: str, width: int, ellipsis: str) -> str:
    # A long detail (an error body, a prompt excerpt) must not wrap the table into
    # noise; the whole text stays in summary.json.
    return line if len(line) <= width else line[: width - len(ellipsis)] + ellipsis


def format_console(result: TestResult, *, ascii_only: bool | None = None, width: int = 118) -> str:
    """Render a prefix-cache test for a terminal: verdict first, then the evidence.

    Layout: the verdict and reason (wrapped, never clipped); the headline figures (hit
    rate of its ceiling, control/warm TTFT with its interval over repeats and each
    repeat's ratio, the run's comparisons, the cache-off verdict and on-vs-off ratios);
    the server and the token plan; a table of each server's phases pooled over repeats
    (requests, failures, TTFT p50/p90/p99, e2e p50, requests/s, tokens/s, the hit rate
    from counters, from ``cached_tokens`` and its ceiling); the checks (✓ pass, ✗ fail,
    ? unknown, · skip); the run's error; files, notes and times. A ``!`` after a hit
    rate means the server's counters went back during that phase.

    Args:
        result: The test, finished or partial.
        ascii_only: Replace ✓ ✗ · – with ASCII; None decides from ``sys.stdout``'s encoding.
        width: Longest line; longer ones are clipped, except the verdict, the paths and the notes.

    Returns:
        The text, lines joined by ``\\n``, without a trailing newline.
    """
    if ascii_only is None:
        ascii_only = _wants_ascii()
    decision = result.decision
    verdict = decision.verdict
    indent = " " * (len(verdict) + 2)
    reason = " ".join(decision.reason.split())
    kept = textwrap.wrap(f"{verdict}  {reason}", width, subsequent_indent=indent, break_on_hyphens=False)
    lines = [indent + line for line in _headline(result, width - len(indent))]
    if (result.partial or result.error) and not (result.error and result.error in reason):
        lines.append(f"{indent}run incomplete: {result.error or 'short of some evidence (see the checks)'}")
    lines += ["", *_server_lines(result, width), *_token_lines(result, width)]
    lines += ["", *_phase_lines(result)]
    fleet = fleet_lines(result.main.fleet if result.main else None)
    if fleet:
        lines += ["", *fleet]
    answers = answer_lines(result.main.evidence if result.main else None)
    if answers:
        lines += ["", *answers]
    checks = _check_lines(result, _ASCII_MARKS if ascii_only else _MARKS, width)
    if checks:
        lines += ["", *checks]
    files = _file_lines(result)

    ellipsis = "..." if ascii_only else "…"
    # The verdict, paths and notes are never clipped: a user acts on the one, copies the
    # others (a note may end with the command that fixes it).
    tagged = [(line, False) for line in kept] + [(line, True) for line in lines]
    tagged += [(line, False) for line in (["", *files] if files else [])]
    out: list[str] = []
    for line, clip in tagged:
        line = redact_text(line)
        if ascii_only:
            line = line.translate(_ASCII).encode("ascii", "replace").decode("ascii")
        out.append(_clip(line, width, ellipsis) if clip else line)
    return "\n".join(out)
