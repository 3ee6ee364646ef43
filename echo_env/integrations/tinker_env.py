"""The echo task as tinker-cookbook RL types, so the cookbook's own training loop runs it.

- :class:`EchoEnv` (``Env``): one agent; its observation is the prompt as tokens, its
  action the sampled tokens; grading, turns, attempts and feedback are
  :class:`echo_env.envs.gym_env.EchoPrefixEnv`'s own. With ``turns > 1`` an episode is
  several steps, and each observation is the previous one plus the action's tokens plus
  the env's answer, so the cookbook trains a whole episode as one sequence.
- :class:`EchoGroupBuilder` (``EnvGroupBuilder``): ``group_size`` envs asked for the same
  words (identical prompts: GRPO's group, and one prefix for a cache to share).
- :class:`EchoDataset` (``RLDataset``): ``batch_size`` groups per batch, one word (or one
  word per turn) each.
- :class:`EchoDatasetBuilder` (``RLDatasetBuilder``, a ``chz`` class): the recipe's
  parameters, ``batch_size``, ``group_size``, ``model_name_for_tokenizer``,
  ``renderer_name``, plus ``turns`` and ``max_turns``; :func:`recipe_config` adds
  ``model_name`` and ``max_tokens`` into the cookbook's ``rl.train.Config``.

The renderer :data:`TRANSCRIPT_RENDERER` gives the plain-text transcript ending in
``Assistant:`` (what a base model follows, stopping at a line break); any cookbook
renderer name (``role_colon``, ``llama3``, ``qwen3``...) gives the chat form instead.

Training needs a Tinker API key (``python -m echo_env.integrations.tinker_env
model_name=... log_path=...``); :class:`OpenAITokenCompleter` samples from any
OpenAI-compatible server instead, so the cookbook's rollout code
(``do_group_rollout``) runs on the embedded vLLM engine with no key.
"""

# No `from __future__ import annotations`: chz evaluates the annotations of
# EchoDatasetBuilder.__call__ at run time, without this module's globals.
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.completers import StopCondition, TokenCompleter, TokensWithLogprobs
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    Env,
    EnvGroupBuilder,
    Observation,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
    StopReason,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

from echo_env.envs.gym_env import EchoPrefixEnv, check_turns
from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError, ServerResponseError
from echo_env.wire.client import LLMClient

TRANSCRIPT_RENDERER = "echo_transcript"
"""Renderer name for the plain-text transcript (base models), stopping at ``"\\n"``."""

TRANSCRIPT_STOP = ["\n"]
"""Stop sequences of the transcript form: the answer is one line."""

DEFAULT_MODEL_NAME = "meta-llama/Llama-3.2-1B"
"""A small base model Tinker serves, for :func:`recipe_config`."""


def _tokenizer(model_name_for_tokenizer: str) -> Any:
    from echo_env.launch.model import resolve_model

    # resolve_model turns "default" into the prepared Gemma 3 270M folder; hub ids pass through.
    return get_tokenizer(resolve_model(model_name_for_tokenizer))


