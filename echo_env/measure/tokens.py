"""Token accounting: shared prefixes and the most a prefix cache can serve.

A paged prefix cache (vLLM, SGLang) reuses KV blocks of ``block_size`` tokens, and only
full blocks (llama.cpp reuses single tokens: a block size of 1). vLLM also always
recomputes the last prompt token, so a prompt of ``P``
tokens can take at most ``B * floor((P - 1) / B)`` tokens from the cache. The functions
here are pure; :mod:`echo_env.wire.tokenizer` is where a tokenizer is called.

:mod:`echo_env.cachetest.align` uses this arithmetic the other way round, to move the
end of the task's shared prefix just past a block boundary.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from echo_env.errors import ConfigError

TokenIds = Sequence[int]


def common_prefix_length(a: TokenIds, b: TokenIds) -> int:
    """How many leading items ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_prefix_length(seqs: Sequence[TokenIds]) -> int:
    """Length of the prefix every sequence shares (0 for no sequences)."""
    if not seqs:
        return 0
    shared = len(seqs[0])
    for seq in seqs[1:]:
        shared = common_prefix_length(seqs[0][:shared], seq)
    return shared


@dataclass(frozen=True)
class FirstDifference:
    """Where two prompts of a batch stop agreeing."""

    position: int
    """Index of the first item that differs."""
    first_index: int
    """Which prompt is the reference (always 0)."""
    other_index: int
    """The first prompt that differs from the reference there."""


def first_difference(seqs: Sequence[TokenIds]) -> FirstDifference | None:
    """The earliest position where some sequence departs from the first one.

    Returns None when all sequences are equal up to the shortest one's length.
    """
    best: FirstDifference | None = None
    for j, seq in enumerate(seqs[1:], start=1):
        pos = common_prefix_length(seqs[0], seq)
        if pos < min(len(seqs[0]), len(seq)) and (best is None or pos < best.position):
            best = FirstDifference(position=pos, first_index=0, other_index=j)
    return best


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size must be a positive number of tokens, got {block_size}")


