"""GRPO on the echo task with TRL: the dataset, the reward, and a rollout function.

The three pieces ``GRPOTrainer`` takes::

    from trl import GRPOConfig, GRPOTrainer
    from echo_env.integrations.trl_grpo import EchoRollout, echo_dataset, echo_reward

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=echo_reward,
        train_dataset=echo_dataset(64),           # one row per prompt; TRL repeats it per group
        args=GRPOConfig(num_generations=8, max_completion_length=8, ...),
        rollout_func=EchoRollout("http://127.0.0.1:8000/v1"),   # optional: sample on a vLLM server
    )

Without ``rollout_func`` TRL generates with the model itself (transformers); give the
model :func:`stop_at_newline` first so generation ends where the answer line ends, as
the server's ``stop=["\\n"]`` does. With it, each group goes to the server as one
request with ``n`` = group size (one prefill of the shared prefix, the prefix cache's
best case) through :class:`echo_env.rollout.worker.RolloutWorker`; the server's token ids and
logprobs go back to the trainer. On a GPU, serve the policy with ``trl vllm-serve`` and
set ``use_vllm=True, vllm_mode="server"`` so TRL pushes each update into that server.

GRPO here is single-turn: one prompt, one completion, one reward. Multi-turn episodes
(``turns`` words per conversation) run in the envs, the tinker-cookbook adapter and the
verifiers adapter; TRL's ``rollout_func`` would have to drive whole conversations and
return their interleaved token masks, which this adapter does not do.

Only :func:`echo_dataset` imports a library (``datasets``); everything else here is plain
Python over duck-typed TRL objects. What runs on the trainer's own model
(:func:`stop_at_newline`, :class:`SharedPrefixRollout`, :func:`grpo_trainer_class`) lives in
:mod:`echo_env.integrations.trl_model` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError, ServerResponseError
from echo_env.integrations.data import PromptStyle, echo_rows, grade_batch, outcome_fractions
from echo_env.integrations.trl_model import (
    SharedPrefixRollout,
    grpo_trainer_class,
    newline_token_ids,
    stop_at_newline,
)
from echo_env.measure.phase import CounterProbe, measure_phase
from echo_env.measure.stats import percentiles
from echo_env.rollout.worker import AgentCompletion, RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord
from echo_env.wire.info import server_root
from echo_env.wire.metrics import MetricsReader, Snapshot

log = logging.getLogger(__name__)

__all__ = [
    "REWARD_METRICS",
    "EchoRollout",
    "RolloutStats",
    "SharedPrefixRollout",
    "echo_dataset",
    "echo_reward",
    "grpo_trainer_class",
    "newline_token_ids",
    "stop_at_newline",
]

T = TypeVar("T")

REWARD_METRICS = ("frac_correct", "frac_wrong_word", "frac_format_error")
"""Shares of each outcome that :func:`echo_reward` logs, as ``echo/<name>``."""


def echo_dataset(
    num_prompts: int = 64,
    seed: int = 0,
    task: EchoTask | None = None,
    prompt_style: PromptStyle = "transcript",
) -> Any:
    """The echo prompts as a ``datasets.Dataset`` with columns ``prompt`` and ``word``.

    Every prompt shares the system prompt; ``GRPOTrainer`` repeats each row
    ``num_generations`` times to make a group, so a row is one group's prompt.

    Args:
        num_prompts: Rows (distinct words while the word list lasts).
        seed: Seeds the word choice.
        task: The task; the default one if None.
        prompt_style: ``transcript`` (plain text, for base models) or ``chat`` (messages,
            which TRL renders with the tokenizer's chat template).

    Returns:
        The dataset.

    Raises:
        ConfigError: ``datasets`` is not installed, or a bad argument.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"echo_dataset needs datasets: pip install 'echo-prefix-env[trl]' ({exc})") from exc
    return datasets.Dataset.from_list(echo_rows(num_prompts, seed=seed, task=task, prompt_style=prompt_style))


