"""The prefix-cache test's runner: measure an open server's phases, keep the result as it grows.

The command opens each server (cache on; then the cache-off baseline when asked for) and
hands it to :func:`measure_server`, which reads the server's facts, builds the whole
workload once (:func:`~echo_env.cachetest.workload.build_workload`) and sends it, on a
prefix made new by a run tag:

1. ``cold``: the first agent alone;
2. ``warm``: every other agent in one burst, for the hit rate against its ceiling; then
   every answer is graded by stepping the env;
3. ``warm_single``: the cold prompt again, alone (cold vs warm at zero load);
4. ``turn<n>``: with ``turns>1``, each later turn of the episodes, graded in turn;
5. TTFT repeats: a small warm burst and a small control burst each, their order
   alternating between repeats, one control/warm ratio per repeat, until the interval
   over repeats decides or ``max_repeats`` is reached; the first three repeats add a burst of
   short uncached prompts, for what prefill costs (:mod:`echo_env.cachetest.prefill`);
6. the answer checks asked for (:mod:`echo_env.cachetest.answer_run`).

Every phase is measured by :func:`echo_env.measure.phase.measure_phase`; its records go to
the sink as it ends, with a summary judged on what has been measured
(:mod:`echo_env.cachetest.judge`), so a run that dies keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, Protocol

from echo_env.cachetest import prefill as pf
from echo_env.cachetest.answer_run import measure_answer_checks
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.fleet_run import FleetWatch, counter_probe
from echo_env.cachetest.judge import Measured
from echo_env.cachetest.results import FirstDifference, PrefixEvidence
from echo_env.cachetest.turns import Episode, later_turns, sampling
from echo_env.cachetest.workload import Prompt, Workload, build_workload, key_of
from echo_env.errors import ServerUnreachableError
from echo_env.launch.model import load_tokenizer
from echo_env.launch.target import OpenServer
from echo_env.measure.figures import PhaseFigures
from echo_env.measure.phase import CounterProbe, measure_phase
from echo_env.measure.stats import sequential_decision
from echo_env.measure.tokens import first_difference, plan_tokens
from echo_env.rollout.worker import RolloutWorker
from echo_env.wire.client import LLMClient, RequestRecord
from echo_env.wire.info import ServerFacts, read_server_facts, tokenize_prompts
from echo_env.wire.records import unreachable

log = logging.getLogger(__name__)


class _ShortOfEvidence(Exception):
    """A phase lost more requests than ``max_failed_fraction``: the verdict cannot be PASS, so stop."""


class _Run:
    """One server's phases: sends, measures, keeps the token plan of everything sent."""

    def __init__(
        self, config: PrefixTestConfig, state: Measured, worker: RolloutWorker, probe: CounterProbe, sink: PhaseSink
    ) -> None:
        self.config = config
        self.state = state
        self.worker = worker
        self.probe = probe
        self.sink = sink
        facts = state.facts
        assert facts is not None
        self.facts = facts
        self.ids: dict[str, list[int]] = {}
        self.sent: list[list[int]] = []
        self.answers: list[list[int]] = []
        """The last turn's prompts with their generated tokens: the server caches their full blocks too."""

    def plan(self, prompts: Sequence[Prompt], extra_cold: int = 0) -> Any:
        unit = self.facts.block_size
        if unit is None or not self.ids or any(key_of(p) not in self.ids for p in prompts):
            return None
        seqs = [self.ids[key_of(p)] for p in prompts]
        return plan_tokens(seqs, unit, warm=[*self.sent, *self.answers], extra_cold=extra_cold)

    async def phase(
        self,
        name: str,
        prompts: dict[str, Prompt],
        repeat: int | None = None,
        extra_cold: int = 0,
        sessions: dict[str, str] | None = None,
    ) -> tuple[PhaseFigures, dict[str, Any]]:
        """Send one phase and measure it; its figures and each agent's completion.

        Raises:
            ServerUnreachableError: No request reached the server, or more than ``max_failed_fraction``
                failed and some of them could not connect.
            _ShortOfEvidence: More requests failed than ``max_failed_fraction`` allows.
        """
        plan = self.plan(list(prompts.values()), extra_cold)
        done: dict[str, Any] = {}

        async def send() -> list[RequestRecord]:
            completions, records = await self.worker.complete(prompts, sessions)
            done.update(completions)
            return records

        measured = await measure_phase(name, send, probe=self.probe, plan=plan, server=self.state.label, repeat=repeat)
        if self.ids:
            self.sent.extend(self.ids[key_of(p)] for p in prompts.values() if key_of(p) in self.ids)
        self.state.phases.append(measured.figures)
        self.sink.phase_done(measured.figures, measured.records)
        f, records = measured.figures, measured.records
        dead = [r for r in records if unreachable(r)]
        lossy = bool(f.requests) and f.failed / f.requests > self.config.rules.max_failed_fraction
        if lossy or (dead and len(dead) == len(records)):
            if dead:  # refused or cut connections: the server went away, which is not a lossy phase
                raise ServerUnreachableError(
                    f"{len(dead)} of {len(records)} requests of the {name} phase could not reach the server "
                    f"({dead[0].error})"
                )
            raise _ShortOfEvidence(name)
        return f, done

    def graded(self, name: str, rewards: list[float]) -> None:
        """Give the last phase called ``name`` the mean env reward of its graded answers."""
        if not rewards:
            return
        phases = self.state.phases
        i = max(i for i, p in enumerate(phases) if p.name == name)
        phases[i] = dataclasses.replace(phases[i], mean_reward=math.fsum(rewards) / len(rewards))


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
    rules, st = run.config.rules, run.state
    for r, bursts in enumerate(work.ttft):
        order = ("warm", "control") if r % 2 == 0 else ("control", "warm")
        figures: dict[str, PhaseFigures] = {}
        for which in order:
            if which == "control" and bursts.short:
                # The prefill cost, in bursts of the same size (cachetest.prefill). Just before a
                # control burst: on llama.cpp a burst leaves its prompts in the slots, and
                # uncached ones there would cost the next warm burst its hits.
                await run.phase(pf.SHORT_PHASE, bursts.short, repeat=r)
            prompts = bursts.warm if which == "warm" else bursts.control
            figures[which], _ = await run.phase(f"ttft_{which}", prompts, repeat=r)
        ratio = _median_ratio(figures["control"], figures["warm"])
        st.orders.append(order[0])
        if ratio is not None:
            st.ratios.append(ratio)
        decision, _ = sequential_decision(
            st.ratios, rules.min_effect, rules.confidence, rules.min_repeats, run.config.max_repeats
        )
        phases = (st.named("ttft_control"), st.named(pf.SHORT_PHASE), st.named("ttft_warm"))
        enough = len(st.ratios) >= rules.min_repeats
        if decision != "undecided" or (enough and pf.below_min_effect(*phases, rules.min_effect)):
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


