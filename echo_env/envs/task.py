"""The echo task: the shared prompt, the words, the two renderings, and the grading.

Everything here is pure (the only I/O is reading the package's data files once), so the
environments, the rollout worker and the prefix-cache test all agree on what an agent
sees and how an answer scores.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import numpy as np

from echo_env.errors import ConfigError

Outcome = Literal["correct", "wrong_word", "format_error"]
"""How an answer was graded."""

ChatMessage = dict[str, str]
"""One OpenAI-style chat message: ``{"role": ..., "content": ...}``."""

ECHO_PREFIX = "Echo: "
"""What every well-formed answer starts with."""

CORRECT_FEEDBACK = "Correct! Echo matched."
"""What the environment says to a correct answer (the recipe's wording)."""

REWARD_CORRECT = 1.0
REWARD_WRONG_WORD = 0.0
REWARD_FORMAT_ERROR = -1.0

# End-of-turn markers that chat templates and base models leave at the end of a reply.
_END_OF_TURN = re.compile(
    r"(?:\s*(?:<end_of_turn>|<eos>|</s>|<\|im_end\|>|<\|eot_id\|>|<\|endoftext\|>|<\|end\|>))+\s*\Z"
)
_FEEDBACK_PREVIEW_CHARS = 60


@functools.cache
def default_system_prompt() -> str:
    """The shared ~2 KB system prompt shipped as ``echo_env/data/system_prompt.txt``."""
    text = resources.files("echo_env").joinpath("data/system_prompt.txt").read_text("utf-8")
    return text.rstrip("\n")


@functools.cache
def default_words() -> tuple[str, ...]:
    """The word list shipped as ``echo_env/data/words.txt`` (distinct, lowercase)."""
    text = resources.files("echo_env").joinpath("data/words.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def user_turn(word: str) -> str:
    """The user's request for ``word``: ``Please echo the following word: {word}``."""
    return f"Please echo the following word: {word}"


def worked_example(word: str) -> str:
    """One worked example in the system prompt's form (``User: ...`` then ``Assistant: Echo: word``)."""
    return f"User: {user_turn(word)}\nAssistant: {ECHO_PREFIX}{word}"


_WORKED_EXAMPLE = re.compile(r"User: Please echo the following word: (\S+)\nAssistant: Echo: (\S+)")


def find_worked_examples(system_prompt: str) -> list[tuple[int, int, str]]:
    """The worked examples in a system prompt, as ``(start, end, word)`` character spans.

    Only well-formed examples count (the echoed word equals the requested one), so text
    that merely mentions the form is left alone by :func:`with_examples`.
    """
    return [
        (m.start(), m.end(), m.group(1)) for m in _WORKED_EXAMPLE.finditer(system_prompt) if m.group(1) == m.group(2)
    ]


def with_examples(system_prompt: str, keep: int, extra_words: Sequence[str] = ()) -> str:
    """The system prompt with only its first ``keep`` worked examples, then ``extra_words`` added as examples.

    Text before the first example and after the last one stays as it is; added examples
    follow the last kept one, separated by a blank line as the shipped prompt does. With
    ``keep`` equal to the number of examples and no extra words the prompt is unchanged.

    Raises:
        ConfigError: The prompt has no worked examples, or ``keep`` is out of range.
    """
    spans = find_worked_examples(system_prompt)
    if not spans:
        raise ConfigError(
            "the system prompt has no worked examples ('User: Please echo the following word: w' then "
            "'Assistant: Echo: w') to pad or trim"
        )
    if not 1 <= keep <= len(spans):
        raise ConfigError(f"keep={keep} worked examples: the prompt has {len(spans)}, keep 1 to {len(spans)}")
    cut = spans[keep - 1][1]
    added = "".join(f"\n\n{worked_example(w)}" for w in extra_words)
    return system_prompt[:cut] + added + system_prompt[spans[-1][1] :]


@dataclass(frozen=True)
class Grade:
    """The result of grading one answer."""

    reward: float
    """1.0 correct, 0.0 wrong word, -1.0 format error."""
    outcome: Outcome
    """Which of the three rules applied."""
    feedback: str
    """What the environment says back to the agent."""
    answer: str | None
    """The text after ``Echo: `` when the form was right, else None."""


def _preview(text: str) -> str:
    # ascii() escapes control and non-ASCII characters, so feedback stays printable.
    if len(text) <= _FEEDBACK_PREVIEW_CHARS:
        return ascii(text)
    return ascii(text[:_FEEDBACK_PREVIEW_CHARS]) + f"... ({len(text)} characters)"


def strip_answer(completion: str) -> str:
    """Remove surrounding whitespace and any trailing end-of-turn markers."""
    return _END_OF_TURN.sub("", completion).strip()


def grade(completion: str, word: str) -> Grade:
    """Grade one completion against the requested word.

    The rules, applied in order to the completion after :func:`strip_answer` (surrounding
    whitespace and trailing end-of-turn markers such as ``<end_of_turn>`` removed):

    1. Empty, or more than one line (any ``\\n`` or ``\\r`` left inside): format error.
    2. Not starting with exactly ``Echo: `` (capital E, colon, one space): format error.
       So ``echo: apple``, ``Echo:apple`` and ``Sure! Echo: apple`` are format errors.
    3. The rest (the answer) equal to ``word``, character for character: correct.
    4. Any other answer: wrong word. Case counts (``Echo: Apple``), and so do extra
       spaces (``Echo:  apple``), punctuation (``Echo: apple.``) and repeats
       (``Echo: Echo: apple``).

    Args:
        completion: The model's reply, as generated.
        word: The word the agent was asked to echo.

    Returns:
        The reward (1.0, 0.0 or -1.0), the outcome, the feedback and the parsed answer.
    """
    text = strip_answer(completion)
    expected = f"{ECHO_PREFIX}{word}"
    if not text:
        reason = "an empty reply"
    elif "\n" in text or "\r" in text:
        reason = "several lines"
    elif not text.startswith(ECHO_PREFIX):
        reason = f"no 'Echo: ' prefix in {_preview(text)}"
    else:
        answer = text[len(ECHO_PREFIX) :]
        if answer == word:
            return Grade(REWARD_CORRECT, "correct", CORRECT_FEEDBACK, answer)
        feedback = f"Incorrect. Expected '{expected}' but the echoed word was {_preview(answer)}."
        return Grade(REWARD_WRONG_WORD, "wrong_word", feedback, answer)
    feedback = f"Format error: reply with the single line '{expected}'; got {reason}."
    return Grade(REWARD_FORMAT_ERROR, "format_error", feedback, None)


@dataclass(frozen=True)
class Turn:
    """One earlier attempt in a multi-turn episode."""

    reply: str
    """What the agent answered."""
    feedback: str
    """What the environment said back."""


@dataclass(frozen=True)
class EchoTask:
    """The echo task as configured for one run.

    Everything before the word is the same for every agent of a run: the optional run
    tag, then the system prompt, then the fixed start of the user turn.
    """

    system_prompt: str = field(default_factory=default_system_prompt)
    """The shared text every agent sees first."""
    words: tuple[str, ...] = field(default_factory=default_words)
    """The words agents are asked to echo."""
    run_tag: str = ""
    """Text put at the very start of the system prompt to make a run's prefix new."""

    def __post_init__(self) -> None:
        if not self.system_prompt.strip():
            raise ConfigError("system_prompt is empty: give the shared text every agent sees")
        if not self.words:
            raise ConfigError("the word list is empty: give at least one word")
        bad = [w for w in self.words if not w or w != w.strip() or "\n" in w]
        if bad:
            raise ConfigError(f"words must be single non-blank tokens without spaces at the ends: {bad[:3]}")

    @property
    def system_text(self) -> str:
        """The system prompt with the run tag in front (if any)."""
        return f"{self.run_tag}\n{self.system_prompt}" if self.run_tag else self.system_prompt

    def sample_words(self, n: int, seed: int | None = None, *, rng: np.random.Generator | None = None) -> list[str]:
        """Pick ``n`` words, distinct while the list lasts, deterministically from a seed.

        Args:
            n: How many words.
            seed: Seed for a fresh generator (ignored when ``rng`` is given).
            rng: A generator to draw from, such as a Gymnasium env's ``np_random``.

        Returns:
            The words, in order.
        """
        if n < 0:
            raise ConfigError(f"cannot sample {n} words: ask for zero or more")
        gen = rng if rng is not None else np.random.default_rng(seed)
        picks: list[str] = []
        while len(picks) < n:
            take = min(n - len(picks), len(self.words))
            idx = gen.choice(len(self.words), size=take, replace=False)
            picks.extend(self.words[int(i)] for i in idx)
        return picks

    def chat_messages(self, word: str, history: Sequence[Turn] = ()) -> list[ChatMessage]:
        """The conversation as chat messages, for ``/v1/chat/completions``.

        Earlier attempts (``history``) appear as assistant replies followed by the
        feedback, which is prepended to the repeated request.
        """
        messages: list[ChatMessage] = [
            {"role": "system", "content": self.system_text},
        ]
        request = user_turn(word)
        messages.append({"role": "user", "content": request})
        for turn in history:
            messages.append({"role": "assistant", "content": strip_answer(turn.reply)})
            messages.append({"role": "user", "content": f"{turn.feedback} {request}"})
        return messages

    def transcript(self, word: str, history: Sequence[Turn] = ()) -> str:
        """The conversation as one plain-text prompt ending in ``Assistant:``.

        This is the form a base model follows (the system prompt's worked examples use
        it), for ``/v1/completions``.
        """
        parts = [self.system_text, "", f"User: {user_turn(word)}"]
        for turn in history:
            # Every kind of line break (\r too), so a reply cannot start a line of its own.
            reply = " ".join(strip_answer(turn.reply).splitlines())
            parts.append(f"Assistant: {reply}")
            parts.append(f"User: {turn.feedback} {user_turn(word)}")
        return "\n".join(parts) + "\nAssistant:"

    def shared_text(self) -> str:
        """The text every transcript of this run starts with (up to the word)."""
        return self.transcript("\x00").split("\x00", 1)[0]
