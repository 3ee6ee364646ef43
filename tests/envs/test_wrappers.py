"""Timing wrappers: per-step ``timing``, caller-supplied figures, episode totals."""

from __future__ import annotations

import gymnasium
import pytest
from pettingzoo.test import parallel_api_test

import echo_env  # noqa: F401 - registers EchoPrefix-v0
from echo_env.envs.gym_env import EchoPrefixEnv
from echo_env.envs.parallel import agent_id, parallel_env
from echo_env.envs.wrappers import REQUEST_TIMING_KEYS, TIMING_KEYS, ParallelTimingWrapper, TimingWrapper
from echo_env.errors import EnvUsageError


def wrapped(max_turns: int = 1) -> TimingWrapper:
    env = TimingWrapper(EchoPrefixEnv(max_turns=max_turns))
    env.reset(options={"word": "apple"})
    return env


def test_every_step_has_a_timing_dict_with_all_keys() -> None:
    env = wrapped(max_turns=3)
    for _ in range(3):
        *_, info = env.step("wrong")
        timing = info["timing"]
        assert set(timing) == set(TIMING_KEYS)
        assert timing["step_s"] >= timing["env_step_s"] >= 0
        assert all(timing[k] is None for k in REQUEST_TIMING_KEYS)
    # The env's own info is kept.
    assert info["word"] == "apple"


def test_supplied_figures_land_in_the_next_step_only() -> None:
    env = wrapped(max_turns=2)
    env.set_request_timing({"ttft_s": 0.07, "e2e_s": 0.2, "cached_tokens": 384})
    *_, info = env.step("wrong")
    assert info["timing"]["ttft_s"] == 0.07
    assert info["timing"]["e2e_s"] == 0.2
    assert info["timing"]["cached_tokens"] == 384
    assert info["timing"]["prompt_tokens"] is None
    *_, info = env.step("wrong")
    assert info["timing"]["ttft_s"] is None


def test_unknown_timing_keys_are_a_usage_error() -> None:
    env = wrapped()
    with pytest.raises(EnvUsageError, match="ttft_s"):
        env.set_request_timing({"ttft": 0.1})
    with pytest.raises(EnvUsageError):
        env.set_request_timing({"step_s": 0.1})


def test_episode_timing_sums_the_steps() -> None:
    env = wrapped(max_turns=3)
    env.set_request_timing({"ttft_s": 0.25, "prompt_tokens": 500})
    *_, info = env.step("wrong")
    assert "episode_timing" not in info
    env.set_request_timing({"ttft_s": 0.5, "prompt_tokens": 520, "e2e_s": None})
    *_, terminated, _, info = env.step("Echo: apple")
    assert terminated
    episode = info["episode_timing"]
    assert episode["steps"] == 2
    assert episode["ttft_s"] == pytest.approx(0.75)
    assert episode["prompt_tokens"] == 1020
    assert episode["e2e_s"] is None
    assert episode["cached_tokens"] is None
    assert episode["episode_s"] >= episode["step_s"] - 1e-9 >= 0
    assert episode["env_step_s"] >= info["timing"]["env_step_s"]


def test_reset_starts_a_new_episode_clock() -> None:
    env = wrapped()
    env.set_request_timing({"prompt_tokens": 100})
    *_, info = env.step("Echo: apple")
    assert info["episode_timing"]["prompt_tokens"] == 100
    env.reset(options={"word": "apple"})
    *_, info = env.step("Echo: apple")
    assert info["episode_timing"]["steps"] == 1
    assert info["episode_timing"]["prompt_tokens"] is None


def test_timing_dicts_are_fresh_every_step() -> None:
    env = wrapped(max_turns=3)
    *_, first = env.step("wrong")
    first["timing"]["step_s"] = -1.0
    *_, second = env.step("wrong")
    assert second["timing"] is not first["timing"]
    assert second is not first
    assert second["timing"]["step_s"] >= 0


def test_episode_timing_sums_every_turn_of_a_multi_turn_episode() -> None:
    env = TimingWrapper(gymnasium.make("EchoPrefix-v0", turns=3, max_turns=2))
    _, info = env.reset(seed=0)
    cached = [300, 320, 340, 360]
    replies = ["wrong", " Echo: {w}", " Echo: {w}", " Echo: {w}"]
    for i, (tokens, reply) in enumerate(zip(cached, replies)):
        word = env.unwrapped.word  # type: ignore[attr-defined]
        env.set_request_timing({"cached_tokens": tokens, "ttft_s": 0.5})
        *_, terminated, _, info = env.step(reply.format(w=word))
        assert info["timing"]["cached_tokens"] == tokens
        assert ("episode_timing" in info) == terminated == (i == 3)
    assert (info["turn"], info["session_id"]) == (2, "seed0-ep0")
    episode = info["episode_timing"]
    assert episode["steps"] == 4
    assert episode["cached_tokens"] == sum(cached)
    assert episode["ttft_s"] == pytest.approx(2.0)


