"""Hit-rate ceilings of a fleet of replicas, and the per-replica evidence a routing verdict reads.

A prefix cache lives in one replica. Behind a router, a request hits only what earlier
requests left on the replica it lands on, so the best a fleet can do depends on where
requests go. For one workload (the prompts' token ids in send order and their groups,
the agents that share a prompt) this module gives the one-server ceiling and models of
three placements, each from the same block arithmetic as
:func:`echo_env.measure.tokens.plan_tokens`:

- ``one_server``: every prompt on one server (the single-server ceiling);
- ``affinity``: every group on one replica, the groups spread evenly (group ``g``, in order
  of first appearance, on replica ``g mod N``); the shared system prompt is paid once per
  replica;
- ``scatter``: each request on a replica drawn uniformly at random, independently. This is
  the exact expectation, not a simulation: a prompt's ``k``-th block hits when any of the
  ``m`` earlier prompts holding the same chained block went to the same replica, which
  happens with probability ``1 - (1 - 1/N) ** m``.

plus ``round_robin``, the hit rate of request ``i`` on replica ``i mod N`` in send order
(what vllm-router's round_robin does when requests arrive in send order).

Every model takes the cache as large enough to keep everything and counts the first
request of a prefix on a replica as cold, as ``plan_tokens`` does. They are models of a
placement, not ceilings of a run: a router that leaves a replica idle beats the affinity
model. The ceiling of the placement that happened, from each replica's request count, is
:attr:`FleetEvidence.placement_ceiling` (:mod:`echo_env.measure.placement`). Pure
functions (asking a router for its replicas is the wire's: :mod:`echo_env.wire.router`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from echo_env.errors import ConfigError
from echo_env.measure.tokens import TokenIds, block_chain, plan_tokens
from echo_env.wire.metrics import CacheCounters, CounterDelta, Sample, delta

if TYPE_CHECKING:
    from echo_env.measure.placement import FleetCeiling, PlacementBound

# --------------------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetCeilings:
    """The hit rates a workload allows on a fleet, by where its requests go."""

    replicas: int
    """How many replicas."""
    block_size: int
    """The cache block size in tokens."""
    prompt_tokens: int
    """All prompt tokens of the workload."""
    one_server: float
    """Every prompt on one server."""
    affinity: float
    """Every group on one replica, groups spread evenly (a model: a run that leaves replicas idle beats it)."""
    scatter: float
    """Each request on a uniformly random replica (the exact expectation)."""
    round_robin: float
    """Request ``i`` on replica ``i mod N``, in send order."""
    placement: PlacementBound | None = None
    """The census behind the ceiling that follows each replica's request count (None: not built)."""

    @property
    def discriminates(self) -> float:
        """``affinity - scatter``: how far routing can move the hit rate on this workload."""
        return self.affinity - self.scatter


