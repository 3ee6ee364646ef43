"""The report of a prefix-cache test: what a person reads, and what goes to disk.

The prefix-cache test hands this module a JSON-ready ``summary`` dict and per-request
record dicts; it never measures anything itself. Two outputs:

* :func:`format_console` renders the summary for a terminal: the verdict and its reason
  on the first line, then one table of the phases, the checks, and where the files are.
* :class:`RunWriter` owns a run's ``out_dir``. Records are appended to
  ``requests.jsonl`` as they arrive and ``summary.json`` is replaced atomically, so a run
  that dies half-way still leaves what it measured; :meth:`RunWriter.finish` adds
  ``phases.csv`` and the two plots.

Every string that reaches the disk goes through :func:`redact` first, so an API key in
the config never lands in a file a user might attach to a bug report.

Plots need the optional ``plots`` extra (matplotlib). Without it, or if drawing fails,
the JSON and CSV are still written and the reason is kept in the summary's
``report.notes`` and shown on the console.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
"""The run's summary, rewritten (atomically) as the run goes."""
RECORDS_FILE = "requests.jsonl"
"""One JSON object per request, appended as requests finish."""
PHASES_FILE = "phases.csv"
"""One row per measured phase (and repeat), columns in :data:`PHASE_COLUMNS` order."""
TTFT_PLOT_FILE = "ttft_by_phase.png"
"""Box plot of per-request time to first token, per phase, cache on vs off."""
HIT_RATE_PLOT_FILE = "hit_rate.png"
"""Warm-phase hit rate, measured two ways, against the ceiling, per server."""

PHASE_COLUMNS: tuple[str, ...] = (
    "name",
    "server",
    "repeat",
    "requests",
    "failed",
    "wall_s",
    "throughput_rps",
    "tokens_per_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "itl_p50_s",
    "itl_p90_s",
    "itl_p99_s",
    "prompt_tokens",
    "cached_tokens",
    "hit_rate",
    "hit_rate_reported",
    "hit_rate_ceiling",
    "counter_reset",
    "mean_reward",
)
"""Leading columns of ``phases.csv``; keys a phase has beyond these follow, sorted."""

REDACTED = "***"
"""What a secret value is replaced with on disk."""

PLOTS_INSTALL_HINT = "pip install 'echo-prefix-env[plots]'"
"""How a user gets the plots when matplotlib is missing."""

_PHASE_ORDER = ("cold", "warm_single", "warm", "control")
# Phases the TTFT plot always shows, with n=0 when a run stopped before them.
_MAIN_PHASES = ("cold", "warm", "control")
_SERVER_ORDER = ("cache_on", "cache_off")
_SERVER_LABELS = {"cache_on": "cache on", "cache_off": "cache off"}
_PHASE_COLORS = {"cold": "#4C72B0", "warm_single": "#8172B2", "warm": "#55A868", "control": "#DD8452"}
_NA = "n/a"
_MIN_BOX_SAMPLES = 5
_MAX_TABLE_ROWS = 8
_MAX_LINE = 118

# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------

