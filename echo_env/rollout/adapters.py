"""How the worker's one step loop drives each kind of env: PettingZoo parallel, a list of Gymnasium envs, a vector env.

Keys are agent ids (parallel envs) or sub-env indices as strings; each adapter hands the
request timings to the env's timing wrappers before stepping it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import gymnasium as gym

from echo_env.envs.wrappers import ParallelTimingWrapper, TimingWrapper

Timings = Mapping[str, Mapping[str, float | int | None]]
StepOut = tuple[dict[str, str], dict[str, float], dict[str, bool], dict[str, dict[str, Any]]]


class EnvAdapter(Protocol):
    """How the one step loop drives a kind of env: keys are agent ids or sub-env indices."""

    def step(self, actions: dict[str, str], timings: Timings) -> StepOut: ...


class ParallelAdapter:
    """A PettingZoo parallel env (timings go to a ParallelTimingWrapper)."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def step(self, actions: dict[str, str], timings: Timings) -> StepOut:
        if isinstance(self.env, ParallelTimingWrapper):
            self.env.set_request_timings(timings)
        obs, rewards, terms, _truncs, infos = self.env.step(actions)
        return obs, rewards, terms, infos


class GymListAdapter:
    """A list of Gymnasium envs, keyed by index (timings go to each TimingWrapper)."""

    def __init__(self, envs: Sequence[gym.Env[str, str]]) -> None:
        self.envs = list(envs)

    def reset(self, seed: int | None) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        observations: dict[str, str] = {}
        infos: dict[str, dict[str, Any]] = {}
        for i, e in enumerate(self.envs):
            observations[str(i)], infos[str(i)] = e.reset(seed=None if seed is None else seed + i)
        return observations, infos

    def step(self, actions: dict[str, str], timings: Timings) -> StepOut:
        obs, rewards, terms, infos = {}, {}, {}, {}
        for i, e in enumerate(self.envs):
            key = str(i)
            if isinstance(e, TimingWrapper):
                e.set_request_timing(timings[key])
            obs[key], reward, terms[key], _trunc, infos[key] = e.step(actions[key])
            rewards[key] = float(reward)
        return obs, rewards, terms, infos


class VectorAdapter:
    """A Gymnasium vector env of echo envs, keyed by index."""

    def __init__(self, venv: Any) -> None:
        self.venv = venv
        self.keys: list[str] = []

    def reset(self, seed: int | None) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        obs, infos = self.venv.reset(seed=seed)
        self.keys = [str(i) for i in range(len(obs))]
        messages = infos.get("messages")
        per_env = {k: ({"messages": messages[i]} if messages is not None else {}) for i, k in enumerate(self.keys)}
        return dict(zip(self.keys, obs, strict=True)), per_env

    def step(self, actions: dict[str, str], timings: Timings) -> StepOut:
        for i, sub in enumerate(getattr(self.venv, "envs", [])):
            if isinstance(sub, TimingWrapper):
                sub.set_request_timing(timings[self.keys[i]])
        next_obs, rewards, terms, _truncs, infos = self.venv.step(tuple(actions[k] for k in self.keys))
        return (
            dict(zip(self.keys, next_obs, strict=True)),
            {k: float(rewards[i]) for i, k in enumerate(self.keys)},
            {k: bool(terms[i]) for i, k in enumerate(self.keys)},
            {k: env_slice(infos, i) for i, k in enumerate(self.keys)},
        )


def env_slice(infos: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sub-env ``i``'s info from a vector env's infos (nested dicts of arrays, ``_key`` masks)."""
    return {
        name: env_slice(values, i) if isinstance(values, Mapping) else values[i]
        for name, values in infos.items()
        if not name.startswith("_")
    }
