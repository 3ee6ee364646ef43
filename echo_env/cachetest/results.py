"""Typed results of the prefix-cache test: figures, evidence, checks, the verdict, the summary.

The runner measures and fills these; :mod:`echo_env.cachetest.verdict` decides from
them without I/O; the report (console, ``summary.json``, plots) is derived from one
:class:`TestResult`. Every figure is computed once, here or in the measuring code, and
never recomputed from a dict downstream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from echo_env.cachetest.answer_evidence import IsolationEvidence, OutputsEvidence, WeightUpdateEvidence
from echo_env.cachetest.rules import Rules
from echo_env.measure.extension import TurnReuse
from echo_env.measure.figures import PhaseFigures
from echo_env.measure.fleet import FleetEvidence
from echo_env.measure.placement import FleetCeiling
from echo_env.measure.stats import RepeatRatioCI

Verdict = Literal["PASS", "FAIL", "UNKNOWN"]
"""What the test concludes about the server's prefix cache."""

Outcome = Literal["pass", "fail", "unknown", "skip"]
"""How one check came out: ``skip`` when it does not apply (an earlier check decided)."""

EXIT_CODES: dict[str, int] = {"PASS": 0, "FAIL": 1, "UNKNOWN": 2}
"""Exit status of ``echo-prefix test`` for each verdict; a crash exits 2 as UNKNOWN does."""


@dataclass(frozen=True)
class Check:
    """One check of the evidence, with what it found."""

    name: str
    """Stable id (``caching_enabled``, ``prefix_shared``...), for tests and scripts."""
    title: str
    """What is checked, in words."""
    outcome: Outcome
    """``pass``, ``fail``, ``unknown`` or ``skip``."""
    detail: str
    """The figures behind the outcome."""


@dataclass(frozen=True)
class Decision:
    """The verdict and why: the first decisive check, and every check made."""

    verdict: Verdict
    """PASS, FAIL or UNKNOWN."""
    reason: str
    """One sentence a user can act on."""
    reason_id: str
    """Which rule decided (a stable id; table-driven tests assert it)."""
    checks: tuple[Check, ...]
    """Every check, in order."""

    @property
    def exit_code(self) -> int:
        """The process exit status for this verdict."""
        return EXIT_CODES[self.verdict]


@dataclass(frozen=True)
class FirstDifference:
    """Where the prompts of the workload stop agreeing, with readable context."""

    position: int
    """Index of the first token that differs."""
    prompt_index: int
    """The first prompt that differs from prompt 0 there."""
    context: str
    """The differing prompt's text around that token."""


@dataclass(frozen=True)
class PrefixEvidence:
    """What the token plan says about the shared prefix."""

    tokenized_by: str
    """``server`` (its own tokenize endpoint) or ``local`` (a tokenizer of the model)."""
    unit_tokens: int
    """The cache's reuse granularity in tokens (block, page, 1)."""
    unit_source: str
    """Where the granularity comes from."""
    prompt_tokens_min: int
    """The shortest prompt."""
    prompt_tokens_max: int
    """The longest prompt."""
    shared_tokens: int
    """Tokens every prompt shares from the start."""
    cacheable_shared_tokens: int
    """The part of the shared prefix in whole cache units, short of a prompt's last token."""
    first_difference: FirstDifference | None
    """Where prompts first differ (None: all equal up to the shortest)."""
    workload_ceiling: float
    """The hit-rate ceiling of the whole workload (cold requests included)."""

    @property
    def shared_fraction(self) -> float:
        """Cacheable shared tokens over the mean prompt length."""
        mean = (self.prompt_tokens_min + self.prompt_tokens_max) / 2
        return self.cacheable_shared_tokens / mean if mean else 0.0


@dataclass(frozen=True)
class ServerEvidence:
    """What the server is and says about its cache."""

    kind: str
    """``vllm``, ``sglang``, ``llamacpp`` or ``openai``."""
    base_url: str
    """The OpenAI API root under test."""
    model: str
    """The served model name."""
    version: str | None
    """Its version, where it says."""
    caching_enabled: bool | None
    """Whether it says prefix caching is on (None: it does not say)."""
    caching_enabled_source: str
    """How that is known (``vllm:cache_config_info``, ``/props``...)."""
    unit_tokens: int | None
    """Cache reuse granularity (None: unknown)."""
    unit_source: str | None
    """Where the granularity comes from."""
    slots: int | None
    """llama.cpp: independent per-slot caches."""
    metrics_url: str | None
    """Where its counters were read (None: not used)."""
    metrics_error: str | None
    """Why its counters could not be read."""
    caching_disabled_fix: str
    """How to turn caching on, for this kind."""
    no_counters_fix: str
    """How to make hits visible, for this kind."""
    embedded: bool = False
    """Whether this package started it."""


