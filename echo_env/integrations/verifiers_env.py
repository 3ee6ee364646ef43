"""The echo task as a verifiers environment: ``load_environment(**kwargs)``.

verifiers finds environments as modules with a ``load_environment`` function; this one
is reachable as ``echo-env`` (``echo_env.load_environment`` forwards here), so::

    OPENAI_API_KEY=EMPTY vf-eval echo-env -m echo-gemma3-270m -b http://127.0.0.1:8000/v1 \\
        -k OPENAI_API_KEY -n 8 -r 4 -t 16 -T 1.0

evaluates a served model on it (``-a '{"turns": 3}'`` for three words per rollout).
With the defaults the environment is a ``SingleTurnEnv`` over the echo dataset
(completion prompts by default, the plain transcript a base model follows, or chat
messages), stopping at a line break, with a rubric whose reward is the env's own
grading and whose zero-weight metrics count correct answers and format errors.

With ``turns > 1`` or ``max_turns > 1`` it is a ``MultiTurnEnv`` run by the rules of
:class:`~echo_env.envs.gym_env.EchoPrefixEnv`: ``turns`` words per rollout, each allowing
``max_turns`` attempts; after each answer the environment replies with its feedback and
the next request, appended to the conversation (verifiers only ever appends, so each
turn's prompt is the last one plus the reply plus that reply). Each step's reward is its
answer's grade; the rollout's reward is their sum, the env's episode return.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

from echo_env.envs.gym_env import Conversation, check_turns
from echo_env.envs.task import EchoTask, Grade, env_turn, follow_up, grade
from echo_env.errors import ConfigError
from echo_env.integrations.data import PromptStyle, completion_text, echo_rows

ENV_ID = "echo-env"
"""The id ``vf-eval`` and ``verifiers.load_environment`` take."""

_EVAL_SEED_OFFSET = 1_000_003
_STATE_KEY = "echo"


def echo_reward(completion: Any, answer: str, **_: Any) -> float:
    """The env's grading: 1.0 correct, 0.0 wrong word, -1.0 format error."""
    return grade(completion_text(completion), answer).reward


def correct(completion: Any, answer: str, **_: Any) -> float:
    """1.0 when the answer is exactly ``Echo: <word>`` (a metric: weight 0)."""
    return float(grade(completion_text(completion), answer).outcome == "correct")


def format_error(completion: Any, answer: str, **_: Any) -> float:
    """1.0 when the reply breaks the one-line ``Echo: <word>`` form (a metric: weight 0)."""
    return float(grade(completion_text(completion), answer).outcome == "format_error")


@dataclass
class EchoProgress:
    """A multi-turn rollout's place in its episode, kept in the verifiers state."""

    conversation: Conversation
    """The env's own bookkeeping: words, turn, attempts, history."""
    max_turns: int
    """Attempts per word."""
    grades: list[Grade] = field(default_factory=list)
    """The grade of every answer so far."""
    words_right: int = 0
    """Words answered right (at some attempt)."""
    pending: tuple[str, str | None] | None = None
    """The feedback and the next word (None: the end) for the environment's next reply."""

    def answer(self, reply: str) -> Grade:
        """Grade a reply by the env's rules and remember what to say next."""
        result, keys = self.conversation.answer(reply, self.max_turns)
        self.grades.append(result)
        self.words_right += result.outcome == "correct"
        self.pending = (result.feedback, keys["next_word"])
        return result


def _progress(state: Any) -> EchoProgress | None:
    progress = state.get(_STATE_KEY)
    return progress if isinstance(progress, EchoProgress) else None


def episode_reward(state: Any, **_: Any) -> float:
    """The sum of the rollout's step rewards (the env's episode return)."""
    progress = _progress(state)
    return sum(g.reward for g in progress.grades) if progress else 0.0


def words_correct(state: Any, **_: Any) -> float:
    """The share of the rollout's words answered right at some attempt (a metric)."""
    progress = _progress(state)
    return progress.words_right / len(progress.conversation.words) if progress else 0.0


def format_errors(state: Any, **_: Any) -> float:
    """The share of the rollout's answers that broke the form (a metric)."""
    progress = _progress(state)
    if not progress or not progress.grades:
        return 0.0
    return sum(g.outcome == "format_error" for g in progress.grades) / len(progress.grades)


def _dataset(num_examples: int, seed: int, task: EchoTask, message_type: str, turns: int) -> Any:
    from datasets import Dataset

    style: PromptStyle = "transcript" if message_type == "completion" else "chat"
    rows = echo_rows(num_examples, seed=seed, task=task, prompt_style=style)
    info: list[dict[str, Any]] = [{"word": r["word"]} for r in rows]
    if turns > 1:
        # The first words are echo_rows' own (the same seed), the later ones drawn after them.
        for entry, words in zip(info, task.episode_words(num_examples, turns, seed=seed)):
            entry["words"] = words
    return Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["word"], "info": i, "task": ENV_ID} for r, i in zip(rows, info)]
    )