# A key is secret when its last word names a credential. Anchoring at the end is what
# keeps the many token *counts* (``prompt_tokens``, ``max_tokens``) and ``token_plan``
# readable while ``hf_token``, ``api_key`` and ``wandb_api_key`` are hidden.
_SECRET_KEY_RE = re.compile(
    r"(?:^|_)(?:token|api_?key|(?:access|secret|private)_?key|secret|password|passwd|"
    r"authorization|auth|bearer|credentials?|cookie)$"
)
# Credentials can also hide inside values: ``https://user:pass@host`` and header text.
# The bounded scheme keeps the scan linear: an unbounded one backtracks quadratically
# over a long run of letters (a prompt, a padded config value).
_URL_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]{0,15}://)(?P<user>[^/@\s:]*):(?P<pw>[^/@\s]+)@")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a credential whose value must not be written.

    ``api_key``, ``Authorization``, ``hf_token``, ``wandb-api-key`` are secret;
    ``prompt_tokens``, ``max_tokens``, ``token_plan`` and ``tokenized_by`` are not.

    Args:
        name: The key, in any case, with ``-`` or ``_`` between words.

    Returns:
        True when the value under this key should be replaced by :data:`REDACTED`.
    """
    return bool(_SECRET_KEY_RE.search(name.strip().lower().replace("-", "_")))


def _redact_text(text: str) -> str:
    text = _URL_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret replaced by ``"***"``.

    Values under secret keys (see :func:`is_secret_key`) are replaced whatever their
    type, except None, which stays None so the file still tells "no key was set" from
    "a key was set". Strings anywhere also lose URL passwords and bearer tokens.

    Args:
        obj: Any JSON-like value: mappings, sequences, strings, numbers, None.

    Returns:
        A new object of the same shape; ``obj`` is not modified.
    """
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if value is not None and is_secret_key(str(key)) else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(item) for item in obj]
    if isinstance(obj, str):
        return _redact_text(obj)
    return obj


# --------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN/inf become None, numpy scalars Python numbers."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        # Strict JSON has no NaN; a percentile of nothing is "unknown", i.e. null.
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_jsonable(item) for item in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    item = getattr(obj, "item", None)  # numpy scalars, without importing numpy
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _dumps(obj: Any, **kwargs: Any) -> str:
    # Plain values first, so a secret inside a dataclass (a client config) is seen too.
    return json.dumps(redact(_jsonable(obj)), ensure_ascii=False, allow_nan=False, **kwargs)


# --------------------------------------------------------------------------------------
# Small readers over the summary (every key may be missing or None)
# --------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    keys = list(keys)
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def _phase_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(server, phase label, stats)`` to show: pooled ``by_phase``, else each phase entry."""
    by_phase = _dict(summary.get("by_phase"))
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for server in _ordered((k for k, v in by_phase.items() if isinstance(v, Mapping)), _SERVER_ORDER):
        phases = _dict(by_phase[server])
        for name in _ordered((k for k, v in phases.items() if isinstance(v, Mapping)), _PHASE_ORDER):
            rows.append((server, name, _dict(phases[name])))
    if rows:
        return rows
    # A run that stopped before pooling still has its per-repeat entries.
    for entry in summary.get("phases") or []:
        if isinstance(entry, Mapping):
            label = str(entry.get("name") or "?")
            if entry.get("repeat") is not None:
                label += f" #{entry['repeat']}"
            rows.append((str(entry.get("server") or "cache_on"), label, dict(entry)))
    return rows


def _warm_hit_rates(summary: Mapping[str, Any], server: str) -> tuple[float | None, float | None, float | None]:
    """(counter-based, cached_tokens-based, ceiling) warm-phase hit rates for a server."""
    warm = _dict(_dict(_dict(summary.get("by_phase")).get(server)).get("warm"))
    measured, reported, ceiling = (
        _num(warm.get("hit_rate")),
        _num(warm.get("hit_rate_reported")),
        _num(warm.get("hit_rate_ceiling")),
    )
    if server == "cache_on":
        # The top-level figure is the counter one only when it says so; otherwise it is
        # cached_tokens under another name and must not be drawn as "server counters".
        if measured is None and summary.get("hit_rate_source") == "metrics":
            measured = _num(summary.get("hit_rate"))
        if reported is None:
            reported = _num(summary.get("hit_rate_reported"))
        if ceiling is None:
            ceiling = _num(summary.get("hit_rate_ceiling"))
    elif server == "cache_off":
        if measured is None:
            measured = _num(_dict(summary.get("cache_off")).get("hit_rate"))
        if ceiling is None:
            ceiling = _num(summary.get("hit_rate_ceiling"))
    return measured, reported, ceiling


def ttft_samples(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """Per-request TTFT in seconds, split by ``(server, phase)``.

    Only successful requests that measured a TTFT count: a failed request has no first
    token, and counting its timeout would draw the failure as a slow hit.

    Args:
        records: Request records with ``ok``, ``ttft_s``, ``server`` and ``phase``.

    Returns:
        ``{(server, phase): [ttft_s, ...]}``; ``server`` defaults to ``"cache_on"``.
    """
    out: dict[tuple[str, str], list[float]] = {}
    for rec in records:
        ttft = _num(rec.get("ttft_s"))
        if not rec.get("ok") or ttft is None or rec.get("phase") is None:
            continue
        key = (str(rec.get("server") or "cache_on"), str(rec["phase"]))
        out.setdefault(key, []).append(ttft)
    return out


# --------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 2) -> str:
    num = _num(value)
    return _NA if num is None else f"{num:.{digits}f}"


def _ms(seconds: Any) -> str:
    num = _num(seconds)
    if num is None:
        return _NA
    ms = num * 1000.0
    # Three significant figures at most: sub-millisecond noise is not evidence.
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _int(value: Any) -> str:
    num = _num(value)
    return _NA if num is None else f"{num:.0f}"


def _pct(value: Any) -> str:
    num = _num(value)
    return _NA if num is None else f"{num * 100:.0f}%"


def _speedup(ratio: Any, low: Any = None, high: Any = None) -> str | None:
    """``"2.6x faster (CI 2.3–2.9)"`` from a ratio old time / new time, or None."""
    r = _num(ratio)
    if r is None or r <= 0:
        return None
    text = f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"
    lo, hi = _num(low), _num(high)
    if lo is not None and hi is not None:
        text += f" (CI {lo:.1f}–{hi:.1f})"
    return text


def _pack(parts: Sequence[str], width: int) -> list[str]:
    """Join ``parts`` with `` · `` into as few lines of at most ``width`` as they fit."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return lines


