"""The echo task: the shared prompt, the words, the two renderings, and the grading.

A conversation asks for a word, grades the reply, answers with the feedback and the
next request (the same word again, or the next word), and so on; each turn's rendering
extends the previous turn's by the reply and the environment's answer, character for
character, which is what a server's prefix cache needs to reuse the history.

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


def _choice(rng: np.random.Generator, n: int, size: int) -> list[int]:
    """``size`` distinct indices below ``n`` drawn from ``rng``."""
    return [int(i) for i in rng.choice(n, size=size, replace=False)]


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


# Every character str.splitlines() breaks a line at ("\r\n" counts as one break).
_LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def transcript_reply(reply: str) -> str:
    """A reply as the plain-text transcript shows it: as generated, text on one line.

    The reply's trailing whitespace stays as it is: a final ``"\\n"`` (the stop string,
    when a server or a token sampler keeps it in the output, or a ``"\\n\\n"`` token)
    ends the reply's line. Every line break before the reply's last visible character
    becomes a space, so a reply cannot start a line of its own and fake a ``User:``
    turn. A reply from a server that stops at ``"\\n"`` has no such line break, so it is
    shown exactly as generated, leading space included.
    """
    body = reply.rstrip()
    return _LINE_BREAK.sub(" ", body) + reply[len(body) :]


def env_turn(feedback: str, next_word: str | None) -> str:
    """What the environment says after an answer: the feedback, then the next request if any.

    ``"Correct! Echo matched. Please echo the following word: river"``, or the feedback
    alone when the episode is over.
    """
    return feedback if next_word is None else f"{feedback} {user_turn(next_word)}"


def follow_up(reply: str, feedback: str, next_word: str | None) -> str:
    """The transcript text that follows a reply (as shown) up to the agent's next turn.

    A line break unless the reply already ends with one, then ``User:`` and
    :func:`env_turn`, then ``"\\nAssistant:"`` when a next word is asked. So the next
    prompt is the previous prompt, the reply, and this text, character for character.
    """
    sep = "" if reply.endswith("\n") else "\n"
    text = f"{sep}User: {env_turn(feedback, next_word)}"
    return text if next_word is None else text + "\nAssistant:"


@dataclass(frozen=True)
class Turn:
    """One answered request of an episode, and what the environment said next."""

    reply: str
    """What the agent answered, as generated (an env keeps it cut to its Text space)."""
    feedback: str
    """The grade's feedback."""
    next_word: str | None
    """The word asked next (the same word for a retry, the next one after a finished word);
    None when the episode ended with this answer."""


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
            picks.extend(self.words[i] for i in _choice(gen, len(self.words), take))
        return picks

    def chat_messages(self, word: str, history: Sequence[Turn] = ()) -> list[ChatMessage]:
        """The conversation as chat messages, for ``/v1/chat/completions``.

        The system prompt, the request for ``word``, then for each earlier answer the
        assistant's reply (as given) and a user message with :func:`env_turn` (the
        feedback, then the next request if any). Each turn's messages extend the
        previous turn's.
        """
        messages: list[ChatMessage] = [
            {"role": "system", "content": self.system_text},
            {"role": "user", "content": user_turn(word)},
        ]
        for turn in history:
            messages.append({"role": "assistant", "content": turn.reply})
            messages.append({"role": "user", "content": env_turn(turn.feedback, turn.next_word)})
        return messages

    def transcript(self, word: str, history: Sequence[Turn] = ()) -> str:
        """The conversation as one plain-text prompt ending in ``Assistant:``.

        This is the form a base model follows (the system prompt's worked examples use
        it), for ``/v1/completions``. Each earlier answer appears right after its
        ``Assistant:`` as :func:`transcript_reply` shows it, followed by
        :func:`follow_up`; so a turn's prompt starts with the previous turn's prompt
        plus the reply as generated. After the last answer of an episode the text ends
        with the final feedback instead of ``Assistant:``.
        """
        text = f"{self.system_text}\n\nUser: {user_turn(word)}\nAssistant:"
        for turn in history:
            shown = transcript_reply(turn.reply)
            text += shown + follow_up(shown, turn.feedback, turn.next_word)
        return text

    def later_words(self, first: str, count: int, rng: np.random.Generator) -> list[str]:
        """``count`` distinct words other than ``first``, for an episode's later turns.

        Draws nothing when ``count`` is 0, so an episode of one turn leaves ``rng`` as it was.

        Raises:
            ConfigError: The task has fewer than ``count`` other distinct words.
        """
        if count <= 0:
            return []
        others = [w for w in dict.fromkeys(self.words) if w != first]
        if count > len(others):
            raise ConfigError(
                f"{count + 1} turns need {count + 1} distinct words and the task has {len(others) + 1}: "
                "lower turns or add words"
            )
        idx = _choice(rng, len(others), count)
        return [others[i] for i in idx]

    def episode_words(
        self, groups: int, turns: int, seed: int | None = None, *, rng: np.random.Generator | None = None
    ) -> list[list[str]]:
        """Each group's words, one per turn, distinct within a group, from a seed.

        The first words are :meth:`sample_words` of the same seed (distinct across groups
        while the list lasts), so a one-turn episode asks exactly those; the later words
        are drawn after them.

        Args:
            groups: How many groups.
            turns: Words per group.
            seed: Seed for a fresh generator (ignored when ``rng`` is given).
            rng: A generator to draw from.

        Returns:
            ``groups`` lists of ``turns`` words.
        """
        gen = rng if rng is not None else np.random.default_rng(seed)
        firsts = self.sample_words(groups, rng=gen)
        return [[first, *self.later_words(first, turns - 1, gen)] for first in firsts]

    def shared_text(self) -> str:
        """The text every transcript of this run starts with (up to the word)."""
        return self.transcript("\x00").split("\x00", 1)[0]
