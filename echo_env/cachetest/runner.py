"""The prefix-cache test's runner: open the server, measure the phases, hand the evidence to the verdict.

Per server (cache on; then the cache-off baseline when asked for), on a prefix made new
by a run tag:

1. ``cold``: the first agent alone;
2. ``warm``: every other agent in one burst, for the hit rate against its ceiling;
3. ``warm_single``: the cold prompt again, alone (cold vs warm at zero load);
4. TTFT repeats: a small warm burst and a small control burst each, their order
   alternating between repeats, one control/warm ratio per repeat, until the interval
   over repeats decides or ``max_repeats`` is reached; the first three repeats add a burst of
   short uncached prompts, for what prefill costs (:mod:`echo_env.cachetest.prefill`).

Every phase is measured by :func:`echo_env.measure.phase.measure_phase`; its records go to
disk as it ends, so a run that dies keeps what it measured.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from echo_env.cachetest import prefill as pf
from echo_env.cachetest.align import align_system_prompt
from echo_env.cachetest.answer_run import AnswerChecks, measure_answer_checks
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.fleet_run import join_decisions, watch_fleet
from echo_env.cachetest.results import (
    Comparison,
    Evidence,
    FirstDifference,
    FleetResult,
    PrefixEvidence,
    ServerEvidence,
    ServerRun,
    TestResult,
    TTFTEvidence,
)
from echo_env.cachetest.turns import Grader, TurnReuse, later_turns, request_fields, stop_strings
from echo_env.cachetest.verdict import decide
from echo_env.cachetest.workload import Prompt, Workload, all_prompts, build_workload, key_of, run_tag
from echo_env.errors import ConfigError, EchoEnvError, ServerUnreachableError
from echo_env.interrupts import run_main
from echo_env.launch.model import load_tokenizer
from echo_env.launch.target import OpenServer, open_target
from echo_env.measure.figures import PhaseFigures, pool
from echo_env.measure.phase import CounterProbe, measure_phase
from echo_env.measure.stats import EffectDecision, sequential_decision
from echo_env.measure.tokens import first_difference, plan_tokens, slot_cold_requests
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import LLMClient, RequestRecord
from echo_env.wire.info import ServerFacts, read_server_facts, tokenize_prompts

log = logging.getLogger(__name__)

ALIGN_SLACK_TOKENS = 6
"""Tokens ``align_prefix`` keeps past the boundary: run tags differ in length by a few tokens."""

PhaseHook = Callable[[PhaseFigures, Sequence[RequestRecord]], None]
"""Called as each phase ends (the runner writes its records and a partial summary)."""


@dataclass
class _State:
    """What one server's run has measured so far (enough to judge a run that stopped)."""

    label: str
    facts: ServerFacts | None = None
    prefix: PrefixEvidence | None = None
    phases: list[PhaseFigures] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    decided_at: float | None = None
    fleet: FleetResult | None = None
    history: list[TurnReuse] = field(default_factory=list)
    answers: AnswerChecks | None = None

    def named(self, name: str) -> list[PhaseFigures]:
        return [p for p in self.phases if p.name == name]


def aligned_system_prompt(config: PrefixTestConfig, facts: ServerFacts) -> str | None:
    """The system prompt ``align_prefix`` asks for on this server (None: the shipped one).

    Raises:
        ConfigError: The cache's block size is unknown.
    """
    if config.align_prefix == "off":
        return None
    if facts.block_size is None:
        raise ConfigError("align_prefix needs the cache block size: the server does not say it, pass block_size=")
    from echo_env.envs.task import EchoTask

    # A tag of the run's form (8 hex digits), since the tag is part of the prefix.
    task = EchoTask(run_tag=run_tag("5f3a9c2e-cache_on"))
    render: Literal["transcript", "chat"] = "chat" if config.api == "chat" else "transcript"
    aligned = align_system_prompt(
        task,
        facts.tokenizer(),
        facts.block_size,
        mode=config.align_prefix,
        slack_tokens=ALIGN_SLACK_TOKENS,
        render=render,
    )
    return aligned.system_prompt


class _ShortOfEvidence(Exception):
    """A phase lost more requests than ``max_failed_fraction``: the verdict cannot be PASS, so stop."""