def _headline(summary: Mapping[str, Any], width: int) -> list[str]:
    """The run's key figures: warm vs control, then cache on vs off when compared."""
    parts: list[str] = []
    hit, ceiling = _num(summary.get("hit_rate")), _num(summary.get("hit_rate_ceiling"))
    if hit is not None:
        text = f"hit rate {hit:.2f}"
        if summary.get("hit_rate_source") == "cached_tokens":
            text += " (from cached_tokens)"
        if ceiling is not None:
            text += f" of a {ceiling:.2f} ceiling"
            vs = _num(summary.get("hit_rate_vs_ceiling"))
            if vs is None and ceiling > 0:
                vs = hit / ceiling
            if vs is not None:
                text += f" ({_pct(vs)})"
        parts.append(text)
    else:
        parts.append(f"hit rate {_NA}" + (f" (ceiling {ceiling:.2f})" if ceiling is not None else ""))
    speed = _dict(summary.get("speedup_ttft"))
    ttft = _speedup(speed.get("ratio"), speed.get("low"), speed.get("high"))
    thr = _num(summary.get("speedup_throughput"))
    if ttft or thr is not None:
        parts.append(f"warm vs control: TTFT {ttft or _NA}" + (f", req/s {thr:.2f}x" if thr is not None else ""))
    again = _dict(summary.get("speedup_ttft_cold_vs_warm_single"))
    ttft = _speedup(again.get("ratio"), again.get("low"), again.get("high"))
    if ttft:
        parts.append(f"cold prompt sent again: TTFT {ttft}")
    lines = _pack(parts, width)

    off = _dict(summary.get("cache_off"))
    if off:
        text = f"cache off: {off.get('verdict') or _NA}, hit rate {_f(off.get('hit_rate'))}"
        if off.get("reason"):
            text += f" ({off['reason']})"
        parts = [text]
        on_off = _dict(off.get("speedup_ttft_on_vs_off"))
        ttft = _speedup(on_off.get("ratio"), on_off.get("low"), on_off.get("high"))
        ratio = _num(off.get("throughput_ratio_on_vs_off"))
        if ttft or ratio is not None:
            text = "cache on vs off: warm TTFT " + (ttft or _NA)
            if ratio is not None:
                text += f", req/s {ratio:.2f}x"
            parts.append(text)
        lines += _pack(parts, width)
    return lines


