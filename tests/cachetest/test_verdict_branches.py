"""Every decisive branch of the verdict has a row: the guard over the verdict's tables.

A check can decide more than one way (``ttft_gain`` gives UNKNOWN for too few repeats,
FAIL for no gain and UNKNOWN again for an undecided interval), so a row per check id is
not enough. :data:`BRANCHES` lists every decisive branch once, as ``(reason_id, verdict,
a phrase of its reason)``. Two tests hold it to the code and to the rows:

- every place in the checks' modules that gives a verdict (``failed(...)``, ``unknown(...)``,
  a ``Step`` or a ``("PASS", reason, id)`` with a verdict) is one entry of :data:`BRANCHES`,
  found by its phrase in the reason's source text, and no entry is stale;
- every entry is reached by a row of one of the verdict's tables (:data:`ROW_TABLES`): a
  row whose decision has that reason id and verdict, with the phrase in its reason.

A new branch in the checks fails the first test, naming the file, line, check and
reason; an entry no row reaches fails the second, naming the branch.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest

from echo_env.cachetest import verdict as verdict_module
from echo_env.cachetest.results import EXIT_CODES, Decision, Evidence
from echo_env.cachetest.verdict import CHECKS, decide

Branch = tuple[str, str, str]
"""``(reason_id, verdict, phrase)``: the phrase is literal text of the reason, unique to the branch."""

BRANCHES: list[Branch] = [
    # echo_env/cachetest/verdict.py, in the order the checks decide
    ("run_finished", "UNKNOWN", "the run did not finish"),
    ("caching_enabled", "FAIL", "caching disabled on the server"),
    ("ceiling_known", "UNKNOWN", "the server does not say its cache block size"),
    ("ceiling_known", "UNKNOWN", "the prompts could not be tokenized as the server sees them"),
    ("prefix_shared", "FAIL", "prompts shorter than one cache block"),
    ("prefix_shared", "FAIL", "tokens in whole cache units"),
    ("phases_complete", "UNKNOWN", "the evidence is incomplete"),
    ("phases_complete", "UNKNOWN", "the run is short of its evidence"),
    ("phases_complete", "UNKNOWN", "phases sent nothing"),
    ("counters_intact", "UNKNOWN", "the server restarted during the"),
    ("hits_visible", "UNKNOWN", "cannot see cache hits"),
    ("hits_visible", "UNKNOWN", "cannot see the control phase's hits"),
    ("own_traffic", "UNKNOWN", "the server's counters include other traffic"),
    ("sources_agree", "UNKNOWN", "but its responses' cached_tokens say"),
    ("not_above_ceiling", "UNKNOWN", "is above the most the prompts allow"),
    ("hits_nonzero", "FAIL", "hits at zero"),
    ("hits_reach_ceiling", "UNKNOWN", "behind a router the hit rate depends on where requests went"),
    ("hits_reach_ceiling", "FAIL", "hit rate far under the"),
    ("control_baseline", "UNKNOWN", "beyond what its prompts share"),
    ("history_reuse", "UNKNOWN", "cannot judge history reuse on"),
    ("history_reuse", "FAIL", "history not reused"),
    ("ttft_gain", "UNKNOWN", "too few TTFT repeats for an interval"),
    ("ttft_gain", "FAIL", "hits are there but warm TTFT is not"),
    ("ttft_gain", "UNKNOWN", "TTFT gain undecided"),
    ("pass", "PASS", "prefix caching works: "),
    ("pass_prefill_cheap", "PASS", "prefix caching works by its hits"),
    # echo_env/cachetest/history_checks.py
    ("history_extends", "FAIL", "turn prompts do not extend the last prompt + answer"),
    ("answer_blocks_kept", "FAIL", "the server does not keep the cache blocks filled by generated tokens"),
    # echo_env/cachetest/answers.py
    ("outputs_equal", "UNKNOWN", "cannot compare cached and fresh answers"),
    ("outputs_equal", "UNKNOWN", "fresh computation hit the cache"),
    ("outputs_equal", "UNKNOWN", "was not served from the cache, so nothing compares cached with"),
    ("outputs_equal", "FAIL", "the cache changes the answers"),
    ("weight_update", "UNKNOWN", "the weight-update check could not be made"),
    ("weight_update", "FAIL", ") the prompt hit "),
    ("weight_update", "UNKNOWN", "changed no answer, so cached blocks from the old weights"),
    # echo_env/cachetest/isolation.py
    ("isolation", "UNKNOWN", "isolation was asked for but cannot be shown"),
    ("isolation", "UNKNOWN", "isolation needs each response's cached_tokens"),
    ("isolation", "FAIL", "cache_salt is ignored"),
    ("isolation", "FAIL", "requests with the same cache_salt do not share cached blocks"),
]
"""Every decisive branch of the verdict, once."""

ROW_TABLES: list[tuple[str, str, str | None]] = [
    ("test_verdict", "ROWS", "good"),
    ("test_verdict_answers", "ROWS", "checked"),
    ("test_verdict_prefill", "ROWS", "good"),
    ("test_verdict_turns", "ROWS", "good"),
    ("test_fleet_verdict", "CACHE_ROWS", None),
]
"""The verdict's row tables: (test module, table, the function building the evidence each
row's change starts from; None: the rows hold their evidence)."""

_VERDICTS = ("PASS", "FAIL", "UNKNOWN")


