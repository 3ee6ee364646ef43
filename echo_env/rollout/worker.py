"""The vectorized rollout worker: every live agent's LLM call in one batch, then one env step.

Observations -> prompts -> requests (three batching modes) -> completions -> actions ->
``env.step``; each request's latency goes into the agent's ``info["timing"]`` through
the timing wrappers. Failed requests are kept as records and their agents get an empty
action (graded as a format error, but counted under ``failures``, not in the rewards).
What a rollout produces lives in :mod:`echo_env.rollout.results` (re-exported here), how
each kind of env is stepped in :mod:`echo_env.rollout.adapters`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from echo_env.config import check_max_tokens
from echo_env.errors import ConfigError, ServerUnreachableError
from echo_env.rollout.adapters import EnvAdapter, GymListAdapter, ParallelAdapter, VectorAdapter
from echo_env.rollout.results import AgentCompletion, RolloutSummary, StepResult, summarize_rollout
from echo_env.rollout.token_in import ReuseLog, TokenHistory, output_ids, prompt_ids
from echo_env.wire.client import Api, LLMClient, Output, Prompt, RequestRecord, unreachable
from echo_env.wire.tokenizer import Tokenizer, encode_prompts

log = logging.getLogger(__name__)

__all__ = [
    "SESSION_HEADER",
    "AgentCompletion",
    "Batching",
    "PromptFormat",
    "RolloutSummary",
    "RolloutWorker",
    "SamplingConfig",
    "StepResult",
    "summarize_rollout",
]

SESSION_HEADER = "X-Session-ID"
"""The header vllm-router's ``consistent_hash`` and ``sticky_least_loaded`` read first (case-insensitive).

After it come ``X-User-ID``, ``X-Tenant-ID``, ``X-Correlation-ID``, ``X-Request-ID`` and ``X-Trace-ID``.
Its docs also list body fields (``session_params.session_id``, ``user``...), but for ``/v1/completions``
0.1.17 hashed the prompt text instead (measured: 16 requests with 16 different ``user`` values and one
prompt all went to one replica), so send the header. Without any key, identical prompts meet on one
replica and a conversation's turns (different prompts) scatter."""

