"""Fleet evidence made by hand, shared by the routing tests and the report tests (no server)."""

from __future__ import annotations

from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.cachetest.results import FleetResult
from echo_env.measure.fleet import FleetCeilings, FleetEvidence, replica_figures
from echo_env.wire.metrics import CacheCounters


def fleet_result(per_replica: tuple[tuple[int, int, int], ...]) -> FleetResult:
    """Evidence of a warm burst and its routing verdict: (requests, queries, hits) per replica."""
    figures = tuple(
        replica_figures(
            f"http://127.0.0.1:{8001 + i}",
            CacheCounters("vllm", queries=0, hits=0, requests=0),
            CacheCounters("vllm", queries=q, hits=h, requests=n),
        )
        for i, (n, q, h) in enumerate(per_replica)
    )
    ceilings = FleetCeilings(2, 128, 7000, one_server=0.85, affinity=0.80, scatter=0.78, round_robin=0.80)
    sent = sum(n for n, _, _ in per_replica)
    evidence = FleetEvidence(figures, ceilings, sent, policy="round_robin")
    return FleetResult(evidence, decide_fleet(evidence))
