"""What a rollout produces: each agent's completion, each vectorized step, and their summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from echo_env.measure.figures import phase_figures
from echo_env.wire.client import Output, RequestRecord


@dataclass
class AgentCompletion:
    """What one agent got back, and the figures for its ``info["timing"]``."""

    text: str
    """The completion ('' when the request failed)."""
    timing: dict[str, float | int | None]
    """Request figures under :data:`echo_env.envs.wrappers.REQUEST_TIMING_KEYS`."""
    request_id: str
    """The request that produced it."""
    error: str | None = None
    """Why there is no completion."""
    output: Output | None = None
    """The generated sequence itself (token ids and logprobs when the server sent them)."""


@dataclass
class StepResult:
    """One vectorized step."""

    actions: dict[str, str]
    """The text sent to the env for each agent."""
    observations: dict[str, str]
    """The env's next observations."""
    rewards: dict[str, float]
    """The env's rewards."""
    terminations: dict[str, bool]
    """Which agents finished."""
    infos: dict[str, dict[str, Any]]
    """The env's infos (with ``timing``)."""
    records: list[RequestRecord]
    """Every request of the step."""
    failures: dict[str, str]
    """Agents whose request failed, with the error."""
    wall_s: float
    """Time for the whole step, requests included."""


@dataclass
class RolloutSummary:
    """Aggregates over a rollout."""

    agents: int
    """Agent-steps graded."""
    failed: int
    """Agent-steps whose request failed (left out of the reward figures)."""
    mean_reward: float | None
    """Mean reward over graded agent-steps."""
    frac_correct: float | None
    """Share answered right."""
    frac_wrong_word: float | None
    """Share with the right form but another word."""
    frac_format_error: float | None
    """Share with a broken form."""
    requests: int
    """Requests sent."""
    wall_s: float
    """Time the rollout took."""
    requests_per_s: float | None
    """Finished requests per second of wall time."""
    completion_tokens_per_s: float | None
    """Generated tokens per second of wall time."""
    ttft_s: dict[str, float | None]
    """TTFT percentiles (p50, p90, p99) over finished requests."""
    e2e_s: dict[str, float | None]
    """End-to-end latency percentiles."""
    prompt_tokens: int
    """Prompt tokens reported by the server."""
    cached_tokens: int | None
    """Cached prompt tokens reported by the server (None: never reported)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def summarize_rollout(steps: Sequence[StepResult], wall_s: float) -> RolloutSummary:
    """Aggregate rewards and request timings over steps.

    Agent-steps whose request failed are counted in ``failed`` and left out of the
    reward figures, so a flaky server does not look like a bad policy. Request figures
    are pooled by :func:`echo_env.measure.figures.phase_figures`, as every command's are.
    """
    rewards: list[float] = []
    outcomes: list[str] = []
    failed = 0
    records: list[RequestRecord] = []
    for step in steps:
        records.extend(step.records)
        for agent, reward in step.rewards.items():
            if agent in step.failures:
                failed += 1
                continue
            rewards.append(reward)
            outcomes.append(step.infos.get(agent, {}).get("outcome", ""))
    graded = len(rewards)

    def share(kind: str) -> float | None:
        return outcomes.count(kind) / graded if graded else None

    fig = phase_figures("rollout", records, wall_s, rewards=rewards)
    return RolloutSummary(
        agents=graded + failed,
        failed=failed,
        mean_reward=fig.mean_reward,
        frac_correct=share("correct"),
        frac_wrong_word=share("wrong_word"),
        frac_format_error=share("format_error"),
        requests=fig.requests,
        wall_s=wall_s,
        requests_per_s=fig.throughput_rps,
        completion_tokens_per_s=fig.tokens_per_s,
        ttft_s={"p50": fig.ttft.p50, "p90": fig.ttft.p90, "p99": fig.ttft.p99},
        e2e_s={"p50": fig.e2e.p50, "p90": fig.e2e.p90, "p99": fig.e2e.p99},
        prompt_tokens=fig.prompt_tokens,
        cached_tokens=fig.cached_tokens,
    )
