"""From what one server's run measured to its evidence, verdict and headline comparisons.

The runner fills a :class:`Measured` as phases end; :func:`judge` pools its phases, builds the
typed :class:`~echo_env.cachetest.results.Evidence` and hands it to the pure verdict
(:func:`~echo_env.cachetest.verdict.decide`), joined with the routing verdict on a fleet. No I/O:
a run that stopped halfway is judged on what it has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from echo_env.cachetest import prefill as pf
from echo_env.cachetest.answer_run import AnswerChecks
from echo_env.cachetest.fleet_checks import FleetRules, decide_fleet
from echo_env.cachetest.fleet_run import join_decisions
from echo_env.cachetest.results import (
    Comparison,
    Evidence,
    FleetResult,
    PrefixEvidence,
    Rules,
    ServerEvidence,
    ServerRun,
    TTFTEvidence,
)
from echo_env.cachetest.verdict import decide
from echo_env.measure.extension import TurnReuse
from echo_env.measure.figures import PhaseFigures, pool
from echo_env.measure.fleet import FleetEvidence
from echo_env.measure.stats import sequential_decision
from echo_env.wire.info import ServerFacts


@dataclass
class Measured:
    """What one server's run has measured so far (enough to judge a run that stopped)."""

    label: str
    """``cache_on`` or ``cache_off``."""
    opened_at: float = field(default_factory=time.perf_counter)
    """When the server was open and answering (the start of the time to verdict)."""
    facts: ServerFacts | None = None
    prefix: PrefixEvidence | None = None
    phases: list[PhaseFigures] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    decided_at: float | None = None
    fleet: FleetEvidence | None = None
    """The warm burst's evidence on a fleet (its routing verdict is decided here, with the cache's)."""
    history: list[TurnReuse] = field(default_factory=list)
    answers: AnswerChecks | None = None

    def named(self, name: str) -> list[PhaseFigures]:
        """Every phase of this name, in order."""
        return [p for p in self.phases if p.name == name]


def _ttft(state: Measured, pooled: dict[str, PhaseFigures], rules: Rules, max_repeats: int) -> TTFTEvidence | None:
    if not state.ratios:
        return None
    decision, ci = sequential_decision(state.ratios, rules.min_effect, rules.confidence, rules.min_repeats, max_repeats)
    warm_of = {p.repeat: p for p in state.named("ttft_warm")}
    pairs = [(c, warm_of[c.repeat]) for c in state.named("ttft_control") if c.repeat in warm_of]
    prefill = pf.prefill_evidence(state.named("ttft_control"), state.named(pf.SHORT_PHASE), pooled.get("ttft_warm"))
    spread = pf.repeat_spread(state.ratios, pairs, state.orders if len(state.orders) == len(state.ratios) else ())
    return TTFTEvidence(tuple(state.ratios), ci, decision, tuple(state.orders), prefill, spread)


def judge(
    state: Measured, rules: Rules, max_repeats: int, run_error: str | None = None, fleet_rules: FleetRules | None = None
) -> ServerRun | None:
    """One server's evidence, verdict and figures from what it measured (None: not even its facts).

    Args:
        state: What the server's run measured.
        rules: The verdict's thresholds.
        max_repeats: The most TTFT repeats the run could make (the interval spends its confidence over them).
        run_error: Why the run stopped early, if it did.
        fleet_rules: The routing verdict's thresholds (a fleet only; defaults: :class:`FleetRules`).
    """
    if state.facts is None:
        return None
    turn_names = sorted({p.name for p in state.phases if p.name.startswith("turn")}, key=lambda n: int(n[4:]))
    names = ("cold", "warm", "warm_single", *turn_names, "ttft_warm", "ttft_control", pf.SHORT_PHASE)
    pooled = {n: pool(n, state.named(n), state.label) for n in names if state.named(n)}
    answers = state.answers or AnswerChecks()
    fleet = FleetResult(state.fleet, decide_fleet(state.fleet, fleet_rules)) if state.fleet is not None else None
    evidence = Evidence(
        server=server_evidence(state.facts),
        prefix=state.prefix,
        warm=pooled.get("warm"),
        control=pooled.get("ttft_control"),
        ttft_warm=pooled.get("ttft_warm"),
        ttft=_ttft(state, pooled, rules, max_repeats),
        other_phases=tuple(pooled[n] for n in ("cold", "warm_single") if n in pooled),
        turns=tuple(pooled[n] for n in turn_names),
        history=tuple(state.history),
        run_error=run_error,
        fleet_ceiling=fleet.evidence.cache_ceiling() if fleet is not None else None,
        outputs=answers.outputs,
        weight_update=answers.weight_update,
        isolation=answers.isolation,
    )
    verdict = decide(evidence, rules)
    if fleet is not None:
        verdict = join_decisions(verdict, fleet.decision)
    return ServerRun(
        label=state.label,
        evidence=evidence,
        decision=verdict,
        phases=tuple(state.phases),
        pooled=tuple(pooled.values()),
        comparisons=_comparisons(pooled),
        fleet=fleet,
    )


def server_evidence(facts: ServerFacts) -> ServerEvidence:
    """What the server said about itself, as the verdict reads it."""
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


def on_vs_off(on: ServerRun, off: ServerRun) -> tuple[Comparison, ...]:
    """The cache-on run against the cache-off baseline: TTFT and throughput of the same bursts."""

    def get(run: ServerRun, name: str) -> PhaseFigures | None:
        return next((p for p in run.pooled if p.name == name), None)

    out = []
    for name, label in (("warm", "warm burst"), ("ttft_warm", "small warm bursts")):
        a, b = get(on, name), get(off, name)
        if a and b:
            out.append(Comparison(f"cache on vs off: {label} TTFT p50", _ratio(b.ttft.p50, a.ttft.p50)))
            out.append(Comparison(f"cache on vs off: {label} req/s", _ratio(a.throughput_rps, b.throughput_rps)))
    return tuple(out)