def _server_line(summary: Mapping[str, Any]) -> str:
    server = _dict(summary.get("server"))
    kind = " ".join(str(x) for x in (server.get("kind"), server.get("version")) if x) or "server unknown"
    caching = server.get("prefix_caching_enabled")
    # Only a real bool counts: a "1" or "yes" from an odd exporter stays "unknown".
    cache_text = "prefix caching " + ("on" if caching is True else "OFF" if caching is False else "unknown")
    block = server.get("block_size") or _dict(summary.get("token_plan")).get("block_size")
    parts = [kind, str(server.get("model") or "model unknown"), cache_text, f"block {block or _NA}"]
    if server.get("embedded"):
        parts.append("embedded engine")
    if server.get("base_url"):
        parts.append(_redact_text(str(server["base_url"])))
    return "server  " + " · ".join(parts)


def _token_lines(summary: Mapping[str, Any]) -> list[str]:
    plan = _dict(summary.get("token_plan"))
    if not plan:
        return []
    lo, hi = _int(plan.get("prompt_tokens_min")), _int(plan.get("prompt_tokens_max"))
    prompt = lo if lo == hi else f"{lo}–{hi}"
    parts = [
        f"prompts {prompt}",
        f"shared prefix {_int(plan.get('shared_prefix_tokens'))}"
        f" ({_int(plan.get('cacheable_shared_tokens'))} in whole {_int(plan.get('block_size'))}-token blocks)",
        # The whole workload's ceiling counts each prefix's cold first request; the warm
        # phase's own ceiling (the table, the verdict) leaves it out, so it is higher.
        f"workload ceiling {_f(plan.get('hit_rate_ceiling', summary.get('hit_rate_ceiling')))}"
        " (cold requests included)",
        f"counted by {plan.get('tokenized_by') or _NA}",
    ]
    lines = [("tokens  " if i == 0 else " " * 8) + line for i, line in enumerate(_pack(parts, _MAX_LINE - 8))]
    diff = plan.get("first_difference")
    if isinstance(diff, Mapping):
        context = str(diff.get("context") or "")
        lines.append(
            f"        prompts first differ at token {_int(diff.get('position'))}"
            f" (prompt #{_int(diff.get('other_index'))})" + (f": {context!r}" if context else "")
        )
    return lines


# (header, unit line) of the phase table; the last three are the hit rate from the
# server's counters, from usage.cached_tokens, and its ceiling.
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


