"""Timing wrappers: per-step latency in ``info["timing"]``, totals at the episode's end.

The env cannot see the LLM call that produced an action, so the caller (the rollout
worker, or your own loop) hands the request's figures to the wrapper before ``step``;
the wrapper adds its own clock readings and merges both into one fresh dict per step.

Keys of ``info["timing"]`` (seconds unless named ``*_tokens``; None means unknown):

- ``step_s``: wall time from handing out the observation to the end of ``step``
  (the agent's whole turn, LLM call included).
- ``env_step_s``: time spent inside the env's own ``step``.
- ``ttft_s``, ``e2e_s``, ``queue_s``, ``itl_mean_s``: the request's time to first token,
  end-to-end latency, wait before it was sent, and mean gap between streamed tokens.
- ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``: from the server's usage.

When an agent's episode ends, ``info["episode_timing"]`` holds ``steps``,
``episode_s`` (reset to end) and the sum of every key above over the episode: every
attempt at every word of a multi-turn episode (a sum of a key stays None while every
step left it unknown).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
from pettingzoo.utils.wrappers import BaseParallelWrapper

from echo_env.errors import EnvUsageError

log = logging.getLogger(__name__)

REQUEST_TIMING_KEYS = (
    "ttft_s",
    "e2e_s",
    "queue_s",
    "itl_mean_s",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
)
"""Figures the caller may supply for an action."""
TIMING_KEYS = ("step_s", "env_step_s", *REQUEST_TIMING_KEYS)
"""Every key of ``info["timing"]``."""

Number = float | int


def _check_request_timing(timing: Mapping[str, Number | None]) -> dict[str, Number | None]:
    unknown = set(timing) - set(REQUEST_TIMING_KEYS)
    if unknown:
        raise EnvUsageError(f"unknown timing key(s) {sorted(unknown)}: use {', '.join(REQUEST_TIMING_KEYS)}")
    return dict(timing)


class _EpisodeClock:
    """One agent's clocks and running totals."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.handed_out = self.started
        self.steps = 0
        self.totals: dict[str, Number | None] = {k: None for k in TIMING_KEYS}
        self.pending: dict[str, Number | None] = {}

    def record(self, env_step_s: float) -> dict[str, Any]:
        now = time.perf_counter()
        timing: dict[str, Any] = {k: None for k in REQUEST_TIMING_KEYS}
        timing.update(self.pending)
        timing["step_s"] = now - self.handed_out
        timing["env_step_s"] = env_step_s
        self.pending = {}
        self.handed_out = now
        self.steps += 1
        for key in TIMING_KEYS:
            value = timing.get(key)
            if value is not None:
                total = self.totals[key]
                self.totals[key] = value if total is None else total + value
        return timing

    def episode(self) -> dict[str, Any]:
        return {"steps": self.steps, "episode_s": time.perf_counter() - self.started, **self.totals}


class TimingWrapper(gym.Wrapper[str, str, str, str]):
    """Adds ``info["timing"]`` to every step of a Gymnasium env.

    Example:
        >>> env = TimingWrapper(gymnasium.make("EchoPrefix-v0"))
        >>> obs, info = env.reset(seed=0)
        >>> env.set_request_timing({"ttft_s": 0.07, "e2e_s": 0.2, "cached_tokens": 384})
        >>> obs, reward, terminated, truncated, info = env.step("Echo: apple")
        >>> info["timing"]["ttft_s"]
        0.07
    """

    def __init__(self, env: gym.Env[str, str]) -> None:
        super().__init__(env)
        self._clock = _EpisodeClock()

    def set_request_timing(self, timing: Mapping[str, Number | None]) -> None:
        """Give the figures of the LLM request behind the next action."""
        self._clock.pending = _check_request_timing(timing)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        obs, info = super().reset(seed=seed, options=options)
        self._clock = _EpisodeClock()
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(action)
        timing = self._clock.record(time.perf_counter() - t0)
        info = dict(info)
        info["timing"] = timing
        log.debug("step timing: %s", timing)
        if terminated or truncated:
            info["episode_timing"] = self._clock.episode()
        return obs, float(reward), terminated, truncated, info


class ParallelTimingWrapper(BaseParallelWrapper[str, str, str]):
    """Adds ``infos[agent]["timing"]`` to every step of a PettingZoo parallel env.

    Call :meth:`set_request_timings` with ``{agent: figures}`` before ``step``; agents
    without figures get None for the request keys.
    """

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self._clocks: dict[str, _EpisodeClock] = {}

    def set_request_timings(self, timings: Mapping[str, Mapping[str, Number | None]]) -> None:
        """Give the figures of the LLM request behind each agent's next action."""
        for agent, timing in timings.items():
            if agent not in self._clocks:
                raise EnvUsageError(f"timing for {agent!r}, which is not a live agent: call reset() first")
            self._clocks[agent].pending = _check_request_timing(timing)

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        obs, infos = self.env.reset(seed=seed, options=options)
        self._clocks = {agent: _EpisodeClock() for agent in obs}
        return obs, infos

    def step(
        self, actions: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]]:
        t0 = time.perf_counter()
        obs, rewards, terms, truncs, infos = self.env.step(actions)
        env_step_s = time.perf_counter() - t0
        out_infos: dict[str, dict[str, Any]] = {}
        for agent, info in infos.items():
            info = dict(info)
            clock = self._clocks.get(agent)
            if clock is not None:
                info["timing"] = clock.record(env_step_s)
                if terms.get(agent) or truncs.get(agent):
                    info["episode_timing"] = clock.episode()
                    del self._clocks[agent]
            out_infos[agent] = info
        log.debug("parallel step: %d agents, env step %.6f s", len(out_infos), env_step_s)
        return obs, rewards, terms, truncs, out_infos