class EchoEnv(Env):
    """One agent asked to echo ``1 + len(later_words)`` words in turn, as a tinker-cookbook ``Env``.

    Each word allows ``max_turns`` attempts; a step's reward is its answer's grade and
    the episode ends after the last word (see :class:`~echo_env.envs.gym_env.EchoPrefixEnv`).

    Args:
        word: The first word to echo (one of the task's words).
        tokenizer: The policy's tokenizer (``encode``/``decode``).
        renderer: A cookbook renderer for the chat form, or None for the transcript.
        max_turns: Attempts per word; a wrong answer gets the feedback and another try.
        task: The task; the default one if None.
        later_words: The words of the later turns, in order (all different).
    """

    def __init__(
        self,
        word: str,
        tokenizer: Any,
        renderer: renderers.Renderer | None = None,
        max_turns: int = 1,
        task: EchoTask | None = None,
        later_words: Sequence[str] = (),
    ) -> None:
        self.word = word
        self.words = [word, *later_words]
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.env = EchoPrefixEnv(max_turns=max_turns, task=task, turns=len(self.words))
        self._text = ""
        self._tokens: list[int] = []
        self.extended = True
        """Whether the last observation built extended the one before it token for token (``history/extended``)."""
        self._messages: list[dict[str, str]] = []

    @property
    def stop_condition(self) -> StopCondition:
        """Where sampling stops: a line break, or the renderer's end of turn."""
        return list(TRANSCRIPT_STOP) if self.renderer is None else self.renderer.get_stop_sequences()

    def _observation(self) -> Observation:
        if self.renderer is None:
            return tinker.ModelInput.from_ints(self._tokens)
        return self.renderer.build_generation_prompt(self._messages)  # type: ignore[arg-type]

    def reply_text(self, action: Action) -> str:
        """The reply an action stands for.

        Transcript form: the decoded tokens up to and including the first line break
        and the whitespace right after it (where sampling stopped, e.g. on a ``"\\n\\n"``
        token; any text after it is dropped). Chat form: the renderer's parsed message
        text.
        """
        if self.renderer is None:
            text: str = self.tokenizer.decode(list(action), skip_special_tokens=True)
            line, newline, rest = text.partition("\n")
            return line + newline + rest[: len(rest) - len(rest.lstrip())]
        message, _termination = self.renderer.parse_response(list(action))
        return renderers.get_text_content(message)

    def _next_tokens(self, text: str, action: Action) -> list[int]:
        """The next transcript as tokens: the last observation, the action, then the env's answer.

        Building on the tokens the policy saw and sampled (rather than re-encoding the
        text) keeps each observation an extension of the last, token for token, so the
        cookbook merges the episode into one training sequence; when the env showed the
        reply differently (text after the line break, a special token, characters cut
        to printable ASCII) the transcript is encoded afresh.
        """
        said = self._text + self.tokenizer.decode(list(action), skip_special_tokens=False)
        self.extended = text.startswith(said)
        if self.extended:
            return [*self._tokens, *action, *self.tokenizer.encode(text[len(said) :], add_special_tokens=False)]
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        """Reset the env for this env's words and render its prompt."""
        self._text, info = self.env.reset(options={"words": self.words})
        self._messages = info["messages"]
        if self.renderer is None:
            self._tokens = list(self.tokenizer.encode(self._text, add_special_tokens=True))
        return self._observation(), self.stop_condition

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        """Grade the reply with the env's rules; ask again, ask the next word, or end after the last."""
        reply = self.reply_text(action)
        text, reward, done, _truncated, info = self.env.step(reply)
        if self.renderer is None and not done:
            self._tokens = self._next_tokens(text, action)
        self._text, self._messages = text, info["messages"]
        metrics: dict[str, float | int] = {
            "correct": float(info["outcome"] == "correct"),
            "wrong_word": float(info["outcome"] == "wrong_word"),
            "format_error": float(info["outcome"] == "format_error"),
        }
        if self.renderer is None and not done:
            # History reuse next to the reward: did the next observation extend this one token for token?
            metrics["history/extended"] = float(self.extended)
        if done:
            reason = StopReason.COMPLETED if info["outcome"] == "correct" else StopReason.MAX_TURNS
            metrics[f"stop/{reason}"] = 1.0
        return StepResult(
            reward=float(reward),
            episode_done=done,
            next_observation=tinker.ModelInput.empty() if done else self._observation(),
            next_stop_condition=self.stop_condition,
            metrics=metrics,
            logs={
                "word": info["word"],
                "turn": info["turn"],
                "attempt": info["attempt"],
                "reply": reply[:200],
                "feedback": info["feedback"],
            },
        )


@dataclass(frozen=True)
class EchoGroupBuilder(EnvGroupBuilder):
    """``num_envs`` envs asked for the same words: one GRPO group, one shared prompt.

    Holds names, not objects, so it pickles (the cookbook may ship builders to other
    processes); tokenizer and renderer are made in :meth:`make_envs` (both cached).
    """

    word: str
    """The group's (first) word."""
    num_envs: int
    """Envs in the group (the recipe's ``group_size``)."""
    model_name_for_tokenizer: str
    """Hub id or folder of the policy's tokenizer (``default`` for Gemma 3 270M)."""
    renderer_name: str = TRANSCRIPT_RENDERER
    """:data:`TRANSCRIPT_RENDERER` or a cookbook renderer name."""
    max_turns: int = 1
    """Attempts per word."""
    later_words: tuple[str, ...] = ()
    """The words of the later turns (an episode asks ``1 + len(later_words)`` words)."""

    async def make_envs(self) -> Sequence[Env]:
        """The group's envs."""
        tokenizer = _tokenizer(self.model_name_for_tokenizer)
        renderer = None
        if self.renderer_name != TRANSCRIPT_RENDERER:
            renderer = renderers.get_renderer(self.renderer_name, tokenizer=tokenizer)
        return [
            EchoEnv(self.word, tokenizer, renderer, self.max_turns, later_words=self.later_words)
            for _ in range(self.num_envs)
        ]

    def logging_tags(self) -> list[str]:
        return ["echo"]


