"""The prefix-cache test through a router: every replica read on its own, and the routing verdict joined in.

When the target is a fleet (``replicas=2`` embedded, or ``base_url=ROUTER
replica_urls=U1,U2``), :class:`FleetWatch` takes over the runner's counters: every phase
is measured on the sum of the replicas' own counters (never on the router's
``/metrics``, which answers for one replica per call), read from each replica's
``/metrics`` or, with ``prometheus_url=``, through Prometheus. The reads of each replica
around the warm burst (the ones its figures are summed from) are kept, for
:class:`~echo_env.measure.fleet.FleetEvidence` against the fleet ceilings of the burst's
token plan. The routing verdict (:func:`~echo_env.cachetest.fleet_checks.decide_fleet`)
is judged on it beside the cache verdict (:func:`echo_env.cachetest.judge.judge`), and
joins it (:func:`join_decisions`): a routing FAIL fails the test, a routing UNKNOWN
leaves it UNKNOWN.

A ``base_url`` without ``replica_urls`` that answered as a router when its facts were read
(``GET /workers``, ``/list_workers``; :func:`~echo_env.wire.info.read_server_facts`) has
its counters left unused, and the routing verdict asks for the replicas' URLs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from echo_env.cachetest.results import Decision, Verdict
from echo_env.cachetest.workload import Prompt, key_of
from echo_env.launch.target import OpenServer
from echo_env.measure.figures import PhaseFigures
from echo_env.measure.fleet import FleetCeilings, FleetEvidence
from echo_env.measure.phase import CounterProbe
from echo_env.measure.replicas import FleetCounterProbe, ReplicaProbe, fleet_evidence, phase_ceilings_of
from echo_env.measure.tokens import TokenIds
from echo_env.wire.info import ServerFacts
from echo_env.wire.metrics import CacheCounters, Snapshot

log = logging.getLogger(__name__)

_SEVERITY: dict[Verdict, int] = {"PASS": 0, "UNKNOWN": 1, "FAIL": 2}


def join_decisions(cache: Decision, routing: Decision) -> Decision:
    """The test's verdict on a fleet: the cache verdict and the routing verdict, the worse one deciding.

    FAIL beats UNKNOWN beats PASS. On a tie the cache verdict's reason leads (a cache that
    does not work explains a routing figure, not the other way round); when both pass, the
    reason names both. One exception: when the cache verdict is a shortfall against the
    fleet ceiling (``hits_reach_ceiling``) and routing did not pass, the routing verdict
    decides, since it reads the same shortfall against the routing models and can tell
    eviction (``fleet_evicting``) from scattered groups (``scatter``) from neither (UNKNOWN);
    the fleet ceiling alone cannot. The checks are the cache's, then the routing's.

    Args:
        cache: The verdict on the prefix cache (:func:`echo_env.cachetest.verdict.decide`).
        routing: The routing verdict.

    Returns:
        The joined decision.
    """
    checks = (*cache.checks, *routing.checks)
    routing_explains = cache.reason_id == "hits_reach_ceiling" and routing.verdict != "PASS"
    if routing_explains or _SEVERITY[routing.verdict] > _SEVERITY[cache.verdict]:
        return Decision(routing.verdict, f"routing: {routing.reason}", routing.reason_id, checks)
    if cache.verdict == "PASS":
        return Decision("PASS", f"{cache.reason}; {routing.reason}", cache.reason_id, checks)
    return Decision(cache.verdict, cache.reason, cache.reason_id, checks)


def warm_ceilings(
    ids: Mapping[str, TokenIds], cold: Sequence[Prompt], warm: Sequence[Prompt], block_size: int | None, replicas: int
) -> FleetCeilings | None:
    """The warm burst's fleet ceilings, the cold prompt sent before it; each distinct prompt is a group.

    Args:
        ids: Token ids by prompt key (:func:`~echo_env.cachetest.workload.key_of`).
        cold: The prompts sent before the burst.
        warm: The burst's prompts, in send order.
        block_size: The cache block size (None: unknown, no ceilings).
        replicas: How many replicas.

    Returns:
        The ceilings, or None when a prompt was not tokenized or the block size is unknown.
    """
    keys_cold, keys_warm = [key_of(p) for p in cold], [key_of(p) for p in warm]
    if block_size is None or not keys_warm or any(k not in ids for k in (*keys_cold, *keys_warm)):
        return None
    return phase_ceilings_of(
        [ids[k] for k in keys_cold], keys_cold, [ids[k] for k in keys_warm], keys_warm, block_size, replicas
    )


class _PhaseReads(ReplicaProbe):
    """A :class:`ReplicaProbe` that keeps its last two reads: each replica before and after the last phase.

    A phase is measured with one read before it and one after, so once it ends these are
    exactly the per-replica counters its fleet-wide figures were summed from.
    """

    around: tuple[Sequence[CacheCounters | None], Sequence[CacheCounters | None]] = ((), ())
    """Every replica's counters at the last two reads (None where one could not be read)."""

    async def read(self) -> list[Snapshot | None]:
        snaps = await super().read()
        self.around = (self.around[1], [s.counters if s is not None else None for s in snaps])
        return snaps