def history_reuse(state: Any, step: Any) -> dict[str, Any]:
    """``turn``, ``cached_tokens`` and ``extended`` of one trajectory step (None where the server did not say).

    ``extended``: whether the step's prompt ids begin with the last step's prompt and
    completion ids (verifiers keeps them when the server returns token ids).
    """
    usage = getattr(step.get("response"), "usage", None)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None)
    tokens = step.get("tokens")
    earlier = [s for s in state.get("trajectory", []) if s is not step]
    last = earlier[-1].get("tokens") if earlier else None
    extended = None
    if tokens and last:
        before = [*last["prompt_ids"], *last["completion_ids"]]
        extended = tokens["prompt_ids"][: len(before)] == before
    return {"turn": len(earlier), "cached_tokens": cached, "extended": extended}


@functools.cache
def multi_turn_env_class() -> type[Any]:
    """The verifiers ``MultiTurnEnv`` subclass that runs multi-turn echo episodes.

    Made on first use, so this module imports without verifiers.
    """
    import verifiers as vf

    class EchoMultiTurnEnv(vf.MultiTurnEnv):  # type: ignore[misc, valid-type]
        """Echo episodes of ``turns`` words, ``max_turns`` attempts each, graded as the env grades."""

        def __init__(self, turns: int, attempts: int, **kwargs: Any) -> None:
            # verifiers' own cap counts model calls; ours end the rollout first (one
            # beyond the most an episode takes, so the final feedback is always sent).
            super().__init__(max_turns=turns * attempts + 1, **kwargs)
            self.turns = turns
            self.attempts = attempts

        async def setup_state(self, state: Any) -> Any:
            info = state.get("info") or {}
            words = info.get("words") or [info.get("word", state.get("answer"))]
            state[_STATE_KEY] = EchoProgress(Conversation(list(words)), self.attempts)
            return await super().setup_state(state)

        async def add_trajectory_step(self, state: Any, trajectory_step: Any) -> None:
            # Grade here, as the answer arrives, so a step's reward is recorded even when
            # the rollout stops before the environment's next reply.
            progress = state[_STATE_KEY]
            result = progress.answer(completion_text(trajectory_step["completion"]))
            trajectory_step["reward"] = result.reward
            # History reuse next to the reward, as the env's info["history_reuse"] has it.
            trajectory_step.setdefault("extras", {})["history_reuse"] = history_reuse(state, trajectory_step)
            await super().add_trajectory_step(state, trajectory_step)

        async def env_response(self, messages: Any, state: Any, **kwargs: Any) -> Any:
            progress = state[_STATE_KEY]
            if progress.pending is None:
                raise ConfigError("the echo environment replied before any answer: this is a bug, please report it")
            feedback, next_word = progress.pending
            if self.message_type == "completion":
                reply = completion_text(state["trajectory"][-1]["completion"])
                response: Any = follow_up(reply, feedback, next_word)
            else:
                response = [{"role": "user", "content": env_turn(feedback, next_word)}]
            if next_word is None:
                state["final_env_response"] = response
            return response

    return EchoMultiTurnEnv


def load_environment(
    num_examples: int = 64,
    num_eval_examples: int = 32,
    seed: int = 0,
    message_type: Literal["completion", "chat"] = "completion",
    run_tag: str = "",
    turns: int = 1,
    max_turns: int = 1,
    **kwargs: Any,
) -> Any:
    """A verifiers environment for the echo task.

    Args:
        num_examples: Training prompts (one first word each).
        num_eval_examples: Evaluation prompts, with words drawn from another seed.
        seed: Seeds the words.
        message_type: ``completion`` (plain transcript on ``/v1/completions``, for base
            models) or ``chat`` (messages on ``/v1/chat/completions``).
        run_tag: Text put before the system prompt (makes the shared prefix new).
        turns: Words per rollout, asked one after another in one conversation.
        max_turns: Attempts per word.
        **kwargs: Passed on to the verifiers environment (e.g. ``sampling_args``).

    Returns:
        A ``SingleTurnEnv`` for one word and one attempt (the default), else a
        ``MultiTurnEnv`` (:func:`multi_turn_env_class`).

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
    check_turns(task, turns, max_turns)
    sampling_args = {"stop": ["\n"], **kwargs.pop("sampling_args", {})}
    common = {
        "dataset": _dataset(num_examples, seed, task, message_type, turns),
        "eval_dataset": _dataset(num_eval_examples, seed + _EVAL_SEED_OFFSET, task, message_type, turns),
        "message_type": message_type,
        "sampling_args": sampling_args,
        "env_id": ENV_ID,
    }
    if turns == 1 and max_turns == 1:
        rubric = vf.Rubric(funcs=[echo_reward, correct, format_error], weights=[1.0, 0.0, 0.0])
        return vf.SingleTurnEnv(rubric=rubric, **common, **kwargs)
    rubric = vf.Rubric(funcs=[episode_reward, words_correct, format_errors], weights=[1.0, 0.0, 0.0])
    return multi_turn_env_class()(turns=turns, attempts=max_turns, rubric=rubric, **common, **kwargs)
