"""The echo task as a verifiers environment: ``load_environment(**kwargs)``.

verifiers finds environments as modules with a ``load_environment`` function; this one
is reachable as ``echo-env`` (``echo_env.load_environment`` forwards here), so::

    OPENAI_API_KEY=EMPTY vf-eval echo-env -m echo-gemma3-270m -b http://127.0.0.1:8000/v1 \\
        -k OPENAI_API_KEY -n 8 -r 4 -t 16 -T 1.0

evaluates a served model on it. The environment is a ``SingleTurnEnv`` over the echo
dataset (completion prompts by default, the plain transcript a base model follows, or
chat messages), stopping at a line break, with a rubric whose reward is the env's own
grading and whose zero-weight metrics count correct answers and format errors.
"""

from __future__ import annotations

from typing import Any, Literal

from echo_env.errors import ConfigError
from echo_env.integrations.data import PromptStyle, completion_text, echo_rows
from echo_env.envs.task import EchoTask, grade

ENV_ID = "echo-env"
"""The id ``vf-eval`` and ``verifiers.load_environment`` take."""

_EVAL_SEED_OFFSET = 1_000_003


def echo_reward(completion: Any, answer: str, **_: Any) -> float:
    """The env's grading: 1.0 correct, 0.0 wrong word, -1.0 format error."""
    return grade(completion_text(completion), answer).reward


def correct(completion: Any, answer: str, **_: Any) -> float:
    """1.0 when the answer is exactly ``Echo: <word>`` (a metric: weight 0)."""
    return float(grade(completion_text(completion), answer).outcome == "correct")


def format_error(completion: Any, answer: str, **_: Any) -> float:
    """1.0 when the reply breaks the one-line ``Echo: <word>`` form (a metric: weight 0)."""
    return float(grade(completion_text(completion), answer).outcome == "format_error")


def _dataset(num_examples: int, seed: int, task: EchoTask, message_type: str) -> Any:
    from datasets import Dataset

    style: PromptStyle = "transcript" if message_type == "completion" else "chat"
    rows = echo_rows(num_examples, seed=seed, task=task, prompt_style=style)
    return Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["word"], "info": {"word": r["word"]}, "task": ENV_ID} for r in rows]
    )


def load_environment(
    num_examples: int = 64,
    num_eval_examples: int = 32,
    seed: int = 0,
    message_type: Literal["completion", "chat"] = "completion",
    run_tag: str = "",
    **kwargs: Any,
) -> Any:
    """A verifiers ``SingleTurnEnv`` for the echo task.

    Args:
        num_examples: Training prompts (one word each).
        num_eval_examples: Evaluation prompts, with words drawn from another seed.
        seed: Seeds the words.
        message_type: ``completion`` (plain transcript on ``/v1/completions``, for base
            models) or ``chat`` (messages on ``/v1/chat/completions``).
        run_tag: Text put before the system prompt (makes the shared prefix new).
        **kwargs: Passed on to ``SingleTurnEnv`` (e.g. ``sampling_args``).

    Returns:
        The environment.

    Raises:
        ConfigError: verifiers is not installed, or a bad argument.
    """
    try:
        import verifiers as vf
    except ImportError as exc:
        raise ConfigError(
            f"the verifiers environment needs verifiers: pip install 'echo-prefix-env[verifiers]' ({exc})"
        ) from exc
    if message_type not in ("completion", "chat"):
        raise ConfigError(f"message_type={message_type!r}: use completion or chat")
    task = EchoTask(run_tag=run_tag)
    rubric = vf.Rubric(funcs=[echo_reward, correct, format_error], weights=[1.0, 0.0, 0.0])
    sampling_args = {"stop": ["\n"], **kwargs.pop("sampling_args", {})}
    return vf.SingleTurnEnv(
        dataset=_dataset(num_examples, seed, task, message_type),
        eval_dataset=_dataset(num_eval_examples, seed + _EVAL_SEED_OFFSET, task, message_type),
        rubric=rubric,
        message_type=message_type,
        sampling_args=sampling_args,
        env_id=ENV_ID,
        **kwargs,
    )
