"""Aligning the task's shared prefix with the cache's blocks, by editing its worked examples.

The shared prefix of the echo prompts ends at the word. Tokens of it past the last whole
block are computed again for every prompt; :func:`align_system_prompt` pads or trims the
system prompt's worked examples so the prefix ends just past a block boundary, where the
fewest shared tokens are left out of the cache. The block arithmetic is
:mod:`echo_env.measure.tokens`; this module knows the task's text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from echo_env.envs.task import EchoTask, find_worked_examples, with_examples
from echo_env.errors import ConfigError
from echo_env.measure.tokens import max_cached_tokens, shared_prefix_length
from echo_env.wire.tokenizer import Tokenizer, encode_prompts


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size must be a positive number of tokens, got {block_size}")


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
    goal = BoundaryGoal(block_size, mode, slack_tokens, max_tail_tokens, min_examples)
    n, pool = _examples_and_spare_words(task, min_examples)
    cache: dict[tuple[int, int], int] = {}

    def shared(keep: int, extra: int) -> int:
        if (keep, extra) not in cache:
            variant = dataclasses.replace(task, system_prompt=with_examples(task.system_prompt, keep, pool[:extra]))
            cache[keep, extra] = prefix_geometry(variant, tokenizer, block_size, render).shared_tokens
        return cache[keep, extra]

    keep, extra = examples_for_boundary(shared, n, len(pool), goal)
    if (keep, extra) == (n, 0):
        return task
    return dataclasses.replace(task, system_prompt=with_examples(task.system_prompt, keep, pool[:extra]))


def _examples_and_spare_words(task: EchoTask, min_examples: int) -> tuple[int, list[str]]:
    """How many worked examples the system prompt has, and the task's words none of them uses (in list order)."""
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
    return n, [w for w in task.words if w not in used]


@dataclass(frozen=True)
class BoundaryGoal:
    """Where :func:`align_system_prompt` should end the shared prefix; the fields are its arguments."""

    block_size: int
    mode: Literal["auto", "pad", "trim"] = "auto"
    slack_tokens: int = 0
    max_tail_tokens: int | None = None
    min_examples: int = 1

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        if not 0 <= self.slack_tokens < self.block_size:
            raise ConfigError(
                f"slack_tokens={self.slack_tokens} must be from 0 to block_size - 1 ({self.block_size - 1})"
            )
        if self.max_tail_tokens is not None and self.max_tail_tokens < 1:
            raise ConfigError(f"max_tail_tokens={self.max_tail_tokens} must be at least 1")
        if self.mode not in ("auto", "pad", "trim"):
            raise ConfigError(f"mode={self.mode!r}: use auto, pad or trim")


def examples_for_boundary(
    shared: Callable[[int, int], int], examples: int, spare_words: int, goal: BoundaryGoal
) -> tuple[int, int]:
    """How many worked examples to keep and to add so the shared prefix ends just past a block boundary.

    The block arithmetic of :func:`align_system_prompt`, apart from the task's text: it
    only measures candidates through ``shared``.

    Args:
        shared: ``shared(keep, extra)``, the shared prefix in tokens with the first ``keep``
            examples kept and ``extra`` new ones added.
        examples: The examples the prompt has now.
        spare_words: How many new examples could be added.
        goal: The block size and the window past its boundary.

    Returns:
        ``(keep, extra)``; ``(examples, 0)`` when the prefix already ends in the window.

    Raises:
        ConfigError: No count of examples within reach puts the prefix in the window.
    """
    n, block_size, slack = examples, goal.block_size, goal.slack_tokens
    base = shared(n, 0)
    # One example's worth of tokens: the step between neighbouring candidates.
    step = max(abs(shared(n, 1) - base) if spare_words else 0, abs(base - shared(n - 1, 0)) if n > 1 else 0, 1)
    window = goal.max_tail_tokens if goal.max_tail_tokens is not None else step

    def fits(tokens: int) -> bool:
        # The highest boundary at least ``slack_tokens`` below the prefix's end.
        boundary = block_size * ((tokens - slack) // block_size)
        return boundary >= block_size and tokens - boundary < slack + window

    if fits(base):
        return n, 0
    candidates: list[tuple[int, int, int]] = []  # (changes, keep, extra)
    if goal.mode in ("auto", "trim"):
        for keep in range(n - 1, goal.min_examples - 1, -1):
            if fits(shared(keep, 0)):
                candidates.append((n - keep, keep, 0))
                break
    if goal.mode in ("auto", "pad"):
        # Far enough to pass the next boundary and its window, whatever the step.
        far = block_size * ((base - slack) // block_size + 1) + slack + window
        for extra in range(1, spare_words + 1):
            tokens = shared(n, extra)
            if fits(tokens):
                candidates.append((extra, n, extra))
                break
            if tokens >= far:
                break
    if not candidates:
        raise ConfigError(
            f"no count of worked examples ({goal.mode}) puts the shared prefix ({base} tokens) within "
            f"{slack}-{slack + window - 1} tokens past a {block_size}-token boundary: "
            "try mode=auto, a lower min_examples or a larger max_tail_tokens"
        )
    # Fewest changes; on a tie the padded prompt (extra > 0 sorts it first).
    _, keep, extra = min(candidates, key=lambda c: (c[0], -c[2]))
    return keep, extra
