"""The hit-rate ceiling of a fleet that follows where a phase's requests actually went.

The fleet models of :mod:`echo_env.measure.fleet` assume a placement (affinity: groups
spread evenly; scatter: uniform at random). A run's own placement can differ: a
consistent-hash router may leave a replica without any group, and then fewer replicas
pay the shared prefix, so the run beats the affinity model. What each replica's own
counters say (how many requests it served) bounds what the fleet could hit:

- with each replica's prompts known (a simulated router, a router's log):
  :func:`assigned_hit_tokens` counts them exactly, as ``plan_tokens`` does per replica
  (:func:`replica_hits` gives each replica's figures; ``benchmarks/fleet_ceilings.py``
  simulates routers with it). A real run does not learn which replica served a request,
  so the test uses the next bound;
- with only each replica's request count: :class:`PlacementBound` gives the most any
  placement with those counts could hit. In the cache model of ``plan_tokens`` (nothing
  evicted) a prompt misses a block only the first time that block reaches its replica, so
  each block is missed once on every replica that receives it, unless an earlier phase's
  prompt left it there. A block held by ``c`` of the phase's prompts reaches at least as
  many replicas as the fewest request counts that add up to ``c``: a block every prompt
  holds (the shared system prompt) is paid once by every replica that served a request,
  a group's own blocks at least once. That is "each replica pays each group's shared
  prefix once for the groups it saw", at its best over the groups a replica could have
  seen. No run with these counts hits more, so it is a ceiling, not a model.

Pure functions.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from echo_env.errors import ConfigError
from echo_env.measure.tokens import TokenIds, block_chain, plan_tokens


@dataclass(frozen=True)
class PlacementBound:
    """A phase's prompts reduced to what the count-based ceiling needs: each block and how many prompts hold it."""

    block_size: int
    """The cache block size in tokens."""
    prompt_tokens: int
    """All prompt tokens of the phase."""
    chain_blocks: int
    """Cacheable blocks summed over the phase's prompts (each prompt's own chain)."""
    blocks: tuple[tuple[int, int, int], ...]
    """``(phase prompts holding it, earlier prompts holding it, how many such blocks)`` over distinct blocks."""

    def hit_tokens(self, counts: Sequence[int]) -> int:
        """The most hit tokens any placement with these per-replica request counts allows.

        Args:
            counts: Requests each replica served in the phase.

        Returns:
            Hit tokens; a count of zero is a replica that pays nothing.
        """
        if any(n < 0 for n in counts):
            raise ConfigError(f"request counts must be zero or more, got {list(counts)}")
        # The fewest replicas that can hold c requests: the busiest ones first.
        reach = list(itertools.accumulate(sorted((n for n in counts if n > 0), reverse=True)))
        used = len(reach)
        if used == 0:
            return 0

        def spread(c: int) -> int:
            return next((i + 1 for i, total in enumerate(reach) if total >= c), used)

        misses = sum(max(0, spread(c) - h) * k for c, h, k in self.blocks)
        return max(0, self.chain_blocks - misses) * self.block_size

    def hit_rate(self, counts: Sequence[int]) -> float:
        """:meth:`hit_tokens` over the phase's prompt tokens (0 for a phase with none)."""
        return self.hit_tokens(counts) / self.prompt_tokens if self.prompt_tokens else 0.0


def placement_bound(history: Sequence[TokenIds], prompts: Sequence[TokenIds], block_size: int) -> PlacementBound:
    """The count-based ceiling's census of one phase sent after ``history``.

    Args:
        history: Prompts sent before the phase (each may have left its blocks on one replica).
        prompts: The phase's prompts, in send order.
        block_size: The cache block size in tokens.

    Returns:
        The census: every cacheable block of the phase with its holders.
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be a positive number of tokens, got {block_size}")
    held: Counter[Hashable] = Counter()
    earlier: Counter[Hashable] = Counter()
    chain_blocks = 0
    for seq in prompts:
        chain = block_chain(seq, block_size)
        chain_blocks += len(chain)
        held.update(chain)
    for seq in history:
        earlier.update(set(block_chain(seq, block_size)) & held.keys())
    census = Counter((c, earlier[key]) for key, c in held.items())
    return PlacementBound(
        block_size=block_size,
        prompt_tokens=sum(len(p) for p in prompts),
        chain_blocks=chain_blocks,
        blocks=tuple(sorted((c, h, k) for (c, h), k in census.items())),
    )


def replica_hits(
    history: Sequence[TokenIds],
    history_placement: Sequence[int],
    prompts: Sequence[TokenIds],
    placement: Sequence[int],
    block_size: int,
) -> dict[int, tuple[int, int, int]]:
    """What each replica's counters would say over a phase whose every prompt's replica is known.

    The cache model of ``plan_tokens`` on each replica: its earlier prompts are in its
    cache, then its prompts of the phase in send order; nothing is evicted.

    Args:
        history: Prompts sent before the phase.
        history_placement: Their replicas.
        prompts: The phase's prompts, in send order.
        placement: Their replicas.
        block_size: The cache block size in tokens.

    Returns:
        Replica to ``(requests, prompt tokens, hit tokens)`` of the phase, for every replica that got a prompt.
    """
    if len(placement) != len(prompts) or len(history_placement) != len(history):
        raise ConfigError("give one replica per prompt, for the phase and for the prompts sent before it")
    out: dict[int, tuple[int, int, int]] = {}
    for replica in dict.fromkeys(placement):
        mine = [p for p, at in zip(prompts, placement) if at == replica]
        before = [p for p, at in zip(history, history_placement) if at == replica]
        plan = plan_tokens(mine, block_size, warm=before)
        out[replica] = (len(mine), plan.prompt_tokens, plan.max_hit_tokens)
    return out


def assigned_hit_tokens(
    history: Sequence[TokenIds],
    history_placement: Sequence[int],
    prompts: Sequence[TokenIds],
    placement: Sequence[int],
    block_size: int,
) -> int:
    """The most hit tokens of a phase whose every prompt's replica is known (and the earlier prompts').

    The ceiling of that placement: :func:`replica_hits` summed over replicas.
    """
    return sum(hits for _, _, hits in replica_hits(history, history_placement, prompts, placement, block_size).values())


@dataclass(frozen=True)
class FleetCeiling:
    """The ceiling the cache checks hold a fleet's warm hit rate to, in place of the one-server ceiling."""

    value: float | None
    """The most the fleet could hit given where the warm burst's requests went (None: unknown)."""
    replicas: int
    """Replicas in the fleet."""
    used: int | None = None
    """Replicas that served a request of the burst (None: unknown)."""
    why_unknown: str | None = None
    """Why :attr:`value` is unknown, when it is."""

    @property
    def described(self) -> str:
        """How the value was found, in words."""
        if self.value is None:
            return f"{self.replicas} replicas, placement unknown ({self.why_unknown})"
        return f"{self.used} of {self.replicas} replicas served requests, each paying a shared prefix once"