class _Run:
    """One server's phases: sends, measures, keeps the token plan of everything sent."""

    def __init__(self, config: PrefixTestConfig, state: _State, worker: RolloutWorker, on_phase: PhaseHook) -> None:
        self.config = config
        self.state = state
        self.worker = worker
        self.on_phase = on_phase
        facts = state.facts
        assert facts is not None
        self.facts = facts
        # Metrics that failed when the server was first asked stay off: the reason is kept.
        reader = facts.metrics_reader() if facts.metrics_error is None else None
        self.probe = CounterProbe(reader, facts.metrics_error or "metrics_url=none")
        self.ids: dict[str, list[int]] = {}
        self.sent: list[list[int]] = []
        self.answers: list[list[int]] = []
        """The last turn's prompts with their generated tokens: the server caches their full blocks too."""

    def plan(self, prompts: Sequence[Prompt], extra_cold: int = 0) -> Any:
        unit = self.facts.block_size
        if unit is None or not self.ids:
            return None
        if any(key_of(p) not in self.ids for p in prompts):
            return None
        seqs = [self.ids[key_of(p)] for p in prompts]
        return plan_tokens(seqs, unit, warm=[*self.sent, *self.answers], extra_cold=extra_cold)

    async def phase(
        self,
        name: str,
        prompts: dict[str, Prompt],
        repeat: int | None = None,
        extra_cold: int = 0,
        grade: Callable[[dict[str, Any]], list[float]] | None = None,
        sessions: dict[str, str] | None = None,
    ) -> PhaseFigures:
        plan = self.plan(list(prompts.values()), extra_cold)
        done: dict[str, Any] = {}

        async def send() -> list[RequestRecord]:
            completions, records = await self.worker.complete(prompts, sessions)
            done.update(completions)
            return records

        measured = await measure_phase(
            name,
            send,
            probe=self.probe,
            plan=plan,
            server=self.state.label,
            repeat=repeat,
            rewards=(lambda _records: grade(done)) if grade else None,
        )
        if self.ids:
            self.sent.extend(self.ids[key_of(p)] for p in prompts.values() if key_of(p) in self.ids)
        self.state.phases.append(measured.figures)
        self.on_phase(measured.figures, measured.records)
        _check_reachable(measured.records)
        f = measured.figures
        if f.requests and f.failed / f.requests > self.config.max_failed_fraction:
            raise _ShortOfEvidence(name)
        return f


def _check_reachable(records: Sequence[RequestRecord]) -> None:
    dead = [r for r in records if not r.ok and (r.error or "").startswith("connection failed")]
    if dead and len(dead) == len(records):
        raise ServerUnreachableError(
            f"{len(dead)} of {len(records)} requests could not reach the server ({dead[0].error})"
        )


def _median_ratio(control: PhaseFigures, warm: PhaseFigures) -> float | None:
    if not control.ttft_samples or not warm.ttft_samples:
        return None
    w = statistics.median(warm.ttft_samples)
    return statistics.median(control.ttft_samples) / w if w > 0 else None


async def _ttft_repeats(run: _Run, work: Workload) -> None:
    """Pairs of small bursts, order alternating, until the interval over repeats decides.

    Also stopped, from ``min_repeats`` on, where the measured prefill cost says the hits can
    buy less than ``min_effect``: the verdict is then PASS on the hits whatever the interval.
    """
    cfg = run.config
    for r in range(cfg.max_repeats):
        warm_prompts, control_prompts = work.ttft_pair(r)
        order = ("warm", "control") if r % 2 == 0 else ("control", "warm")
        figures: dict[str, PhaseFigures] = {}
        for which in order:
            if which == "control" and r < pf.SHORT_REPEATS:
                # The prefill cost, in bursts of the same size (cachetest.prefill). Just before a
                # control burst: on llama.cpp a burst leaves its prompts in the slots, and
                # uncached ones there would cost the next warm burst its hits.
                await run.phase(pf.SHORT_PHASE, pf.short_prompts(control_prompts, work.task.run_tag, r), repeat=r)
            prompts = warm_prompts if which == "warm" else control_prompts
            figures[which] = await run.phase(f"ttft_{which}", prompts, repeat=r)
        ratio = _median_ratio(figures["control"], figures["warm"])
        run.state.orders.append(order[0])
        if ratio is not None:
            run.state.ratios.append(ratio)
        decision, _ = sequential_decision(
            run.state.ratios, cfg.min_effect, cfg.confidence, cfg.min_repeats, cfg.max_repeats
        )
        st = run.state
        phases = (st.named("ttft_control"), st.named(pf.SHORT_PHASE), st.named("ttft_warm"))
        enough = len(st.ratios) >= cfg.min_repeats
        if decision != "undecided" or (enough and pf.below_min_effect(*phases, cfg.min_effect)):
            break


