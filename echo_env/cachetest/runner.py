"""The prefix-cache test: run the echo workload, read the server's counters, give a verdict.

Per repeat, with a run tag at the very start of the system prompt so the prefix is new:

1. *cold*: the first agent's request alone, on a prefix the server has never seen;
2. *warm*: every other agent (``batch_size x group_size - 1`` requests) all in flight;
3. *control*: as many requests of the same lengths, each with its own tag, so nothing
   can hit.

Each phase gets its own counter deltas from ``/metrics`` and its own request records.
The token plan (the prompts tokenized as the server sees them) gives the best hit rate
the workload allows; the verdict compares the measured rate with it, and warm TTFT with
control TTFT. Nothing touches the prefix under test before the cold phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from echo_env.serving.client import ClientConfig, LLMClient, RequestRecord
from echo_env.errors import ConfigError, EchoEnvError, MetricsError, ServerUnreachableError
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.serving.info import ServerFacts, read_server_facts, tokenize_prompts
from echo_env.serving.metrics import CounterDelta, MetricsReader, Snapshot, delta
from echo_env.measure.stats import bootstrap_ratio_ci, summarize
from echo_env.envs.task import EchoTask
from echo_env.measure.tokens import TokenPlan, align_system_prompt, first_difference, plan_tokens
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.envs.wrappers import ParallelTimingWrapper

log = logging.getLogger(__name__)

Verdict = Literal["PASS", "FAIL", "UNKNOWN"]
EXIT_CODES: dict[str, int] = {"PASS": 0, "FAIL": 1, "UNKNOWN": 2}
"""Exit status of ``echo-prefix test`` for each verdict."""

PHASES = ("cold", "warm_single", "warm", "control")
"""Phase names in report order (``warm_single`` runs after ``warm``)."""

CONTROL_HIT_LIMIT = 0.05
"""Above this hit rate the control phase is not an uncached baseline and the verdict is UNKNOWN."""

HIT_RATE_FRACTION = 0.9
"""PASS needs the measured hit rate at or above this share of the ceiling."""


@dataclass(frozen=True)
class PrefixTestConfig:
    """Settings of ``echo-prefix test`` (each is a ``key=value`` on the command line)."""

    base_url: str | None = None
    """Your server's OpenAI API root; unset starts the embedded vLLM engine."""
    model_name: str | None = None
    """Served model name (your server), or the model the embedded engine serves."""
    api: Literal["completions", "chat"] = "completions"
    """``completions`` sends the plain transcript; ``chat`` the chat messages."""
    batch_size: int = 16
    """Distinct prompts (groups)."""
    group_size: int = 8
    """Agents per prompt."""
    max_tokens: int = 32
    """Generation limit per request."""
    temperature: float = 0.0
    """Sampling temperature."""
    seed: int = 0
    """Seeds the words and sampling."""
    repeats: int = 3
    """How many times the cold/warm/control sequence runs, each on a new prefix."""
    out_dir: str | None = None
    """Where results go; default ``echo_prefix_results/<time>-<id>``."""
    compare_without_cache: bool = False
    """Also run the workload with caching off (embedded: restart; own server: baseline_url)."""
    baseline_url: str | None = None
    """A second server of the same model started without prefix caching."""
    metrics_url: str | None = None
    """Prometheus endpoint; default ``<server>/metrics``."""
    block_size: int | None = None
    """Cache block size in tokens when the server does not say."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token for your server (never written anywhere); unset reads ``OPENAI_API_KEY``."""
    timeout_s: float = 600.0
    """Per-request limit (a burst of uncached prompts on a CPU takes minutes)."""
    max_concurrency: int = 1024
    """Requests in flight at once (the warm phase wants them all)."""
    prompt_format: Literal["text", "tokens"] = "text"
    """``tokens`` sends token ids from the server's tokenizer."""
    align_prefix: Literal["off", "auto", "pad", "trim"] = "off"
    """Pad (``pad``) or trim (``trim``) the system prompt's worked examples, or whichever
    changes fewer (``auto``), so the shared prefix ends just past a cache-block boundary
    for the server's tokenizer and block size."""
    vary_before_prefix: bool = False
    """Spoil the test on purpose: an agent id before the shared text, as a template that
    stamps a date or id would. The test must then FAIL and say where prompts differ."""
    wandb_project: str | None = None
    """Log the summary to this wandb project (if wandb is installed)."""
    wandb_name: str | None = None
    """The wandb run name."""
    debug: bool = False
    """Show tracebacks and per-step timing logs."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "group_size", "repeats", "max_concurrency"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if self.batch_size * self.group_size < 2:
            raise ConfigError("the test needs at least 2 agents: raise batch_size or group_size")
        if not 1 <= self.max_tokens <= 4096:
            raise ConfigError(f"max_tokens={self.max_tokens} is out of range: use 1 to 4096")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        # Checked here, not where they are used, so a bad value fails before an engine starts.
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}: e.g. timeout_s=600")
        if not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature={self.temperature} is out of range: use 0 to 10")
        for key in ("base_url", "baseline_url"):
            url = getattr(self, key)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{key}={url!r} is not an http(s) URL: e.g. {key}=http://127.0.0.1:8000/v1")
        if self.api == "chat" and self.prompt_format == "tokens":
            raise ConfigError("prompt_format=tokens needs api=completions")
        if self.baseline_url is not None and self.base_url is None:
            raise ConfigError("baseline_url compares two servers of yours: set base_url too")

    def public(self) -> dict[str, Any]:
        """The config as written to reports (the API key left out)."""
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        return data


@dataclass
class PhaseRun:
    """One phase of one repeat on one server."""

    name: str
    """``cold``, ``warm`` or ``control``."""
    server: str
    """``cache_on`` or ``cache_off``."""
    repeat: int
    """Which repeat."""
    records: list[RequestRecord]
    """Its requests."""
    wall_s: float
    """From the first send to the last answer."""
    counters: CounterDelta | None
    """Server counter deltas over the phase (None: no metrics)."""
    plan: TokenPlan | None
    """What the phase's prompts allow a cache to serve."""
    rewards: list[float] = field(default_factory=list)
    """Rewards of the phase's agents."""

    def figures(self) -> dict[str, Any]:
        """The phase's row in ``summary["phases"]``."""
        row: dict[str, Any] = {"name": self.name, "server": self.server, "repeat": self.repeat}
        row.update(_pooled([self]))
        return row


