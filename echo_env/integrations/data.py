"""The echo task as dataset rows and graded batches: what every RL-library adapter shares.

Pure functions over :mod:`echo_env.envs.task`: a row holds the prompt an agent sees and the
word it must echo, and a batch of completions is graded with the env's own rules, so
every library scores an answer exactly as :class:`~echo_env.envs.gym_env.EchoPrefixEnv` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from echo_env.envs.task import EchoTask, Grade, grade
from echo_env.errors import ConfigError

PromptStyle = Literal["transcript", "chat"]
"""``transcript``: the plain text ending in ``Assistant:`` (what a base model completes);
``chat``: the same conversation as chat messages."""

OUTCOMES = ("correct", "wrong_word", "format_error")
"""The three ways an answer is graded, in the order metrics report them."""


def echo_rows(
    num_prompts: int,
    seed: int = 0,
    task: EchoTask | None = None,
    prompt_style: PromptStyle = "transcript",
) -> list[dict[str, Any]]:
    """One row per prompt: ``{"prompt": ..., "word": ...}``, every prompt sharing the prefix.

    Words are drawn without repeats while the word list lasts, deterministically from
    ``seed``; a group (GRPO's G completions of one prompt) comes from repeating a row,
    which the trainers do themselves.

    Args:
        num_prompts: How many rows.
        seed: Seeds the word choice.
        task: The task (system prompt, words, run tag); the default one if None.
        prompt_style: ``transcript`` (plain text) or ``chat`` (messages).

    Returns:
        The rows.

    Raises:
        ConfigError: ``num_prompts`` is below 1 or ``prompt_style`` is unknown.
    """
    if num_prompts < 1:
        raise ConfigError(f"num_prompts must be at least 1, got {num_prompts}")
    if prompt_style not in ("transcript", "chat"):
        raise ConfigError(f"prompt_style={prompt_style!r}: use transcript or chat")
    task = task if task is not None else EchoTask()
    rows: list[dict[str, Any]] = []
    for word in task.sample_words(num_prompts, seed=seed):
        prompt: str | list[dict[str, str]] = (
            task.transcript(word) if prompt_style == "transcript" else task.chat_messages(word)
        )
        rows.append({"prompt": prompt, "word": word})
    return rows


def completion_text(completion: Any) -> str:
    """The reply text of a completion as libraries hand it over.

    Args:
        completion: A string, or chat messages (the last assistant message is the reply),
            or one message dict.

    Returns:
        The text ('' when there is none).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                content = message.get("content")
                return content if isinstance(content, str) else ""
    return ""


def grade_batch(completions: Sequence[Any], words: Sequence[str]) -> list[Grade]:
    """Grade each completion against its word with the env's rules (:func:`echo_env.envs.task.grade`).

    Raises:
        ConfigError: The two sequences differ in length.
    """
    if len(completions) != len(words):
        raise ConfigError(f"{len(completions)} completions for {len(words)} words: give one word per completion")
    return [grade(completion_text(c), w) for c, w in zip(completions, words)]


def outcome_fractions(grades: Sequence[Grade]) -> dict[str, float]:
    """Mean reward and the share of each outcome: ``reward``, ``frac_correct``, ...

    Returns:
        An empty dict for no grades.
    """
    if not grades:
        return {}
    n = len(grades)
    out = {"reward": sum(g.reward for g in grades) / n}
    for outcome in OUTCOMES:
        out[f"frac_{outcome}"] = sum(g.outcome == outcome for g in grades) / n
    return out


def group_advantages(rewards: Sequence[float], group_size: int) -> list[float]:
    """GRPO's advantage: each reward minus the mean reward of its group.

    Args:
        rewards: Rewards in group order (the ``group_size`` completions of a prompt together).
        group_size: Completions per prompt.

    Returns:
        One advantage per reward; a group whose rewards are all equal gets zeros (it
        carries no signal about which answer was better).

    Raises:
        ConfigError: ``group_size`` is below 1 or does not divide the number of rewards.
    """
    if group_size < 1 or len(rewards) % group_size:
        raise ConfigError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / group_size
        out.extend(r - mean for r in group)
    return out