class EchoDataset(RLDataset):
    """Batches of :class:`EchoGroupBuilder`: ``batch_size`` words per batch, one group each.

    Words are drawn without repeats within a batch, from a generator seeded by
    ``seed + index``, so a batch is the same every time it is asked for; with
    ``turns > 1`` each group's later words are drawn after them (different from each
    other within the group).

    Raises:
        ConfigError: A size below 1, or ``turns`` / ``max_turns`` the env refuses.
    """

    def __init__(
        self,
        batch_size: int,
        group_size: int,
        model_name_for_tokenizer: str,
        renderer_name: str = TRANSCRIPT_RENDERER,
        n_batches: int = 100,
        max_turns: int = 1,
        seed: int = 0,
        task: EchoTask | None = None,
        turns: int = 1,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("group_size", group_size), ("n_batches", n_batches)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        self.task = task if task is not None else EchoTask()
        check_turns(self.task, turns, max_turns)
        self.turns = turns
        self.batch_size = batch_size
        self.group_size = group_size
        self.model_name_for_tokenizer = model_name_for_tokenizer
        self.renderer_name = renderer_name
        self.n_batches = n_batches
        self.max_turns = max_turns
        self.seed = seed

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        """The ``index``-th batch of group builders."""
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch {index} of an echo dataset with {self.n_batches} batches")
        words = self.task.episode_words(self.batch_size, self.turns, seed=self.seed + index)
        return [
            EchoGroupBuilder(
                word=first,
                num_envs=self.group_size,
                model_name_for_tokenizer=self.model_name_for_tokenizer,
                renderer_name=self.renderer_name,
                max_turns=self.max_turns,
                later_words=tuple(later),
            )
            for first, *later in words
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class EchoDatasetBuilder(RLDatasetBuilder):
    """The echo dataset with the recipe's parameters (``chz``: ``key=value`` command lines)."""

    batch_size: int = 16
    """Groups (distinct prompts) per batch."""
    group_size: int = 8
    """Envs per group (completions per prompt)."""
    model_name_for_tokenizer: str = DEFAULT_MODEL_NAME
    """Hub id or folder of the policy's tokenizer."""
    renderer_name: str = TRANSCRIPT_RENDERER
    """:data:`TRANSCRIPT_RENDERER` (base models) or a cookbook renderer name."""
    n_batches: int = 100
    """Training batches."""
    max_turns: int = 1
    """Attempts per word."""
    turns: int = 1
    """Words per episode, asked one after another in one conversation."""
    seed: int = 0
    """Seeds the words."""
    n_test_batches: int = 0
    """Evaluation batches (one env per word), drawn from other seeds; 0 for none."""

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        """Build the training dataset and, if asked, a test dataset."""
        train = EchoDataset(
            self.batch_size,
            self.group_size,
            self.model_name_for_tokenizer,
            self.renderer_name,
            self.n_batches,
            self.max_turns,
            self.seed,
            turns=self.turns,
        )
        test = None
        if self.n_test_batches:
            test = EchoDataset(
                self.batch_size,
                1,
                self.model_name_for_tokenizer,
                self.renderer_name,
                self.n_test_batches,
                self.max_turns,
                seed=self.seed + 1_000_000,
                turns=self.turns,
            )
        return train, test


def recipe_config(
    model_name: str = DEFAULT_MODEL_NAME,
    log_path: str = "/tmp/echo_env/tinker-echo",
    renderer_name: str = TRANSCRIPT_RENDERER,
    batch_size: int = 16,
    group_size: int = 8,
    max_tokens: int = 16,
    learning_rate: float = 4e-5,
    turns: int = 1,
    max_turns: int = 1,
) -> chz.Blueprint[Any]:
    """The cookbook's ``rl.train.Config`` for the echo task, as a ``chz`` blueprint.

    ``blueprint.make_from_argv(["batch_size=32"])`` (or ``.make()``) gives the config that
    ``tinker_cookbook.rl.train.main`` runs.

    Args:
        model_name: The Tinker model to train (and its tokenizer).
        log_path: Where the cookbook writes checkpoints and logs.
        renderer_name: :data:`TRANSCRIPT_RENDERER` or a cookbook renderer name.
        batch_size: Groups per batch.
        group_size: Completions per prompt.
        max_tokens: Longest completion.
        learning_rate: Adam learning rate.
        turns: Words per episode (``dataset_builder.turns``).
        max_turns: Attempts per word (``dataset_builder.max_turns``).

    Returns:
        The blueprint.
    """
    from tinker_cookbook.rl import train

    return chz.Blueprint(train.Config).apply(
        {
            "model_name": model_name,
            "recipe_name": "recipe_echo_prefix",
            # The cookbook's own renderer checks do not know the transcript form.
            "renderer_name": None if renderer_name == TRANSCRIPT_RENDERER else renderer_name,
            "log_path": log_path,
            # The class and its fields (not an instance), so `dataset_builder.batch_size=32`
            # on the command line can still change them.
            "dataset_builder": EchoDatasetBuilder,
            "dataset_builder.batch_size": batch_size,
            "dataset_builder.group_size": group_size,
            "dataset_builder.model_name_for_tokenizer": model_name,
            "dataset_builder.renderer_name": renderer_name,
            "dataset_builder.turns": turns,
            "dataset_builder.max_turns": max_turns,
            "learning_rate": learning_rate,
            "max_tokens": max_tokens,
            "eval_every": 0,
        }
    )


@dataclass
class OpenAITokenCompleter(TokenCompleter):
    """A cookbook ``TokenCompleter`` sampling from an OpenAI-compatible server (vLLM).

    The observation's tokens go out as a token-id prompt on ``/v1/completions``; the
    server's own token ids and logprobs come back (vLLM's ``return_token_ids``). It lets
    the cookbook's rollout code run against the embedded engine, or any vLLM, with no
    Tinker key, and every group's identical prompts meet the server's prefix cache.
    """

    client: LLMClient
    """An open client (``async with LLMClient(...) as client``)."""
    max_tokens: int = 16
    """Longest completion."""
    temperature: float = 1.0
    """Sampling temperature."""

    async def __call__(
        self, model_input: tinker.ModelInput, stop: StopCondition, *, max_tokens: int | None = None
    ) -> TokensWithLogprobs:
        """Sample one completion of ``model_input``.

        Raises:
            ConfigError: ``stop`` holds token ids (only stop strings go over this API).
            ServerResponseError: The request failed or carried no token ids.
        """
        if any(not isinstance(s, str) for s in stop):
            raise ConfigError("OpenAITokenCompleter takes stop strings only; this renderer stops on token ids")
        limit = self.max_tokens if max_tokens is None else min(self.max_tokens, max_tokens)
        record = await self.client.generate(
            model_input.to_ints(),
            max_tokens=limit,
            temperature=self.temperature,
            stop=[str(s) for s in stop],
            logprobs=0,
            extra_body={"return_token_ids": True},
            tag="tinker",
        )
        out = record.outputs[0] if record.ok and record.outputs else None
        if out is None or out.token_ids is None:
            raise ServerResponseError(
                f"sampling failed ({record.error or 'no token ids in the answer'}): the server must be vLLM "
                "0.10.2 or later (return_token_ids)"
            )
        logprobs = [float(x) if x is not None else 0.0 for x in out.logprobs] if out.logprobs is not None else None
        return TokensWithLogprobs(
            tokens=list(out.token_ids),
            maybe_logprobs=logprobs,
            stop_reason="length" if out.finish_reason == "length" else "stop",
            prompt_cache_hit_tokens=record.cached_tokens or 0,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Train with the cookbook's RL loop on Tinker (needs ``TINKER_API_KEY``).

    ``python -m echo_env.integrations.tinker_env model_name=meta-llama/Llama-3.2-1B
    log_path=/tmp/echo-rl dataset_builder.batch_size=16 dataset_builder.group_size=8``
    """
    from tinker_cookbook import cli_utils
    from tinker_cookbook.rl import train

    args = list(sys.argv[1:] if argv is None else argv)
    # The dataset's tokenizer follows model_name, so read it before the other keys.
    model_name = cli_utils.model_name_from_argv(args, default=DEFAULT_MODEL_NAME)
    config = recipe_config(model_name).make_from_argv(args)
    asyncio.run(train.main(config))


if __name__ == "__main__":
    main()