Batching = Literal["per_agent", "per_group", "batched"]
PromptFormat = Literal["text", "tokens"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the worker asks the server for completions."""

    api: Api = "completions"
    """``completions`` sends the plain transcript (base models); ``chat`` the messages."""
    batching: Batching = "per_agent"
    """``per_agent``: one streamed request per agent, all in flight; ``per_group``: one
    request per distinct prompt with ``n`` = its agents; ``batched``: one completions
    request carrying every prompt."""
    max_tokens: int = 32
    """Generation limit per completion."""
    temperature: float = 0.0
    """Sampling temperature (0 is greedy)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    stop: tuple[str, ...] = ("\n",)
    """Stop strings; the answer is one line."""
    seed: int | None = None
    """Sampling seed sent to the server."""
    prompt_format: PromptFormat = "text"
    """``tokens`` sends token ids from the model's tokenizer (completions only)."""
    logprobs: int | None = None
    """Sampled-token logprobs to ask for (completions only)."""
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Extra request fields for the server."""

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ConfigError(f"api={self.api!r}: use api=completions or api=chat")
        if self.batching not in ("per_agent", "per_group", "batched"):
            raise ConfigError(f"batching={self.batching!r}: use per_agent, per_group or batched")
        if self.batching == "batched" and self.api == "chat":
            raise ConfigError("batching=batched sends a list of prompts, which only api=completions takes")
        if self.prompt_format == "tokens" and self.api == "chat":
            raise ConfigError("prompt_format=tokens needs api=completions")
        check_max_tokens(self.max_tokens)
        if not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature={self.temperature} is out of range: use 0 to 10")


def _timing(record: RequestRecord, out: Output | None, shared: bool) -> dict[str, float | int | None]:
    itl = out.itl_s if out is not None else []
    timing: dict[str, float | int | None] = {
        "ttft_s": out.ttft_s if out is not None else None,
        "e2e_s": out.e2e_s if out is not None else record.e2e_s,
        "queue_s": record.queue_s,
        "itl_mean_s": float(np.mean(itl)) if itl else None,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
    }
    if shared:
        # One request served several agents: usage totals are not per agent.
        timing["completion_tokens"] = out.chunks if out is not None else None
        if record.num_prompts > 1:
            timing["prompt_tokens"] = timing["cached_tokens"] = None
    return timing


@dataclass(frozen=True)
class _Call:
    """One request of a batch: the agents it answers and what it sends for them."""

    mode: Batching
    agents: tuple[str, ...]
    prompts: tuple[Prompt, ...]
    """One prompt, or (``batched``) one per agent, sent as one list."""
    n: int
    tag: str
    session: str | None = None

    def answer_index(self, i: int) -> int:
        """Which of the request's answers is its ``i``-th agent's (a greedy group shares the one answer)."""
        return i if self.mode == "batched" or self.n > 1 else 0

    @property
    def shared(self) -> bool:
        """Several agents share this request: its usage totals are not per agent."""
        return len(self.agents) > 1 or self.mode == "batched"


def _prompt_key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class RolloutWorker:
    """Drives envs with an LLM behind an :class:`~echo_env.wire.client.LLMClient`.

    Args:
        client: The client (its concurrency limit applies to every batch).
        sampling: How to ask for completions.
        tokenizer: The served model's tokenizer; needed for ``prompt_format="tokens"``.
    """

    def __init__(self, client: LLMClient, sampling: SamplingConfig, tokenizer: Tokenizer | None = None) -> None:
        if sampling.prompt_format == "tokens" and tokenizer is None:
            raise ConfigError("prompt_format=tokens needs the model's tokenizer")
        self.client = client
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.records: list[RequestRecord] = []
        """Every request this worker sent, in order of completion."""
        self._token_cache: dict[str, list[int]] = {}
        self.history = TokenHistory(tokenizer) if sampling.prompt_format == "tokens" and tokenizer else None
        """Token-in multi-turn: each agent's next prompt appends to its last prompt and generated ids."""
        self.reuse = ReuseLog()
        """Each agent's history reuse, put in every step's ``info["history_reuse"]``."""
        self.on_record: Callable[[RequestRecord], None] | None = None
        """Called with each request's record as it finishes (progress bars)."""

    def token_prompt(self, agent: str, prompt: str) -> list[int]:
        """The ids ``prompt_format=tokens`` sends for ``agent``'s ``prompt`` (appended to its last turn's)."""
        assert self.history is not None
        key = f"{agent}\x00{prompt}"
        ids = self._token_cache.get(key)
        if ids is None:
            ids = self._token_cache[key] = self.history.prompt_ids(agent, prompt)
        return ids

    def _calls(self, prompts: Mapping[str, Prompt], sessions: Mapping[str, str]) -> list[_Call]:
        """The requests of one batch, as ``batching`` says: which agents each one answers."""
        mode = self.sampling.batching
        if mode == "per_agent":
            return [_Call(mode, (a,), (prompts[a],), 1, a, sessions.get(a)) for a in prompts]
        if mode == "batched":
            agents = tuple(prompts)
            return [_Call(mode, agents, tuple(prompts[a] for a in agents), 1, f"batch of {len(agents)}")]
        by_prompt: dict[str, list[str]] = defaultdict(list)
        for agent in prompts:
            by_prompt[_prompt_key(prompts[agent])].append(agent)
        # Greedy decoding gives every sample the same text, and vLLM refuses n > 1
        # with temperature 0: ask once and hand the answer to the whole group.
        greedy = self.sampling.temperature == 0.0
        return [
            _Call(mode, tuple(g), (prompts[g[0]],), 1 if greedy else len(g), f"{g[0]}+{len(g) - 1}")
            for g in by_prompt.values()
        ]

    def _wire_prompt(self, prompt: Prompt, agent: str | None = None) -> Prompt:
        if agent is not None and self.history is not None and isinstance(prompt, str):
            return self.token_prompt(agent, prompt)
        if self.sampling.prompt_format == "tokens" and isinstance(prompt, str):
            ids = self._token_cache.get(prompt)
            if ids is None:
                assert self.tokenizer is not None
                ids = self._token_cache[prompt] = encode_prompts(self.tokenizer, [prompt])[0]
            return ids
        return prompt

    async def _request(self, call: _Call) -> tuple[RequestRecord, Any]:
        """Send one call (its prompts as the server takes them); its record and what was sent."""
        s = self.sampling
        # Token-in history is kept per agent, so only for one agent's own request.
        agent = call.agents[0] if call.mode == "per_agent" else None
        wires = [self._wire_prompt(p, agent) for p in call.prompts]
        wire: Any = wires if call.mode == "batched" else wires[0]
        record = await self.client.generate(
            wire,
            api=s.api,
            n=call.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop=s.stop,
            seed=s.seed,
            logprobs=s.logprobs,
            extra_body=dict(s.extra_body) or None,
            headers={SESSION_HEADER: call.session} if call.session else None,
            tag=call.tag,
        )
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return record, wire

    async def complete(
        self, prompts: Mapping[str, Prompt], sessions: Mapping[str, str] | None = None
    ) -> tuple[dict[str, AgentCompletion], list[RequestRecord]]:
        """Get one completion per agent, batched as configured.

        Args:
            prompts: Each agent's prompt (transcript text or chat messages).
            sessions: Each agent's session key, sent as ``X-Session-ID`` (``per_agent``
                only), so a router can keep an agent's turns on one replica.

        Returns:
            Each agent's completion, and the records of the requests sent.
        """
        if not prompts:
            return {}, []
        await self.client.model()
        calls = self._calls(prompts, sessions or {})
        sent = await asyncio.gather(*(self._request(c) for c in calls))
        return self._completions(calls, sent), [record for record, _ in sent]

    def _completions(
        self, calls: Sequence[_Call], sent: Sequence[tuple[RequestRecord, Any]]
    ) -> dict[str, AgentCompletion]:
        """Each agent's share of its call's answer; token-in history is recorded per agent."""
        results: dict[str, AgentCompletion] = {}
        for call, (rec, wire) in zip(calls, sent, strict=True):
            for i, agent in enumerate(call.agents):
                k = call.answer_index(i)
                out = rec.outputs[k] if rec.ok and k < len(rec.outputs) else None
                prompt = call.prompts[0]
                per_agent = call.mode == "per_agent"
                if per_agent and self.history and out and isinstance(prompt, str) and isinstance(wire, list):
                    self.history.record(agent, prompt, wire, out.text, output_ids(out))
                results[agent] = AgentCompletion(
                    out.text if out else "", _timing(rec, out, shared=call.shared), rec.request_id, rec.error, out
                )
        return results

    def _prompts(self, observations: Mapping[str, str], infos: Mapping[str, Mapping[str, Any]]) -> dict[str, Prompt]:
        if self.sampling.api == "completions":
            return dict(observations)
        prompts: dict[str, Prompt] = {}
        for agent in observations:
            messages = infos.get(agent, {}).get("messages")
            if messages is None:
                raise ConfigError(f"api=chat needs info['messages'] for {agent}: use an echo_env env")
            prompts[agent] = messages
        return prompts

    def check_reachable(self, records: Sequence[RequestRecord]) -> None:
        """Raise ServerUnreachableError if any of ``records`` could not reach the server."""
        dead = [r for r in records if unreachable(r)]
        if not dead and records and all(not r.ok and (r.error or "").startswith("timed out") for r in records):
            dead = list(records)  # nothing at all came back in time: the server has stalled
        if dead:
            err = ServerUnreachableError(
                f"{len(dead)} of {len(records)} requests could not reach the server "
                f"({dead[0].error}); every finished request is kept in .records"
            )
            err.records = list(self.records)  # type: ignore[attr-defined]
            raise err

    async def _step(self, adapter: EnvAdapter, observations: Mapping[str, str], infos: Mapping[str, Any]) -> StepResult:
        """The one step loop: prompts from observations, one batch of requests, timings in, env step."""
        start = time.perf_counter()
        prompts = self._prompts(observations, infos)
        sessions = {k: str(i["session_id"]) for k, i in infos.items() if isinstance(i, Mapping) and i.get("session_id")}
        completions, records = await self.complete(prompts, sessions)
        self.check_reachable(records)
        actions = {k: c.text for k, c in completions.items()}
        next_obs, rewards, terms, step_infos = adapter.step(actions, {k: c.timing for k, c in completions.items()})
        failures = {k: c.error or "failed" for k, c in completions.items() if c.error is not None}
        for key, error in failures.items():
            if key in step_infos:
                step_infos[key]["request_error"] = error
        for key, c in completions.items():
            if key in step_infos:
                sent = prompt_ids(c.output) or self._token_cache.get(f"{key}\x00{prompts[key]}")
                cached = c.timing.get("cached_tokens")
                step_infos[key]["history_reuse"] = self.reuse.observe(
                    key, sent, output_ids(c.output), None if cached is None else int(cached)
                )
        wall = time.perf_counter() - start
        log.debug("step: %d agents, %d requests, %d failed, %.3f s", len(prompts), len(records), len(failures), wall)
        return StepResult(actions, next_obs, rewards, terms, step_infos, list(records), failures, wall)

    async def step(
        self,
        env: Any,
        observations: Mapping[str, str],
        infos: Mapping[str, Mapping[str, Any]],
    ) -> StepResult:
        """One vectorized step of a PettingZoo parallel env (ideally a ParallelTimingWrapper).

        Args:
            env: The env; its live agents are the keys of ``observations``.
            observations: The live agents' observations.
            infos: Their infos (``messages`` is read for ``api=chat``, ``session_id`` is sent
                as ``X-Session-ID``).

        Raises:
            ServerUnreachableError: When requests could not reach the server; the
                exception's ``records`` holds every request of this worker so far.
        """
        live = [a for a in observations if a in getattr(env, "agents", observations)]
        return await self._step(ParallelAdapter(env), {a: observations[a] for a in live}, infos)

    async def run_episode(
        self, env: Any, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> list[StepResult]:
        """Reset a parallel env and step it until every agent is done.

        Returns:
            One :class:`StepResult` per step.
        """
        observations, infos = env.reset(seed=seed, options=options)
        self.reuse.forget()
        steps: list[StepResult] = []
        while env.agents:
            result = await self.step(env, {a: observations[a] for a in env.agents}, infos)
            steps.append(result)
            observations, infos = result.observations, result.infos
        return steps

    async def run_vector(self, venv: Any, seed: int | None = None) -> StepResult:
        """Reset a Gymnasium vector env of echo envs, get every reply in one batch, step it once.

        With ``gymnasium.make_vec("EchoPrefix-v0", n, vectorization_mode="sync",
        wrappers=[TimingWrapper])`` each sub-env also gets the request figures in its
        ``info["timing"]``; with other vector envs they are only in the result.
        """
        adapter = VectorAdapter(venv)
        observations, infos = adapter.reset(seed)
        return await self._step(adapter, observations, infos)

    async def run_gym(self, envs: Sequence[gym.Env[str, str]], seed: int | None = None) -> StepResult:
        """Reset a list of Gymnasium envs, get every reply in one batch, step each once.

        ``TimingWrapper`` envs get the request figures in ``info["timing"]``.
        """
        adapter = GymListAdapter(envs)
        observations, infos = adapter.reset(seed)
        return await self._step(adapter, observations, infos)
