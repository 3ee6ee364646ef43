"""The client and the rollout worker against the real embedded vLLM engine."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import gymnasium
import pytest

import echo_env
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.envs.wrappers import ParallelTimingWrapper, TimingWrapper
from echo_env.errors import ConfigError
from echo_env.rollout.worker import RolloutWorker, SamplingConfig, summarize_rollout
from echo_env.wire.client import ClientConfig, LLMClient

pytestmark = pytest.mark.engine


def _client(engine: Any, **kw: Any) -> LLMClient:
    return LLMClient(ClientConfig(base_url=engine.base_url, model=engine.served_model_name, **kw))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_rollout_records_every_request_and_ttft(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8))
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=2, group_size=4))
            steps = await worker.run_episode(env, seed=3)
            return steps, worker.records

    steps, records = _run(go())
    assert len(steps) == 1
    step = steps[0]
    assert len(records) == 8 and all(r.ok for r in records), [r.error for r in records]
    assert set(step.infos) == set(step.rewards) and len(step.infos) == 8
    for info in step.infos.values():
        timing = info["timing"]
        assert timing["ttft_s"] is not None and 0 < timing["ttft_s"] <= timing["e2e_s"]
        assert timing["prompt_tokens"] > 400
        assert "episode_timing" in info


def test_default_model_echoes_most_words_at_temperature_zero(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8, temperature=0.0))
            env = EchoPrefixParallelEnv(batch_size=8, group_size=1)
            return await worker.run_episode(env, seed=11)

    steps = _run(go())
    rewards = list(steps[0].rewards.values())
    assert sum(r == 1.0 for r in rewards) >= 6, steps[0].actions


def test_cached_tokens_reported_on_warm_requests(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=4))
            task = echo_env.EchoTask(run_tag=f"[cached-tokens test {time.time_ns()}]")
            prompt = task.transcript("apple")
            cold, _ = await worker.complete({"a": prompt})
            warm, _ = await worker.complete({"b": prompt, "c": prompt})
            return cold, warm

    cold, warm = _run(go())
    assert cold["a"].timing["cached_tokens"] == 0
    for c in warm.values():
        assert c.timing["cached_tokens"] is not None and c.timing["cached_tokens"] >= 384


@pytest.mark.parametrize("batching", ["per_agent", "per_group", "batched"])
def test_every_batching_mode_returns_one_action_per_agent(engine: Any, batching: str) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=6, batching=batching))  # type: ignore[arg-type]
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=2, group_size=3))
            steps = await worker.run_episode(env, seed=5)
            return steps, worker.records

    steps, records = _run(go())
    step = steps[0]
    assert len(step.actions) == 6 and not step.failures
    expected_requests = {"per_agent": 6, "per_group": 2, "batched": 1}[batching]
    assert len(records) == expected_requests
    assert all(info["timing"]["ttft_s"] is not None for info in step.infos.values())
    assert summarize_rollout(steps, 1.0).agents == 6


def test_chat_api_runs_through_the_chat_template(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(api="chat", max_tokens=6))
            return await worker.run_episode(EchoPrefixParallelEnv(batch_size=1, group_size=2), seed=1)

    steps = _run(go())
    assert len(steps[0].actions) == 2 and not steps[0].failures


def test_gym_envs_with_timing_wrapper(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8))
            envs = [TimingWrapper(gymnasium.make("EchoPrefix-v0")) for _ in range(3)]
            return await worker.run_gym(envs, seed=0)

    result = _run(go())
    assert len(result.rewards) == 3
    assert all(info["timing"]["ttft_s"] is not None for info in result.infos.values())


def test_unknown_model_name_names_the_served_one(engine: Any) -> None:
    async def go() -> Any:
        async with LLMClient(ClientConfig(base_url=engine.base_url, model="no-such-model")) as client:
            return await client.model()

    with pytest.raises(ConfigError, match=engine.served_model_name):
        _run(go())


def test_vector_env_of_timing_wrapped_envs(engine: Any) -> None:
    async def go() -> Any:
        async with _client(engine) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8))
            venv = gymnasium.make_vec("EchoPrefix-v0", num_envs=3, vectorization_mode="sync", wrappers=[TimingWrapper])
            return await worker.run_vector(venv, seed=0)

    result = _run(go())
    assert len(result.rewards) == 3 and len(result.records) == 3
    assert all(info["timing"]["ttft_s"] is not None for info in result.infos.values())
