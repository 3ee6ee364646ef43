"""Formatting shared by the README renderers (``doc_tables.py``): ratios, ranges, tables, machine lines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Doc = dict[str, Any]
"""One loaded results file."""


def times(value: float, digits: int = 2) -> str:
    """A ratio as ``9.90x``."""
    return f"{value:.{digits}f}x"


def span(values: Iterable[float], fmt: str = "{:.2f}", suffix: str = "") -> str:
    """The range of some figures, ``lo-hi`` (one figure when they agree at this precision)."""
    vals = sorted(values)
    lo, hi = fmt.format(vals[0]), fmt.format(vals[-1])
    return f"{lo}{suffix}" if lo == hi else f"{lo}-{hi}{suffix}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(doc: Doc, source: str | None = None) -> str:
    """Where and when a results file was measured, from its own ``machine`` facts.

    ``source`` defaults to the file name ``render_docs.load`` recorded in ``_file``.
    """
    source = source or doc["_file"]
    m = doc["machine"]
    load = m.get("load_average_1_5_15") or []
    parts = [f"{m['cpu_model']} ({m['logical_cores']} logical cores)", f"{m['mem_total_gib']} GiB RAM"]
    if m.get("engine"):
        parts.append(f"{m['engine']} {m.get('engine_version', '')}".strip())
    if m.get("model"):
        parts.append(f"model `{m['model']}`")
    parts.append(f"Python {m['python']}")
    when = m["timestamp_utc"][:10]
    load_text = f"; load average at the end {load[0]:.1f}" if load else ""
    return (
        f"_Measured {when} on {', '.join(parts)}, commit `{m['git_commit']}`{load_text}; "
        f"source `benchmarks/results/{source}`._"
    )


def benchmark_markdown(doc: Doc) -> str:
    """A results file's own ``markdown`` table (as its benchmark printed it) and its machine line."""
    return doc["markdown"].strip("\n") + "\n\n" + machine_line(doc)
