"""The test's prompts: every phase's, built once, before the first request.

One run tag at the very start of the system prompt makes the prefix new to the server.
The hit-rate burst is every agent of a ``batch_size x group_size`` parallel env (the
first one goes alone, cold), rendered from the words that env asks for; each TTFT repeat
has ``ttft_burst`` new words on the cached prefix (the warm burst), the same words under
a tag of their own in place of the run tag (the control burst: the same lengths, nothing
to hit) and, for the first repeats, a burst of short uncached prompts (what prefill costs,
:mod:`echo_env.cachetest.prefill`). Every prompt is rendered by the task itself; nothing
is edited afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from echo_env.cachetest.align import align_system_prompt
from echo_env.cachetest.prefill import SHORT_REPEATS
from echo_env.envs.parallel import agent_id
from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError
from echo_env.measure.tokens import slot_cold_requests

if TYPE_CHECKING:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.wire.info import ServerFacts

Prompt = Any
"""Transcript text (``api=completions``) or chat messages (``api=chat``)."""

ALIGN_SLACK_TOKENS = 6
"""Tokens ``align_prefix`` keeps past the boundary: run tags differ in length by a few tokens."""

CHECK_PURPOSES = ("answers", "tenants", "weights")
"""The answer checks, each with a prompt of its own (:mod:`echo_env.cachetest.answer_run`)."""


def run_tag(tag: str) -> str:
    """The text that makes a run's prefix new: ``[echo-prefix run <tag>]``."""
    return f"[echo-prefix run {tag}]"


def control_tag(tag: str, repeat: int, index: int) -> str:
    """A control request's own tag, a few characters longer than the run tag at most."""
    return f"[echo-prefix ctrl {tag}.{repeat}.{index:03d}]"


def short_tag(tag: str, repeat: int, index: int) -> str:
    """A short control request's own tag (new to the server, like a control tag)."""
    return f"[echo-prefix short {tag}.{repeat}.{index:03d}]"


@dataclass(frozen=True)
class TTFTRepeat:
    """One TTFT repeat's bursts."""

    warm: dict[str, Prompt]
    """New words on the cached prefix."""
    control: dict[str, Prompt]
    """The same words under tags of their own: the same lengths, nothing to hit."""
    short: dict[str, Prompt]
    """The same requests after a short system prompt of their own (uncached, for what prefill costs; empty
    after the first :data:`SHORT_REPEATS`)."""


@dataclass(frozen=True)
class Workload:
    """Every prompt of one server's run, by phase, in send order."""

    tag: str
    """This run's tag (a run id and the server's label)."""
    task: EchoTask
    """The task with this run's tag."""
    words: tuple[tuple[str, ...], ...]
    """Each group's words of the hit-rate burst, one per turn (the env that grades it asks these)."""
    cold: dict[str, Prompt]
    """The first agent, sent alone on a prefix the server has never seen."""
    warm: dict[str, Prompt]
    """Every other agent, all in flight: the hit-rate burst."""
    warm_misses: int
    """The warm burst's requests that can hit nothing: on a server of independent slots (llama.cpp ``-np``)
    all but one of its first wave (:func:`~echo_env.measure.tokens.slot_cold_requests`); 0 on one shared cache."""
    ttft: tuple[TTFTRepeat, ...]
    """The TTFT repeats, at most ``max_repeats``."""
    checks: dict[str, str]
    """The answer checks' prompts by purpose: the cold prompt as text under a run tag of its own."""
    to_tokenize: tuple[Prompt, ...]
    """Every prompt whose tokens the plan counts: the hit-rate burst and each repeat's warm and control
    bursts (tokenized in one go before any timing)."""

    @property
    def prompts(self) -> dict[str, Prompt]:
        """The hit-rate burst's agents, the cold one first."""
        return {**self.cold, **self.warm}

    @property
    def warm_single(self) -> dict[str, Prompt]:
        """The cold prompt again, alone (cold vs warm at zero load)."""
        first, prompt = next(iter(self.cold.items()))
        return {f"{first}-again": prompt}


