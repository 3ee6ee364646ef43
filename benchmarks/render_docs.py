"""Render the READMEs' figures from the committed results files, or check that they match.

Every figure table (and the sentences quoting figures) in README.md and
benchmarks/README.md sits between two marker lines::

    <!-- results:client_overhead -->
    ...generated, never typed...
    <!-- /results -->

and is rewritten from ``benchmarks/results/*.json`` by the renderer that :data:`BLOCKS`
names for it. A figure that no committed file backs sits between
``<!-- measured-elsewhere: date=YYYY-MM-DD; machine=...; commit=... -->`` and
``<!-- /measured-elsewhere -->`` and says in its own text where and when it was measured.

Usage::

    .venv/bin/python benchmarks/render_docs.py          # rewrite the blocks in place
    .venv/bin/python benchmarks/render_docs.py --check  # exit 1 and print the diff if a README is stale

To add a results file: add a row ``"my_block": Block(("my_file.json",), render)`` to
:data:`BLOCKS`, put ``<!-- results:my_block -->`` and ``<!-- /results -->`` on their own
lines where it goes in a README, and run this script. ``render`` is
``doc_format.benchmark_markdown`` (import it here) for the benchmark's own ``markdown``
table plus the machine line, or a ``def my_table(doc: Doc) -> str`` of your own in ``doc_tables.py`` (it
gets the loaded JSON, one argument per file listed).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_tables

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
READMES = (REPO / "README.md", REPO / "benchmarks" / "README.md")


@dataclass(frozen=True)
class Block:
    """One generated block: the results files it reads and the function that renders them."""

    files: tuple[str, ...]
    """Names under ``benchmarks/results/``, passed to ``render`` as loaded JSON, in order."""
    render: Callable[..., str]
    """Loaded files -> the markdown between the markers (no leading or trailing blank line)."""


BLOCKS: dict[str, Block] = {
    "prefix_cache_gain": Block(("prefix_cache_gain.json",), doc_tables.prefix_cache_gain_table),
    "prefix_cache_gain.summary": Block(
        ("prefix_cache_gain.json", "prefix_cache_gain-busy.json"), doc_tables.prefix_cache_gain_summary
    ),
    "block_alignment.computed": Block(("block_alignment.json",), doc_tables.block_alignment_computed),
    "block_alignment.measured": Block(("block_alignment.json",), doc_tables.block_alignment_measured),
    "client_overhead": Block(("client_overhead.json",), doc_tables.client_overhead_table),
    "client_overhead.summary": Block(
        ("client_overhead.json", "client_overhead-intel.json"), doc_tables.client_overhead_summary
    ),
    "clock_honesty": Block(("clock_honesty.json",), doc_tables.clock_honesty_table),
    "clock_honesty.summary": Block(("clock_honesty.json", "clock_honesty-sdk.json"), doc_tables.clock_honesty_summary),
    "scale": Block(("scale.json",), doc_tables.scale_table),
    "scale.summary": Block(("scale.json",), doc_tables.scale_summary),
    "ttft_false_positive": Block(("ttft_false_positive.json",), doc_tables.ttft_false_positive_table),
    "ttft_false_positive.setup": Block(("ttft_false_positive.json",), doc_tables.ttft_false_positive_setup),
    "ttft_false_positive.sentence": Block(("ttft_false_positive.json",), doc_tables.ttft_false_positive_sentence),
    "routing": Block(("routing.json",), doc_tables.routing_table),
    "routing.scale_out": Block(("routing-scale-out.json",), doc_tables.routing_scale_out_table),
    "routing.sentence": Block(("routing.json", "routing-scale-out.json"), doc_tables.routing_sentence),
    "history_reuse": Block(("history_reuse-quick.json",), doc_tables.history_reuse_table),
    "decode_blocks": Block(("decode_blocks.json",), doc_tables.decode_blocks_table),
    "time_to_verdict": Block(("time_to_verdict.json",), doc_tables.time_to_verdict_table),
    "fleet_ceilings": Block(("fleet_ceilings.json",), doc_tables.fleet_ceilings_table),
    "goals": Block(
        (
            "prefix_cache_gain.json",
            "prefix_cache_gain-busy.json",
            "block_alignment.json",
            "client_overhead.json",
            "clock_honesty.json",
            "clock_honesty-sdk.json",
            "scale.json",
        ),
        doc_tables.goals_table,
    ),
}
"""Block name (as in ``<!-- results:NAME -->``) -> the files it reads and its renderer."""

BLOCK_RE = re.compile(r"^<!-- results:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /results -->$", re.M | re.S)
"""A generated block: its name and its current body."""

ELSEWHERE_RE = re.compile(
    r"^<!-- measured-elsewhere: (?P<label>[^\n]*?) -->\n(?P<body>.*?)^<!-- /measured-elsewhere -->$", re.M | re.S
)
"""A labelled block of figures that no committed file backs."""

LABEL_FIELDS = ("date", "machine", "commit")
"""What a measured-elsewhere label must say."""


class DocsError(Exception):
    """A README block that cannot be rendered: unknown name, missing file, bad label."""


def load(name: str, results: Path = RESULTS) -> dict[str, Any]:
    """A results file's JSON."""
    path = results / name
    if not path.is_file():
        raise DocsError(f"{path} is missing: rerun its benchmark or drop the block that reads it")
    data: dict[str, Any] = json.loads(path.read_text())
    data["_file"] = name  # for the machine line under a table
    return data


