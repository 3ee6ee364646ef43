"""A GRPO-shaped training loop over the PettingZoo echo env, with no RL library.

Each step: reset the parallel env (``batch_size`` groups of ``group_size`` agents, a
group sharing one word and so one prompt), sample every agent's reply from an
OpenAI-compatible server through the echo worker (one request per group, ``n`` = its
agents: one prefill of the shared prompt), step the env to grade the replies, and give
each agent its group-relative advantage, ``reward - mean(reward of its group)``: the
advantage GRPO uses, and what tinker-cookbook's ``compute_advantages`` returns.

A policy-gradient step would then minimise ``-mean(advantage * logprob(reply))`` over the
policy's parameters; the loop prints that loss, computed from the sampled tokens'
logprobs the server returns, at the spot marked GRADIENT STEP. The served model stays as
it is (to train for real, put your optimizer there and push the new weights to the
server, as ``echo-prefix train generation=server`` does through TRL).

    python examples/grpo_loop.py base_url=http://127.0.0.1:8000/v1 steps=3
    python examples/grpo_loop.py steps=2          # starts the embedded vLLM engine (~1 min)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from echo_env import ParallelTimingWrapper, agent_group, parallel_env
from echo_env.config import parse_overrides
from echo_env.errors import ConfigError, EchoEnvError
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the example loop (``key=value`` on the command line)."""

    base_url: str | None = None
    """Server's OpenAI API root; unset starts the embedded vLLM engine."""
    model_name: str | None = None
    """Served model name (unset: the server's first)."""
    steps: int = 3
    """Episodes (one env step each)."""
    batch_size: int = 4
    """Groups (distinct prompts) per step."""
    group_size: int = 4
    """Agents per group."""
    temperature: float = 1.0
    """Sampling temperature (0 would give a group identical answers: zero advantages)."""
    max_tokens: int = 16
    """Longest reply."""
    seed: int = 0
    """Seeds the words."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.group_size < 2:
            raise ConfigError("steps and batch_size must be at least 1, group_size at least 2")


def group_relative_advantages(rewards: Mapping[str, float]) -> dict[str, float]:
    """Each agent's reward minus the mean reward of its group (agents ``group<g>_agent<i>``)."""
    by_group: dict[int, list[float]] = defaultdict(list)
    for agent, reward in rewards.items():
        by_group[agent_group(agent)].append(reward)
    means = {g: statistics.fmean(rs) for g, rs in by_group.items()}
    return {agent: reward - means[agent_group(agent)] for agent, reward in rewards.items()}


async def run_loop(config: LoopConfig, base_url: str) -> list[dict[str, Any]]:
    """Run the loop against the server at ``base_url``; one summary dict per step."""
    sampling = SamplingConfig(
        batching="per_group",
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        logprobs=0,  # the sampled tokens' logprobs, for the policy-gradient loss
    )
    env = ParallelTimingWrapper(parallel_env(batch_size=config.batch_size, group_size=config.group_size))
    history: list[dict[str, Any]] = []
    async with LLMClient(ClientConfig(base_url=base_url, model=config.model_name)) as client:
        worker = RolloutWorker(client, sampling)
        for step in range(config.steps):
            observations, _infos = env.reset(seed=config.seed + step)
            # observations -> worker -> server -> replies (one request per group)
            completions, records = await worker.complete(observations)
            worker.check_reachable(records)
            env.set_request_timings({a: c.timing for a, c in completions.items()})
            _obs, rewards, _terms, _truncs, infos = env.step({a: c.text for a, c in completions.items()})
            # A failed request is no evidence about the policy: leave its agent out.
            graded = {a: r for a, r in rewards.items() if completions[a].error is None}
            advantages = group_relative_advantages(graded)

            # GRADIENT STEP: with logprob(reply) = the sum of its tokens' logprobs under the
            # policy, minimise loss = -mean(advantage * logprob(reply)) and update the
            # weights. Here the logprobs are the server's (the behaviour policy), so this
            # is the loss's value at the current weights; its gradient is the policy gradient.
            terms = []
            for agent, adv in advantages.items():
                out = completions[agent].output
                if out is not None and out.logprobs:
                    terms.append(adv * sum(lp for lp in out.logprobs if lp is not None))
            loss = -statistics.fmean(terms) if terms else None

            outcomes = [infos[a]["outcome"] for a in graded]
            summary = {
                "step": step,
                "mean_reward": statistics.fmean(graded.values()) if graded else None,
                "frac_correct": outcomes.count("correct") / len(outcomes) if outcomes else None,
                "frac_format_error": outcomes.count("format_error") / len(outcomes) if outcomes else None,
                "failed": len(rewards) - len(graded),
                "loss": loss,
                "ttft_p50_s": statistics.median([r.ttft_s for r in records if r.ttft_s is not None] or [0.0]),
                "advantages": advantages,
                "replies": {a: completions[a].text for a in graded},
            }
            history.append(summary)
            print_step(summary, config.group_size)
    return history


def print_step(summary: Mapping[str, Any], group_size: int) -> None:
    """Print one step: the figures, then each group's replies with their advantages."""
    loss = summary["loss"]
    print(
        f"step {summary['step']}: mean reward {summary['mean_reward']:.3f}  correct {summary['frac_correct']:.2f}  "
        f"format errors {summary['frac_format_error']:.2f}  loss {'n/a' if loss is None else f'{loss:.3f}'}  "
        f"ttft p50 {summary['ttft_p50_s'] * 1000:.0f} ms"
    )
    for agent, adv in sorted(summary["advantages"].items(), key=lambda kv: (agent_group(kv[0]), kv[0])):
        print(f"    {agent:<16} adv {adv:+.3f}  {summary['replies'][agent]!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; ``key=value`` arguments as :class:`LoopConfig`."""
    config = parse_overrides(LoopConfig, list(sys.argv[1:] if argv is None else argv))
    if config.base_url:
        asyncio.run(run_loop(config, config.base_url))
        return 0
    from echo_env.launch.engine import EmbeddedEngine

    print("starting the embedded vLLM engine (about a minute on a CPU)...", file=sys.stderr)
    with EmbeddedEngine() as engine:
        asyncio.run(run_loop(config, engine.base_url))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EchoEnvError as exc:
        print(f"grpo_loop: error: {exc}", file=sys.stderr)
        sys.exit(2)