def test_parallel_episode_timing_covers_every_turn() -> None:
    env = ParallelTimingWrapper(parallel_env(batch_size=1, group_size=2, turns=2))
    env.reset(options={"words": [["apple", "forest"]]})
    a, b = agent_id(0, 0), agent_id(0, 1)
    for turn, word in enumerate(["apple", "forest"]):
        env.set_request_timings({a: {"prompt_tokens": 100 * (turn + 1)}, b: {"prompt_tokens": 10}})
        _, _, terms, _, infos = env.step({a: f" Echo: {word}", b: "wrong"})
    assert all(terms.values())
    assert infos[a]["episode_timing"]["steps"] == 2
    assert infos[a]["episode_timing"]["prompt_tokens"] == 300
    assert infos[b]["episode_timing"]["prompt_tokens"] == 20


def test_wraps_an_env_from_gymnasium_make() -> None:
    env = TimingWrapper(gymnasium.make("EchoPrefix-v0"))
    _, info = env.reset(seed=0)
    _, reward, *_, info = env.step("Echo: " + info["word"])
    assert reward == 1.0
    assert info["episode_timing"]["steps"] == 1
    assert isinstance(env.unwrapped, EchoPrefixEnv)


# --- the parallel wrapper -------------------------------------------------------------------


def pwrapped(max_turns: int = 2) -> ParallelTimingWrapper:
    env = ParallelTimingWrapper(parallel_env(batch_size=2, group_size=2, max_turns=max_turns))
    env.reset(options={"words": ["apple", "forest"]})
    return env


@pytest.mark.parametrize("turns", [1, 3])
def test_parallel_wrapper_passes_the_api_test(turns: int) -> None:
    env = ParallelTimingWrapper(parallel_env(batch_size=2, group_size=2, max_turns=2, turns=turns))
    parallel_api_test(env, num_cycles=10)


def test_parallel_timing_per_agent() -> None:
    env = pwrapped()
    a, b = agent_id(0, 0), agent_id(1, 1)
    env.set_request_timings({a: {"ttft_s": 0.1, "completion_tokens": 4}})
    _, _, terms, _, infos = env.step({x: "wrong" for x in env.agents})
    assert set(infos) == set(env.possible_agents)
    for info in infos.values():
        assert set(info["timing"]) == set(TIMING_KEYS)
        assert info["timing"]["step_s"] >= 0
    assert infos[a]["timing"]["ttft_s"] == 0.1
    assert infos[a]["timing"]["completion_tokens"] == 4
    assert infos[b]["timing"]["ttft_s"] is None
    assert len({id(info["timing"]) for info in infos.values()}) == len(infos)
    assert not any(terms.values())
    assert all("episode_timing" not in info for info in infos.values())


def test_parallel_episode_timing_when_each_agent_ends() -> None:
    env = pwrapped()
    a, b = agent_id(0, 0), agent_id(1, 0)
    env.set_request_timings({a: {"cached_tokens": 256}, b: {"cached_tokens": 128}})
    acts = {x: "wrong" for x in env.agents}
    acts[a] = "Echo: apple"
    _, _, terms, _, infos = env.step(acts)
    assert terms[a] and infos[a]["episode_timing"]["steps"] == 1
    assert infos[a]["episode_timing"]["cached_tokens"] == 256
    assert "episode_timing" not in infos[b]
    with pytest.raises(EnvUsageError, match="live agent"):
        env.set_request_timings({a: {"ttft_s": 0.1}})
    env.set_request_timings({b: {"cached_tokens": 128}})
    _, _, terms, _, infos = env.step({x: "wrong" for x in env.agents})
    assert all(terms.values())
    assert infos[b]["episode_timing"]["steps"] == 2
    assert infos[b]["episode_timing"]["cached_tokens"] == 256
    assert infos[b]["episode_timing"]["ttft_s"] is None


def test_parallel_unknown_keys_and_agents_are_usage_errors() -> None:
    env = pwrapped()
    with pytest.raises(EnvUsageError):
        env.set_request_timings({agent_id(0, 0): {"latency": 1.0}})
    with pytest.raises(EnvUsageError):
        env.set_request_timings({"group9_agent9": {"ttft_s": 1.0}})
    with pytest.raises(EnvUsageError):
        ParallelTimingWrapper(parallel_env(batch_size=1, group_size=1)).set_request_timings(
            {agent_id(0, 0): {"ttft_s": 1.0}}
        )


def test_parallel_wrapper_forwards_the_env_api() -> None:
    env = pwrapped()
    assert env.possible_agents == env.unwrapped.possible_agents
    assert env.agents == env.unwrapped.agents
    assert env.observation_space(agent_id(0, 0)) is env.unwrapped.observation_space(agent_id(0, 0))