def echo_reward(
    completions: Sequence[Any],
    word: Sequence[str],
    log_metric: Any = None,
    rollout_ttft_s: Sequence[float | None] | None = None,
    rollout_hit_rate: Sequence[float | None] | None = None,
    rollout_cached_tokens: Sequence[float | int | None] | None = None,
    **_: Any,
) -> list[float]:
    """TRL reward function: the env's grading (1.0 correct, 0.0 wrong word, -1.0 format error).

    TRL calls it with the decoded completions and every dataset column (``word``); it
    passes ``log_metric`` too, which this function uses to log the share of each
    outcome (``echo/frac_correct``, ``echo/frac_wrong_word``, ``echo/frac_format_error``)
    and, when :class:`EchoRollout` produced the batch, its server figures
    (``rollout/ttft_p50_s``, ``rollout/hit_rate``): TRL hands reward functions the
    rollout function's extra fields, and this is where they reach its logs.

    Args:
        completions: The completions (strings, or chat messages for chat prompts).
        word: The word each completion should echo.
        log_metric: TRL's ``log_metric(name, value)``; None outside a trainer.
        rollout_ttft_s: Per completion, its request's time to first token.
        rollout_hit_rate: The server's prefix-cache hit rate over the batch (repeated).
        rollout_cached_tokens: Per completion, its prompt's cached tokens (``rollout/cached_tokens_mean``).

    Returns:
        One reward per completion.
    """
    grades = grade_batch(completions, word)
    if log_metric is not None:
        shares = outcome_fractions(grades)
        for name in REWARD_METRICS:
            log_metric(f"echo/{name}", shares[name])
        ttfts = [t for t in rollout_ttft_s or () if t is not None]
        if ttfts:
            log_metric("rollout/ttft_p50_s", percentiles(ttfts, (50,))["p50"])
        hit_rates = [h for h in rollout_hit_rate or () if h is not None]
        if hit_rates:
            log_metric("rollout/hit_rate", hit_rates[0])
        cached = [c for c in rollout_cached_tokens or () if c is not None]
        if cached:
            log_metric("rollout/cached_tokens_mean", sum(cached) / len(cached))
    return [g.reward for g in grades]


@dataclass
class RolloutStats:
    """Figures of one call of :class:`EchoRollout` (one generation batch)."""

    completions: int
    """Completions returned."""
    requests: int
    """Requests sent (one per distinct prompt)."""
    wall_s: float
    """Time the batch took."""
    ttft_p50_s: float | None
    """Median time to first token over the requests."""
    hit_rate: float | None
    """Prefix-cache hits / queries the server counted during the batch (None: no counters)."""
    prompt_tokens: int
    """Prompt tokens the server reported."""