async def _phases(run: _Run, work: Workload, watch: FleetWatch | None, client: LLMClient) -> None:
    """Every phase of one server, in order; each one's answers graded as it ends."""
    state, episode = run.state, Episode(run.config, work)
    _, cold = await run.phase("cold", work.cold)
    warm, done = await run.phase("warm", work.warm, extra_cold=work.warm_misses)
    run.graded("warm", episode.grade({**cold, **done}))
    if watch is not None and state.label == "cache_on":
        cold_warm = (list(work.cold.values()), list(work.warm.values()))
        state.fleet = watch.after_warm(warm, run.ids, *cold_warm, run.facts.block_size)
    await run.phase("warm_single", work.warm_single)
    state.history = await later_turns(run, work, episode)
    await _ttft_repeats(run, work)
    if state.label == "cache_on":
        # After every timed phase, on prompts of their own (echo_env.cachetest.answer_run).
        state.answers = await measure_answer_checks(run.config, client, run.facts, work.checks)


async def measure_server(
    config: PrefixTestConfig, server: OpenServer, state: Measured, run_id: str, sink: PhaseSink
) -> None:
    """Measure one open server with the whole workload, ``state`` and ``sink`` kept up to date as phases end.

    Args:
        config: The test's settings.
        server: The open server.
        state: Its record (:meth:`echo_env.cachetest.record.PrefixTestRun.server`).
        run_id: Makes this run's prefix new (with the state's label).
        sink: Told as each phase ends.
    """
    target = config.server
    async with LLMClient(server.client) as client:
        state.facts = facts = await read_server_facts(
            server.base_url, await client.model(), target.metrics_url if state.label == "cache_on" else None,
            embedded=server.embedded, api_key=target.resolved_api_key, block_size=target.block_size,
        )  # fmt: skip
        facts.tokenizer_source = server.tokenizer_source or target.model_name
        # The default model's name may need its conversion first; loaded once however often it is asked for.
        facts.tokenizer_loader = functools.cache(load_tokenizer)
        work = build_workload(config, f"{run_id}-{state.label}", facts)
        tokenized = await tokenize_prompts(facts, work.to_tokenize, local_only=config.prompt_format == "tokens")
        # A fleet is measured on its replicas' own counters, never through the router's /metrics.
        probe, watch = counter_probe(server, facts, target.resolved_api_key)
        tokenizer = facts.tokenizer() if config.prompt_format == "tokens" else None
        worker = RolloutWorker(client, sampling(config, facts), tokenizer=tokenizer)
        run = _Run(config, state, worker, probe, sink)
        try:
            if tokenized is not None:
                run.ids = dict(zip(map(key_of, work.to_tokenize), tokenized.ids, strict=True))
                state.prefix = await _prefix_evidence(facts, tokenized.ids[: len(work.prompts)], tokenized.by)
            await _phases(run, work, watch, client)
        except _ShortOfEvidence as short:
            log.warning("stopping: the %s phase lost more requests than max_failed_fraction allows", short)
    state.decided_at = time.perf_counter()


class PhaseSink(Protocol):
    """What the runner tells as each phase ends (the test's record)."""

    def phase_done(self, figures: PhaseFigures, records: Sequence[RequestRecord]) -> None:
        """Keep one phase's figures and records."""
        ...
