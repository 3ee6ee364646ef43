"""Token accounting: shared prefixes and the most a prefix cache can serve.

A paged prefix cache (vLLM, SGLang) reuses KV blocks of ``block_size`` tokens, and only
full blocks. vLLM also always recomputes the last prompt token, so a prompt of ``P``
tokens can take at most ``B * floor((P - 1) / B)`` tokens from the cache. The functions
here are pure; :func:`encode_prompts` is the one place a tokenizer is called.

:func:`align_system_prompt` uses that arithmetic the other way round: it pads or trims
the system prompt's worked examples so the shared prefix ends just past a block
boundary, where the fewest shared tokens are left out of the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from echo_env.errors import ConfigError
from echo_env.envs.task import EchoTask, find_worked_examples, with_examples

TokenIds = Sequence[int]


class Tokenizer(Protocol):
    """The part of a ``transformers`` tokenizer this module uses."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt as a vLLM server would build them.

    A string is a plain completion prompt (the tokenizer adds its special tokens, such as
    Gemma's ``<bos>``, as vLLM's ``/v1/completions`` does); a list of messages goes through
    the tokenizer's chat template with the generation prompt, as ``/v1/chat/completions``.
    """
    out: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


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


def plan_tokens(prompts: Sequence[TokenIds], block_size: int, warm: Sequence[TokenIds] = ()) -> TokenPlan:
    """Count what a prefix cache can serve for ``prompts`` sent in order.

    Each prompt can hit the leading full blocks it shares with any prompt sent before it
    (or with ``warm``, prompts already in the cache), capped at
    :func:`max_cached_tokens`. The cache is taken as large enough to keep everything, so
    this is a ceiling: the first request of each distinct prefix is cold.

    Args:
        prompts: Token ids of each prompt, in the order they are sent.
        block_size: The cache's block size in tokens (vLLM on CPU: 128; on GPU: 16).
        warm: Token ids of prompts the cache already holds.

    Returns:
        The plan, with the hit-rate ceiling.
    """
    _check_block_size(block_size)
    # Each block is keyed by (key of the block before it, its own tokens), as vLLM
    # chains its block hashes, so equal keys mean equal prefixes up to that block.
    seen: set[tuple[object, tuple[int, ...]]] = set()

    def blocks(seq: TokenIds) -> list[tuple[object, tuple[int, ...]]]:
        n = max_cached_tokens(len(seq), block_size) // block_size
        chain: list[tuple[object, tuple[int, ...]]] = []
        parent: object = None
        for k in range(n):
            key = (parent, tuple(seq[k * block_size : (k + 1) * block_size]))
            chain.append(key)
            parent = hash(key)
        return chain

    for seq in warm:
        seen.update(blocks(seq))
    hits = 0
    for seq in prompts:
        chain = blocks(seq)
        k = 0
        while k < len(chain) and chain[k] in seen:
            k += 1
        hits += k * block_size
        seen.update(chain)
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


Render = Literal["transcript", "chat"]
"""How prompts reach the server: the plain transcript (``/v1/completions``) or chat messages."""


@dataclass(frozen=True)
class PrefixGeometry:
    """Where a task's shared prefix ends relative to the cache's blocks, for one tokenizer."""

    block_size: int
    """The cache's block size in tokens."""
    shared_tokens: int
    """Tokens every prompt of the task shares (everything before the word)."""
    prompt_tokens: int
    """Length of a typical full prompt."""
    cacheable_tokens: int
    """The shared tokens in whole blocks: what a cache can serve to every prompt."""

    @property
    def tail_tokens(self) -> int:
        """Shared tokens past the last whole block: computed again for every prompt."""
        return self.shared_tokens - self.cacheable_tokens

    @property
    def hit_rate_ceiling(self) -> float:
        """``cacheable_tokens / prompt_tokens``: the best hit rate of a warm prompt whose only reuse is the prefix."""
        return self.cacheable_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _probe_words(task: EchoTask) -> list[str]:
    # Words with different first letters, so the prompts part right at the word.
    picked: list[str] = []
    for word in task.words:
        if all(word[0] != p[0] for p in picked):
            picked.append(word)
        if len(picked) == 3:
            break
    return picked if len(picked) >= 2 else list(task.words[:2])