def _check(prompts: Sequence[TokenIds], block_size: int, replicas: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size must be a positive number of tokens, got {block_size}")
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, got {replicas}")


def placement_hit_tokens(prompts: Sequence[TokenIds], placement: Sequence[int], block_size: int) -> int:
    """The most tokens a fleet's caches can serve when prompt ``i`` goes to replica ``placement[i]``.

    Args:
        prompts: Token ids of each prompt, in send order.
        placement: The replica of each prompt (any hashable labels work; ints by convention).
        block_size: The cache block size in tokens.

    Returns:
        Hit tokens summed over replicas, each replica's prompts taken in send order.
    """
    if len(placement) != len(prompts):
        raise ConfigError(f"{len(placement)} placements for {len(prompts)} prompts: give one replica per prompt")
    per_replica: dict[int, list[TokenIds]] = {}
    for prompt, replica in zip(prompts, placement):
        per_replica.setdefault(replica, []).append(prompt)
    return sum(plan_tokens(seqs, block_size).max_hit_tokens for seqs in per_replica.values())


def affinity_placement(groups: Sequence[Hashable], replicas: int) -> list[int]:
    """Each request's replica when every group stays on one replica: groups by first appearance, ``g mod N``."""
    order: dict[Hashable, int] = {}
    for g in groups:
        order.setdefault(g, len(order))
    return [order[g] % replicas for g in groups]


def round_robin_placement(n: int, replicas: int) -> list[int]:
    """Request ``i`` on replica ``i mod N``."""
    return [i % replicas for i in range(n)]


def expected_scatter_hit_tokens(prompts: Sequence[TokenIds], replicas: int, block_size: int) -> float:
    """Expected hit tokens when each prompt goes to a uniformly random replica, independently.

    Exact: block ``k`` of prompt ``i`` is on its replica when one of the ``m`` earlier
    prompts holding that chained block landed there, with probability
    ``1 - (1 - 1/N) ** m``; a prompt stores its whole chain, so a deeper block on the
    replica implies every shallower one, and expected hits add up block by block.

    Args:
        prompts: Token ids of each prompt, in send order.
        replicas: How many replicas.
        block_size: The cache block size in tokens.

    Returns:
        The expected hit tokens.
    """
    _check(prompts, block_size, replicas)
    miss = 1.0 - 1.0 / replicas
    holders: Counter[Hashable] = Counter()
    expected = 0.0
    for seq in prompts:
        chain = block_chain(seq, block_size)
        expected += block_size * math.fsum(1.0 - miss ** holders[key] for key in chain)
        holders.update(chain)
    return expected


def fleet_ceilings(
    prompts: Sequence[TokenIds], groups: Sequence[Hashable], block_size: int, replicas: int
) -> FleetCeilings:
    """The hit-rate ceilings of a workload on ``replicas`` replicas.

    Args:
        prompts: Token ids of each prompt, in send order.
        groups: The group of each prompt (agents of a group share their prompt or session).
        block_size: The cache block size in tokens (vLLM on CPU: 128).
        replicas: How many replicas.

    Returns:
        The ceilings; every rate is 0 for a workload with no prompt tokens.

    Raises:
        ConfigError: ``groups`` does not match ``prompts``, or a size is not positive.
    """
    _check(prompts, block_size, replicas)
    if len(groups) != len(prompts):
        raise ConfigError(f"{len(groups)} group ids for {len(prompts)} prompts: give one group per prompt")
    from echo_env.measure.placement import placement_bound

    total = sum(len(p) for p in prompts)

    def rate(hits: float) -> float:
        return hits / total if total else 0.0

    return FleetCeilings(
        replicas=replicas,
        block_size=block_size,
        prompt_tokens=total,
        one_server=rate(plan_tokens(prompts, block_size).max_hit_tokens),
        affinity=rate(placement_hit_tokens(prompts, affinity_placement(groups, replicas), block_size)),
        scatter=rate(expected_scatter_hit_tokens(prompts, replicas, block_size)),
        round_robin=rate(placement_hit_tokens(prompts, round_robin_placement(len(prompts), replicas), block_size)),
        placement=placement_bound((), prompts, block_size),
    )


# --------------------------------------------------------------------------------------
# Evidence read from each replica
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaFigures:
    """What one replica counted over a phase, read from its own ``/metrics`` or through Prometheus."""

    url: str
    """The replica's root (as the router names it)."""
    counters: CounterDelta | None
    """Its counter deltas over the phase (None: not read)."""
    note: str | None = None
    """Why there are no usable counters, when there are none."""

    @property
    def requests(self) -> int | None:
        """Requests it finished in the phase (None: unknown)."""
        c = self.counters
        if c is None or c.reset or c.requests is None:
            return None
        return round(c.requests)

    @property
    def hit_rate(self) -> float | None:
        """Its ``hits / queries`` over the phase (None: unknown or nothing queried)."""
        c = self.counters
        return None if c is None or c.reset else c.hit_rate

    @property
    def usable(self) -> bool:
        """Whether its hits, queries and requests are all known."""
        c = self.counters
        return c is not None and not c.reset and c.hits is not None and c.queries is not None and c.requests is not None


MetricsSource = Literal["replicas", "prometheus", "router"]
"""Where counters were read: each replica's own ``/metrics``, each replica's series through a
Prometheus server's API (``prometheus_url=``), or only the router's address."""


@dataclass(frozen=True)
class FleetEvidence:
    """Everything a routing verdict reads about one phase on a fleet. Pure data: build it by hand in tests."""

    replicas: tuple[ReplicaFigures, ...]
    """One entry per replica, from its own ``/metrics`` (empty when only the router was read)."""
    ceilings: FleetCeilings | None
    """The workload's ceilings (None: the prompts were not tokenized)."""
    requests_sent: int
    """Requests the phase sent through the router."""
    policy: str | None = None
    """The router's policy, when known."""
    metrics_source: MetricsSource = "replicas"
    """``replicas`` when each replica's ``/metrics`` was read; ``prometheus`` when each replica's
    series were read through Prometheus; ``router`` when only the router's address was."""
    replica_urls_hint: tuple[str, ...] = ()
    """Replica URLs the router lists (``GET /workers``), for the message that asks for them."""

    @property
    def hits(self) -> float | None:
        """Hit tokens summed over replicas (None: a replica's counters are missing)."""
        if not self.replicas or not all(r.usable for r in self.replicas):
            return None
        return math.fsum(r.counters.hits for r in self.replicas if r.counters and r.counters.hits is not None)

    @property
    def queries(self) -> float | None:
        """Queried tokens summed over replicas (None: a replica's counters are missing)."""
        if not self.replicas or not all(r.usable for r in self.replicas):
            return None
        return math.fsum(r.counters.queries for r in self.replicas if r.counters and r.counters.queries is not None)

    @property
    def fleet_hit_rate(self) -> float | None:
        """``sum(hits) / sum(queries)`` over replicas: the fleet's hit rate, weighted by tokens."""
        hits, queries = self.hits, self.queries
        if hits is None or queries is None or queries <= 0:
            return None
        return hits / queries

    @property
    def replica_requests(self) -> tuple[int, ...] | None:
        """Requests each replica finished (None: a replica's count is missing)."""
        counts = [r.requests for r in self.replicas]
        if not counts or any(c is None for c in counts):
            return None
        return tuple(c for c in counts if c is not None)

    @property
    def request_shares(self) -> tuple[float, ...] | None:
        """Each replica's share of the requests the replicas finished (None: unknown or none)."""
        counts = self.replica_requests
        if counts is None or sum(counts) == 0:
            return None
        total = sum(counts)
        return tuple(c / total for c in counts)

    @property
    def max_share(self) -> float | None:
        """The busiest replica's share of requests."""
        shares = self.request_shares
        return max(shares) if shares else None

    @property
    def placement_ceiling(self) -> float | None:
        """The most the fleet could hit given each replica's request count (None: counts or census unknown).

        See :class:`~echo_env.measure.placement.PlacementBound`: the ceiling of the placement that
        happened, where the affinity, round-robin and scatter figures are models of one.
        """
        bound = self.ceilings.placement if self.ceilings else None
        counts = self.replica_requests
        return bound.hit_rate(counts) if bound is not None and counts is not None else None

    def cache_ceiling(self) -> FleetCeiling:
        """The ceiling the cache checks hold the fleet's warm hit rate to (:attr:`placement_ceiling`)."""
        from echo_env.measure.placement import FleetCeiling

        counts = self.replica_requests
        n = len(self.replicas) or len(self.replica_urls_hint) or (self.ceilings.replicas if self.ceilings else 0)
        used = sum(1 for c in counts if c > 0) if counts is not None else None
        why = None
        if counts is None:
            why = "the replicas' request counts were not read"
        elif self.ceilings is None or self.ceilings.placement is None:
            why = "the prompts were not tokenized"
        return FleetCeiling(self.placement_ceiling, n, used, why)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (``summary.json``): the derived figures with the inputs."""
        c = self.ceilings
        return {
            "policy": self.policy,
            "metrics_source": self.metrics_source,
            "requests_sent": self.requests_sent,
            "fleet_hit_rate": self.fleet_hit_rate,
            "placement_ceiling": self.placement_ceiling,
            "hits": self.hits,
            "queries": self.queries,
            "replica_requests": list(self.replica_requests) if self.replica_requests else None,
            "request_shares": list(self.request_shares) if self.request_shares else None,
            "replicas": [
                {"url": r.url, "requests": r.requests, "hit_rate": r.hit_rate, "note": r.note} for r in self.replicas
            ],
            "ceilings": None
            if c is None
            else {
                "replicas": c.replicas,
                "block_size": c.block_size,
                "prompt_tokens": c.prompt_tokens,
                "one_server": c.one_server,
                "affinity": c.affinity,
                "round_robin": c.round_robin,
                "scatter": c.scatter,
            },
        }


def replica_figures(url: str, before: CacheCounters | None, after: CacheCounters | None) -> ReplicaFigures:
    """One replica's figures from its counters before and after a phase.

    Args:
        url: The replica's root.
        before: Its counters before (None: not read).
        after: Its counters after (None: not read).

    Returns:
        The figures, with a note saying why counters are unusable when they are.
    """
    if before is None or after is None:
        return ReplicaFigures(url, None, f"{url}/metrics could not be read")
    d = delta(before, after)
    note = None
    if d.reset:
        note = f"{url} restarted during the phase (its counters went back)"
    elif d.hits is None or d.queries is None:
        note = f"{url} exposes no prefix-cache counters"
    elif d.requests is None:
        note = f"{url} exposes no request counter"
    return ReplicaFigures(url, d, note)


# --------------------------------------------------------------------------------------
# Telling a router from a server
# --------------------------------------------------------------------------------------


def counters_jump(first: CacheCounters, second: CacheCounters) -> bool:
    """Whether two consecutive scrapes of one URL look like two different servers.

    With no traffic in between, one server's counters never go down and its
    ``_created`` times never change. A router that proxies ``/metrics`` to one replica
    per call shows both (a counter going down, or a different ``started_at``).

    Args:
        first: Counters of the first scrape.
        second: Counters of the next scrape of the same URL.

    Returns:
        True when the second scrape cannot come from the same running server.
    """
    if first.started_at is not None and second.started_at is not None and first.started_at != second.started_at:
        return True
    return delta(first, second).reset


def scrapes_alternate(scrapes: Sequence[CacheCounters]) -> bool:
    """Whether any two consecutive scrapes of one URL jump between servers (see :func:`counters_jump`)."""
    return any(counters_jump(a, b) for a, b in itertools.pairwise(scrapes))


ROUTER_METRIC = "vllm_router_processed_requests_total"
"""vllm-router's per-worker request counter (on its Prometheus port)."""


def router_worker_requests(samples: Sequence[Sample]) -> dict[str, float]:
    """Requests the router sent to each worker, from its own metrics page.

    Args:
        samples: The parsed page of the router's Prometheus port.

    Returns:
        Worker URL to requests; empty when the page has no per-worker counter.
    """
    out: dict[str, float] = {}
    for s in samples:
        if s.name in (ROUTER_METRIC, ROUTER_METRIC.removesuffix("_total")) and "worker" in s.labels:
            out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out