def _table(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    header = tuple(name for name, _ in _TABLE_COLUMNS)
    units = tuple(unit for _, unit in _TABLE_COLUMNS)
    many_servers = len({server for server, _, _ in rows}) > 1
    body: list[tuple[str, ...]] = []
    last_server = None
    for server, phase, st in rows:
        label = phase
        if many_servers:
            # The server name once per block keeps the column quiet but unambiguous.
            prefix = _SERVER_LABELS.get(server, server) if server != last_server else ""
            label = f"{prefix:<10}{phase}"
        last_server = server
        body.append(
            (
                label,
                _int(st.get("requests")),
                _int(st.get("failed")),
                _ms(st.get("ttft_p50_s")),
                _ms(st.get("ttft_p90_s")),
                _ms(st.get("ttft_p99_s")),
                _ms(st.get("e2e_p50_s")),
                _f(st.get("throughput_rps"), 1),
                _f(st.get("tokens_per_s"), 0),
                _f(st.get("hit_rate")) + ("!" if st.get("counter_reset") else ""),
                _f(st.get("hit_rate_reported")),
                _f(st.get("hit_rate_ceiling")),
            )
        )
    widths = [max(len(r[i]) for r in (header, units, *body)) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"  {first}  {rest}".rstrip()

    return [fmt(header), fmt(units), *(fmt(r) for r in body)]


def _check_lines(summary: Mapping[str, Any], marks: Mapping[Any, str]) -> list[str]:
    checks = [c for c in summary.get("checks") or [] if isinstance(c, Mapping)]
    if not checks:
        return []
    width = max(len(str(c.get("name") or "")) for c in checks)
    lines = ["checks"]
    for check in checks:
        mark = marks.get(check.get("passed"), marks[None])
        line = f"  {mark} {check.get('name') or '?'!s:<{width}}  {check.get('detail') or ''}".rstrip()
        lines.append(line)
    return lines


def _clip(line: str) -> str:
    # A long detail (an error body, a prompt excerpt) must not wrap the table into
    # noise; the whole text stays in summary.json.
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 1] + "…"


_ASCII = str.maketrans({"✓": "+", "✗": "x", "·": "|", "–": "-", "…": "~", "≥": ">", "×": "x"})


def _wants_ascii() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗·–…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def format_console(
    summary: Mapping[str, Any],
    *,
    files: Sequence[Path | str] | None = None,
    notes: Sequence[str] | None = None,
    ascii_only: bool | None = None,
) -> str:
    """Render a run's summary for a terminal: verdict first, then the evidence.

    Layout (under 30 lines): the verdict and reason; the key figures; the server and
    token plan; a table of the phases (pooled over repeats; cache on, then cache off
    when compared) with requests, TTFT p50/p90/p99, e2e p50, requests/s, tokens/s and
    the hit rate from counters, from ``cached_tokens`` and its ceiling; the checks; the
    files. Missing figures read ``n/a``; a ``!`` after a hit rate means the server's
    counters reset during that phase.

    Args:
        summary: The summary dict of the prefix-cache test; any key may be missing or None.
        files: Files written for the run; default: the summary's ``report.files``.
        notes: Extra lines to show (e.g. why plots were skipped); default: the
            summary's ``report.notes``.
        ascii_only: Replace ✓ ✗ · – with ASCII; None decides from ``sys.stdout``'s encoding.

    Returns:
        The text, lines joined by ``\\n``, without a trailing newline.
    """
    # Console output gets pasted into bug reports: the same redaction as the files.
    summary = _dict(redact(_jsonable(summary)))
    report = _dict(summary.get("report"))
    if files is None:
        files = report.get("files") or summary.get("files") or []
    if notes is None:
        notes = report.get("notes") or []
    verdict = str(summary.get("verdict") or "UNKNOWN")
    reason = " ".join(str(summary.get("reason") or "no reason given").split())
    indent = " " * (len(verdict) + 2)
    # The reason is wrapped, never clipped: it is the one sentence a user acts on.
    lines = textwrap.wrap(f"{verdict}  {reason}", _MAX_LINE, subsequent_indent=indent, break_on_hyphens=False)
    lines += [indent + line for line in _headline(summary, _MAX_LINE - len(indent))]
    if summary.get("partial") or summary.get("error"):
        lines.append(f"{indent}run incomplete: {summary.get('error') or 'stopped before the end'}")
    lines += ["", _server_line(summary), *_token_lines(summary)]

    rows = _phase_rows(summary)
    lines.append("")
    lines += _table(rows[:_MAX_TABLE_ROWS]) if rows else ["phases  none measured"]
    if len(rows) > _MAX_TABLE_ROWS:
        lines.append(f"  … {len(rows) - _MAX_TABLE_ROWS} more in {PHASES_FILE}")
    if any(st.get("counter_reset") for _, _, st in rows):
        lines.append("  ! the server's counters reset during that phase (a restart?), so its hit rate is unknown")

    marks = {True: "✓", False: "✗", None: "?"}
    checks = _check_lines(summary, marks)
    if checks:
        lines += ["", *checks]

    lines.append("")
    out_dir = summary.get("out_dir")
    names = [Path(f).name for f in files]
    duration = _num(summary.get("duration_s"))
    took = f" (run took {duration:.1f} s)" if duration is not None else ""
    if out_dir:
        lines.append(f"files   {out_dir}/ {took}".rstrip())
    if names:
        lines.append(f"        {' '.join(names)}" if out_dir else f"files   {' '.join(names)}{took}")
    lines += [f"note    {note}" for note in notes]

    # Paths and the verdict are never clipped: a user copies the one and acts on the other.
    text = "\n".join(line if line.startswith(("files", verdict)) else _clip(line) for line in lines)
    if ascii_only is None:
        ascii_only = _wants_ascii()
    if ascii_only:
        text = text.translate(_ASCII).encode("ascii", "replace").decode("ascii")
    return text


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="" writes the text as given: the csv module has chosen its line ends.
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _write_phases_csv(path: Path, phases: Sequence[Mapping[str, Any]]) -> None:
    rows = [redact(_jsonable(p)) for p in phases if isinstance(p, Mapping)]
    extra = sorted({k for row in rows for k in row} - set(PHASE_COLUMNS))
    columns = [*PHASE_COLUMNS, *extra]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    _atomic_write_text(path, buffer.getvalue())


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


def _pyplot() -> Any:
    try:
        import matplotlib

        # Agg draws to files only: no display needed on a server, and no window pops
        # up when the test runs on a laptop.
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailable(f"matplotlib is not installed ({exc}); {PLOTS_INSTALL_HINT}") from exc
    return plt


def _draw_ttft_panel(ax: Any, data: Sequence[Sequence[float]], phases: Sequence[str]) -> None:
    """One server's panel: a box per phase (enough samples), every request as a dot."""
    present = [i for i, d in enumerate(data) if d]
    if not present:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    # Quartiles of a handful of points (the cold phase has one per repeat) would look
    # like a measured spread; those phases get their dots and a median tick only.
    boxed = [i for i in present if len(data[i]) >= _MIN_BOX_SAMPLES]
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
            patch.set_facecolor(_PHASE_COLORS.get(phases[i], "#999999"))
            patch.set_alpha(0.35)
    for i in present:
        n = len(data[i])
        # Deterministic jitter (golden-ratio steps) so reruns draw the same picture.
        xs = [i + 1 + 0.32 * ((k * 0.618034) % 1.0 - 0.5) for k in range(n)]
        color = _PHASE_COLORS.get(phases[i], "#555555")
        ax.scatter(xs, data[i], s=14 if i not in boxed else 9, alpha=0.7, color=color, linewidths=0, zorder=3)
        median = statistics.median(data[i])
        if i not in boxed:
            ax.hlines(median, i + 0.75, i + 1.25, colors="black", linewidth=1.5, zorder=4)
        ax.annotate(
            f"p50 {median:.0f} ms" if median >= 10 else f"p50 {median:.1f} ms",
            (i + 1, max(data[i])),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=8,
        )
    ax.set_xlim(0.4, len(phases) + 0.6)
    ax.set_xticks(range(1, len(phases) + 1))
    ax.set_xticklabels([f"{p}\n(n={len(d)})" for p, d in zip(phases, data, strict=True)])
    ax.set_xlabel("phase")
    ax.grid(axis="y", alpha=0.3)


def _plot_ttft(path: Path, summary: Mapping[str, Any], samples: Mapping[tuple[str, str], list[float]]) -> bool:
    """TTFT per request by phase, one panel per server sharing the y axis."""
    if not any(samples.values()):
        return False
    plt = _pyplot()
    servers = _ordered({s for s, _ in samples}, _SERVER_ORDER)
    # The main phases always get a slot: "warm (n=0)" tells a partial run apart.
    phases = _ordered({p for _, p in samples} | set(_MAIN_PHASES), _PHASE_ORDER)
    positive = [v * 1000 for vals in samples.values() for v in vals if v > 0]
    # Linear from zero reads honestly; log only when cold dwarfs warm so much that the
    # warm box would be a flat line at the bottom.
    log_scale = bool(positive) and max(positive) / min(positive) > 50
    fig, axes = plt.subplots(1, len(servers), figsize=(1.2 + 3.2 * len(servers), 4.6), sharey=True, squeeze=False)
    try:
        for ax, server in zip(axes[0], servers, strict=True):
            _draw_ttft_panel(ax, [[v * 1000 for v in samples.get((server, p), [])] for p in phases], phases)
            ax.set_title(_SERVER_LABELS.get(server, server))
        ax0 = axes[0][0]
        if log_scale:
            ax0.set_yscale("log")
            ax0.set_ylabel("time to first token (ms, log scale)")
        else:
            ax0.set_ylim(bottom=0)
            ax0.set_ylabel("time to first token (ms)")
        bottom, top = ax0.get_ylim()
        ax0.set_ylim(bottom, top * (1.6 if log_scale else 1.1))  # room for the p50 labels
        model = _dict(summary.get("server")).get("model")
        fig.suptitle("Time to first token per request, by phase" + (f"\n{model}" if model else ""), fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True


def _plot_hit_rate(path: Path, summary: Mapping[str, Any]) -> bool:
    """Grouped bars per server: counter hit rate, cached_tokens hit rate, ceiling."""
    servers = ["cache_on"]
    if summary.get("cache_off") or "cache_off" in _dict(summary.get("by_phase")):
        servers.append("cache_off")
    values = {s: _warm_hit_rates(summary, s) for s in servers}
    if all(v is None for triple in values.values() for v in triple):
        return False
    plt = _pyplot()
    series = ("server counters (/metrics)", "usage.cached_tokens", "ceiling (whole blocks)")
    colors = ("#4C72B0", "#8172B2", "#BBBBBB")
    width = 0.26
    fig, ax = plt.subplots(figsize=(max(6.4, 1.8 + 2.6 * len(servers)), 4.6), layout="constrained")
    try:
        for j, (label, color) in enumerate(zip(series, colors, strict=True)):
            xs = [i + (j - 1) * width for i in range(len(servers))]
            heights = [values[s][j] for s in servers]
            ax.bar(xs, [h or 0.0 for h in heights], width, label=label, color=color, edgecolor="black", linewidth=0.5)
            for x, h, s in zip(xs, heights, servers, strict=True):
                # A missing figure is written "n/a", never drawn as a zero bar.
                text = _NA if h is None else f"{h:.2f}"
                ceiling = values[s][2]
                if j < 2 and h is not None and ceiling:
                    text += f"\n{h / ceiling:.0%} of ceil."
                ax.annotate(text, (x, h or 0.0), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xlim(-0.6, len(servers) - 0.4)
        ax.set_xticks(range(len(servers)))
        ax.set_xticklabels([_SERVER_LABELS.get(s, s) for s in servers])
        ax.set_ylim(0, 1.12)  # room for the value labels above a full bar
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("hit rate (cached / prompt tokens)")
        ax.set_xlabel("server")
        ax.set_title("Prefix-cache hit rate, warm phase: measured vs ceiling", fontsize=11)
        fig.legend(loc="outside lower center", fontsize=8, ncol=len(series), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return True


class RunWriter:
    """Everything a run leaves in its ``out_dir``, written so a crash keeps what was measured.

    Use one writer per run: records go to ``requests.jsonl`` as they arrive
    (:meth:`append_records`), partial summaries replace ``summary.json`` as often as
    wanted (:meth:`write_summary`), and :meth:`finish` adds the CSV and plots.

    Example:
        >>> writer = RunWriter(Path("runs/2025-01-01"))       # doctest: +SKIP
        >>> writer.append_records(records)                     # doctest: +SKIP
        >>> paths = writer.finish(summary)                     # doctest: +SKIP
        >>> print(format_console(summary, files=paths, notes=writer.notes))  # doctest: +SKIP
    """

    def __init__(self, out_dir: Path | str) -> None:
        """Create ``out_dir`` (and parents) and start an empty ``requests.jsonl``.

        Args:
            out_dir: The run's folder. A ``requests.jsonl`` already there is emptied, so
                a reused folder never mixes two runs' records.
        """
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out_dir / RECORDS_FILE
        self.summary_path = self.out_dir / SUMMARY_FILE
        self.records_path.write_text("", encoding="utf-8")
        self.notes: list[str] = []
        """Why something was not written (plots skipped or failed), for the console."""
        self._samples: dict[tuple[str, str], list[float]] = {}
        self._records_written = 0

    @property
    def records_written(self) -> int:
        """How many records :meth:`append_records` has written so far."""
        return self._records_written

    def append_records(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append request records to ``requests.jsonl`` and flush them to disk now.

        Args:
            records: Request records (dicts); secrets are redacted, NaN becomes null.

        Returns:
            How many records were written.
        """
        lines: list[str] = []
        for rec in records:
            lines.append(_dumps(rec) + "\n")
            for key, values in ttft_samples([rec]).items():
                self._samples.setdefault(key, []).extend(values)
        if not lines:
            return 0
        # One write per batch, flushed, so a crash loses at most the batch in flight.
        with self.records_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
        self._records_written += len(lines)
        return len(lines)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Replace ``summary.json`` atomically with ``summary``, secrets redacted.

        Safe to call many times during a run: a reader (or a crash) sees the previous
        summary or this one, never a half-written file.

        Args:
            summary: The summary dict, complete or partial.

        Returns:
            The path of ``summary.json``.
        """
        start = time.perf_counter()
        _atomic_write_text(self.summary_path, _dumps(summary, indent=2) + "\n")
        log.debug("time/report/write_summary: %.4f s", time.perf_counter() - start)
        return self.summary_path

    def finish(self, summary: Mapping[str, Any]) -> list[Path]:
        """Write the final summary, ``phases.csv`` and the plots.

        JSON and CSV come first, so a plot that fails (or a missing matplotlib) loses
        nothing else: the failure is logged as a warning, and the reason goes to
        :attr:`notes` and into ``summary.json`` under ``report``
        (``{"files": [...], "notes": [...]}``), where :func:`format_console` finds it.

        The same ``report`` entry is added to ``summary`` itself (when it is a mutable
        mapping), so ``format_console(summary)`` lists the files and says why a plot is
        missing without being handed them.

        Args:
            summary: The run's final (or partial) summary.

        Returns:
            The paths written, ``requests.jsonl`` included.
        """
        start = time.perf_counter()
        written = [self.write_summary(summary), self.records_path]
        phases_path = self.out_dir / PHASES_FILE
        _write_phases_csv(phases_path, summary.get("phases") or [])
        written.append(phases_path)
        log.debug("time/report/csv: %.4f s", time.perf_counter() - start)

        plots = (
            (TTFT_PLOT_FILE, lambda p: _plot_ttft(p, summary, self._samples), "no successful request had a TTFT"),
            (HIT_RATE_PLOT_FILE, lambda p: _plot_hit_rate(p, summary), "no hit rate was measured"),
        )
        for name, draw, empty_reason in plots:
            plot_start = time.perf_counter()
            target = self.out_dir / name
            try:
                if draw(target):
                    written.append(target)
                else:
                    self._note(f"{name} not drawn: {empty_reason}")
            except PlotsUnavailable as exc:
                log.warning("plots skipped: %s", exc)
                self._note(f"plots skipped: {exc}")
                break
            except Exception as exc:  # a plot is a convenience; never let it lose the data
                log.warning("could not draw %s", name, exc_info=True)
                self._note(f"{name} not drawn: {type(exc).__name__}: {exc}")
            log.debug("time/report/%s: %.4f s", name, time.perf_counter() - plot_start)

        report = {"files": [p.name for p in written], "notes": list(self.notes)}
        if isinstance(summary, MutableMapping):
            summary["report"] = report
        self.write_summary({**summary, "report": report})
        log.debug("time/report/finish: %.4f s", time.perf_counter() - start)
        return written

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
