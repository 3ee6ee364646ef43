"""Every branch of the routing verdict, and the cache check's fleet ceiling, from evidence made without a server.

The hand-made rows start from two workloads of the test's shape (``benchmarks/fleet_ceilings.py``):
``grouped`` (groups share 520 tokens of their own: routing moves the hit rate) and ``flat``
(the echo task: groups share only the system prompt). Each row asserts the verdict, the
reason id and the exit code; a guard checks that every decisive branch of
``echo_env/cachetest/fleet_checks.py`` is reached by a row. Then the offline tables of
2, 3, 4, 6 and 16 replicas: simulated routers, each replica's counters from the cache model.
Needs nothing beyond the package's core (no msgspec, no server).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from echo_env.cachetest import fleet_checks
from echo_env.cachetest.fleet_checks import FLEET_CHECKS, PASS_REASONS, FleetRules, decide_fleet
from echo_env.cachetest.fleet_run import join_decisions
from echo_env.cachetest.results import EXIT_CODES, Decision, Evidence
from echo_env.cachetest.verdict import decide
from echo_env.measure.fleet import FleetCeilings, FleetEvidence, ReplicaFigures
from echo_env.measure.placement import FleetCeiling
from echo_env.measure.replicas import phase_ceilings_of
from echo_env.wire.metrics import CounterDelta

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fleet_ceilings as table
from test_verdict import good, phase


def ceilings_of(workload: table.Workload, replicas: int) -> FleetCeilings:
    """The warm burst's ceilings: the first agent's prompt sent before, as the test does."""
    ids, groups = workload.prompts()
    return phase_ceilings_of(ids[:1], groups[:1], ids[1:], groups[1:], table.BLOCK, replicas)


GROUPED = ceilings_of(table.grouped(4, 4), 3)  # affinity 0.810, scatter 0.563, round robin 0.459
FLAT = ceilings_of(table.flat(4, 4), 3)  # affinity = scatter = 0.850; two replicas of three: 0.915


def rep(url: str, requests: int, rate: float, tokens: int = 780) -> ReplicaFigures:
    queries = requests * tokens
    counters = CounterDelta("vllm", reset=False, queries=queries, hits=rate * queries, requests=requests)
    return ReplicaFigures(url, counters)


def ev(rates: Sequence[float] = (0.8, 0.8, 0.8), counts: Sequence[int] = (5, 5, 5), **kw: Any) -> FleetEvidence:
    """Evidence of the grouped burst (15 requests) on ``len(rates)`` replicas."""
    base: dict[str, Any] = {
        "replicas": tuple(rep(f"http://r{i}", n, x) for i, (x, n) in enumerate(zip(rates, counts))),
        "ceilings": GROUPED,
        "requests_sent": sum(counts),
        "policy": "consistent_hash",
    }
    base.update(kw)
    return FleetEvidence(**base)


def flat_ev(rates: Sequence[float], counts: Sequence[int] = (5, 5, 5)) -> FleetEvidence:
    replicas = tuple(rep(f"http://r{i}", n, x, 522) for i, (x, n) in enumerate(zip(rates, counts)))
    return ev(rates, counts, replicas=replicas, ceilings=FLAT)


ROWS: list[tuple[str, FleetEvidence, str, str, str]] = [
    # (row id, evidence, verdict, reason_id, words in the reason); the exit code follows the verdict
    ("through the router", ev(metrics_source="router", replicas=(), replica_urls_hint=("http://a", "http://b")),
     "UNKNOWN", "read_per_replica", "meaningless; replica_urls=http://a,http://b"),
    ("no replica read", ev(replicas=()), "UNKNOWN", "replica_counters", "replica_urls="),
    ("a replica unreadable", ev(replicas=(rep("http://a", 15, 0.8), ReplicaFigures("http://b", None,
     "http://b/metrics could not be read"))), "UNKNOWN", "replica_counters", "http://b/metrics could not be read"),
    ("a replica restarted", ev(replicas=(rep("http://a", 15, 0.8), ReplicaFigures("http://b",
     CounterDelta("vllm", reset=True), "http://b restarted"))), "UNKNOWN", "replica_counters", "restarted"),
    ("other traffic", ev(requests_sent=10), "UNKNOWN", "requests_accounted", "other traffic"),
    ("a replica not listed", ev(requests_sent=30), "UNKNOWN", "requests_accounted", "only 15 of 30"),
    ("no ceilings", ev(ceilings=None), "UNKNOWN", "fleet_ceilings_known", "tokenized"),
    ("nothing queried", ev(replicas=(rep("http://a", 8, 0.0, 0), rep("http://b", 7, 0.0, 0))), "UNKNOWN",
     "fleet_not_above_ceiling", "no prefix-cache queries"),
    ("above the placement ceiling", ev((0.84, 0.84, 0.84)), "UNKNOWN", "fleet_not_above_ceiling",
     "above the most its placement allows; placement ceiling 0.810"),
    ("one replica takes 93%", ev(counts=(14, 1, 0)), "FAIL", "load_balanced", "93% of requests; max_share=0.8"),
    ("groups together", ev((0.80, 0.78, 0.76)), "PASS", "fleet_pass",
     "keeps groups together; of 0.81 placement ceiling"),
    ("flat, together", flat_ev((0.85, 0.85, 0.85)), "PASS", "fleet_pass_flat",
     "cannot tell routing policies apart; not put to the test"),
    # The issue's case: a hash router left a replica idle, so the burst beats the affinity model (0.850)
    # and stays within the ceiling of the placement that happened (two replicas pay the prefix).
    ("flat, beats the affinity model", flat_ev((0.91, 0.0, 0.92), (7, 0, 8)), "PASS", "fleet_pass_flat",
     "of 0.92 placement ceiling"),
    ("below every routing model", ev((0.40, 0.40, 0.40)), "FAIL", "fleet_evicting",
     "below every routing model; round-robin model gives 0.459; caches lose blocks; routing is not the cause"),
    ("scatters", ev((0.58, 0.56, 0.57)), "FAIL", "scatter", "scatters groups; predicts 0.563; X-Session-ID"),
    ("between", ev((0.71, 0.71, 0.71)), "UNKNOWN", "scatter", "between the scatter model"),
    ("flat, short of the placement", flat_ev((0.78, 0.0, 0.78), (7, 0, 8)), "UNKNOWN", "flat_shortfall",
     "cannot tell routing policies apart; router is not to blame"),
    ("no census: held to the affinity model", ev(ceilings=dataclasses.replace(GROUPED, placement=None)),
     "PASS", "fleet_pass", "of 0.81 affinity model"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "evidence", "verdict", "reason_id", "words"), ROWS, ids=[r[0] for r in ROWS])
def test_routing_verdict(row: str, evidence: FleetEvidence, verdict: str, reason_id: str, words: str) -> None:
    d = decide_fleet(evidence)
    assert (d.verdict, d.reason_id, d.exit_code) == (verdict, reason_id, EXIT_CODES[verdict]), d.reason
    for w in words.split("; "):
        assert w in d.reason
    names = [c.name for c in d.checks]
    assert names == [name for name, _, _ in FLEET_CHECKS]
    decided_at = names.index(reason_id) if reason_id not in PASS_REASONS else len(d.checks)
    assert all(c.outcome == "skip" for c in d.checks[decided_at + 1 :])


def test_the_models_of_the_hand_made_workloads() -> None:
    assert (round(GROUPED.affinity, 3), round(GROUPED.scatter, 3), round(GROUPED.round_robin, 3)) == (
        0.810, 0.563, 0.459,
    )  # fmt: skip
    assert FleetRules().discriminates(GROUPED) and not FleetRules().discriminates(FLAT)
    assert FLAT.affinity == pytest.approx(FLAT.scatter, abs=0.005)


def _decisive_lines() -> dict[int, str]:
    """Line -> check name of every ``failed(...)`` / ``unknown(...)`` call in a check of FLEET_CHECKS."""
    source = Path(inspect.getsourcefile(fleet_checks) or "").read_text()
    names = {fn.__name__: name for name, _, fn in FLEET_CHECKS}
    lines = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Name)
                    and call.func.id in ("failed", "unknown")
                ):
                    lines[call.lineno] = names[node.name]
    return lines


def test_every_decisive_branch_has_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    reached: set[int] = set()
    for name in ("failed", "unknown"):
        original = getattr(fleet_checks, name)

        def record(*args: Any, _original: Any = original) -> Any:
            reached.add(sys._getframe(1).f_lineno)
            return _original(*args)

        monkeypatch.setattr(fleet_checks, name, record)
    ids = {decide_fleet(evidence).reason_id for _, evidence, *_ in ROWS}
    branches = _decisive_lines()
    assert len(branches) >= 12
    missing = {line: check for line, check in branches.items() if line not in reached}
    assert not missing, f"branches of fleet_checks.py without a row (line: check): {missing}"
    assert set(PASS_REASONS) <= ids
    assert {name for name, _, _ in FLEET_CHECKS} - {"workload_discriminates", "groups_together"} <= ids


# ----- the cache check's fleet ceiling --------------------------------------------------------------


def fleet_warm(rate: float, fleet: FleetCeiling | None, one_server: float = 0.981) -> Evidence:
    """The healthy evidence of the verdict's table, its warm burst at ``rate`` of the one-server ceiling."""
    warm = phase("warm", rate=rate, reported=rate, ceiling=one_server)
    return dataclasses.replace(good(), warm=warm, fleet_ceiling=fleet)