@dataclass(frozen=True)
class PrefillEvidence:
    """What prefill costs on the server at hand, and the TTFT gain the measured hits can buy.

    Measured with the control bursts (full-length prompts, nothing cached) and short control
    bursts of the same size (a few dozen tokens, nothing cached) in the same repeats: the TTFT
    slope over prompt tokens is the prefill cost; the warm bursts' cached tokens times that
    slope is what the cache saves. Made by :func:`echo_env.cachetest.prefill.prefill_evidence`.
    """

    control_ttft_s: float
    """Median TTFT of every control burst, seconds."""
    short_ttft_s: float
    """Median TTFT of the short control bursts, seconds."""
    control_prompt_tokens: float
    """Mean prompt tokens of a control request."""
    short_prompt_tokens: float
    """Mean prompt tokens of a short control request."""
    prefill_per_token_s: float
    """TTFT added per prompt token in bursts of this size: the smallest repeat's slope, at least 0."""
    cached_tokens: float
    """Mean cached prompt tokens of a warm TTFT request (its hit rate times its prompt tokens)."""
    saved_s: float
    """TTFT the cached tokens save: ``prefill_per_token_s * cached_tokens``, at most ``control - short``."""
    expected_gain: float
    """``control_ttft_s / (control_ttft_s - saved_s)``: the control/warm TTFT ratio the hits can buy."""
    repeats: int
    """Repeats with a slope (a control and a short burst that both finished)."""


@dataclass(frozen=True)
class RepeatSpread:
    """Whether the TTFT interval is wide because the repeats disagree or because the bursts are noisy.

    The repeat spread is the standard deviation of ``log(ratio)`` over repeats; the burst spread
    is what a repeat's own requests allow that log ratio to vary by (the root mean square, over
    repeats, of the standard error of the log of the control median over the warm median, from
    the spread of log TTFT within each burst). Repeats that disagree far more than their bursts
    explain mean the machine changed between repeats (other load): only then does a quieter
    machine help. Made by :func:`echo_env.cachetest.prefill.repeat_spread`.
    """

    between_repeats: float
    """Standard deviation of ``log(ratio)`` over repeats."""
    within_bursts: float
    """Expected standard deviation of ``log(ratio)`` from the bursts' own spread."""
    noisy_machine: bool
    """The repeats disagree beyond their bursts' spread (``NOISY_MACHINE_FACTOR`` times it), and not by their order."""
    order_effect: bool = False
    """The repeats disagree beyond their bursts' spread, but agree within each order of their two bursts
    (warm first, control first): the server keeps state from one burst to the next, the machine is not to blame."""


@dataclass(frozen=True)
class TTFTEvidence:
    """Warm vs control time to first token, one ratio per independent repeat."""

    ratios: tuple[float, ...]
    """``median(control TTFT) / median(warm TTFT)`` of each repeat's pair of bursts."""
    ci: RepeatRatioCI | None
    """Interval over repeats (None: fewer than two usable repeats)."""
    decision: Literal["above", "below", "undecided"]
    """Where the interval lies against the minimum effect."""
    orders: tuple[str, ...] = ()
    """Which burst of each repeat ran first (``warm`` or ``control``)."""
    prefill: PrefillEvidence | None = None
    """The prefill cost and the gain the hits can buy (None: not measured)."""
    spread: RepeatSpread | None = None
    """Repeat spread against burst spread (None: fewer than two repeats with two requests a burst)."""