class _ProbeUntilFailure(CounterProbe):
    """Rewards do not need the counters: after the first failed read, training goes on without a hit rate."""

    async def snapshot(self) -> Snapshot | None:
        snapshot = await super().snapshot()
        if snapshot is None:
            self.reader = None  # the failure was logged once; do not read again
        return snapshot


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # A notebook already runs a loop in this thread: run ours in another thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class EchoRollout:
    """A TRL ``rollout_func`` that samples through the echo worker on a vLLM server.

    TRL calls it with the batch's prompts (each repeated ``num_generations`` times) and
    the trainer. Identical prompts go out as one ``/v1/completions`` request with ``n``
    completions; sampling settings come from the trainer's ``GRPOConfig``
    (``max_completion_length``, ``temperature``, ``top_p``), and answers stop at a line
    break. Returns ``prompt_ids``, ``completion_ids`` and ``logprobs`` (the server's own
    token ids and sampled-token logprobs, via vLLM's ``return_token_ids``), plus
    ``rollout_ttft_s`` and ``rollout_hit_rate``, which TRL forwards to
    :func:`echo_reward` for logging.

    Chat prompts (lists of messages) are rendered with the trainer's tokenizer and sent
    as token ids, so the template is applied where TRL wants it: at the backend boundary.
    vLLM returns logprobs before temperature scaling unless started with
    ``--logprobs-mode processed_logprobs`` (``trl vllm-serve`` does that); at
    temperature 1 it makes no difference.
    """

    base_url: str
    """The server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str | None = None
    """Served model name; None takes the server's first."""
    metrics_url: str | None = None
    """Prometheus page for the hit rate; None means ``<server>/metrics``, ``"none"`` skips it."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token for the server."""
    timeout_s: float = 120.0
    """Limit on one request."""
    stop: tuple[str, ...] = ("\n",)
    """Stop strings: the answer is one line."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """More request fields for the server."""
    history: list[RolloutStats] = field(default_factory=list, init=False)
    """The figures of every batch so far."""

    def __post_init__(self) -> None:
        ClientConfig(base_url=self.base_url, timeout_s=self.timeout_s)  # checks the values now, not mid-training
        if self.metrics_url is None:
            self.metrics_url = server_root(self.base_url) + "/metrics"
        self._probe: CounterProbe | None = None

    def sampling(self, trainer: Any) -> SamplingConfig:
        """The worker's sampling settings for this trainer's ``GRPOConfig``."""
        args = trainer.args
        return SamplingConfig(
            api="completions",
            batching="per_group",
            max_tokens=int(args.max_completion_length),
            temperature=float(args.temperature),
            top_p=float(getattr(args, "top_p", 1.0) or 1.0),
            stop=self.stop,
            logprobs=0,  # the sampled token's logprob only
            extra_body={"return_token_ids": True, **self.extra_body},
        )

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Sample one completion per prompt; the shape ``GRPOTrainer`` expects.

        Raises:
            ServerUnreachableError: The server could not be reached.
            ServerResponseError: A request failed, or the server sent no token ids.
        """
        tokenizer = trainer.processing_class
        wire = [self._wire_prompt(p, tokenizer) for p in prompts]
        return _run_sync(self._rollout(wire, self.sampling(trainer), tokenizer))

    @staticmethod
    def _wire_prompt(prompt: Any, tokenizer: Any) -> str | list[int]:
        if isinstance(prompt, str):
            return prompt
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _counter_probe(self) -> CounterProbe:
        if self._probe is None:  # made at the first batch, from the metrics_url then in effect
            url = str(self.metrics_url)
            reader = None if url == "none" else MetricsReader(url, model_name=self.model, api_key=self.api_key)
            self._probe = _ProbeUntilFailure(reader, "metrics_url=none")
        return self._probe

    async def _rollout(self, wire: list[str | list[int]], sampling: SamplingConfig, tokenizer: Any) -> dict[str, Any]:
        start = time.perf_counter()
        completions: dict[str, AgentCompletion] = {}

        async def send() -> list[RequestRecord]:
            config = ClientConfig(
                base_url=self.base_url, model=self.model, api_key=self.api_key, timeout_s=self.timeout_s
            )
            async with LLMClient(config) as client:
                worker = RolloutWorker(client, sampling)
                done, records = await worker.complete({str(i): p for i, p in enumerate(wire)})
                worker.check_reachable(records)
            completions.update(done)
            return records

        figures = (await measure_phase("rollout", send, probe=self._counter_probe())).figures
        failed = [c.error for c in completions.values() if c.error is not None]
        if failed:
            raise ServerResponseError(
                f"{len(failed)} of {len(wire)} completions failed during the rollout ({failed[0]}): "
                "check the server's log"
            )
        batch = self._trl_batch(wire, completions, tokenizer)
        hit_rate = figures.hit.counters
        self.history.append(
            RolloutStats(
                completions=len(wire),
                requests=figures.requests,
                wall_s=time.perf_counter() - start,
                ttft_p50_s=figures.ttft.p50,
                hit_rate=hit_rate,
                prompt_tokens=figures.prompt_tokens,
            )
        )
        return {**batch, "rollout_hit_rate": hit_rate}

    def _trl_batch(
        self, wire: list[str | list[int]], completions: Mapping[str, AgentCompletion], tokenizer: Any
    ) -> dict[str, Any]:
        """``prompt_ids``, ``completion_ids``, ``logprobs`` and ``rollout_ttft_s``, one per prompt, in order."""
        prompt_ids: list[list[int]] = []
        completion_ids: list[list[int]] = []
        logprobs: list[list[float | None]] | None = []
        ttfts: list[float | None] = []
        for i, prompt in enumerate(wire):
            out = completions[str(i)].output
            if out is None or out.token_ids is None:
                raise ServerResponseError(
                    f"the server at {self.base_url} sent no token ids: EchoRollout needs vLLM's "
                    "return_token_ids (vLLM 0.10.2 or later)"
                )
            if out.prompt_token_ids is not None:
                prompt_ids.append(out.prompt_token_ids)
            elif isinstance(prompt, list):
                prompt_ids.append(prompt)
            else:
                prompt_ids.append([int(t) for t in tokenizer(prompt)["input_ids"]])
            completion_ids.append(out.token_ids)
            if logprobs is not None and out.logprobs is not None and len(out.logprobs) == len(out.token_ids):
                logprobs.append(out.logprobs)
            else:
                logprobs = None  # without every sequence's logprobs TRL skips the correction
            ttfts.append(out.ttft_s)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "rollout_ttft_s": ttfts,
            # Per completion, as the env's info["history_reuse"] carries it: logged by echo_reward.
            "rollout_cached_tokens": [completions[str(i)].timing.get("cached_tokens") for i in range(len(wire))],
        }