async def _prefix_evidence(facts: ServerFacts, ids: list[list[int]], by: str) -> PrefixEvidence | None:
    unit = facts.block_size
    if unit is None or not ids:
        return None
    plan = plan_tokens(ids, unit)
    diff = first_difference(ids)
    first = None
    if diff is not None:
        seq = ids[diff.other_index]
        context = await facts.decode(seq[max(0, diff.position - 8) : diff.position + 4])
        first = FirstDifference(diff.position, diff.other_index, context)
    assert facts.granularity is not None
    return PrefixEvidence(
        tokenized_by=by,
        unit_tokens=unit,
        unit_source=facts.granularity.source,
        prompt_tokens_min=plan.min_prompt_tokens,
        prompt_tokens_max=plan.max_prompt_tokens,
        shared_tokens=plan.shared_prefix_tokens,
        cacheable_shared_tokens=plan.cacheable_shared_tokens,
        first_difference=first,
        workload_ceiling=plan.hit_rate_ceiling,
    )


async def _measure_server(
    config: PrefixTestConfig, state: _State, server: OpenServer, run_id: str, hook: PhaseHook
) -> None:
    target = config.server
    async with LLMClient(target.client_config(server)) as client:
        model = await client.model()
        metrics_url = target.metrics_url if state.label == "cache_on" else None
        facts = await read_server_facts(
            server.base_url, model, metrics_url, embedded=server.embedded, api_key=target.resolved_api_key,
            block_size=target.block_size,
        )  # fmt: skip
        facts.tokenizer_source = server.tokenizer_source or target.model_name
        facts.tokenizer_loader = load_tokenizer  # the default model's name may need its conversion first
        state.facts = facts
        work = build_workload(config, f"{run_id}-{state.label}", aligned_system_prompt(config, facts))
        prompts = all_prompts(work, config.max_repeats)
        tokenized = await tokenize_prompts(facts, prompts, local_only=config.prompt_format == "tokens")
        sampling = SamplingConfig(
            api=config.api, batching="per_agent", max_tokens=config.max_tokens, temperature=config.temperature,
            seed=config.seed, prompt_format=config.prompt_format, stop=stop_strings(config),
            extra_body=request_fields(config, facts),
        )  # fmt: skip
        tokenizer = facts.tokenizer() if config.prompt_format == "tokens" else None
        run = _Run(config, state, RolloutWorker(client, sampling, tokenizer=tokenizer), hook)
        # A fleet is measured on its replicas' own counters, never through the router's /metrics.
        watch = await watch_fleet(server, facts, config.fleet_rules, target.resolved_api_key)
        if watch is not None:
            run.probe = watch.probe
        if tokenized is not None:
            run.ids = {key_of(p): ids for p, ids in zip(prompts, tokenized.ids, strict=True)}
            workload_ids = [run.ids[key_of(p)] for p in work.prompts.values()]
            state.prefix = await _prefix_evidence(facts, workload_ids, tokenized.by)
        slots = facts.granularity.slots if facts.granularity else None
        grade = Grader(work)
        try:
            await run.phase("cold", work.cold, grade=grade)
            if watch is not None:
                await watch.before_warm()
            warm = await run.phase("warm", work.warm, extra_cold=slot_cold_requests(len(work.warm), slots), grade=grade)
            if watch is not None and state.label == "cache_on":
                cold_warm = (list(work.cold.values()), list(work.warm.values()))
                state.fleet = await watch.after_warm(warm, run.ids, *cold_warm, facts.block_size)
            first, prompt = next(iter(work.cold.items()))
            await run.phase("warm_single", {f"{first}-again": prompt})
            state.history = await later_turns(run, work, grade)
            await _ttft_repeats(run, work)
            if state.label == "cache_on":
                # After every timed phase, on prompts of their own (echo_env.cachetest.answer_run).
                state.answers = await measure_answer_checks(config, client, facts, work)
        except _ShortOfEvidence as short:
            log.warning("stopping: the %s phase lost more requests than max_failed_fraction allows", short)
        state.decided_at = time.perf_counter()