def max_cached_tokens(prompt_tokens: int, block_size: int) -> int:
    """The most tokens of a ``prompt_tokens``-long prompt a prefix cache can serve.

    ``block_size * floor((prompt_tokens - 1) / block_size)``: whole blocks only, and the
    last prompt token is always computed.
    """
    _check_block_size(block_size)
    if prompt_tokens <= 1:
        return 0
    return block_size * ((prompt_tokens - 1) // block_size)


def reusable_prefix_length(seqs: Sequence[TokenIds]) -> int:
    """The prefix every sequence shares, short of each one's last token (0 for no sequences).

    What a token-granular cache (a block size of 1) can reuse for all of them: the last
    prompt token always goes through the model, its logits start the completion. Used
    by a trainer that computes the shared prefix once (:class:`echo_env.integrations.trl_model.SharedPrefixRollout`).
    """
    if not seqs:
        return 0
    return min(shared_prefix_length(seqs), max_cached_tokens(min(len(s) for s in seqs), 1))


@dataclass(frozen=True)
class TokenPlan:
    """What a workload's prompts allow a prefix cache to do."""

    num_prompts: int
    """How many prompts the workload sends."""
    block_size: int
    """The cache's block size in tokens."""
    prompt_tokens: int
    """All prompt tokens of the workload."""
    min_prompt_tokens: int
    """The shortest prompt."""
    max_prompt_tokens: int
    """The longest prompt."""
    shared_prefix_tokens: int
    """Tokens every prompt shares from the start."""
    cacheable_shared_tokens: int
    """The part of the shared prefix a cache can serve: its whole blocks, short of a prompt's last token."""
    max_hit_tokens: int
    """The most tokens a cache could serve, sending the prompts in order to a cold cache."""

    @property
    def hit_rate_ceiling(self) -> float:
        """``max_hit_tokens / prompt_tokens``: the best hit rate this workload allows."""
        return self.max_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


_BlockKey = tuple[object, tuple[int, ...]]


def _block_chain(seq: TokenIds, block_size: int) -> list[_BlockKey]:
    """The keys of the blocks a cache can serve of ``seq``.

    Each block is keyed by (key of the block before it, its own tokens), as vLLM
    chains its block hashes, so equal keys mean equal prefixes up to that block.
    """
    n = max_cached_tokens(len(seq), block_size) // block_size
    chain: list[_BlockKey] = []
    parent: object = None
    for k in range(n):
        key = (parent, tuple(seq[k * block_size : (k + 1) * block_size]))
        chain.append(key)
        parent = hash(key)
    return chain


def _max_hit_tokens(prompts: Sequence[TokenIds], block_size: int, warm: Sequence[TokenIds], extra_cold: int) -> int:
    """The tokens a cache large enough to keep everything serves for ``prompts`` sent in order."""
    seen: set[_BlockKey] = set()
    for seq in warm:
        seen.update(_block_chain(seq, block_size))
    hits = 0
    for i, seq in enumerate(prompts):
        chain = _block_chain(seq, block_size)
        k = 0
        while i >= extra_cold and k < len(chain) and chain[k] in seen:
            k += 1
        hits += k * block_size
        seen.update(chain)
    return hits


def plan_tokens(
    prompts: Sequence[TokenIds], block_size: int, warm: Sequence[TokenIds] = (), extra_cold: int = 0
) -> TokenPlan:
    """Count what a prefix cache can serve for ``prompts`` sent in order.

    Each prompt can hit the leading full blocks it shares with any prompt sent before it
    (or with ``warm``, prompts already in the cache), capped at
    :func:`max_cached_tokens`. The cache is taken as large enough to keep everything, so
    this is a ceiling: the first request of each distinct prefix is cold.

    Args:
        prompts: Token ids of each prompt, in the order they are sent.
        block_size: The cache's block size in tokens (vLLM on CPU: 128; on GPU: 16).
        warm: Token ids of sequences the cache already holds: earlier prompts, or a prompt
            followed by the tokens generated for it (vLLM, SGLang and llama.cpp's slots keep
            the KV of generated tokens too, in full blocks: all but the last token has KV,
            so the same ``(len - 1) // block_size`` blocks count).
        extra_cold: The first this-many prompts can hit nothing (a cache of several
            independent parts, such as llama.cpp's slots, each filled once by a burst).

    Returns:
        The plan, with the hit-rate ceiling.
    """
    _check_block_size(block_size)
    hits = _max_hit_tokens(prompts, block_size, warm, extra_cold)
    lengths = [len(p) for p in prompts]
    shared = shared_prefix_length(prompts)
    cacheable = block_size * (shared // block_size)
    if lengths:
        # When a prompt is all shared prefix, its last token is computed, never served.
        cacheable = min(cacheable, max_cached_tokens(min(lengths), block_size))
    return TokenPlan(
        num_prompts=len(prompts),
        block_size=block_size,
        prompt_tokens=sum(lengths),
        min_prompt_tokens=min(lengths, default=0),
        max_prompt_tokens=max(lengths, default=0),
        shared_prefix_tokens=shared,
        cacheable_shared_tokens=cacheable,
        max_hit_tokens=hits,
    )


def slot_cold_requests(burst: int, slots: int | None) -> int:
    """How many requests of a burst miss entirely on a cache of independent slots (llama.cpp ``-np``).

    Each slot keeps only the last prompt it served. Before the burst one slot (``A``) holds
    the shared prefix (the cold request's), the others hold nothing of it. llama-server
    gives a new request the idle slot whose cached prompt shares the largest fraction with
    it (above ``--slot-prompt-similarity``, 0.1 by default), else the least recently used
    one (``get_available_slot`` in its ``server-context.cpp``). The burst's requests are sent
    together, so its first wave of ``min(burst, slots)`` requests is in flight at once, each
    in a slot of its own: one of them takes ``A`` and hits, the others miss. Every later
    request finds the prefix in whichever slot frees up. Hence ``min(burst, slots) - 1``.

    The count is the same under pure least-recently-used choice (``--slot-prompt-similarity
    0``) whenever ``burst >= slots``: ``A``, used last, is then taken by the first wave's
    last request instead of its first. Only a burst smaller than ``slots`` misses once more
    there; that setting is not llama-server's default and is not modelled.
    The host prompt cache (``--cache-ram``) cannot rescue the first wave either: ``A`` is
    busy while the wave is placed and was never saved while idle.

    Args:
        burst: Requests sent together, the cold one of the phase before not counted.
        slots: Independent slots (None: one cache shared by every request).

    Returns:
        The requests to plan with no hit (``extra_cold`` of :func:`plan_tokens`).
    """
    if slots is None or slots <= 1 or burst <= 0:
        return 0
    return min(burst, slots) - 1


def block_chain(seq: TokenIds, block_size: int, *, whole: bool = False) -> list[Hashable]:
    """The keys of the blocks of ``seq`` a cache can serve, each naming its whole prefix.

    The same chaining as ``plan_tokens`` (and vLLM's block hashes): equal keys mean
    equal prefixes up to and including that block. A key is ``(parent key, block tokens)``.

    Args:
        seq: Token ids.
        block_size: The cache block size in tokens.
        whole: Key every whole block (what a server stores), not only those a prompt of
            this length can hit (its last token is always computed).
    """
    usable = len(seq) if whole else max_cached_tokens(len(seq), block_size)
    n = usable // block_size
    chain: list[Hashable] = []
    parent: Hashable = None
    for k in range(n):
        key = (parent, tuple(seq[k * block_size : (k + 1) * block_size]))
        chain.append(key)
        parent = key
    return chain
