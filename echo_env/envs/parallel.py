"""The echo task as a PettingZoo parallel environment: many agents, one shared prefix.

``batch_size`` groups of ``group_size`` agents. Every agent of a run sees the same
system prompt; the agents of a group are also asked for the same word, so their whole
prompts are identical (the recipe's ``EnvGroupBuilder`` groups).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils import parallel_to_aec, wrappers
from pettingzoo.utils.env import AECEnv

from echo_env.envs.gym_env import (
    CHARSET,
    MAX_ACTION_CHARS,
    check_task,
    clip_action,
    observation_length_limit,
    printable,
    requested_word,
    step_info,
)
from echo_env.errors import ConfigError, EnvUsageError
from echo_env.envs.task import EchoTask, Turn, grade

AgentID = str
_AGENT_RE = re.compile(r"^group(\d+)_agent(\d+)$")


def agent_id(group: int, index: int) -> AgentID:
    """The id of agent ``index`` of group ``group``: ``group3_agent5``."""
    return f"group{group}_agent{index}"


def agent_group(agent: AgentID) -> int:
    """The group an agent id belongs to."""
    match = _AGENT_RE.match(agent)
    if match is None:
        raise EnvUsageError(f"{agent!r} is not an agent id of this env (expected e.g. 'group0_agent0')")
    return int(match.group(1))


class EchoPrefixParallelEnv(ParallelEnv[AgentID, str, str]):
    """``batch_size x group_size`` agents that share one prefix.

    Observations are plain-text transcripts ending in ``Assistant:``; ``infos[agent]``
    carries the chat messages too. An agent is done when it answers correctly or uses up
    ``max_turns``; it then leaves ``agents``.

    Args:
        batch_size: Distinct prompts (groups) per episode.
        group_size: Agents per prompt; all of a group get the same word.
        max_turns: Attempts per agent.
        task: The task (system prompt, words, run tag); the default one if None.
        render_mode: ``"ansi"`` returns a one-line-per-agent summary from :meth:`render`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1, "name": "echo_prefix_v0", "is_parallelizable": True}

    def __init__(
        self,
        batch_size: int = 16,
        group_size: int = 8,
        max_turns: int = 1,
        task: EchoTask | None = None,
        render_mode: str | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("group_size", group_size), ("max_turns", max_turns)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.batch_size = batch_size
        self.group_size = group_size
        self.max_turns = max_turns
        self.task = task if task is not None else EchoTask()
        check_task(self.task)
        self.render_mode = render_mode
        self.possible_agents = [agent_id(g, i) for g in range(batch_size) for i in range(group_size)]
        self.agents: list[AgentID] = []
        self._obs_len = observation_length_limit(self.task, max_turns)
        self._words: list[str] = []
        self._history: dict[AgentID, list[Turn]] = {}
        self._rng_seed: int | None = None
        self._episodes = 0

    @functools.cache  # noqa: B019 - one space per agent, as PettingZoo expects
    def observation_space(self, agent: AgentID) -> spaces.Space[str]:
        return spaces.Text(max_length=self._obs_len, min_length=1, charset=CHARSET)

    @functools.cache  # noqa: B019
    def action_space(self, agent: AgentID) -> spaces.Space[str]:
        return spaces.Text(max_length=MAX_ACTION_CHARS, min_length=0, charset=CHARSET)

    @property
    def words(self) -> list[str]:
        """The word of each group in this episode."""
        return list(self._words)

    def word_of(self, agent: AgentID) -> str:
        """The word ``agent`` is asked to echo."""
        if not self._words:
            raise EnvUsageError("call reset() before asking for words")
        return self._words[agent_group(agent)]

    def _obs(self, agent: AgentID) -> str:
        return self.task.transcript(self.word_of(agent), self._history[agent])

    def _reset_info(self, agent: AgentID) -> dict[str, Any]:
        word = self.word_of(agent)
        return {
            "word": word,
            "group": agent_group(agent),
            "turn": 0,
            "messages": self.task.chat_messages(word, self._history[agent]),
        }

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[AgentID, str], dict[AgentID, dict[str, Any]]]:
        """Start an episode: pick one word per group.

        Args:
            seed: Seeds the word choice. Without one, each reset draws new words from the
                generator seeded by the last seed given.
            options: ``{"words": [...]}`` gives the groups' words (one per group, each one
                of the task's words); other keys are ignored.

        Raises:
            ConfigError: ``options["words"]`` has the wrong length or a word not in the task.
        """
        # Other keys are ignored: PettingZoo's own API test passes options of its own.
        options = options or {}
        if "words" in options:
            words = [requested_word(self.task, w) for w in options["words"]]
            if len(words) != self.batch_size:
                raise ConfigError(f"options['words'] needs one word per group: {self.batch_size}, got {len(words)}")
        else:
            if seed is not None:
                self._rng_seed = seed
                self._episodes = 0
            base = self._rng_seed
            episode_seed = None if base is None else base + self._episodes
            words = self.task.sample_words(self.batch_size, seed=episode_seed)
        self._episodes += 1
        self._words = words
        self.agents = list(self.possible_agents)
        self._history = {a: [] for a in self.agents}
        return {a: self._obs(a) for a in self.agents}, {a: self._reset_info(a) for a in self.agents}

    def step(
        self, actions: dict[AgentID, str]
    ) -> tuple[
        dict[AgentID, str],
        dict[AgentID, float],
        dict[AgentID, bool],
        dict[AgentID, bool],
        dict[AgentID, dict[str, Any]],
    ]:
        """Grade one reply from every live agent.

        Raises:
            EnvUsageError: before reset, for actions of unknown or finished agents, or
                when a live agent has no action.
        """
        if not self._words:
            raise EnvUsageError("step() before reset(): call reset() to start an episode")
        live = set(self.agents)
        extra = [a for a in actions if a not in live]
        if extra:
            kind = "finished" if all(a in self.possible_agents for a in extra) else "unknown"
            raise EnvUsageError(f"actions for {kind} agents {extra[:4]}: send actions only for env.agents")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise EnvUsageError(f"no action for live agents {missing[:4]}: every agent in env.agents must act")
        # Check every action before grading any, so a refused step changes nothing.
        for agent in self.agents:
            if not isinstance(actions[agent], str):
                kind = type(actions[agent]).__name__
                raise EnvUsageError(f"the action of {agent} must be the reply text (str), got {kind}")
        obs, rewards, terms, truncs, infos = {}, {}, {}, {}, {}
        for agent in self.agents:
            action, cut = clip_action(actions[agent])
            word = self.word_of(agent)
            result = grade(action, word)
            history = self._history[agent]
            history.append(Turn(reply=printable(action), feedback=result.feedback))
            obs[agent] = self._obs(agent)
            rewards[agent] = result.reward
            terms[agent] = result.outcome == "correct" or len(history) >= self.max_turns
            truncs[agent] = False
            infos[agent] = step_info(word, len(history), result, cut) | {"group": agent_group(agent)}
        self.agents = [a for a in self.agents if not terms[a]]
        return obs, rewards, terms, truncs, infos

    def render(self) -> str | None:
        """One line per group in ``"ansi"`` mode: its word and how many agents are left."""
        if self.render_mode != "ansi" or not self._words:
            return None
        live = [agent_group(a) for a in self.agents]
        return "\n".join(f"group {g}: {w!r}, {live.count(g)} live" for g, w in enumerate(self._words))

    def state(self) -> str:
        """The groups' words joined by spaces (a compact global state)."""
        return " ".join(self._words)

    def close(self) -> None:
        pass


def parallel_env(**kwargs: Any) -> EchoPrefixParallelEnv:
    """Make the parallel env; keyword arguments as :class:`EchoPrefixParallelEnv`."""
    return EchoPrefixParallelEnv(**kwargs)


def raw_env(**kwargs: Any) -> AECEnv[AgentID, str, str]:
    """The same env in PettingZoo's turn-based (AEC) form, through ``parallel_to_aec``."""
    return parallel_to_aec(parallel_env(**kwargs))


def env(**kwargs: Any) -> AECEnv[AgentID, str, str]:
    """The AEC env with PettingZoo's usual order-enforcing wrapper."""
    return wrappers.OrderEnforcingWrapper(raw_env(**kwargs))