def render_block(name: str, results: Path = RESULTS) -> str:
    """The markdown a block should hold."""
    block = BLOCKS.get(name)
    if block is None:
        raise DocsError(f"<!-- results:{name} --> has no renderer: add it to BLOCKS in benchmarks/render_docs.py")
    return block.render(*(load(f, results) for f in block.files)).strip("\n")


def parse_label(label: str) -> dict[str, str]:
    """``date=2026-11-30; machine=...; commit=abc1234`` -> its fields; raises when one is missing."""
    fields = dict(part.strip().split("=", 1) for part in label.split(";") if "=" in part)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    missing = [f for f in LABEL_FIELDS if not fields.get(f)]
    if missing:
        raise DocsError(f"measured-elsewhere label {label!r} lacks {', '.join(missing)}")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", fields["date"]):
        raise DocsError(f"measured-elsewhere label {label!r}: date must be YYYY-MM-DD")
    return fields


def elsewhere_blocks(text: str) -> Iterator[tuple[dict[str, str], str]]:
    """Each measured-elsewhere block's label fields and body; a bad label raises."""
    for m in ELSEWHERE_RE.finditer(text):
        fields = parse_label(m["label"])
        if fields["date"] not in m["body"]:
            raise DocsError(f"measured-elsewhere block dated {fields['date']} does not say the date in its text")
        yield fields, m["body"]


def render_text(text: str, results: Path = RESULTS) -> str:
    """A README with every generated block rewritten from the results."""
    list(elsewhere_blocks(text))

    def fill(m: re.Match[str]) -> str:
        return f"<!-- results:{m['name']} -->\n{render_block(m['name'], results)}\n<!-- /results -->"

    return BLOCK_RE.sub(fill, text)


def check(paths: tuple[Path, ...] = READMES, results: Path = RESULTS) -> list[str]:
    """Unified diffs of every README that differs from what the results give (empty: all agree)."""
    diffs = []
    for path in paths:
        old = path.read_text()
        new = render_text(old, results)
        if new != old:
            rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            diff = difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True), f"{rel} (README)", f"{rel} (results)"
            )
            diffs.append("".join(diff))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print the diff and exit 1 if a README is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            diffs = check()
            sys.stdout.write("".join(diffs))
            if diffs:
                print("README figures differ from benchmarks/results: run benchmarks/render_docs.py", file=sys.stderr)
            return 1 if diffs else 0
        for path in READMES:
            old = path.read_text()
            new = render_text(old)
            if new != old:
                path.write_text(new)
                print(f"rewrote {path.relative_to(REPO)}")
    except DocsError as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