@dataclass(frozen=True)
class Evidence:
    """Everything the verdict reads, for one server. Pure data: build it in a test to drive the verdict."""

    server: ServerEvidence
    """The server."""
    prefix: PrefixEvidence | None
    """The token plan (None: the prompts could not be tokenized)."""
    warm: PhaseFigures | None
    """The full warm burst: the hit rate against its ceiling."""
    control: PhaseFigures | None
    """Every control burst pooled: requests with nothing to hit."""
    ttft_warm: PhaseFigures | None
    """Every small warm burst of the TTFT repeats pooled."""
    ttft: TTFTEvidence | None
    """The TTFT comparison over repeats."""
    other_phases: tuple[PhaseFigures, ...] = ()
    """Phases that feed the verdict only through their failures (cold, warm_single)."""
    turns: tuple[PhaseFigures, ...] = ()
    """Later turns of multi-turn episodes (``turn1``, ``turn2``...): history reuse against its ceiling."""
    history: tuple[TurnReuse, ...] = ()
    """Each later turn's extension check and its prompt-only ceiling (same phase names as ``turns``)."""
    run_error: str | None = None
    """Why the run stopped early (None: it finished)."""
    fleet_ceiling: FleetCeiling | None = None
    """Behind a router: the warm burst's ceiling following where its requests went (each replica pays a
    shared prefix once for the groups it saw), held in place of ``warm.hit.ceiling``, which stays the
    one-server ceiling shown for reference. None: one server."""
    outputs: OutputsEvidence | None = None
    """Cached vs fresh answers at temperature 0 (None: ``check_outputs=false``)."""
    weight_update: WeightUpdateEvidence | None = None
    """Answers after a weight update vs fresh ones (None: no ``weight_update``)."""
    isolation: IsolationEvidence | None = None
    """Who shares cached blocks by ``cache_salt`` (None: ``isolation=false``)."""


@dataclass(frozen=True)
class Comparison:
    """A ratio between two conditions, with where it came from."""

    name: str
    """What is compared (``warm vs control TTFT p50``)."""
    ratio: float | None
    """Old over new for latencies, new over old for throughput: above 1 is better."""
    low: float | None = None
    """Lower end of its interval, when there is one."""
    high: float | None = None
    """Upper end."""
    unit: str = "x"
    """How to print it."""


@dataclass(frozen=True)
class FleetResult:
    """The routing verdict of a test through a router: each replica's evidence over the warm burst, and its decision."""

    evidence: FleetEvidence
    """Each replica's own counters, the fleet hit rate and the workload's fleet ceilings."""
    decision: Decision
    """The routing verdict (:func:`echo_env.cachetest.fleet_checks.decide_fleet`)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the evidence's figures, then the routing verdict and its checks."""
        d = self.decision
        return {
            **self.evidence.to_json(),
            "verdict": d.verdict,
            "reason": d.reason,
            "reason_id": d.reason_id,
            "checks": [dataclasses.asdict(c) for c in d.checks],
        }


@dataclass(frozen=True)
class ServerRun:
    """Everything measured on one server (cache on, or the cache-off baseline)."""

    label: str
    """``cache_on`` or ``cache_off``."""
    evidence: Evidence
    """What the verdict read."""
    decision: Decision
    """The verdict on this server."""
    phases: tuple[PhaseFigures, ...]
    """Every phase of every repeat, in the order run."""
    pooled: tuple[PhaseFigures, ...]
    """One row per phase name, pooled over repeats."""
    comparisons: tuple[Comparison, ...] = ()
    """Headline ratios (warm vs control, cold prompt again)."""
    fleet: FleetResult | None = None
    """Behind a router: the routing verdict, already joined into :attr:`decision` (None: one server)."""