@dataclass(frozen=True)
class _Site:
    """A place in the checks' source that gives a verdict."""

    where: str
    function: str
    reason_id: str | None  # None: a helper of a check, its id unknown from the source
    verdict: str
    reason_source: str

    def __str__(self) -> str:
        head = " ".join(self.reason_source.split())[:100]
        return f"{self.where} {self.function} gives {self.verdict} ({head})"


def _decisive(node: ast.AST) -> tuple[str, ast.expr, str | None] | None:
    """``(verdict, reason node, reason id if written there)`` when ``node`` gives a verdict."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args = node.func.id, node.args
        if name in ("failed", "unknown"):
            assert len(args) >= 2, f"line {node.lineno}: {name}(detail, reason) expected"
            return ("FAIL" if name == "failed" else "UNKNOWN"), args[1], None
        if name == "Step" and len(args) >= 3 and isinstance(args[2], ast.Constant) and args[2].value in _VERDICTS:
            assert len(args) >= 4, f"line {node.lineno}: Step(outcome, detail, verdict, reason) expected"
            return str(args[2].value), args[3], None
    if isinstance(node, ast.Tuple) and len(node.elts) == 3:
        verdict, reason, rid = node.elts
        if isinstance(verdict, ast.Constant) and verdict.value in _VERDICTS and isinstance(rid, ast.Constant):
            return str(verdict.value), reason, str(rid.value)
    return None


def _modules() -> list[ModuleType]:
    found = {inspect.getmodule(fn) for _, _, fn in CHECKS} | {verdict_module}
    return sorted((m for m in found if m is not None), key=lambda m: m.__name__)


def _sites() -> Iterator[_Site]:
    """Every place in the checks' modules that gives a verdict."""
    check_ids = {(fn.__module__, fn.__name__): name for name, _, fn in CHECKS}
    for module in _modules():
        source = inspect.getsource(module)
        path = module.__name__.replace(".", "/") + ".py"
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                found = _decisive(node)
                if found is None:
                    continue
                verdict, reason, rid = found
                text = ast.get_source_segment(source, reason) or ""
                rid = rid or check_ids.get((module.__name__, fn.name))
                yield _Site(f"{path}:{node.lineno}", fn.name, rid, verdict, text)


def test_every_branch_of_the_checks_is_in_the_table() -> None:
    sites = list(_sites())
    assert len(sites) >= len(CHECKS), "the scan found fewer decisive branches than checks: is it reading the code?"
    problems = []
    used: dict[Branch, list[_Site]] = {b: [] for b in BRANCHES}
    for site in sites:
        entries = [b for b in BRANCHES if b[1] == site.verdict and b[2] in site.reason_source]
        if len(entries) != 1:
            what = "is not in BRANCHES" if not entries else f"matches {len(entries)} entries of BRANCHES: {entries}"
            problems.append(
                f"{site} {what}: add (reason_id, verdict, a phrase of its reason) to BRANCHES in "
                "tests/cachetest/test_verdict_branches.py, and a row that reaches it"
            )
            continue
        entry = entries[0]
        used[entry].append(site)
        if site.reason_id is not None and site.reason_id != entry[0]:
            problems.append(f"{site} is the {site.reason_id!r} check's, but BRANCHES says {entry}")
    problems += [
        f"BRANCHES entry {b} matches no branch of the checks: update or remove it" for b, s in used.items() if not s
    ]
    assert not problems, "\n".join(problems)


def _row_decisions() -> Iterator[tuple[str, Decision]]:
    for module_name, table, base_name in ROW_TABLES:
        try:
            module = importlib.import_module(module_name)
        except pytest.skip.Exception as exc:  # a table that skips on import would hide its branches
            pytest.fail(f"{module_name} skips on import ({exc}): its rows must run in every test command")
        base: Callable[[], Evidence] | None = getattr(module, base_name) if base_name else None
        for row in getattr(module, table):
            case, change = row[0], row[1]
            evidence = change(base()) if base is not None and callable(change) else change
            yield f"{module_name}.{table}[{case!r}]", decide(evidence)


def test_every_branch_has_a_row() -> None:
    reached: dict[Branch, list[str]] = {b: [] for b in BRANCHES}
    for row, d in _row_decisions():
        assert d.exit_code == EXIT_CODES[d.verdict]
        for b in BRANCHES:
            if (d.reason_id, d.verdict) == b[:2] and b[2] in d.reason:
                reached[b].append(row)
    missing = [b for b, rows in reached.items() if not rows]
    assert not missing, "verdict branches no row reaches (add a row to tests/cachetest/test_verdict.py ROWS, or to " + (
        "the table of its own check in ROW_TABLES):\n" + "\n".join(f"  {b}" for b in missing)
    )


def test_the_table_names_every_check() -> None:
    named = {b[0] for b in BRANCHES}
    assert {name for name, _, _ in CHECKS} <= named, "checks with no branch in BRANCHES"


def test_the_readme_verdict_table_has_every_check() -> None:
    """The README's table of checks names each one by its title, in the order they decide."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| check | decides |") :].split("\n\n", 1)[0]
    rows = [line.split("|")[1].replace("`", "").strip() for line in table.splitlines()[2:]]
    titles = [title for _, title, _ in CHECKS]
    found = [next((i for i, row in enumerate(rows) if row.startswith(t)), None) for t in titles]
    missing = [t for t, i in zip(titles, found, strict=True) if i is None]
    assert not missing, f"checks missing from README.md's verdict table (a row starting with the title): {missing}"
    assert found == sorted(found), "README.md's verdict table lists the checks out of their order"