def build_workload(config: PrefixTestConfig, tag: str, facts: ServerFacts | None = None) -> Workload:
    """Every prompt of one server's run, each rendered by the task (the run's, or one with a tag of its own).

    Args:
        config: The test's settings.
        tag: Makes this run's prefix new (a run id and the server's label).
        facts: The server's facts, for ``align_prefix`` and its slots (None: the shipped system prompt, one
            shared cache).

    Raises:
        ConfigError: ``align_prefix`` on a server whose cache block size is unknown.
    """
    system_prompt = aligned_system_prompt(config, facts) if facts is not None else None
    slots = facts.granularity.slots if facts is not None and facts.granularity is not None else None
    # The first agent goes alone (cold); the rest are the warm burst.
    warm_misses = slot_cold_requests(config.batch_size * config.group_size - 1, slots)
    task = EchoTask(run_tag=run_tag(tag))
    if system_prompt is not None:
        task = replace(task, system_prompt=system_prompt)
    chat = config.api == "chat"
    words = tuple(tuple(ws) for ws in task.episode_words(config.batch_size, config.turns, seed=config.seed))
    prompts: dict[str, Prompt] = {}
    for g, ws in enumerate(words):
        for i in range(config.group_size):
            # vary_before_prefix: an agent-specific mark before the shared text, as a template stamping an id would.
            own = task
            if config.vary_before_prefix:
                own = replace(task, run_tag=f"[agent {len(prompts):04d}] {task.run_tag}")
            prompts[agent_id(g, i)] = own.chat_messages(ws[0]) if chat else own.transcript(ws[0])
    # The answer checks send text whatever api says: token ids and logprobs come with completions only.
    checks = {p: replace(task, run_tag=run_tag(f"{tag}-{p}")).transcript(words[0][0]) for p in CHECK_PURPOSES}
    repeats = []
    for r in range(config.max_repeats):
        ttft_words = task.sample_words(config.ttft_burst, seed=config.seed + 1 + r)
        controls = [replace(task, run_tag=control_tag(tag, r, i)) for i in range(len(ttft_words))]
        warm = {f"ttft{r}/{agent_id(g, 0)}": task.chat_messages(w) if chat else task.transcript(w)
                for g, w in enumerate(ttft_words)}  # fmt: skip
        control = {f"ctrl{r}/{i:03d}": c.chat_messages(w) if chat else c.transcript(w)
                   for i, (c, w) in enumerate(zip(controls, ttft_words, strict=True))}  # fmt: skip
        # The short prompts: a tag of their own as the whole system prompt, then the same requests.
        shorts = [EchoTask(short_tag(tag, r, i)) for i in range(len(ttft_words) if r < SHORT_REPEATS else 0)]
        short = {f"short{r}/{i:03d}": t.chat_messages(w) if chat else t.transcript(w)
                 for i, (t, w) in enumerate(zip(shorts, ttft_words, strict=False))}  # fmt: skip
        repeats.append(TTFTRepeat(warm, control, short))
    first = next(iter(prompts))
    return Workload(
        tag=tag,
        task=task,
        words=words,
        cold={first: prompts[first]},
        warm={a: p for a, p in prompts.items() if a != first},
        warm_misses=warm_misses,
        ttft=tuple(repeats),
        checks=checks,
        to_tokenize=(*prompts.values(), *(p for r in repeats for p in (*r.warm.values(), *r.control.values()))),
    )


def aligned_system_prompt(config: PrefixTestConfig, facts: ServerFacts) -> str | None:
    """The system prompt ``align_prefix`` asks for on this server (None: the shipped one).

    Raises:
        ConfigError: The cache's block size is unknown.
    """
    if config.align_prefix == "off":
        return None
    if facts.block_size is None:
        raise ConfigError("align_prefix needs the cache block size: the server does not say it, pass block_size=")
    # A tag of the run's form (8 hex digits), since the tag is part of the prefix.
    task = EchoTask(run_tag=run_tag("5f3a9c2e-cache_on"))
    render: Literal["transcript", "chat"] = "chat" if config.api == "chat" else "transcript"
    aligned = align_system_prompt(
        task, facts.tokenizer(), facts.block_size, mode=config.align_prefix, slack_tokens=ALIGN_SLACK_TOKENS,
        render=render,
    )  # fmt: skip
    return aligned.system_prompt


def key_of(prompt: Prompt) -> str:
    """A hashable key of a prompt (text as is, messages as their repr)."""
    return prompt if isinstance(prompt, str) else repr(prompt)
