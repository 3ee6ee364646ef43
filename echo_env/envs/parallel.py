"""The echo task as a PettingZoo parallel environment: many agents, one shared prefix.

``batch_size`` groups of ``group_size`` agents. Every agent of a run sees the same
system prompt; the agents of a group are also asked for the same words, turn by turn,
so their prompts are identical until their answers differ (the recipe's
``EnvGroupBuilder`` groups).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.utils import parallel_to_aec, wrappers
from pettingzoo.utils.env import AECEnv

from echo_env.envs.gym_env import (
    CHARSET,
    MAX_ACTION_CHARS,
    Conversation,
    check_task,
    check_turns,
    clip_action,
    observation_length_limit,
    requested_word,
    requested_words,
    session_key,
    step_info,
)
from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError, EnvUsageError

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
    """``batch_size x group_size`` agents that share one prefix, each in its own conversation.

    Each agent's episode is :class:`~echo_env.envs.gym_env.EchoPrefixEnv`'s: ``turns``
    words, one after another, each allowing ``max_turns`` attempts; every agent of a
    group is asked the same word at each turn (all drawn from the seed, different from
    each other within an episode). Observations are plain-text transcripts ending in
    ``Assistant:``, each extending the agent's previous one by its reply as generated;
    ``infos[agent]`` carries the chat messages, the ``session_id`` and the grading (the
    keys of ``EchoPrefixEnv``, plus ``group``). An agent is done after its last word's
    last answer; it then leaves ``agents``.

    Args:
        batch_size: Distinct prompts (groups) per episode.
        group_size: Agents per prompt; all of a group get the same words.
        max_turns: Attempts per word.
        task: The task (system prompt, words, run tag); the default one if None.
        render_mode: ``"ansi"`` returns a one-line-per-group summary from :meth:`render`.
        turns: Words per episode, each different.

    Raises:
        ConfigError: A bad setting (see :func:`~echo_env.envs.gym_env.check_turns`).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1, "name": "echo_prefix_v0", "is_parallelizable": True}

    def __init__(
        self,
        batch_size: int = 16,
        group_size: int = 8,
        max_turns: int = 1,
        task: EchoTask | None = None,
        render_mode: str | None = None,
        *,
        turns: int = 1,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("group_size", group_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task = task if task is not None else EchoTask()
        check_task(self.task)
        check_turns(self.task, turns, max_turns)
        self.batch_size = batch_size
        self.group_size = group_size
        self.max_turns = max_turns
        self.turns = turns
        self.render_mode = render_mode
        self.possible_agents = [agent_id(g, i) for g in range(batch_size) for i in range(group_size)]
        self.agents: list[AgentID] = []
        self._obs_len = observation_length_limit(self.task, max_turns, turns)
        self._group_words: list[list[str]] = []
        self._convs: dict[AgentID, Conversation] = {}
        self._rng_seed: int | None = None
        self._episodes = 0
        self._run = ""

    @functools.cache  # noqa: B019 - one space per agent, as PettingZoo expects
    def observation_space(self, agent: AgentID) -> spaces.Space[str]:
        return spaces.Text(max_length=self._obs_len, min_length=1, charset=CHARSET)

    @functools.cache  # noqa: B019
    def action_space(self, agent: AgentID) -> spaces.Space[str]:
        return spaces.Text(max_length=MAX_ACTION_CHARS, min_length=0, charset=CHARSET)

    @property
    def words(self) -> list[str]:
        """The first word of each group in this episode."""
        return [ws[0] for ws in self._group_words]

    @property
    def episode_words(self) -> list[list[str]]:
        """Each group's words in this episode, one per turn."""
        return [list(ws) for ws in self._group_words]

    def _conv(self, agent: AgentID) -> Conversation:
        if not self._group_words:
            raise EnvUsageError("call reset() before asking for words or sessions")
        conv = self._convs.get(agent)
        if conv is None:
            raise EnvUsageError(f"{agent!r} is not an agent of this env: use one of env.possible_agents")
        return conv

    def word_of(self, agent: AgentID) -> str:
        """The word ``agent`` is asked to echo now (after its last answer, its last word)."""
        return self._conv(agent).word

    def turn_of(self, agent: AgentID) -> int:
        """The turn (0-based index of the word in the episode) ``agent`` is at."""
        return self._conv(agent).turn

    def session_id(self, agent: AgentID) -> str:
        """A key for ``agent``'s conversation in this episode, the same at every turn.

        ``seed<seed>-ep<n>-<agent>``: the seed of the last seeded reset, the episodes
        since, and the agent id (a random ``run<hex>`` stands for the seed when none was
        given; a run tag adds its checksum). Send it as a session header (e.g.
        ``X-Session-ID``) so a session-affinity router keeps the agent's turns on one
        replica, where its history is cached.
        """
        self._conv(agent)
        return f"{self._run}-ep{self._episodes - 1}-{agent}"

    def _obs(self, agent: AgentID) -> str:
        conv = self._convs[agent]
        return self.task.transcript(conv.words[0], conv.history)

    def _common_info(self, agent: AgentID) -> dict[str, Any]:
        conv = self._convs[agent]
        return {
            "group": agent_group(agent),
            "session_id": self.session_id(agent),
            "messages": self.task.chat_messages(conv.words[0], conv.history),
        }

    def _requested(self, words: object) -> list[list[str]]:
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise ConfigError(f"options['words'] must be a list with one entry per group, got {words!r}")
        if len(words) != self.batch_size:
            raise ConfigError(f"options['words'] needs one word per group: {self.batch_size}, got {len(words)}")
        out: list[list[str]] = []
        for entry in words:
            if isinstance(entry, str) and self.turns > 1:
                raise ConfigError(
                    f"options['words'] entry {entry!r}: with turns={self.turns} give each group a list of "
                    f"{self.turns} different words"
                )
            if isinstance(entry, str):
                out.append([requested_word(self.task, entry)])
            else:
                out.append(requested_words(self.task, entry, self.turns))
        return out

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[AgentID, str], dict[AgentID, dict[str, Any]]]:
        """Start an episode: pick each group's words.

        Args:
            seed: Seeds the words. Without one, each reset draws new words from the
                generator seeded by the last seed given.
            options: ``{"words": [...]}`` gives the groups' words: one entry per group,
                a word when ``turns`` is 1, else a list of ``turns`` different words
                (each one of the task's words); other keys are ignored.

        Raises:
            ConfigError: ``options["words"]`` has the wrong length or a word not in the task.
        """
        # Other keys are ignored: PettingZoo's own API test passes options of its own.
        options = options or {}
        if seed is not None or not self._run:
            self._run = session_key(seed, self.task)
        if seed is not None:
            self._rng_seed = seed
            self._episodes = 0
        if "words" in options:
            group_words = self._requested(options["words"])
        else:
            base = self._rng_seed
            episode_seed = None if base is None else base + self._episodes
            group_words = self.task.episode_words(self.batch_size, self.turns, rng=np.random.default_rng(episode_seed))
        self._episodes += 1
        self._group_words = group_words
        self.agents = list(self.possible_agents)
        self._convs = {a: Conversation(list(group_words[agent_group(a)])) for a in self.agents}
        observations = {a: self._obs(a) for a in self.agents}
        infos = {a: {"word": self.word_of(a), "turn": 0, **self._common_info(a)} for a in self.agents}
        return observations, infos

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
        if not self._group_words:
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
            conv = self._convs[agent]
            result, keys = conv.answer(action, self.max_turns)
            obs[agent] = self._obs(agent)
            rewards[agent] = result.reward
            terms[agent] = conv.done
            truncs[agent] = False
            infos[agent] = step_info(result, keys, cut) | self._common_info(agent)
        self.agents = [a for a in self.agents if not terms[a]]
        return obs, rewards, terms, truncs, infos

    def render(self) -> str | None:
        """One line per group in ``"ansi"`` mode: its words and how many agents are left."""
        if self.render_mode != "ansi" or not self._group_words:
            return None
        live = [agent_group(a) for a in self.agents]
        lines = []
        for g, ws in enumerate(self._group_words):
            lines.append(f"group {g}: {' '.join(repr(w) for w in ws)}, {live.count(g)} live")
        return "\n".join(lines)

    def state(self) -> str:
        """The groups' words joined by spaces, a group's turns by ``/`` (a compact global state)."""
        return " ".join("/".join(ws) for ws in self._group_words)

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