def _pooled(runs: Sequence[PhaseRun]) -> dict[str, Any]:
    records = [r for run in runs for r in run.records]
    ok = [r for r in records if r.ok]
    wall = sum(run.wall_s for run in runs)
    out: dict[str, Any] = {"requests": len(records), "failed": len(records) - len(ok), "wall_s": wall}
    out["first_error"] = next((r.error for r in records if not r.ok), None)
    out["throughput_rps"] = len(ok) / wall if wall > 0 else None
    completion = sum(r.completion_tokens or 0 for r in ok)
    out["tokens_per_s"] = completion / wall if wall > 0 else None
    for key, values in (
        ("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
        ("e2e", [r.e2e_s for r in ok if r.e2e_s is not None]),
        ("itl", [gap for r in ok for gap in r.itl_s]),
    ):
        s = summarize(values)
        out[f"{key}_p50_s"], out[f"{key}_p90_s"], out[f"{key}_p99_s"] = s.p50, s.p90, s.p99
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    out["prompt_tokens"] = prompt
    out["cached_tokens"] = sum(cached) if cached else None
    out["hit_rate_reported"] = sum(cached) / prompt if cached and prompt else None
    deltas = [run.counters for run in runs]
    reset = any(d is not None and d.reset for d in deltas)
    out["counter_reset"] = reset
    queries = [d.queries for d in deltas if d is not None and d.queries is not None]
    hits = [d.hits for d in deltas if d is not None and d.hits is not None]
    known = not reset and len(queries) == len(runs) and len(hits) == len(runs) and sum(queries) > 0
    out["hit_rate"] = sum(hits) / sum(queries) if known else None
    plans = [run.plan for run in runs]
    if all(p is not None for p in plans) and plans:
        total = sum(p.prompt_tokens for p in plans if p is not None)
        best = sum(p.max_hit_tokens for p in plans if p is not None)
        out["hit_rate_ceiling"] = best / total if total else None
    else:
        out["hit_rate_ceiling"] = None
    rewards = [x for run in runs for x in run.rewards]
    out["mean_reward"] = sum(rewards) / len(rewards) if rewards else None
    return out


@dataclass
class Workload:
    """The prompts of one repeat, in send order."""

    cold: dict[str, Any]
    """The first agent and its prompt."""
    warm: dict[str, Any]
    """Every other agent and its prompt."""
    control: dict[str, Any]
    """Control requests: same lengths, each prefix its own."""
    env: ParallelTimingWrapper
    """The env the agents live in (graded after the warm phase)."""
    observations: dict[str, str]
    """The agents' observations."""


ALIGN_SLACK_TOKENS = 6
"""Tokens ``align_prefix`` keeps past the boundary: run tags differ in length by a few tokens."""


def _task_for(config: PrefixTestConfig, tag: str, system_prompt: str | None = None) -> EchoTask:
    if system_prompt is None:
        return EchoTask(run_tag=f"[echo-prefix run {tag}]")
    return EchoTask(system_prompt=system_prompt, run_tag=f"[echo-prefix run {tag}]")


def aligned_system_prompt(config: PrefixTestConfig, facts: ServerFacts) -> str | None:
    """The system prompt ``align_prefix`` asks for on this server (None: the shipped one, unchanged).

    Raises:
        ConfigError: The block size is unknown (the server does not say and no ``block_size=``).
    """
    if config.align_prefix == "off":
        return None
    block = facts.block_size or config.block_size
    if block is None:
        raise ConfigError("align_prefix needs the cache block size: the server does not say it, pass block_size=")
    # A tag of the run's form (8 hex digits), since the tag is part of the prefix.
    task = _task_for(config, "5f3a9c2e-on00")
    render: Literal["transcript", "chat"] = "chat" if config.api == "chat" else "transcript"
    aligned = align_system_prompt(
        task, facts.tokenizer(), block, mode=config.align_prefix, slack_tokens=ALIGN_SLACK_TOKENS, render=render
    )
    return aligned.system_prompt


def build_workload(config: PrefixTestConfig, tag: str, seed: int, system_prompt: str | None = None) -> Workload:
    """Make the env for one repeat and the prompts of its three phases.

    ``system_prompt`` replaces the shipped one (see :func:`aligned_system_prompt`).
    """
    task = _task_for(config, tag, system_prompt)
    env = ParallelTimingWrapper(
        EchoPrefixParallelEnv(batch_size=config.batch_size, group_size=config.group_size, task=task)
    )
    observations, infos = env.reset(seed=seed)
    agents = list(observations)

    def prompt_of(agent: str, t: EchoTask, word: str) -> Any:
        return t.chat_messages(word) if config.api == "chat" else t.transcript(word)

    prompts: dict[str, Any] = {}
    for i, agent in enumerate(agents):
        word = infos[agent]["word"]
        if config.vary_before_prefix:
            # The spoiler: something agent-specific in front of the shared text.
            spoiled = EchoTask(system_prompt=task.system_prompt, run_tag=f"[agent {i:04d}] " + task.run_tag)
            prompts[agent] = prompt_of(agent, spoiled, word)
        else:
            prompts[agent] = prompt_of(agent, task, word)
    control: dict[str, Any] = {}
    for i, agent in enumerate(agents[1:]):
        # A tag of its own per request (and per repeat and server: a tag seen in an earlier
        # repeat would be warm), a few tokens longer than the run tag at most.
        ctrl = EchoTask(system_prompt=task.system_prompt, run_tag=f"[echo-prefix ctrl {tag}.{i:04d}]")
        control[f"control{i}"] = prompt_of(agent, ctrl, infos[agent]["word"])
    first = agents[0]
    return Workload(
        cold={first: prompts[first]},
        warm={a: prompts[a] for a in agents[1:]},
        control=control,
        env=env,
        observations=observations,
    )


class _Metrics:
    """Counter snapshots around phases; quiet when the server has no metrics."""

    def __init__(self, reader: MetricsReader | None) -> None:
        self.reader = reader
        self.error: str | None = None

    def snapshot(self) -> Snapshot | None:
        if self.reader is None:
            return None
        try:
            return self.reader.snapshot()
        except MetricsError as exc:
            self.error = str(exc)
            log.warning("metrics unavailable: %s", exc)
            return None


def _delta(before: Snapshot | None, after: Snapshot | None) -> CounterDelta | None:
    if before is None or after is None:
        return None
    return delta(before.counters, after.counters)


async def _tokenized_plan(
    facts: ServerFacts, config: PrefixTestConfig, prompts: Sequence[Any], warm: Sequence[Any]
) -> TokenPlan | None:
    """The plan of ``prompts`` sent after ``warm``; None when tokens or block size are unknown."""
    block = facts.block_size or config.block_size
    if block is None:
        return None
    ids = await tokenize_prompts(facts, list(warm) + list(prompts), api=config.api, api_key=config.api_key)
    if ids is None:
        return None
    return plan_tokens(ids[len(warm) :], block, warm=ids[: len(warm)])


ProgressFn = Callable[[int], None]


async def run_phases(
    config: PrefixTestConfig,
    client: LLMClient,
    facts: ServerFacts,
    server: str,
    run_id: str,
    on_phase: Callable[[PhaseRun], None],
    progress: ProgressFn | None = None,
) -> list[PhaseRun]:
    """Run ``repeats`` x (cold, warm, control) against one server.

    ``on_phase`` is called after every phase (the caller writes its records to disk).
    """
    sampling = SamplingConfig(
        api=config.api,
        batching="per_agent",
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        seed=config.seed,
        prompt_format=config.prompt_format,
    )
    tokenizer = None
    if config.prompt_format == "tokens":
        tokenizer = facts.tokenizer()
    worker = RolloutWorker(client, sampling, tokenizer=tokenizer)
    if progress is not None:
        worker.on_record = lambda _record: progress(1)
    system_prompt = aligned_system_prompt(config, facts)
    reader = (
        MetricsReader(facts.metrics_url, model_name=facts.model, api_key=config.api_key) if facts.metrics_url else None
    )
    metrics = _Metrics(reader)
    runs: list[PhaseRun] = []
    for repeat in range(config.repeats):
        tag = f"{run_id}-{server[6:]}{repeat:02d}"
        work = build_workload(config, tag, seed=config.seed + repeat, system_prompt=system_prompt)
        cold_prompts, warm_prompts = list(work.cold.values()), list(work.warm.values())
        cold_plan = await _tokenized_plan(facts, config, cold_prompts, ())
        warm_plan = await _tokenized_plan(facts, config, warm_prompts, cold_prompts)
        ctrl_plan = await _tokenized_plan(facts, config, list(work.control.values()), ())
        single_plan = await _tokenized_plan(facts, config, cold_prompts, cold_prompts)
        completions: dict[str, Any] = {}
        for name, prompts, plan in (
            ("cold", work.cold, cold_plan),
            ("warm", work.warm, warm_plan),
            # The cold prompt again, alone: cold vs warm TTFT at the same (zero) load.
            ("warm_single", {f"{next(iter(work.cold))}-again": cold_prompts[0]}, single_plan),
            ("control", work.control, ctrl_plan),
        ):
            before = metrics.snapshot()
            start = time.perf_counter()
            done, records = await worker.complete(prompts)
            wall = time.perf_counter() - start
            after = metrics.snapshot()
            for rec in records:
                rec.tag = f"{server}/{name}/{repeat}/{rec.tag}"
            run = PhaseRun(name, server, repeat, list(records), wall, _delta(before, after), plan)
            if name in ("cold", "warm"):
                completions.update(done)
            runs.append(run)
            try:
                worker.check_reachable(records)
            except ServerUnreachableError:
                on_phase(run)  # the failed requests and their reasons are part of what was measured
                raise
            if name == "warm":
                # Grade the agents: the env is the workload, not just a prompt source.
                work.env.set_request_timings({a: c.timing for a, c in completions.items()})
                _, rewards, _, _, _ = work.env.step({a: c.text for a, c in completions.items()})
                first = next(iter(work.cold))
                runs[-2].rewards = [rewards[first]]
                # A failed request's empty reply is graded too; it says nothing about the model.
                run.rewards = [r for a, r in rewards.items() if a != first and completions[a].error is None]
            on_phase(run)
            log.debug("%s %s repeat %d: %d requests in %.2f s", server, name, repeat, len(records), wall)
    return runs


def _first_difference_detail(facts: ServerFacts, ids: list[list[int]]) -> dict[str, Any] | None:
    diff = first_difference(ids)
    if diff is None:
        return None
    context = facts.decode(ids[diff.other_index][max(0, diff.position - 8) : diff.position + 4])
    return {"position": diff.position, "other_index": diff.other_index, "context": context}


def checks_and_verdict(
    facts: ServerFacts,
    plan: TokenPlan | None,
    first_diff: dict[str, Any] | None,
    on: dict[str, dict[str, Any]],
    speedup: dict[str, float] | None,
    metrics_error: str | None,
) -> tuple[Verdict, str, list[dict[str, Any]]]:
    """Decide PASS / FAIL / UNKNOWN from the pooled cache-on figures.

    Returns:
        The verdict, the reason a user can act on, and every check made.
    """
    warm = on.get("warm", {})
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool | None, detail: str) -> None:
        checks.append({"name": name, "passed": passed, "detail": detail})

    enabled = facts.prefix_caching_enabled
    check(
        "caching enabled on the server",
        enabled,
        {
            True: "vllm:cache_config_info says enable_prefix_caching=True",
            False: "the server reports caching disabled",
            None: "the server does not say",
        }[enabled],
    )
    if plan is not None:
        shared_ok = plan.cacheable_shared_tokens > 0
        detail = (
            f"{plan.shared_prefix_tokens} shared tokens, "
            f"{plan.cacheable_shared_tokens} in whole blocks of {plan.block_size}"
        )
        if first_diff is not None and first_diff["position"] < plan.block_size:
            detail += f"; prompts first differ at token {first_diff['position']} ({first_diff['context']!r})"
        check("prefix shared across prompts in whole blocks", shared_ok, detail)
    else:
        check("prefix shared across prompts in whole blocks", None, "no tokenizer and block size: pass block_size=")
    hit, ceiling, reported = warm.get("hit_rate"), warm.get("hit_rate_ceiling"), warm.get("hit_rate_reported")
    # After a restart the cache starts empty, so even cached_tokens would understate it.
    measured = None if warm.get("counter_reset") else (hit if hit is not None else reported)
    source = "server counters" if hit is not None else "usage.cached_tokens"
    if measured is None:
        check("hits reach 90% of the ceiling", None, "no counters and no cached_tokens")
    elif ceiling:
        check(
            "hits reach 90% of the ceiling",
            measured >= HIT_RATE_FRACTION * ceiling,
            f"warm hit rate {measured:.3f} ({source}) vs ceiling {ceiling:.3f}: {measured / ceiling:.0%}",
        )
    else:
        check("hits reach 90% of the ceiling", measured > 0, f"warm hit rate {measured:.3f}; ceiling unknown")
    control_hits = on.get("control", {}).get("hit_rate")
    if control_hits is None:
        control_hits = on.get("control", {}).get("hit_rate_reported")
    check(
        "control phase found nothing to hit",
        None if control_hits is None else control_hits <= CONTROL_HIT_LIMIT,
        "n/a" if control_hits is None else f"control hit rate {control_hits:.3f}",
    )
    if speedup is not None:
        check(
            "warm TTFT below control TTFT",
            speedup["low"] > 1.0,
            f"control/warm TTFT p50 = {speedup['ratio']:.2f}x (95% CI {speedup['low']:.2f}-{speedup['high']:.2f})",
        )
    else:
        check("warm TTFT below control TTFT", None, "not enough finished requests")

    if enabled is False:
        return "FAIL", "caching disabled on the server: start vLLM with --enable-prefix-caching", checks
    if plan is not None and plan.cacheable_shared_tokens == 0:
        if first_diff is not None and first_diff["position"] < plan.block_size:
            return (
                "FAIL",
                f"prefix not shared: prompts first differ at token {first_diff['position']} "
                f"({first_diff['context']!r}); move anything that varies after the shared text",
                checks,
            )
        return "FAIL", f"prefix shorter than one block ({plan.block_size} tokens): nothing can be cached", checks
    finished = warm.get("requests", 0) - warm.get("failed", 0)
    check(
        "warm requests finished",
        None if not warm else finished == warm.get("requests"),
        f"{finished} of {warm.get('requests', 0)}"
        + (f"; first error: {warm['first_error']}" if warm.get("first_error") else ""),
    )
    if warm and finished == 0:
        return (
            "UNKNOWN",
            f"no warm request finished ({warm.get('failed')} failed; first error: {warm.get('first_error')}): "
            "fix what the error names, or raise timeout_s",
            checks,
        )
    if warm.get("counter_reset"):
        return (
            "UNKNOWN",
            "the server restarted during the warm phase (its counters went back to zero), so that phase's hit "
            "rate is unknown: rerun on a server that stays up",
            checks,
        )
    if measured is None:
        why = metrics_error or "no prefix-cache counters on /metrics"
        return (
            "UNKNOWN",
            f"cannot see cache hits ({why}): expose /metrics, or start vLLM with --enable-prompt-tokens-details "
            "(SGLang: --enable-cache-report)",
            checks,
        )
    if measured == 0:
        return "FAIL", "hits at zero: the server computed every prompt token although the prefix repeats", checks
    if ceiling and measured < HIT_RATE_FRACTION * ceiling:
        return (
            "FAIL",
            f"hit rate far under the ceiling: {measured:.3f} vs {ceiling:.3f} ({measured / ceiling:.0%}); "
            "the cache may be too small or evicting",
            checks,
        )
    if control_hits is not None and control_hits > CONTROL_HIT_LIMIT:
        return (
            "UNKNOWN",
            f"the control phase hit the cache ({control_hits:.2f}), so it is no uncached baseline: is something "
            "rewriting the prompts' start (a proxy or template)?",
            checks,
        )
    if speedup is None:
        return "UNKNOWN", "hits are there but too few requests finished to compare TTFT", checks
    if speedup["low"] <= 1.0:
        return (
            "FAIL",
            f"hits are there but warm TTFT is not lower than control beyond the CI "
            f"({speedup['ratio']:.2f}x, CI {speedup['low']:.2f}-{speedup['high']:.2f})",
            checks,
        )
    ceiling_txt = f" of a {ceiling:.2f} ceiling ({measured / ceiling:.0%})" if ceiling else ""
    return (
        "PASS",
        f"prefix caching works: hit rate {measured:.2f}{ceiling_txt}, warm TTFT {speedup['ratio']:.1f}x faster",
        checks,
    )


