"""The echo task as a single-agent Gymnasium environment, ``EchoPrefix-v0``.

An episode asks ``turns`` words, one after another, in one conversation; each word
allows ``max_turns`` attempts. This module also holds what the PettingZoo env shares
with it: the Text spaces, the checks of a configuration, and the info dicts.
"""

from __future__ import annotations

import secrets
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from echo_env.envs.task import ECHO_PREFIX, EchoTask, Grade, Turn, grade
from echo_env.errors import ConfigError, EnvUsageError

CHARSET = frozenset(string.printable)
"""Characters of the Text spaces: printable ASCII with whitespace."""
MAX_ACTION_CHARS = 1024
"""Actions longer than this are cut to it before grading (``info["action_truncated"]``)."""
MAX_EPISODE_STEPS = 256
"""Most steps (``turns x max_turns``) an episode may take: each adds up to ~2 KB to the
observation, whose Text space must hold them all."""
_OBS_MARGIN_CHARS = 1024


def check_turns(task: EchoTask, turns: object, max_turns: object) -> None:
    """Make sure ``turns`` and ``max_turns`` are usable together with ``task``.

    Raises:
        ConfigError: Either is not a whole number of at least 1, the task has fewer distinct words
            than ``turns`` (an episode's words differ from each other), or an episode
            could take more than :data:`MAX_EPISODE_STEPS` steps.
    """
    for name, value in (("turns", turns), ("max_turns", max_turns)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    assert isinstance(turns, int) and isinstance(max_turns, int)
    distinct = len(set(task.words))
    if turns > distinct:
        raise ConfigError(
            f"turns={turns} asks {turns} different words per episode but the task has {distinct}: "
            f"lower turns to at most {distinct} or give the task more words"
        )
    if turns * max_turns > MAX_EPISODE_STEPS:
        raise ConfigError(
            f"turns={turns} x max_turns={max_turns} lets an episode run {turns * max_turns} steps, more than "
            f"{MAX_EPISODE_STEPS}; the prompt grows with every step: lower turns or max_turns"
        )


def observation_length_limit(task: EchoTask, max_turns: int, turns: int = 1) -> int:
    """A Text length that fits the longest transcript the task can produce in ``turns x max_turns`` steps."""
    longest_word = max(task.words, key=len)
    base = len(task.transcript(longest_word))
    # The longest feedback quotes the start of a reply whose characters ascii() escapes to
    # ten each (as it does emoji), so feedback can be far longer than the reply's start.
    worst = "\U0001f600" * MAX_ACTION_CHARS
    feedback = max(
        (grade(reply, longest_word).feedback for reply in (worst, ECHO_PREFIX + worst[len(ECHO_PREFIX) :])), key=len
    )
    longest_step = Turn(reply="x" * MAX_ACTION_CHARS, feedback=feedback, next_word=longest_word)
    per_step = len(task.transcript(longest_word, [longest_step])) - base
    # The observation after the last step shows every step of the episode.
    return base + turns * max_turns * per_step + _OBS_MARGIN_CHARS


def check_task(task: EchoTask) -> None:
    """Make sure the task's text fits the Text spaces (printable ASCII).

    Raises:
        ConfigError: The run tag, the system prompt or a word has other characters.
    """
    texts = [("run_tag", task.run_tag), ("system_prompt", task.system_prompt)]
    texts += [("word", w) for w in task.words]
    for what, text in texts:
        bad = "".join(sorted(set(text) - CHARSET))
        if bad:
            raise ConfigError(
                f"the {what} {text[:40]!a} has characters outside printable ASCII ({bad[:5]!a}): "
                "the envs' observations are printable ASCII, so replace them (EchoTask itself has no such limit)"
            )


def requested_word(task: EchoTask, word: object) -> str:
    """A word asked for in ``reset`` options, which must be one of the task's words.

    Raises:
        ConfigError: The word is not in ``task.words``.
    """
    if not isinstance(word, str) or word not in task.words:
        raise ConfigError(
            f"the word {word!r} is not in the task's word list: pick one of env.task.words, or make the env "
            "with task=EchoTask(words=(...)) including it"
        )
    return word


def requested_words(task: EchoTask, words: object, turns: int) -> list[str]:
    """An episode's words asked for in ``reset`` options: ``turns`` distinct words of the task.

    Raises:
        ConfigError: Not a list of ``turns`` distinct words of the task.
    """
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise ConfigError(f"the words {words!r} must be a list of {turns} words, one per turn")
    picked = [requested_word(task, w) for w in words]
    if len(picked) != turns or len(set(picked)) != turns:
        raise ConfigError(f"the words {picked!r} must be {turns} different words, one per turn (turns={turns})")
    return picked


def clip_action(action: str) -> tuple[str, bool]:
    """Cut an action to :data:`MAX_ACTION_CHARS`; say whether it was cut."""
    if len(action) > MAX_ACTION_CHARS:
        return action[:MAX_ACTION_CHARS], True
    return action, False


def printable(text: str) -> str:
    """``text`` with every character outside :data:`CHARSET` replaced by ``?``.

    Replies go back into later observations, which must stay inside the Text space.
    """
    return "".join(c if c in CHARSET else "?" for c in text)


def session_key(seed: int | None, task: EchoTask) -> str:
    """The run part of a session id: from the seed, or random when there is none.

    The run tag (when set) adds a checksum, so runs that differ only by tag do not share
    session ids.
    """
    key = f"seed{seed}" if seed is not None else f"run{secrets.token_hex(4)}"
    if task.run_tag:
        key += f"-{zlib.crc32(task.run_tag.encode()):08x}"
    return key


@dataclass
class Conversation:
    """One agent's progress through an episode: its words, its turn, its answers."""

    words: list[str]
    """The word of each turn."""
    turn: int = 0
    """The turn (index into ``words``) being asked."""
    attempt: int = 0
    """Answers given to the current turn's word so far."""
    history: list[Turn] = field(default_factory=list)
    """Every answer so far, with what the env said next."""
    done: bool = False
    """The last word has been answered for good."""

    @property
    def word(self) -> str:
        """The word being asked."""
        return self.words[self.turn]

    def answer(self, action: str, max_turns: int) -> tuple[Grade, dict[str, Any]]:
        """Grade ``action`` (already cut to the Text space) and move on.

        The word is finished when the answer is right or its ``max_turns`` attempts are
        used up; then the next word is asked, or the episode ends after the last one.

        Returns:
            The grade and the step's own info keys (``word``, ``turn``, ``attempt``,
            ``next_word``, ``next_turn``).
        """
        word, turn = self.word, self.turn
        result = grade(action, word)
        self.attempt += 1
        attempt = self.attempt
        finished = result.outcome == "correct" or attempt >= max_turns
        next_turn: int | None = turn
        if finished:
            next_turn = turn + 1 if turn + 1 < len(self.words) else None
        next_word = None if next_turn is None else self.words[next_turn]
        self.history.append(Turn(reply=printable(action), feedback=result.feedback, next_word=next_word))
        if next_turn is None:
            self.done = True
        elif finished:
            self.turn, self.attempt = next_turn, 0
        keys = {"word": word, "turn": turn, "attempt": attempt, "next_word": next_word, "next_turn": next_turn}
        return result, keys


def step_info(result: Grade, keys: dict[str, Any], truncated_action: bool) -> dict[str, Any]:
    """The info dict of a graded step (a new dict every call)."""
    return {
        **keys,
        "feedback": result.feedback,
        "outcome": result.outcome,
        "answer": result.answer,
        "reward": result.reward,
        "action_truncated": truncated_action,
    }


class EchoPrefixEnv(gym.Env[str, str]):
    """One agent asked to echo ``turns`` words, one after another, in one conversation.

    The observation is the plain-text transcript ending in ``Assistant:`` (what a base
    model completes); ``info["messages"]`` holds the same conversation as chat messages.
    The action is the model's reply. Each step grades one answer; its reward is that
    answer's grade (1.0, 0.0 or -1.0), so the episode's return is their sum.

    Turns and attempts: each word allows ``max_turns`` attempts. After a wrong answer
    with attempts left, the env gives the feedback and asks for the same word again;
    after a right answer or the last attempt, it gives the feedback and asks for the
    next word; after the last word's, it gives the feedback and the episode ends. So an
    episode takes ``turns`` to ``turns x max_turns`` steps; the defaults (one word, one
    attempt) make it one step.

    Every observation starts with the previous observation followed by the reply as
    generated (see :func:`echo_env.envs.task.transcript_reply`: characters outside
    printable ASCII show as ``?``, replies are cut to :data:`MAX_ACTION_CHARS`), which
    is what lets a server's prefix cache reuse the conversation so far. The last
    observation ends with the final feedback instead of ``Assistant:``.

    Info keys. After ``reset``: ``word`` and ``turn`` (0) asked, ``session_id``,
    ``messages``. After ``step``: the graded ``word``, its ``turn`` (0-based index of
    the word in the episode) and ``attempt`` (1-based), ``outcome``, ``reward``,
    ``feedback``, ``answer``, ``action_truncated``, ``next_word`` and ``next_turn``
    (None once the episode ended), ``session_id`` and ``messages``.

    Args:
        max_turns: Attempts per word.
        task: The task (system prompt, words, run tag); the default one if None.
        render_mode: ``"ansi"`` returns the transcript from :meth:`render`.
        turns: Words per episode, each different.

    Raises:
        ConfigError: A bad setting (see :func:`check_turns`).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self, max_turns: int = 1, task: EchoTask | None = None, render_mode: str | None = None, *, turns: int = 1
    ) -> None:
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task = task if task is not None else EchoTask()
        check_task(self.task)
        check_turns(self.task, turns, max_turns)
        self.turns = turns
        self.max_turns = max_turns
        self.render_mode = render_mode
        self.observation_space = spaces.Text(
            max_length=observation_length_limit(self.task, max_turns, turns), min_length=1, charset=CHARSET
        )
        self.action_space = spaces.Text(max_length=MAX_ACTION_CHARS, min_length=0, charset=CHARSET)
        self._conv: Conversation | None = None
        self._run = ""
        self._episode = 0

    def _conversation(self) -> Conversation:
        if self._conv is None:
            raise EnvUsageError("call reset() before reading the word")
        return self._conv

    @property
    def word(self) -> str:
        """The word being asked (after the episode's end, its last word)."""
        return self._conversation().word

    @property
    def words(self) -> list[str]:
        """The words of the current episode, one per turn."""
        return list(self._conversation().words)

    def session_id(self) -> str:
        """A key for this episode's conversation, the same at every turn.

        ``seed<seed>-ep<n>``: the seed of the last seeded reset and the episodes since
        (a random ``run<hex>`` when never seeded). Send it as a session header (e.g.
        ``X-Session-ID``) so a session-affinity router keeps the conversation on one
        replica, where its history is cached.
        """
        self._conversation()
        return f"{self._run}-ep{self._episode}"

    def _info(self) -> dict[str, Any]:
        conv = self._conversation()
        return {"session_id": self.session_id(), "messages": self.task.chat_messages(conv.words[0], conv.history)}

    def _transcript(self) -> str:
        conv = self._conversation()
        return self.task.transcript(conv.words[0], conv.history)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode.

        Args:
            seed: Seeds the words.
            options: ``{"word": "apple"}`` asks for a given first word (later ones are
                drawn); ``{"words": [...]}`` gives every turn's word (``turns`` different
                words of the task); other keys are ignored.

        Raises:
            ConfigError: A requested word is not one of the task's words, or the words
                are not ``turns`` different ones.
        """
        super().reset(seed=seed)
        if seed is not None or not self._run:
            self._run, self._episode = session_key(seed, self.task), 0
        else:
            self._episode += 1
        options = options or {}
        if options.get("words") is not None:
            words = requested_words(self.task, options["words"], self.turns)
        else:
            if options.get("word") is not None:
                first = requested_word(self.task, options["word"])
            else:
                first = self.task.sample_words(1, rng=self.np_random)[0]
            words = [first, *self.task.later_words(first, self.turns - 1, self.np_random)]
        self._conv = Conversation(words)
        return self._transcript(), {"word": words[0], "turn": 0, **self._info()}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Grade the reply; ask again, ask the next word, or end after the last word."""
        if self._conv is None:
            raise EnvUsageError("step() before reset(): call reset() to start an episode")
        if self._conv.done:
            raise EnvUsageError("step() after the episode ended: call reset() to start a new one")
        if not isinstance(action, str):
            raise EnvUsageError(f"the action must be the reply text (str), got {type(action).__name__}")
        action, cut = clip_action(action)
        result, keys = self._conv.answer(action, self.max_turns)
        info = step_info(result, keys, cut) | self._info()
        return self._transcript(), result.reward, self._conv.done, False, info

    def render(self) -> str | None:  # type: ignore[override]
        """The current transcript in ``"ansi"`` mode; nothing otherwise."""
        if self.render_mode != "ansi" or self._conv is None:
            return None
        return self._transcript()
