"""Fleet ceilings and both verdicts on 2, 3, 4, 6 and 16 replicas, from simulated routers (no server).

Pure computation. For each fleet size, a workload of the test's shape (a cold prompt,
then the rest of the agents in one warm burst, groups of agents sharing a prompt) is
placed by a simulated router, and each replica's counters are what the cache model of
``plan_tokens`` says that replica would count (:func:`echo_env.measure.placement.replica_hits`;
nothing evicted unless the row says so). From those counters alone, as a real run
sees them, come the placement ceiling, the routing verdict and the cache check's
ceiling steps (``not_above_ceiling``, ``hits_reach_ceiling``), next to what the cache
check said when it held a fleet to the one-server ceiling.

Two workloads: ``flat``, the echo task's (a 519-token shared prompt, a group's word in
the last, never-cached block: groups share nothing cacheable beyond the system prompt),
and ``grouped`` (a 260-token shared prompt, then 520 tokens of the group's own, as a
multi-turn history: routing moves the hit rate). Routers: ``hash`` keeps each group on
one replica drawn at random (a consistent-hash router: some replicas may get no group),
``affinity`` spreads groups evenly, ``scatter`` draws a replica per request,
``round_robin`` takes replicas in send order, ``half`` keeps every other group and
scatters the rest, ``hash+evict15`` and ``hash+evict40`` are ``hash`` with caches that
lose 15% and 40% of what they could hit, ``one`` sends everything to one replica.

    python benchmarks/fleet_ceilings.py      # prints the table, writes results/fleet_ceilings.json
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.cachetest.fleet_run import join_decisions
from echo_env.cachetest.results import Decision, Evidence, Rules, ServerEvidence
from echo_env.cachetest.verdict import check_hits_reach_ceiling, check_not_above_ceiling
from echo_env.measure.figures import HitRate, PhaseFigures
from echo_env.measure.fleet import FleetEvidence, ReplicaFigures, affinity_placement
from echo_env.measure.placement import replica_hits
from echo_env.measure.replicas import phase_ceilings_of
from echo_env.wire.metrics import CounterDelta

RESULTS = Path(os.environ.get("ECHO_ENV_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
"""Where the JSON goes (``$ECHO_ENV_BENCH_RESULTS`` when set, as for every benchmark)."""
BLOCK = 128
"""vLLM's block size on CPU."""


@dataclass(frozen=True)
class Workload:
    """Groups of agents sharing a prompt: a shared prefix, then each group's own tokens."""

    name: str
    groups: int
    group_size: int
    shared_tokens: int
    own_tokens: int

    def prompts(self) -> tuple[list[list[int]], list[int]]:
        """Every agent's prompt (group by group, as the test sends them) and its group."""
        shared = list(range(1, self.shared_tokens + 1))
        ids, groups = [], []
        for g in range(self.groups):
            own = [100_000 + 1_000 * g + i for i in range(self.own_tokens)]
            ids += [shared + own] * self.group_size
            groups += [g] * self.group_size
        return ids, groups


def flat(groups: int, size: int) -> Workload:
    return Workload("flat", groups, size, 519, 3)


def grouped(groups: int, size: int) -> Workload:
    return Workload("grouped", groups, size, 260, 520)


Router = Callable[[Sequence[int], int, random.Random], list[int]]
"""A placement of every prompt (the cold one first) from the groups, the replica count and a seeded RNG."""


def _hash(groups: Sequence[int], n: int, rng: random.Random) -> list[int]:
    where = {g: rng.randrange(n) for g in dict.fromkeys(groups)}
    return [where[g] for g in groups]


def _half(groups: Sequence[int], n: int, rng: random.Random) -> list[int]:
    kept = _hash(groups, n, rng)
    return [at if g % 2 == 0 else rng.randrange(n) for g, at in zip(groups, kept)]


ROUTERS: dict[str, Router] = {
    "hash": _hash,
    "affinity": lambda groups, n, rng: affinity_placement(groups, n),
    "scatter": lambda groups, n, rng: [rng.randrange(n) for _ in groups],
    "round_robin": lambda groups, n, rng: [i % n for i in range(len(groups))],
    "half": _half,
    "hash+evict15": _hash,
    "hash+evict40": _hash,
    "one": lambda groups, n, rng: [0] * len(groups),
}
KEPT = {"hash+evict15": 0.85, "hash+evict40": 0.6}
"""Share of the possible hits a router's caches keep (the rest evicted)."""


@dataclass(frozen=True)
class Scenario:
    """One row: a workload on ``replicas`` replicas behind a router."""

    replicas: int
    workload: Workload
    router: str
    seed: int = 0


