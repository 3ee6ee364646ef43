"""The echo task as a single-agent Gymnasium environment, ``EchoPrefix-v0``."""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from echo_env.errors import ConfigError, EnvUsageError
from echo_env.envs.task import ECHO_PREFIX, EchoTask, Grade, Turn, grade

CHARSET = frozenset(string.printable)
"""Characters of the Text spaces: printable ASCII with whitespace."""
MAX_ACTION_CHARS = 1024
"""Actions longer than this are cut to it before grading (``info["action_truncated"]``)."""
_OBS_MARGIN_CHARS = 1024


def observation_length_limit(task: EchoTask, max_turns: int) -> int:
    """A Text length that fits the longest transcript the task can produce."""
    longest_word = max(task.words, key=len)
    base = len(task.transcript(longest_word))
    # The longest feedback quotes the start of a reply whose characters ascii() escapes to
    # ten each (as it does emoji), so feedback can be far longer than the reply's start.
    worst = "\U0001f600" * MAX_ACTION_CHARS
    feedback = max(
        (grade(reply, longest_word).feedback for reply in (worst, ECHO_PREFIX + worst[len(ECHO_PREFIX) :])), key=len
    )
    longest_turn = Turn(reply="x" * MAX_ACTION_CHARS, feedback=feedback)
    per_turn = len(task.transcript(longest_word, [longest_turn])) - base
    # The observation after the last step shows every turn of the episode.
    return base + max_turns * per_turn + _OBS_MARGIN_CHARS


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


def step_info(word: str, turn: int, result: Grade, truncated_action: bool) -> dict[str, Any]:
    """The info dict of a graded step (a new dict every call)."""
    return {
        "word": word,
        "turn": turn,
        "feedback": result.feedback,
        "outcome": result.outcome,
        "answer": result.answer,
        "action_truncated": truncated_action,
    }


class EchoPrefixEnv(gym.Env[str, str]):
    """One agent asked to echo one word.

    The observation is the plain-text transcript ending in ``Assistant:`` (what a base
    model completes); ``info["messages"]`` holds the same conversation as chat messages.
    The action is the model's reply. One step per episode by default; with
    ``max_turns > 1`` a wrong answer gets the feedback and another try.

    Args:
        max_turns: Attempts per episode.
        task: The task (system prompt, words, run tag); the default one if None.
        render_mode: ``"ansi"`` returns the transcript from :meth:`render`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, max_turns: int = 1, task: EchoTask | None = None, render_mode: str | None = None) -> None:
        if max_turns < 1:
            raise ConfigError(f"max_turns must be at least 1, got {max_turns}")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task = task if task is not None else EchoTask()
        check_task(self.task)
        self.max_turns = max_turns
        self.render_mode = render_mode
        self.observation_space = spaces.Text(
            max_length=observation_length_limit(self.task, max_turns), min_length=1, charset=CHARSET
        )
        self.action_space = spaces.Text(max_length=MAX_ACTION_CHARS, min_length=0, charset=CHARSET)
        self._word: str | None = None
        self._history: list[Turn] = []
        self._done = False

    @property
    def word(self) -> str:
        """The word of the current episode."""
        if self._word is None:
            raise EnvUsageError("call reset() before reading the word")
        return self._word

    def _observation(self) -> tuple[str, dict[str, Any]]:
        obs = self.task.transcript(self.word, self._history)
        info = {
            "word": self.word,
            "turn": len(self._history),
            "messages": self.task.chat_messages(self.word, self._history),
        }
        return obs, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode.

        Args:
            seed: Seeds the word choice.
            options: ``{"word": "apple"}`` asks for a given word (one of the task's words);
                other keys are ignored.

        Raises:
            ConfigError: The requested word is not one of the task's words.
        """
        super().reset(seed=seed)
        options = options or {}
        if options.get("word") is not None:
            self._word = requested_word(self.task, options["word"])
        else:
            self._word = self.task.sample_words(1, rng=self.np_random)[0]
        self._history = []
        self._done = False
        return self._observation()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Grade the reply; the episode ends when it is right or the turns are used up."""
        if self._word is None:
            raise EnvUsageError("step() before reset(): call reset() to start an episode")
        if self._done:
            raise EnvUsageError("step() after the episode ended: call reset() to start a new one")
        if not isinstance(action, str):
            raise EnvUsageError(f"the action must be the reply text (str), got {type(action).__name__}")
        action, cut = clip_action(action)
        result = grade(action, self._word)
        turn = len(self._history) + 1
        self._done = result.outcome == "correct" or turn >= self.max_turns
        self._history.append(Turn(reply=printable(action), feedback=result.feedback))
        obs, _ = self._observation()
        info = step_info(self._word, turn, result, cut)
        return obs, result.reward, self._done, False, info

    def render(self) -> str | None:  # type: ignore[override]
        """The current transcript in ``"ansi"`` mode; nothing otherwise."""
        if self.render_mode != "ansi" or self._word is None:
            return None
        return self.task.transcript(self._word, self._history)