@dataclass(frozen=True)
class FleetWatch:
    """The runner's view of a fleet: each replica's reads around the last phase, and the router's policy."""

    replicas: _PhaseReads | None
    """Every replica read on its own (None: a router whose replicas are unknown)."""
    policy: str | None
    """The router's policy, when known."""
    hint: tuple[str, ...] = ()
    """Replica URLs the router listed, for a router given without ``replica_urls``."""

    def after_warm(
        self, figures: PhaseFigures, ids: Mapping[str, TokenIds], cold: Sequence[Prompt], warm: Sequence[Prompt],
        block_size: int | None,
    ) -> FleetEvidence:  # fmt: skip
        """The warm burst's evidence, from every replica's reads around it (the routing verdict is judged on it).

        Call it as the warm burst ends, before another phase reads the replicas.

        Args:
            figures: The warm burst's figures (its finished requests are the ones sent).
            ids: Token ids by prompt key.
            cold: The prompts sent before the burst.
            warm: The burst's prompts.
            block_size: The cache block size.
        """
        if self.replicas is None:
            return FleetEvidence(
                (), None, figures.finished, policy=self.policy, metrics_source="router", replica_urls_hint=self.hint
            )
        before, after = self.replicas.around
        n = len(self.replicas.urls)
        return fleet_evidence(
            self.replicas.urls, before or [None] * n, after or [None] * n, requests_sent=figures.finished,
            ceilings=warm_ceilings(ids, cold, warm, block_size, n), policy=self.policy,
            metrics_source=self.replicas.source,
        )  # fmt: skip


def counter_probe(
    server: OpenServer, facts: ServerFacts, api_key: str | None = None
) -> tuple[CounterProbe, FleetWatch | None]:
    """What measures every phase's counters, and the fleet's watch when the server is a fleet.

    A server given with ``replica_urls`` (or started as an embedded fleet) is read replica
    by replica, through Prometheus when the server names one. A server that answered as a
    router (:attr:`~echo_env.wire.info.ServerFacts.router_workers`) has its counters left
    unused, and the routing verdict names its replicas. Any other server is read on its own
    ``/metrics``; metrics that failed when the server was first asked stay off, with the reason.

    Args:
        server: The open server (its ``replica_urls``, ``prometheus_url`` and ``policy``).
        facts: What the server said about itself (the metric names' adapter, the model, whether it routes).
        api_key: Bearer token for the replicas' pages.

    Returns:
        The probe, and a :class:`FleetWatch` (None: one server, nothing changes).
    """
    if server.replica_urls:
        replicas = _PhaseReads(
            server.replica_urls, model_name=facts.model, api_key=api_key, kind=facts.kind,
            prometheus_url=server.prometheus_url,
        )  # fmt: skip
        return FleetCounterProbe(replicas), FleetWatch(replicas, server.policy)
    found = facts.router_workers
    if found is None:
        return CounterProbe.of_server(facts), None
    log.warning(
        "%s is a router in front of %s: pass replica_urls= to read each replica", server.base_url, ", ".join(found)
    )
    unread = CounterProbe(
        None,
        "base_url is a router: its /metrics answers for one replica per call, so its counters are not used; "
        "pass replica_urls= to read each replica",
    )
    return unread, FleetWatch(None, server.policy, hint=found)