def _server_evidence(facts: ServerFacts) -> ServerEvidence:
    g = facts.granularity
    cfg_source = {"vllm": "vllm:cache_config_info", "sglang": "SGLang /get_server_info", "llamacpp": "llama.cpp /props"}
    return ServerEvidence(
        kind=facts.kind.name,
        base_url=facts.base_url,
        model=facts.model,
        version=facts.props.version,
        caching_enabled=facts.caching_enabled,
        caching_enabled_source=cfg_source.get(facts.kind.name, "the server"),
        unit_tokens=g.unit_tokens if g else None,
        unit_source=g.source if g else None,
        slots=g.slots if g else None,
        metrics_url=facts.metrics_url,
        metrics_error=facts.metrics_error,
        caching_disabled_fix=facts.kind.caching_disabled_fix(),
        no_counters_fix=facts.kind.no_counters_fix(),
        embedded=facts.embedded,
    )


def judge(config: PrefixTestConfig, state: _State, run_error: str | None = None) -> ServerRun | None:
    """One server's evidence, verdict and figures from what it measured (None: not even its facts)."""
    if state.facts is None:
        return None
    turn_names = sorted({p.name for p in state.phases if p.name.startswith("turn")}, key=lambda n: int(n[4:]))
    names = ("cold", "warm", "warm_single", *turn_names, "ttft_warm", "ttft_control", pf.SHORT_PHASE)
    pooled = {n: pool(n, state.named(n), state.label) for n in names if state.named(n)}
    ci = None
    decision: EffectDecision = "undecided"
    if state.ratios:
        decision, ci = sequential_decision(
            state.ratios, config.min_effect, config.confidence, config.min_repeats, config.max_repeats
        )
    ttft = None
    if state.ratios:
        warm_of = {p.repeat: p for p in state.named("ttft_warm")}
        pairs = [(c, warm_of[c.repeat]) for c in state.named("ttft_control") if c.repeat in warm_of]
        prefill = pf.prefill_evidence(state.named("ttft_control"), state.named(pf.SHORT_PHASE), pooled.get("ttft_warm"))
        spread = pf.repeat_spread(state.ratios, pairs, state.orders if len(state.orders) == len(state.ratios) else ())
        ttft = TTFTEvidence(tuple(state.ratios), ci, decision, tuple(state.orders), prefill, spread)
    evidence = Evidence(
        server=_server_evidence(state.facts),
        prefix=state.prefix,
        warm=pooled.get("warm"),
        control=pooled.get("ttft_control"),
        ttft_warm=pooled.get("ttft_warm"),
        ttft=ttft,
        other_phases=tuple(pooled[n] for n in ("cold", "warm_single") if n in pooled),
        turns=tuple(pooled[n] for n in turn_names),
        history=tuple(state.history),
        run_error=run_error,
        fleet_ceiling=state.fleet.evidence.cache_ceiling() if state.fleet is not None else None,
        outputs=state.answers.outputs if state.answers else None,
        weight_update=state.answers.weight_update if state.answers else None,
        isolation=state.answers.isolation if state.answers else None,
    )
    verdict = decide(evidence, config.rules)
    if state.fleet is not None:
        verdict = join_decisions(verdict, state.fleet.decision)
    return ServerRun(
        label=state.label,
        evidence=evidence,
        decision=verdict,
        phases=tuple(state.phases),
        pooled=tuple(pooled.values()),
        comparisons=_comparisons(pooled),
        fleet=state.fleet,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _comparisons(pooled: dict[str, PhaseFigures]) -> tuple[Comparison, ...]:
    """Headline ratios beside the TTFT interval (which the evidence carries itself)."""
    out = []
    warm, control = pooled.get("ttft_warm"), pooled.get("ttft_control")
    if warm and control:
        out.append(
            Comparison("warm vs control req/s (TTFT bursts)", _ratio(warm.throughput_rps, control.throughput_rps))
        )
    cold, again = pooled.get("cold"), pooled.get("warm_single")
    if cold and again:
        out.append(Comparison("cold prompt sent again: TTFT", _ratio(cold.ttft.p50, again.ttft.p50)))
    return tuple(out)


def _on_vs_off(on: ServerRun, off: ServerRun) -> tuple[Comparison, ...]:
    def get(run: ServerRun, name: str) -> PhaseFigures | None:
        return next((p for p in run.pooled if p.name == name), None)

    out = []
    for name, label in (("warm", "warm burst"), ("ttft_warm", "small warm bursts")):
        a, b = get(on, name), get(off, name)
        if a and b:
            out.append(Comparison(f"cache on vs off: {label} TTFT p50", _ratio(b.ttft.p50, a.ttft.p50)))
            out.append(Comparison(f"cache on vs off: {label} req/s", _ratio(a.throughput_rps, b.throughput_rps)))
    return tuple(out)


def _record_rows(figures: PhaseFigures, records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        row = record.to_json()
        row.update({"phase": figures.name, "server": figures.server, "repeat": figures.repeat})
        row["text"] = " | ".join(out["text"] for out in row.pop("outputs"))
        rows.append(row)
    return rows


class ResultSink(Protocol):
    """Where a run's records and summary go as it runs (the report's ``RunWriter``, or nothing)."""

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Keep one phase's request records."""
        ...

    def write_summary(self, result: TestResult) -> Any:
        """Keep the summary so far (called after every phase)."""
        ...

    def finish(self, result: TestResult) -> Any:
        """Keep the final summary and whatever is derived from it."""
        ...


class NullSink:
    """A sink that keeps nothing (for callers that only want the returned result: benchmarks)."""

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        return 0

    def write_summary(self, result: TestResult) -> None:
        return None

    def finish(self, result: TestResult) -> None:
        return None


def run_phases_and_judge(config: PrefixTestConfig, sink: ResultSink, out_dir: str | None = None) -> TestResult:
    """Run the whole test, feeding ``sink`` as it goes; the typed result is returned.

    Whatever happens, the sink has the records measured so far and a summary; an error mid-run (in
    the cache-off baseline too: :attr:`TestResult.decision`) gives verdict UNKNOWN with ``partial: true``.
    A Ctrl-C is raised again once the sink is finished, and so is an error that struck before
    anything was measured (its message is the one line a user needs).
    """
    started = dt.datetime.now(dt.UTC)
    result = TestResult(config=config.public(), rules=config.rules, started_at=started.isoformat(), out_dir=out_dir)
    states: list[_State] = []
    clock = {"healthy": 0.0}

    def refresh(error: str | None = None) -> None:
        result.runs = [r for s in states if (r := judge(config, s, error if s is states[-1] else None))]
        on = states[0] if states else None
        if on and on.decided_at and clock["healthy"]:
            result.time_to_verdict_s = on.decided_at - clock["healthy"]
        if len(result.runs) == 2:
            result.on_vs_off = _on_vs_off(result.runs[0], result.runs[1])

    def hook(figures: PhaseFigures, records: Sequence[RequestRecord]) -> None:
        sink.append_records(_record_rows(figures, records))
        refresh()
        result.partial = True
        sink.write_summary(result)

    raised: BaseException | None = None
    try:
        run_main(lambda: _run_all(config, states, clock, hook))
        refresh()
        result.partial = False
    except KeyboardInterrupt as exc:
        raised = exc
        result.error = "interrupted (Ctrl-C)"
    except (EchoEnvError, Exception) as exc:  # the verdict on a crash is UNKNOWN, written down
        result.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EchoEnvError) else str(exc)
        log.debug("the run stopped", exc_info=True)
        if all(s.facts is None for s in states):
            raised = exc  # nothing measured: the error itself is the message (one line, exit 2)
    if result.error is not None:
        refresh(result.error)
        result.partial = True
    finished = dt.datetime.now(dt.UTC)
    result.finished_at = finished.isoformat()
    result.duration_s = (finished - started).total_seconds()
    sink.finish(result)
    if raised is not None:
        raise raised
    return result


async def _run_all(config: PrefixTestConfig, states: list[_State], clock: dict[str, float], hook: PhaseHook) -> None:
    servers = [("cache_on", True)]
    if config.compare_without_cache or config.baseline_url:
        servers.append(("cache_off", False))
    run_id = uuid.uuid4().hex[:8]
    for label, caching in servers:
        state = _State(label)
        states.append(state)
        # weight_update's reload, pause and reset are served in vLLM's dev mode only.
        dev_mode = caching and config.weight_update is not None
        with open_target(config.server, caching=caching, baseline_url=config.baseline_url, dev_mode=dev_mode) as server:
            if label == "cache_on":
                clock["healthy"] = time.perf_counter()
            try:
                await _measure_server(config, state, server, run_id, hook)
            except ServerUnreachableError as exc:
                if label == "cache_on" or config.baseline_url is None:
                    raise
                # The client's message names base_url; here the server that went missing is the baseline.
                raise ServerUnreachableError(
                    f"the cache-off baseline at baseline_url={config.baseline_url} does not answer ({exc}): start it "
                    "(the same model, --no-enable-prefix-caching) or drop baseline_url"
                ) from exc
