"""Parsing the Prometheus text exposition format (what ``GET /metrics`` answers) into samples.

Pure functions: :func:`parse_prometheus` turns a page into :class:`Sample` s and
:func:`check_prometheus_text` tells a wrong page (empty, HTML, JSON) from a metrics page,
with messages that name the fix. What the samples mean is :mod:`echo_env.wire.counters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from echo_env.errors import MetricsError

__all__ = ["METRICS_FIX", "Sample", "check_prometheus_text", "not_prometheus", "parse_prometheus"]


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus text: a series name, its labels and its value."""

    name: str
    """The sample's name as written, suffix included (``vllm:prompt_tokens_total``)."""
    labels: dict[str, str] = field(hash=False)
    """Label names to unescaped values; empty when the line has none."""
    value: float
    """The value; may be ``inf`` or ``nan``."""
    timestamp: float | None = None
    """The optional timestamp after the value, as written (milliseconds in Prometheus text)."""


_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*')
# Prometheus 3 may quote names that are not legacy-valid: {"my.metric", label="v"} 1
_QUOTED_RE = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)


def not_prometheus(origin: str, why: str, fix: str) -> MetricsError:
    """The error for a page that is not Prometheus text: where, why, and the fix."""
    return MetricsError(f"{origin} is not Prometheus text: {why}. {fix}")


METRICS_FIX = (
    "Point metrics_url at the server root's /metrics, e.g. http://127.0.0.1:8000/metrics "
    "(vLLM serves it by default, not under /v1; SGLang needs --enable-metrics)."
)


def check_prometheus_text(text: str, origin: str = "the metrics page") -> None:
    """Raise :class:`MetricsError` if ``text`` is clearly not Prometheus text.

    Catches what a wrong ``metrics_url`` usually returns: nothing, an HTML page (a web
    UI, a proxy's login or error page) or JSON (an OpenAI-style error body).

    Args:
        text: The page's body.
        origin: What the text is, for the message (a URL, a file name).

    Raises:
        MetricsError: The text is empty, HTML or JSON; the message names the fix.
    """
    head = text.lstrip("\ufeff \t\r\n")
    if not head:
        raise not_prometheus(origin, "the page is empty", METRICS_FIX)
    lowered = head[:512].lower()
    if lowered.startswith("<") or "<html" in lowered or "<!doctype" in lowered:
        raise not_prometheus(origin, "it is an HTML page", METRICS_FIX)
    if head[0] in "{[":
        raise not_prometheus(origin, f"it looks like JSON ({head[:80]!r})", METRICS_FIX)


def _parse_labels(line: str, start: int, origin: str, lineno: int) -> tuple[str | None, dict[str, str], int]:
    """Parse ``{...}`` starting at ``line[start] == "{"``; return (quoted name, labels, end)."""
    labels: dict[str, str] = {}
    quoted_name: str | None = None
    pos = start + 1
    while True:
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == "}":
            return quoted_name, labels, pos + 1
        m = _LABEL_RE.match(line, pos)
        if m:
            labels[m.group(1)] = _unescape(m.group(2))
        else:
            q = _QUOTED_RE.match(line, pos)
            if q is None or quoted_name is not None or labels:
                raise not_prometheus(origin, f"line {lineno} has a malformed label set: {line[:200]!r}", METRICS_FIX)
            quoted_name = _unescape(q.group(1))
            m = q
        pos = m.end()
        if pos < len(line) and line[pos] == ",":
            pos += 1
        elif pos >= len(line) or line[pos] != "}":
            raise not_prometheus(origin, f"line {lineno} has an unclosed label set: {line[:200]!r}", METRICS_FIX)


def _parse_float(token: str) -> float:
    # float() takes "+Inf", "-Inf", "NaN" and exponents as Prometheus writes them.
    return float(token)


def parse_prometheus(text: str, origin: str = "the metrics page") -> list[Sample]:
    """Parse Prometheus text exposition format (as vLLM and SGLang serve it) into samples.

    Comments (``# HELP``, ``# TYPE``, ``# EOF`` and free comments) are skipped. Label values
    may hold escaped quotes, backslashes, newlines, commas and braces. Values may be
    ``+Inf``, ``-Inf``, ``NaN`` or use exponents; an optional timestamp may follow, and an
    OpenMetrics exemplar (`` # {...} v``) after that is ignored. Names keep their suffixes
    (``_total``, ``_created``, ``_bucket``...): :func:`read_counters` knows which to read.

    Args:
        text: The body of ``GET /metrics``.
        origin: What the text is (a URL, a file name), for error messages.

    Returns:
        The samples, in the order of the text.

    Raises:
        MetricsError: The text is empty, HTML, JSON or has a line that is not a sample;
            the message names the line and the fix.
    """
    check_prometheus_text(text, origin)
    samples: list[Sample] = []
    for lineno, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _NAME_RE.match(line)
        name = m.group(0) if m else None
        pos = m.end() if m else 0
        labels: dict[str, str] = {}
        if pos < len(line) and line[pos] == "{":
            quoted, labels, pos = _parse_labels(line, pos, origin, lineno)
            if name is None:
                name = quoted
        if not name:
            raise not_prometheus(origin, f"line {lineno} has no metric name: {line[:200]!r}", METRICS_FIX)
        rest = line[pos:].split("#", 1)[0].split()
        if not rest or len(rest) > 2 or (pos < len(line) and line[pos] not in " \t"):
            raise not_prometheus(
                origin, f"line {lineno} is not 'name{{labels}} value [timestamp]': {line[:200]!r}", METRICS_FIX
            )
        try:
            value = _parse_float(rest[0])
            timestamp = _parse_float(rest[1]) if len(rest) == 2 else None
        except ValueError:
            raise not_prometheus(origin, f"line {lineno} has no numeric value: {line[:200]!r}", METRICS_FIX) from None
        samples.append(Sample(name=name, labels=labels, value=value, timestamp=timestamp))
    return samples
