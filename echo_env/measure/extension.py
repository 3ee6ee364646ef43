"""Does each turn's prompt extend the last one? Token by token, with the cause when it does not.

In a multi-turn episode turn ``t+1``'s prompt should be turn ``t``'s prompt, then the
tokens the model generated, then the new turn's text. A prefix cache keeps the blocks of
both the prompt and the generated tokens, so every token past the first difference is
lost to it. The usual ways it breaks:

- the answer, turned into text and tokenized again, is other tokens (BPE merges across
  its boundary: a ``"\\n\\n"`` token becomes ``"\\n"`` and ``"User"``);
- the chat template rewrites history (strips reasoning from earlier assistant turns,
  drops empty think blocks) or stamps something that varies near the start.

Pure functions over token ids; the caller passes a ``decode`` (ids to text) when it has a
tokenizer, to name the tokens and tell whitespace from re-tokenization.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from echo_env.measure.tokens import common_prefix_length, max_cached_tokens

GeneratedBy = Literal["server", "retokenized"]
"""Where the generated ids came from: the server's own (vLLM ``return_token_ids``), or the
answer's text tokenized again (weaker: it may not be what the server generated)."""

Cause = Literal["retokenized", "whitespace", "history_rewritten", "changed_near_start", "unknown"]
"""Why a prompt stopped extending the last one."""

CAUSES: dict[Cause, tuple[str, str]] = {
    "retokenized": (
        "the answer was re-tokenized across its boundary (same text, other tokens)",
        "send token ids (prompt_format=tokens: the previous prompt's ids + the generated ids + the new turn's ids)",
    ),
    "whitespace": (
        "whitespace at the answer's boundary differs (a stop string or newline generated but not rendered, or "
        "rendered but not generated)",
        "send token ids (prompt_format=tokens), or render the reply with exactly the whitespace generated",
    ),
    "history_rewritten": (
        "the history was rewritten before the answer's end (a template stripping or changing earlier turns)",
        "keep earlier assistant turns as generated in the chat template (keep reasoning in history)",
    ),
    "changed_near_start": (
        "content changed near the start of the prompt (a date, id or counter stamped at the top)",
        "move what varies to the end of the prompt",
    ),
    "unknown": ("the prompt differs from the last prompt plus the answer", "compare the two prompts' tokens"),
}
"""Each cause's words and fix."""

NEAR_START_TOKENS = 64
"""A difference within this many tokens of the start is 'near the start'."""

Decode = Callable[[Sequence[int]], str]
"""Token ids to text (a tokenizer's ``decode``)."""


@dataclass(frozen=True)
class TurnTokens:
    """One agent-turn: its prompt and answer, and the prompt of the agent's next turn."""

    agent: str
    """The agent."""
    turn: int
    """The 0-based turn of ``prompt_ids``; the next prompt is turn ``turn + 1``'s."""
    prompt_ids: Sequence[int]
    """The prompt as the server tokenized it."""
    generated_ids: Sequence[int]
    """The tokens generated for it."""
    generated_by: GeneratedBy
    """Whether ``generated_ids`` are the server's own or the text tokenized again."""
    next_prompt_ids: Sequence[int]
    """The next turn's prompt as the server tokenizes it."""

    @property
    def expected(self) -> list[int]:
        """What the next prompt must start with: the prompt, then the generated tokens."""
        return [*self.prompt_ids, *self.generated_ids]


