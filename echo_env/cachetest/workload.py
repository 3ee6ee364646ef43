"""The test's prompts, taken from the env's own observations.

One run tag at the very start of the system prompt makes the prefix new to the server.
The hit-rate burst is every agent of a ``batch_size x group_size`` parallel env (the
first one goes alone, cold); each TTFT repeat adds a small env of ``ttft_burst`` agents
with new words (the warm burst: the shared prefix is cached, the word is not) and the
same observations with a tag of their own in place of the run tag (the control burst:
the same lengths, nothing to hit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.envs.task import EchoTask
from echo_env.envs.wrappers import ParallelTimingWrapper

Prompt = Any
"""Transcript text (``api=completions``) or chat messages (``api=chat``)."""


def run_tag(tag: str) -> str:
    """The text that makes a run's prefix new: ``[echo-prefix run <tag>]``."""
    return f"[echo-prefix run {tag}]"


def control_tag(tag: str, repeat: int, index: int) -> str:
    """A control request's own tag, a few characters longer than the run tag at most."""
    return f"[echo-prefix ctrl {tag}.{repeat}.{index:03d}]"


def _prompt(config: PrefixTestConfig, obs: str, info: Mapping[str, Any]) -> Prompt:
    return obs if config.api == "completions" else info["messages"]


def _retag(prompt: Prompt, old: str, new: str) -> Prompt:
    """The same prompt with its run tag replaced (the tag is at its very start)."""
    if isinstance(prompt, str):
        return prompt.replace(old, new, 1)
    messages = [dict(m) for m in prompt]
    messages[0]["content"] = messages[0]["content"].replace(old, new, 1)
    return messages


def _spoil(prompt: Prompt, index: int) -> Prompt:
    """Something agent-specific in front of the shared text, as a template stamping an id would."""
    mark = f"[agent {index:04d}] "
    if isinstance(prompt, str):
        return mark + prompt
    messages = [dict(m) for m in prompt]
    messages[0]["content"] = mark + messages[0]["content"]
    return messages


@dataclass
class Workload:
    """The prompts of one server's run, in send order, and the env whose agents they are."""

    config: PrefixTestConfig
    """The test's settings."""
    task: EchoTask
    """The task with this run's tag."""
    env: ParallelTimingWrapper
    """The hit-rate burst's agents (graded after it)."""
    prompts: dict[str, Prompt]
    """Every agent's prompt (its observation), the cold agent first."""

    @property
    def cold(self) -> dict[str, Prompt]:
        """The first agent, sent alone on a prefix the server has never seen."""
        first = next(iter(self.prompts))
        return {first: self.prompts[first]}

    @property
    def warm(self) -> dict[str, Prompt]:
        """Every other agent, all in flight: the hit-rate burst."""
        first = next(iter(self.prompts))
        return {a: p for a, p in self.prompts.items() if a != first}

    def ttft_pair(self, repeat: int) -> tuple[dict[str, Prompt], dict[str, Prompt]]:
        """Repeat ``repeat``'s warm burst (new words on the cached prefix) and its control burst."""
        cfg = self.config
        env = EchoPrefixParallelEnv(batch_size=cfg.ttft_burst, group_size=1, task=self.task)
        observations, infos = env.reset(seed=cfg.seed + 1 + repeat)
        warm = {f"ttft{repeat}/{a}": _prompt(cfg, observations[a], infos[a]) for a in observations}
        control = {
            f"ctrl{repeat}/{i:03d}": _retag(p, self.task.run_tag, control_tag(self._tag, repeat, i))
            for i, p in enumerate(warm.values())
        }
        return warm, control

    @property
    def _tag(self) -> str:
        return self.task.run_tag.removeprefix("[echo-prefix run ").removesuffix("]")


def build_workload(config: PrefixTestConfig, tag: str, system_prompt: str | None = None) -> Workload:
    """The env of one server's run and its agents' prompts.

    Args:
        config: The test's settings.
        tag: Makes this run's prefix new (a run id and the server's label).
        system_prompt: Replaces the shipped one (``align_prefix``).
    """
    task = EchoTask(run_tag=run_tag(tag)) if system_prompt is None else EchoTask(system_prompt, run_tag=run_tag(tag))
    env = ParallelTimingWrapper(
        EchoPrefixParallelEnv(batch_size=config.batch_size, group_size=config.group_size, turns=config.turns, task=task)
    )
    observations, infos = env.reset(seed=config.seed)
    prompts: dict[str, Prompt] = {}
    for i, agent in enumerate(observations):
        prompt = _prompt(config, observations[agent], infos[agent])
        prompts[agent] = _spoil(prompt, i) if config.vary_before_prefix else prompt
    return Workload(config, task, env, prompts)


def all_prompts(workload: Workload, repeats: int) -> list[Prompt]:
    """Every prompt the run may send (for tokenizing them in one go before any timing)."""
    out: list[Prompt] = list(workload.prompts.values())
    for r in range(repeats):
        warm, control = workload.ttft_pair(r)
        out += list(warm.values()) + list(control.values())
    return out


def key_of(prompt: Prompt) -> str:
    """A hashable key of a prompt (text as is, messages as their repr)."""
    return prompt if isinstance(prompt, str) else repr(prompt)