@dataclass
class TestResult:
    """The whole test: what ``summary.json``, the console and the plots are made from."""

    __test__ = False  # not a pytest test class, despite the name

    config: dict[str, Any]
    """The settings, secrets redacted."""
    rules: Rules = field(default_factory=Rules)
    """The thresholds the verdict applied."""
    runs: list[ServerRun] = field(default_factory=list)
    """Cache on first, then the cache-off baseline when asked for."""
    on_vs_off: tuple[Comparison, ...] = ()
    """Cache on vs off, when both ran."""
    partial: bool = False
    """True when the run stopped before its end or a phase is short of its evidence."""
    error: str | None = None
    """Why the run stopped (None: it finished)."""
    started_at: str | None = None
    """ISO time the run started."""
    finished_at: str | None = None
    """ISO time it ended."""
    duration_s: float | None = None
    """Seconds from start to end, engine start included."""
    time_to_verdict_s: float | None = None
    """Seconds from a healthy server to the cache-on verdict."""
    out_dir: str | None = None
    """Where the files are."""
    files: list[str] = field(default_factory=list)
    """Files written."""
    notes: list[str] = field(default_factory=list)
    """What could not be written or drawn, and why."""

    @property
    def main(self) -> ServerRun | None:
        """The cache-on run (the one the verdict is about)."""
        return self.runs[0] if self.runs else None

    @property
    def decision(self) -> Decision:
        """The test's verdict: the cache-on run's, or UNKNOWN when the run stopped before its end.

        A stop in the cache-off baseline (an error, Ctrl-C) leaves the cache-on run whole, but the
        run the user asked for did not finish, so the verdict is UNKNOWN there too (exit 2, never
        the cache-on PASS's 0); the reason carries the cache-on run's own verdict, and
        :attr:`runs` its evidence.
        """
        if self.main is None:
            why = self.error or "nothing was measured"
            return Decision("UNKNOWN", f"the run did not finish: {why}", "run_finished", ())
        on = self.main.decision
        if self.error is None or self.main.evidence.run_error is not None:
            return on  # finished, or stopped in the cache-on run (whose own first check says so)
        # The cache-on run's checks as made, then the one that decides: the whole run did not finish.
        stopped = f"stopped in the cache-off baseline: {self.error}"
        checks = tuple(c for c in on.checks if c.name != "run_finished") + tuple(
            dataclasses.replace(c, outcome="unknown", detail=stopped) for c in on.checks if c.name == "run_finished"
        )
        why = (
            f"the run did not finish: the cache-off baseline did not finish ({self.error}); "
            f"the cache-on run alone says {on.verdict}: {on.reason}"
        )
        return Decision("UNKNOWN", why, "run_finished", checks)

    @property
    def verdict(self) -> Verdict:
        """PASS, FAIL or UNKNOWN."""
        return self.decision.verdict

    @property
    def exit_code(self) -> int:
        """0 PASS, 1 FAIL, 2 UNKNOWN."""
        return self.decision.exit_code

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON values (``summary.json``)."""
        main = self.main
        decision = self.decision
        warm = main.evidence.warm if main else None
        hit = warm.hit if warm else None
        return jsonable(
            {
                "verdict": decision.verdict,
                "reason": decision.reason,
                "reason_id": decision.reason_id,
                "exit_code": decision.exit_code,
                "partial": self.partial,
                "error": self.error,
                "hit_rate": hit.value if hit else None,
                "hit_rate_source": hit.source if hit else None,
                "hit_rate_ceiling": hit.ceiling if hit else None,
                "hit_rate_vs_ceiling": hit.vs_ceiling if hit else None,
                "checks": [dataclasses.asdict(c) for c in decision.checks],
                "fleet": main.fleet.to_json() if main and main.fleet else None,
                "runs": [_run_json(r) for r in self.runs],
                "on_vs_off": [dataclasses.asdict(c) for c in self.on_vs_off],
                "config": self.config,
                "rules": dataclasses.asdict(self.rules),
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "duration_s": self.duration_s,
                "time_to_verdict_s": self.time_to_verdict_s,
                "out_dir": self.out_dir,
                "files": self.files,
                "notes": self.notes,
            }
        )


def _run_json(run: ServerRun) -> dict[str, Any]:
    ev = run.evidence
    return {
        "label": run.label,
        "verdict": run.decision.verdict,
        "reason": run.decision.reason,
        "reason_id": run.decision.reason_id,
        "checks": [dataclasses.asdict(c) for c in run.decision.checks],
        "server": dataclasses.asdict(ev.server),
        "prefix": dataclasses.asdict(ev.prefix) if ev.prefix else None,
        "ttft": dataclasses.asdict(ev.ttft) if ev.ttft else None,
        "run_error": ev.run_error,
        "comparisons": [dataclasses.asdict(c) for c in run.comparisons],
        "pooled": [p.to_json() for p in run.pooled],
        "phases": [p.to_json() for p in run.phases],
        "fleet": run.fleet.to_json() if run.fleet else None,
        "outputs": ev.outputs.to_json() if ev.outputs else None,
        "weight_update": ev.weight_update.to_json() if ev.weight_update else None,
        "isolation": ev.isolation.to_json() if ev.isolation else None,
        "history": [h.to_json() for h in ev.history],
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN and infinities become None, tuples lists, dataclasses dicts."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return jsonable(item())
    return str(obj)