@dataclass(frozen=True)
class ExtensionBreak:
    """Where one agent-turn's next prompt stopped extending its prompt plus answer."""

    agent: str
    """The agent."""
    turn: int
    """The 0-based turn whose prompt and answer were not extended."""
    position: int
    """The first token of the next prompt that differs."""
    prompt_tokens: int
    """Tokens of the turn's prompt (the answer starts here)."""
    generated_tokens: int
    """Tokens generated."""
    expected_ids: tuple[int, ...]
    """Prompt + answer from ``position`` (a few tokens)."""
    actual_ids: tuple[int, ...]
    """The next prompt from ``position`` (a few tokens)."""
    expected_text: str | None
    """``expected_ids`` as text (None: no tokenizer)."""
    actual_text: str | None
    """``actual_ids`` as text."""
    before_text: str | None
    """The few tokens before ``position`` as text."""
    cause: Cause
    """Why, when it can be named."""
    lost_tokens: int
    """Cache-unit tokens this break costs the next prompt (full units after ``position``)."""

    @property
    def where(self) -> str:
        """``in the answer``, ``after the answer`` or ``in the prompt``: where the break lies."""
        if self.position < self.prompt_tokens:
            return "in the prompt"
        if self.position < self.prompt_tokens + self.generated_tokens:
            return "in the answer"
        return "after the answer"

    def describe(self) -> str:
        """One sentence: the agent-turn, the position, the tokens on both sides, the cause."""
        exp = self.expected_text if self.expected_text is not None else str(list(self.expected_ids))
        act = self.actual_text if self.actual_text is not None else str(list(self.actual_ids))
        return (
            f"{self.agent} turn {self.turn + 1} -> {self.turn + 2}: token {self.position} ({self.where}; prompt "
            f"{self.prompt_tokens} + {self.generated_tokens} generated) expected {list(self.expected_ids)} {exp!r}, "
            f"got {list(self.actual_ids)} {act!r}: {CAUSES[self.cause][0]}"
        )

    @property
    def fix(self) -> str:
        """What to do about it."""
        return CAUSES[self.cause][1]


@dataclass(frozen=True)
class ExtensionEvidence:
    """How the prompts of one later turn extended the previous turn's prompt plus answer."""

    phase: str
    """The phase of the next prompts (``turn1``...)."""
    agent_turns: int
    """Agent-turns compared."""
    extended: int
    """How many of them extend exactly."""
    generated_by: str
    """``server``, ``retokenized`` or ``mixed``: where the generated ids came from."""
    first_break: ExtensionBreak | None
    """The first agent-turn that does not extend (None: all do)."""
    lost_tokens: int
    """Cache-unit tokens the breaks cost, over every agent-turn."""

    @property
    def share(self) -> float:
        """Share of agent-turns that extend (1.0 when none were compared)."""
        return self.extended / self.agent_turns if self.agent_turns else 1.0


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def classify(
    expected: Sequence[int], actual: Sequence[int], position: int, prompt_tokens: int, decode: Decode | None
) -> Cause:
    """Why ``actual`` (the next prompt) leaves ``expected`` (prompt + answer) at ``position``.

    Args:
        expected: The last prompt and its generated tokens.
        actual: The next prompt.
        position: The first differing token.
        prompt_tokens: Where the answer starts in ``expected``.
        decode: Token ids to text (None: the cause is told by position only).
    """
    if position < min(NEAR_START_TOKENS, prompt_tokens):
        return "changed_near_start"
    if decode is not None:
        exp = decode(expected[position:])
        act = decode(actual[position : position + max(1, len(expected) - position) + 8])
        if exp and act.startswith(exp):
            return "retokenized"
        if _squash(act).startswith(_squash(exp)):
            return "whitespace"  # the same visible text: only whitespace differs
    if position < prompt_tokens:
        return "history_rewritten"
    return "retokenized" if decode is None and position >= len(expected) - 1 else "history_rewritten"