def _server() -> ServerEvidence:
    return ServerEvidence(
        "vllm", "http://router/v1", "m", None, True, "vllm:cache_config_info", BLOCK, "block_size", None,
        None, None, "--enable-prefix-caching", "--metrics",
    )  # fmt: skip


def evidence_of(s: Scenario) -> tuple[FleetEvidence, float]:
    """The routing evidence of a scenario's warm burst, and its one-server ceiling."""
    ids, groups = s.workload.prompts()
    placement = ROUTERS[s.router](groups, s.replicas, random.Random(s.seed))
    per = replica_hits(ids[:1], placement[:1], ids[1:], placement[1:], BLOCK)
    kept = KEPT.get(s.router, 1.0)
    figures = tuple(
        ReplicaFigures(
            f"http://replica-{r}",
            CounterDelta("vllm", reset=False, queries=per.get(r, (0, 0, 0))[1], hits=kept * per.get(r, (0, 0, 0))[2],
                         requests=per.get(r, (0, 0, 0))[0]),
        )
        for r in range(s.replicas)
    )  # fmt: skip
    ceilings = phase_ceilings_of(ids[:1], groups[:1], ids[1:], groups[1:], BLOCK, s.replicas)
    return FleetEvidence(figures, ceilings, len(ids) - 1, policy=s.router), ceilings.one_server


def cache_steps(rate: float, one_server: float, e: FleetEvidence | None) -> Decision:
    """The cache check's ceiling steps as a decision: the first that decides, else PASS."""
    warm = PhaseFigures("warm", requests=1, hit=HitRate(rate, None, one_server))
    evidence = Evidence(_server(), None, warm, None, None, None, fleet_ceiling=e.cache_ceiling() if e else None)
    for name, check in (
        ("not_above_ceiling", check_not_above_ceiling),
        ("hits_reach_ceiling", check_hits_reach_ceiling),
    ):
        step = check(evidence, Rules())
        if step.verdict is not None:
            return Decision(step.verdict, step.reason, name, ())
    return Decision("PASS", "the hit rate reaches its ceiling", "pass", ())


def row(s: Scenario) -> dict[str, Any]:
    """Every figure of one scenario, and both verdicts."""
    e, one = evidence_of(s)
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    d = decide_fleet(e)
    cache = cache_steps(rate, one, e)
    test = join_decisions(cache, d)
    return {
        "replicas": s.replicas,
        "workload": f"{s.workload.name} {s.workload.groups}x{s.workload.group_size}",
        "router": s.router,
        "replica_requests": list(e.replica_requests or ()),
        "fleet_hit_rate": rate,
        "placement_ceiling": e.placement_ceiling,
        "one_server": one,
        "affinity_model": c.affinity,
        "round_robin_model": c.round_robin,
        "scatter_model": c.scatter,
        "cache_check": cache.verdict,
        "cache_check_one_server": cache_steps(rate, one, None).verdict,
        "routing": d.verdict,
        "routing_reason_id": d.reason_id,
        "routing_exit_code": d.exit_code,
        "test": test.verdict,
        "test_reason_id": test.reason_id,
        "test_exit_code": test.exit_code,
    }


SIZES = {2: (4, 4, 2), 3: (4, 4, 3), 4: (8, 4, 4), 6: (12, 2, 2), 16: (16, 8, 16)}
"""Replicas to (groups, agents per group, seed): 3 and 16 are the issue's sizes, 6 its end-to-end example
(seed 2 leaves one of the six replicas without a group, as the issue's consistent-hash run did)."""


def scenarios() -> list[Scenario]:
    """Every row of the table, seeds fixed."""
    out = []
    for n, (g, k, seed) in SIZES.items():
        for make in (flat, grouped):
            for router in ROUTERS:
                out.append(Scenario(n, make(g, k), router, seed=seed))
    return out


HEADERS = ("N", "workload", "router", "requests", "hit", "placement", "one srv", "affinity", "scatter", "cache",
           "cache (1-srv)", "routing", "test (exit)")  # fmt: skip


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        str(r["replicas"]), r["workload"], r["router"], ",".join(map(str, r["replica_requests"])),
        f"{r['fleet_hit_rate']:.3f}", f"{r['placement_ceiling']:.3f}", f"{r['one_server']:.3f}",
        f"{r['affinity_model']:.3f}", f"{r['scatter_model']:.3f}", r["cache_check"], r["cache_check_one_server"],
        f"{r['routing']} {r['routing_reason_id']}", f"{r['test']} {r['test_reason_id']} ({r['test_exit_code']})",
    ]  # fmt: skip


def main(argv: Sequence[str] = ()) -> int:
    rows = [row(s) for s in scenarios()]
    cells = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(HEADERS, *cells)]
    for line in (HEADERS, *cells):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "fleet_ceilings.json"
    out.write_text(json.dumps({"block_size": BLOCK, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