ISSUE_EXAMPLE = FleetCeiling(0.810, replicas=6, used=5)
"""Six replicas, 12 groups of 2, a hash router that left one replica idle (``benchmarks/fleet_ceilings.py``)."""

CACHE_ROWS: list[tuple[str, Evidence, str, str, str]] = [
    ("one server: held to the one-server ceiling (the old fleet FAIL)", fleet_warm(0.810, None), "FAIL",
     "hits_reach_ceiling", "far under the ceiling: 0.810 vs 0.981"),
    ("fleet: held to its placement ceiling", fleet_warm(0.810, ISSUE_EXAMPLE), "PASS", "pass",
     "of a 0.81 fleet ceiling (5 of 6 replicas; one server 0.981)"),
    ("fleet: far under its placement ceiling", fleet_warm(0.50, ISSUE_EXAMPLE), "FAIL", "hits_reach_ceiling",
     "far under the fleet ceiling; 0.500 vs 0.810; too small or evicting"),
    ("fleet: above its placement ceiling", fleet_warm(0.90, ISSUE_EXAMPLE), "UNKNOWN", "not_above_ceiling",
     "above the most the prompts allow (fleet ceiling"),
    ("fleet: placement unknown", fleet_warm(0.810, FleetCeiling(None, 6, None, "the replicas' request counts were "
     "not read")), "UNKNOWN", "hits_reach_ceiling", "depends on where requests went; pass replica_urls="),
    ("fleet: placement unknown, above one server", fleet_warm(0.95, FleetCeiling(None, 6, None, "not read"), 0.90),
     "UNKNOWN", "not_above_ceiling", "one-server ceiling 0.900"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("row", "evidence", "verdict", "reason_id", "words"), CACHE_ROWS, ids=[r[0] for r in CACHE_ROWS]
)
def test_cache_check_on_a_fleet(row: str, evidence: Evidence, verdict: str, reason_id: str, words: str) -> None:
    d = decide(evidence)
    assert (d.verdict, d.reason_id, d.exit_code) == (verdict, reason_id, EXIT_CODES[verdict]), d.reason
    for w in words.split("; "):
        assert w in d.reason


@pytest.mark.parametrize(
    ("routing_id", "verdict", "reason_id"),
    [("scatter", "FAIL", "scatter"), ("fleet_evicting", "FAIL", "fleet_evicting"), ("flat_shortfall", "UNKNOWN",
     "flat_shortfall"), ("fleet_pass", "FAIL", "hits_reach_ceiling")],
)  # fmt: skip
def test_routing_explains_a_shortfall_against_the_fleet_ceiling(routing_id: str, verdict: str, reason_id: str) -> None:
    cache = Decision("FAIL", "hit rate far under the fleet ceiling", "hits_reach_ceiling", ())
    routing_verdict = {"scatter": "FAIL", "fleet_evicting": "FAIL", "flat_shortfall": "UNKNOWN"}.get(routing_id, "PASS")
    joined = join_decisions(cache, Decision(routing_verdict, "why", routing_id, ()))  # type: ignore[arg-type]
    assert (joined.verdict, joined.reason_id, joined.exit_code) == (verdict, reason_id, EXIT_CODES[verdict])


# ----- offline tables: 2, 3, 4, 6 and 16 replicas -----------------------------------------------------

EXPECTED: dict[tuple[str, str], tuple[str, str]] = {
    # (workload, router) -> (test verdict, reason id) on every fleet size, unless OVERRIDES says otherwise
    ("flat", "hash"): ("PASS", "pass"), ("flat", "affinity"): ("PASS", "pass"), ("flat", "scatter"): ("PASS", "pass"),
    ("flat", "round_robin"): ("PASS", "pass"), ("flat", "half"): ("PASS", "pass"),
    ("flat", "hash+evict15"): ("FAIL", "fleet_evicting"), ("flat", "hash+evict40"): ("FAIL", "fleet_evicting"),
    ("flat", "one"): ("FAIL", "load_balanced"),
    ("grouped", "hash"): ("PASS", "pass"), ("grouped", "affinity"): ("PASS", "pass"),
    ("grouped", "scatter"): ("FAIL", "scatter"), ("grouped", "round_robin"): ("FAIL", "scatter"),
    ("grouped", "half"): ("UNKNOWN", "scatter"), ("grouped", "hash+evict15"): ("UNKNOWN", "scatter"),
    ("grouped", "hash+evict40"): ("FAIL", "scatter"), ("grouped", "one"): ("FAIL", "load_balanced"),
}  # fmt: skip
OVERRIDES: dict[tuple[int, str, str], tuple[str, str]] = {
    # Two replicas: half the groups scattered, or 15% evicted, lands nearer the scatter model (0.678)
    # than the affinity one (0.831); 40% evicted falls below every model.
    (2, "grouped", "half"): ("FAIL", "scatter"), (2, "grouped", "hash+evict15"): ("FAIL", "scatter"),
    (2, "grouped", "hash+evict40"): ("FAIL", "fleet_evicting"), (6, "grouped", "half"): ("FAIL", "scatter"),
    # A flat workload whose hash placement left replicas idle: 15% short of its placement ceiling, yet
    # above the routing models, which the idle replicas' savings lift it over.
    (3, "flat", "hash+evict15"): ("UNKNOWN", "flat_shortfall"),
    (16, "flat", "hash+evict15"): ("UNKNOWN", "flat_shortfall"),
}  # fmt: skip

SCENARIOS = table.scenarios()


@pytest.mark.parametrize("s", SCENARIOS, ids=[f"{s.replicas}-{s.workload.name}-{s.router}" for s in SCENARIOS])
def test_offline_fleet_table(s: table.Scenario) -> None:
    r = table.row(s)
    key = (s.workload.name, s.router)
    verdict, reason_id = OVERRIDES.get((s.replicas, *key), EXPECTED[key])
    assert (r["test"], r["test_reason_id"], r["test_exit_code"]) == (verdict, reason_id, EXIT_CODES[verdict]), r
    assert r["routing_exit_code"] == EXIT_CODES[r["routing"]]
    if s.router not in table.KEPT:
        # No run beats the ceiling of its own placement, and that ceiling is no higher than one server's.
        assert r["fleet_hit_rate"] <= r["placement_ceiling"] + 1e-9 <= r["one_server"] + 2e-9
    if s.router in ("hash", "affinity"):
        # Groups kept whole with the cold prompt's group on its replica: the count bound is exact.
        assert r["fleet_hit_rate"] == pytest.approx(r["placement_ceiling"])
        assert r["cache_check"] == "PASS"


def test_the_issue_example_passes_where_the_one_server_ceiling_failed() -> None:
    r = table.row(table.Scenario(6, table.flat(12, 2), "hash", seed=2))
    assert r["replica_requests"].count(0) == 1
    assert (round(r["fleet_hit_rate"], 3), round(r["one_server"], 3), round(r["affinity_model"], 3)) == (
        0.810, 0.981, 0.768,
    )  # fmt: skip
    assert r["placement_ceiling"] == pytest.approx(r["fleet_hit_rate"])
    assert (r["cache_check_one_server"], r["cache_check"], r["test"], r["test_exit_code"]) == (
        "FAIL",
        "PASS",
        "PASS",
        0,
    )


def test_the_table_covers_2_3_4_and_16_replicas() -> None:
    assert {2, 3, 4, 16} <= {s.replicas for s in SCENARIOS}
    assert set(table.ROUTERS) == {s.router for s in SCENARIOS}
    assert {(w, router) for w in ("flat", "grouped") for router in table.ROUTERS} == set(EXPECTED)