def prefix_geometry(
    task: EchoTask, tokenizer: Tokenizer, block_size: int, render: Render = "transcript"
) -> PrefixGeometry:
    """Measure the task's shared prefix in ``tokenizer``'s tokens against ``block_size``.

    Args:
        task: The task (its run tag counts: it is part of the prefix).
        tokenizer: The served model's tokenizer.
        block_size: The cache's block size in tokens.
        render: ``transcript`` for ``/v1/completions``, ``chat`` for the chat template.

    Returns:
        The geometry: shared, cacheable and prompt tokens.
    """
    _check_block_size(block_size)
    words = _probe_words(task)
    prompts: list[str | list[dict[str, str]]] = [
        task.transcript(w) if render == "transcript" else task.chat_messages(w) for w in words
    ]
    ids = encode_prompts(tokenizer, prompts)
    shared = shared_prefix_length(ids) if len(ids) > 1 else len(ids[0]) - 1
    cacheable = min(block_size * (shared // block_size), max_cached_tokens(min(len(i) for i in ids), block_size))
    return PrefixGeometry(block_size, shared, len(ids[0]), cacheable)


def align_system_prompt(
    task: EchoTask,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    mode: Literal["auto", "pad", "trim"] = "auto",
    slack_tokens: int = 0,
    max_tail_tokens: int | None = None,
    min_examples: int = 1,
    render: Render = "transcript",
) -> EchoTask:
    """Pad or trim the system prompt's worked examples so the shared prefix ends just past a block boundary.

    A prefix cache serves whole blocks only, so the shared tokens past the last block
    boundary (the *tail*) are computed again for every prompt. This adds worked examples
    (words from ``task.words`` not already used, in list order) or drops the last ones,
    the fewest that bring the tail to between ``slack_tokens`` and ``slack_tokens +
    max_tail_tokens``. A task whose tail is already there comes back unchanged.

    Args:
        task: The task to align (its run tag is part of the prefix and is measured too).
        tokenizer: The served model's tokenizer.
        block_size: The cache's block size in tokens (vLLM: 128 on CPU, 16 on GPU).
        mode: ``pad`` only adds examples, ``trim`` only removes them, ``auto`` takes
            whichever changes fewer (adding on a tie: more examples help the model).
        slack_tokens: Shared tokens to keep past the boundary, so a run tag that comes out
            a few tokens shorter cannot push the prefix back below it.
        max_tail_tokens: How far past ``slack_tokens`` the prefix may end; default: the
            largest change one example makes, so some count of examples always fits.
        min_examples: Trimming keeps at least this many examples.
        render: ``transcript`` (``/v1/completions``) or ``chat`` (the chat template).

    Returns:
        The task with the aligned system prompt (the same task when nothing needs doing).

    Raises:
        ConfigError: The prompt has no worked examples, a setting is out of range, or
            no count of examples within reach puts the prefix in the window.
    """
    _check_block_size(block_size)
    if not 0 <= slack_tokens < block_size:
        raise ConfigError(f"slack_tokens={slack_tokens} must be from 0 to block_size - 1 ({block_size - 1})")
    if max_tail_tokens is not None and max_tail_tokens < 1:
        raise ConfigError(f"max_tail_tokens={max_tail_tokens} must be at least 1")
    if mode not in ("auto", "pad", "trim"):
        raise ConfigError(f"mode={mode!r}: use auto, pad or trim")
    spans = find_worked_examples(task.system_prompt)
    n = len(spans)
    if n == 0:
        raise ConfigError(
            "the system prompt has no worked examples ('User: Please echo the following word: w' then "
            "'Assistant: Echo: w') to pad or trim: align it by hand"
        )
    if not 1 <= min_examples <= n:
        raise ConfigError(f"min_examples={min_examples}: the prompt has {n} worked examples")
    used = {word for _, _, word in spans}
    pool = [w for w in task.words if w not in used]

    cache: dict[tuple[int, int], int] = {}

    def shared(keep: int, extra: int) -> int:
        if (keep, extra) not in cache:
            variant = dataclasses.replace(task, system_prompt=with_examples(task.system_prompt, keep, pool[:extra]))
            cache[keep, extra] = prefix_geometry(variant, tokenizer, block_size, render).shared_tokens
        return cache[keep, extra]

    base = shared(n, 0)
    # One example's worth of tokens: the step between neighbouring candidates.
    step = max(abs(shared(n, 1) - base) if pool else 0, abs(base - shared(n - 1, 0)) if n > 1 else 0, 1)
    window = max_tail_tokens if max_tail_tokens is not None else step

    def fits(tokens: int) -> bool:
        # The highest boundary at least ``slack_tokens`` below the prefix's end.
        boundary = block_size * ((tokens - slack_tokens) // block_size)
        return boundary >= block_size and tokens - boundary < slack_tokens + window

    if fits(base):
        return task
    candidates: list[tuple[int, int, int]] = []  # (changes, keep, extra)
    if mode in ("auto", "trim"):
        for keep in range(n - 1, min_examples - 1, -1):
            if fits(shared(keep, 0)):
                candidates.append((n - keep, keep, 0))
                break
    if mode in ("auto", "pad"):
        # Far enough to pass the next boundary and its window, whatever the step.
        goal = block_size * ((base - slack_tokens) // block_size + 1) + slack_tokens + window
        for extra in range(1, len(pool) + 1):
            tokens = shared(n, extra)
            if fits(tokens):
                candidates.append((extra, n, extra))
                break
            if tokens >= goal:
                break
    if not candidates:
        raise ConfigError(
            f"no count of worked examples ({mode}) puts the shared prefix ({base} tokens) within "
            f"{slack_tokens}-{slack_tokens + window - 1} tokens past a {block_size}-token boundary: "
            "try mode=auto, a lower min_examples or a larger max_tail_tokens"
        )
    # Fewest changes; on a tie the padded prompt (extra > 0 sorts it first).
    _, keep, extra = min(candidates, key=lambda c: (c[0], -c[2]))
    return dataclasses.replace(task, system_prompt=with_examples(task.system_prompt, keep, pool[:extra]))