def _lost(t: TurnTokens, position: int, block_size: int) -> int:
    """Full cache units of prompt + answer the next prompt could have reused, lost past ``position``."""
    # Cached: every token with KV (all but the last generated one), in full units; a next
    # prompt that extends is longer than prompt + answer, so all of them were reusable.
    reusable = max_cached_tokens(len(t.prompt_ids) + len(t.generated_ids), block_size)
    kept = block_size * (min(position, reusable) // block_size)
    return reusable - kept


def break_of(t: TurnTokens, block_size: int, decode: Decode | None = None, context: int = 4) -> ExtensionBreak | None:
    """Where ``t``'s next prompt stops extending its prompt plus answer (None: it extends)."""
    expected = t.expected
    pos = common_prefix_length(expected, t.next_prompt_ids)
    if pos == len(expected):
        return None
    exp_ids = tuple(expected[pos : pos + context])
    act_ids = tuple(t.next_prompt_ids[pos : pos + context])
    before = expected[max(0, pos - context) : pos]
    return ExtensionBreak(
        agent=t.agent,
        turn=t.turn,
        position=pos,
        prompt_tokens=len(t.prompt_ids),
        generated_tokens=len(t.generated_ids),
        expected_ids=exp_ids,
        actual_ids=act_ids,
        expected_text=decode(exp_ids) if decode else None,
        actual_text=decode(act_ids) if decode else None,
        before_text=decode(before) if decode else None,
        cause=classify(expected, t.next_prompt_ids, pos, len(t.prompt_ids), decode),
        lost_tokens=_lost(t, pos, block_size),
    )


def slices_to_decode(t: TurnTokens, context: int = 4) -> list[tuple[int, ...]]:
    """The id slices :func:`break_of` decodes for ``t`` (to decode them first, e.g. on the server)."""
    expected = t.expected
    pos = common_prefix_length(expected, t.next_prompt_ids)
    tail = max(1, len(expected) - pos) + 8
    return [
        tuple(expected[pos:]),
        tuple(t.next_prompt_ids[pos : pos + tail]),
        tuple(expected[pos : pos + context]),
        tuple(t.next_prompt_ids[pos : pos + context]),
        tuple(expected[max(0, pos - context) : pos]),
    ]


def check_extension(
    phase: str, turns: Sequence[TurnTokens], block_size: int, decode: Decode | None = None
) -> ExtensionEvidence:
    """Compare every agent-turn's next prompt with its prompt plus answer.

    Args:
        phase: The phase the next prompts were sent in.
        turns: One entry per agent-turn.
        block_size: The cache's unit in tokens (1 for llama.cpp).
        decode: Token ids to text, to name the tokens and the cause.

    Returns:
        The share that extends, the first break (earliest position of the first agent that
        breaks), and the cache tokens the breaks cost.
    """
    breaks = [b for t in turns if (b := break_of(t, block_size, decode)) is not None]
    sources = {t.generated_by for t in turns}
    by = sources.pop() if len(sources) == 1 else ("mixed" if sources else "server")
    first = min(breaks, key=lambda b: b.position) if breaks else None
    return ExtensionEvidence(
        phase=phase,
        agent_turns=len(turns),
        extended=len(turns) - len(breaks),
        generated_by=by,
        first_break=first,
        lost_tokens=sum(b.lost_tokens for b in breaks),
    )


@dataclass(frozen=True)
class TurnReuse:
    """One later turn's history-reuse evidence, beside its phase figures (same ``phase`` name)."""

    phase: str
    """The turn's phase (``turn1``...)."""
    extension: ExtensionEvidence
    """How the turn's prompts extended the previous prompts plus answers."""
    prompt_only_ceiling: float | None
    """The hit-rate ceiling counting earlier prompts only (no generated tokens)."""
    ceiling: float | None
    """The ceiling counting earlier prompts and the full blocks of their generated tokens."""

    @property
    def share_of_ceiling_from_answers(self) -> float | None:
        """How much of the ceiling the generated tokens' blocks add (None: a ceiling unknown)."""
        if self.ceiling is None or self.prompt_only_ceiling is None:
            return None
        return self.ceiling - self.prompt_only_ceiling

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the ceilings, the extension share and the first break with its cause and fix."""
        ext = self.extension
        first = ext.first_break
        return {
            "phase": self.phase,
            "ceiling": self.ceiling,
            "prompt_only_ceiling": self.prompt_only_ceiling,
            "agent_turns": ext.agent_turns,
            "extended": ext.extended,
            "extension_share": ext.share,
            "generated_by": ext.generated_by,
            "lost_tokens": ext.lost_tokens,
            "first_break": None if first is None else {**asdict(first), "where": first.where, "fix": first.fix},
        }