def _speedup(slow: Sequence[PhaseRun], fast: Sequence[PhaseRun], seed: int) -> dict[str, float] | None:
    a = [r.ttft_s for run in slow for r in run.records if r.ok and r.ttft_s is not None]
    b = [r.ttft_s for run in fast for r in run.records if r.ok and r.ttft_s is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    ci = bootstrap_ratio_ci(a, b, seed=seed)
    return {"ratio": ci.ratio, "low": ci.low, "high": ci.high}


def summarize_runs(
    config: PrefixTestConfig,
    facts: ServerFacts,
    runs: Sequence[PhaseRun],
    baseline_facts: ServerFacts | None,
    metrics_errors: dict[str, str | None],
    plan_info: dict[str, Any] | None,
    first_diff: dict[str, Any] | None,
    plan: TokenPlan | None,
) -> dict[str, Any]:
    """Pool the phases, compute speedups and the verdict: the summary's figures."""
    by_phase: dict[str, dict[str, dict[str, Any]]] = {}
    for server in ("cache_on", "cache_off"):
        phases = {}
        for name in PHASES:
            chosen = [r for r in runs if r.server == server and r.name == name]
            if chosen:
                phases[name] = _pooled(chosen)
        if phases:
            by_phase[server] = phases
    on = by_phase.get("cache_on", {})
    warm_on = [r for r in runs if r.server == "cache_on" and r.name == "warm"]
    ctrl_on = [r for r in runs if r.server == "cache_on" and r.name == "control"]
    speed = _speedup(ctrl_on, warm_on, config.seed)
    verdict, reason, checks = checks_and_verdict(facts, plan, first_diff, on, speed, metrics_errors.get("cache_on"))
    workload = _pooled([r for r in runs if r.server == "cache_on" and r.name in ("cold", "warm")]) if on else {}
    warm = on.get("warm", {})
    hit = warm.get("hit_rate")
    ceiling = warm.get("hit_rate_ceiling")
    measured = None if warm.get("counter_reset") else (hit if hit is not None else warm.get("hit_rate_reported"))
    summary: dict[str, Any] = {
        "verdict": verdict,
        "reason": reason,
        "checks": checks,
        "hit_rate": measured,
        "hit_rate_source": "metrics" if hit is not None else ("cached_tokens" if measured is not None else None),
        "hit_rate_reported": warm.get("hit_rate_reported"),
        "hit_rate_ceiling": ceiling,
        "hit_rate_vs_ceiling": measured / ceiling if measured is not None and ceiling else None,
        "workload_hit_rate": workload.get("hit_rate"),
        "workload_hit_rate_ceiling": workload.get("hit_rate_ceiling"),
        "server": facts.to_json(),
        "token_plan": plan_info,
        "phases": [r.figures() for r in runs],
        "by_phase": by_phase,
        "ttft_p50_s": {name: fig.get("ttft_p50_s") for name, fig in on.items()},
        "throughput_rps": {name: fig.get("throughput_rps") for name, fig in on.items()},
        "speedup_ttft": speed,
        "speedup_ttft_cold_vs_warm_single": _speedup(
            [r for r in runs if r.server == "cache_on" and r.name == "cold"],
            [r for r in runs if r.server == "cache_on" and r.name == "warm_single"],
            config.seed,
        ),
        "speedup_throughput": _ratio(
            on.get("warm", {}).get("throughput_rps"), on.get("control", {}).get("throughput_rps")
        ),
        "cache_off": None,
    }
    off = by_phase.get("cache_off")
    if off and baseline_facts is not None:
        warm_off = [r for r in runs if r.server == "cache_off" and r.name == "warm"]
        ctrl_off = [r for r in runs if r.server == "cache_off" and r.name == "control"]
        off_verdict, off_reason, _ = checks_and_verdict(
            baseline_facts,
            plan,
            first_diff,
            off,
            _speedup(ctrl_off, warm_off, config.seed),
            metrics_errors.get("cache_off"),
        )
        summary["cache_off"] = {
            "verdict": off_verdict,
            "reason": off_reason,
            "server": baseline_facts.to_json(),
            "hit_rate": off.get("warm", {}).get("hit_rate"),
            "ttft_p50_s": {name: fig.get("ttft_p50_s") for name, fig in off.items()},
            "throughput_rps": {name: fig.get("throughput_rps") for name, fig in off.items()},
            "speedup_ttft_on_vs_off": _speedup(warm_off, warm_on, config.seed),
            "throughput_ratio_on_vs_off": _ratio(warm.get("throughput_rps"), off.get("warm", {}).get("throughput_rps")),
        }
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _plan_info(plan: TokenPlan | None, facts: ServerFacts, first_diff: dict[str, Any] | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "tokenized_by": facts.tokenized_by,
        "prompt_tokens_min": plan.min_prompt_tokens,
        "prompt_tokens_max": plan.max_prompt_tokens,
        "shared_prefix_tokens": plan.shared_prefix_tokens,
        "cacheable_shared_tokens": plan.cacheable_shared_tokens,
        "block_size": plan.block_size,
        "hit_rate_ceiling": plan.hit_rate_ceiling,
        "first_difference": first_diff,
    }


@contextlib.contextmanager
def _server(config: PrefixTestConfig, caching: bool) -> Iterator[tuple[str, str | None, bool, Any]]:
    """Yield (base_url, model, embedded, engine) for the cache-on or cache-off server."""
    if config.base_url is not None:
        url = config.base_url if caching else config.baseline_url
        assert url is not None
        yield url, config.model_name, False, None
        return
    from echo_env.serving.engine import EmbeddedEngine, EngineConfig

    with EmbeddedEngine(EngineConfig(model=config.model_name, prefix_caching=caching)) as engine:
        yield engine.base_url, engine.served_model_name, True, engine


def default_out_dir() -> Path:
    """``echo_prefix_results/<UTC time>-<short id>`` under the current folder."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("echo_prefix_results") / f"{stamp}-{uuid.uuid4().hex[:6]}"


def run_prefix_test(config: PrefixTestConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the whole test and write its results; the summary is returned.

    Whatever happens, ``summary.json`` and the records measured so far are on disk in
    ``out_dir``; an error mid-run gives verdict UNKNOWN with ``partial: true``.
    """
    from echo_env.report.files import RunWriter

    if config.api_key is None and os.environ.get("OPENAI_API_KEY"):
        # The key the OpenAI client picks up by itself must reach /metrics and /tokenize too.
        config = replace(config, api_key=os.environ["OPENAI_API_KEY"])
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir()
    writer = RunWriter(out_dir)
    started = dt.datetime.now(dt.timezone.utc)
    state: dict[str, Any] = {"runs": [], "facts": None, "baseline": None, "errors": {}, "plan": None}
    summary: dict[str, Any] = {}
    try:
        asyncio.run(_run_all(config, writer, state, show_progress))
        summary = _final_summary(config, state)
        summary["partial"], summary["error"] = False, None
    except (EchoEnvError, KeyboardInterrupt, Exception) as exc:
        summary = _final_summary(config, state) if state["facts"] is not None else {}
        message = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        summary.update(
            {"verdict": "UNKNOWN", "reason": f"the run did not finish: {message}", "partial": True, "error": message}
        )
        summary["config"] = config.public()
        _stamp(summary, started, out_dir)
        writer.write_summary(summary)
        raise
    summary["config"] = config.public()
    _stamp(summary, started, out_dir)
    summary["files"] = [str(p) for p in writer.finish(summary)]
    _log_wandb(config, summary)
    return summary


def _stamp(summary: dict[str, Any], started: dt.datetime, out_dir: Path) -> None:
    finished = dt.datetime.now(dt.timezone.utc)
    summary["started_at"] = started.isoformat()
    summary["finished_at"] = finished.isoformat()
    summary["duration_s"] = (finished - started).total_seconds()
    summary["out_dir"] = str(out_dir)


def _final_summary(config: PrefixTestConfig, state: dict[str, Any]) -> dict[str, Any]:
    plan, first_diff, plan_info = state["plan"] or (None, None, None)
    return summarize_runs(
        config, state["facts"], state["runs"], state["baseline"], state["errors"], plan_info, first_diff, plan
    )


async def _run_all(config: PrefixTestConfig, writer: Any, state: dict[str, Any], show_progress: bool) -> None:
    from tqdm.auto import tqdm

    run_id = uuid.uuid4().hex[:8]
    servers = [("cache_on", True)]
    if config.compare_without_cache or config.baseline_url:
        if config.base_url is not None and config.baseline_url is None:
            raise ConfigError(
                "compare_without_cache with your own server needs baseline_url= (a second server started with "
                "--no-enable-prefix-caching)"
            )
        servers.append(("cache_off", False))
    agents = config.batch_size * config.group_size
    total = len(servers) * config.repeats * 2 * agents
    bar = tqdm(total=total, desc="echo-prefix test", unit="req", disable=not show_progress)
    try:
        for server, caching in servers:
            with _server(config, caching) as (url, model, embedded, _engine):
                client_cfg = ClientConfig(
                    base_url=url,
                    model=model,
                    api_key=config.api_key,
                    timeout_s=config.timeout_s,
                    max_concurrency=config.max_concurrency,
                )
                async with LLMClient(client_cfg) as client:
                    served = await client.model()
                    facts = await read_server_facts(
                        url, served, config.metrics_url if caching else None, embedded=embedded, api_key=config.api_key
                    )
                    if facts.block_size is None and config.block_size is not None:
                        facts.block_size = config.block_size
                    if embedded:
                        facts.tokenizer_source = config.model_name or "default"
                    state["errors"][server] = facts.metrics_error  # named in an UNKNOWN verdict
                    if caching:
                        state["facts"] = facts
                        state["plan"] = await _whole_plan(config, facts, run_id)
                    else:
                        state["baseline"] = facts

                    def on_phase(run: PhaseRun) -> None:
                        state["runs"].append(run)
                        writer.append_records(_record_rows(run))
                        writer.write_summary(_final_summary(config, state) | {"partial": True})

                    await run_phases(config, client, facts, server, run_id, on_phase, bar.update)
    finally:
        bar.close()


async def _whole_plan(
    config: PrefixTestConfig, facts: ServerFacts, run_id: str
) -> tuple[TokenPlan, dict[str, Any] | None, dict[str, Any] | None] | None:
    """The plan of repeat 0's cold + warm prompts (for the shared-prefix checks)."""
    work = build_workload(
        config, f"{run_id}-on00", seed=config.seed, system_prompt=aligned_system_prompt(config, facts)
    )
    prompts = list(work.cold.values()) + list(work.warm.values())
    block = facts.block_size or config.block_size
    ids = await tokenize_prompts(facts, prompts, api=config.api, api_key=config.api_key)
    if ids is None or block is None:
        return None
    plan = plan_tokens(ids, block)
    first_diff = _first_difference_detail(facts, ids)
    return plan, first_diff, _plan_info(plan, facts, first_diff)


def _record_rows(run: PhaseRun) -> list[dict[str, Any]]:
    rows = []
    for record in run.records:
        row = record.to_json()
        row.update({"phase": run.name, "server": run.server, "repeat": run.repeat})
        row["text"] = " | ".join(out["text"] for out in row.pop("outputs"))
        rows.append(row)
    return rows


def _log_wandb(config: PrefixTestConfig, summary: dict[str, Any]) -> None:
    if not config.wandb_project:
        return
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        log.warning("wandb_project is set but wandb is not installed: pip install wandb")
        return
    run = wandb.init(project=config.wandb_project, name=config.wandb_name, config=summary.get("config"))
    flat = {
        "verdict": summary["verdict"],
        "hit_rate": summary.get("hit_rate"),
        "hit_rate_ceiling": summary.get("hit_rate_ceiling"),
    }
    for name, value in (summary.get("ttft_p50_s") or {}).items():
        flat[f"time/ttft_p50_{name}"] = value
    for name, value in (summary.get("throughput_rps") or {}).items():
        flat[f"throughput/{name}_rps"] = value
    run.log(flat)
    run.finish()
