"""A :class:`~echo_env.cachetest.results.TestResult` read back from ``summary.json``, for the console.

``echo-prefix report DIR`` prints an old run's console summary again. The summary holds
every figure the console shows (it leaves out per-request samples, which only the PNG plots
draw), so the typed result is rebuilt field by field; keys a newer or older version
added or dropped are ignored or left at their defaults. Figures the summary stores as
derived values (a replica's hit rate, the fleet's) are kept as stored, not recomputed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from echo_env.cachetest.results import (
    Check,
    Comparison,
    Decision,
    Evidence,
    FirstDifference,
    FleetResult,
    PrefixEvidence,
    Rules,
    ServerEvidence,
    ServerRun,
    TestResult,
    TTFTEvidence,
)
from echo_env.measure.figures import HitRate, PhaseFigures
from echo_env.measure.fleet import FleetCeilings, FleetEvidence, ReplicaFigures
from echo_env.measure.stats import LatencySummary, RepeatRatioCI
from echo_env.wire.metrics import CounterDelta

T = TypeVar("T")


def _build(cls: type[T], data: Mapping[str, Any] | None) -> T | None:
    """``cls(**data)`` with only the fields ``cls`` has (None when ``data`` is None)."""
    if data is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def _latency(row: Mapping[str, Any], key: str, count: int) -> LatencySummary:
    p50, p90, p99 = (row.get(f"{key}_{p}_s") for p in ("p50", "p90", "p99"))
    return LatencySummary(count if p50 is not None else 0, None, p50, p90, p99, None, None)


def _phase(row: Mapping[str, Any]) -> PhaseFigures:
    finished = int(row.get("requests") or 0) - int(row.get("failed") or 0)
    counters = None
    if row.get("counter_queries") is not None or row.get("counter_reset"):
        counters = CounterDelta(
            source="summary.json",
            reset=bool(row.get("counter_reset")),
            queries=row.get("counter_queries"),
            hits=row.get("counter_hits"),
        )
    return PhaseFigures(
        name=str(row.get("name")),
        server=str(row.get("server") or "cache_on"),
        repeat=row.get("repeat"),
        requests=int(row.get("requests") or 0),
        failed=int(row.get("failed") or 0),
        first_error=row.get("first_error"),
        wall_s=float(row.get("wall_s") or 0.0),
        ttft=_latency(row, "ttft", finished),
        e2e=_latency(row, "e2e", finished),
        itl=_latency(row, "itl", finished),
        completion_tokens=int(row.get("completion_tokens") or 0),
        prompt_tokens=int(row.get("prompt_tokens") or 0),
        cached_tokens=row.get("cached_tokens"),
        planned_prompt_tokens=row.get("planned_prompt_tokens"),
        ceiling_tokens=row.get("ceiling_tokens"),
        counters=counters,
        counters_note=row.get("counters_note"),
        hit=HitRate(row.get("hit_rate_counters"), row.get("hit_rate_reported"), row.get("hit_rate_ceiling")),
        mean_reward=row.get("mean_reward"),
    )


def _decision(data: Mapping[str, Any]) -> Decision:
    checks = tuple(c for c in (_build(Check, row) for row in data.get("checks") or []) if c is not None)
    return Decision(
        data.get("verdict") or "UNKNOWN", str(data.get("reason") or ""), str(data.get("reason_id") or ""), checks
    )


@dataclass(frozen=True)
class _SavedReplica(ReplicaFigures):
    """A replica as ``summary.json`` stored it: its request count and hit rate, not its raw counters."""

    saved_requests: int | None = None
    saved_hit_rate: float | None = None

    @property
    def requests(self) -> int | None:
        return self.saved_requests

    @property
    def hit_rate(self) -> float | None:
        return self.saved_hit_rate


@dataclass(frozen=True)
class _SavedFleet(FleetEvidence):
    """A fleet's evidence as stored: its summed figures are the saved ones."""

    saved: Mapping[str, Any] | None = None

    @property
    def fleet_hit_rate(self) -> float | None:
        return (self.saved or {}).get("fleet_hit_rate")

    @property
    def request_shares(self) -> tuple[float, ...] | None:
        shares = (self.saved or {}).get("request_shares")
        return tuple(shares) if shares else None


def _fleet(data: Mapping[str, Any] | None) -> FleetResult | None:
    if not data:
        return None
    replicas = tuple(
        _SavedReplica(str(r.get("url")), None, r.get("note"), r.get("requests"), r.get("hit_rate"))
        for r in data.get("replicas") or []
    )
    # Other fields (router probes and the like) come and go between versions: taken when both sides have them.
    stored = {k: v for k, v in data.items() if k not in ("replicas", "ceilings", "requests_sent", "saved")}
    evidence = _build(
        _SavedFleet,
        {
            **stored,
            "replicas": replicas,
            "ceilings": _build(FleetCeilings, data.get("ceilings")),
            "requests_sent": int(data.get("requests_sent") or 0),
            "metrics_source": data.get("metrics_source") or "replicas",
            "saved": data,
        },
    )
    assert evidence is not None
    return FleetResult(evidence, _decision(data))


def _run(data: Mapping[str, Any], error: str | None) -> ServerRun:
    pooled = tuple(_phase(p) for p in data.get("pooled") or [])
    by_name = {p.name: p for p in pooled}
    ttft = data.get("ttft")
    if ttft is not None:
        ci = ttft.get("ci")
        ci_obj = None if ci is None else RepeatRatioCI(**{**ci, "per_repeat": tuple(ci.get("per_repeat") or ())})
        ttft_ev: TTFTEvidence | None = TTFTEvidence(
            tuple(ttft.get("ratios") or ()),
            ci_obj,
            ttft.get("decision") or "undecided",
            tuple(ttft.get("orders") or ()),
        )
    else:
        ttft_ev = None
    prefix = data.get("prefix")
    if prefix is not None:
        prefix = {**prefix, "first_difference": _build(FirstDifference, prefix.get("first_difference"))}
    evidence = Evidence(
        server=_build(ServerEvidence, data.get("server")) or _unknown_server(),
        prefix=_build(PrefixEvidence, prefix),
        warm=by_name.get("warm"),
        control=by_name.get("control"),
        ttft_warm=by_name.get("ttft_warm"),
        ttft=ttft_ev,
        turns=tuple(p for p in pooled if p.name.startswith("turn")),
        run_error=data.get("run_error", error),
    )
    comparisons = tuple(c for c in (_build(Comparison, row) for row in data.get("comparisons") or []) if c)
    phases = tuple(_phase(p) for p in data.get("phases") or [])
    label = str(data.get("label") or "cache_on")
    return ServerRun(label, evidence, _decision(data), phases, pooled, comparisons, _fleet(data.get("fleet")))


def _unknown_server() -> ServerEvidence:
    return ServerEvidence("openai", "", "", None, None, "", None, None, None, None, None, "", "")


def result_from_summary(summary: Mapping[str, Any]) -> TestResult:
    """The typed result a ``summary.json`` was written from, rebuilt for the console.

    Args:
        summary: ``summary.json`` as loaded.

    Returns:
        A :class:`TestResult` whose console summary matches the run's, samples aside.
    """
    error = summary.get("error")
    result = TestResult(
        config=dict(summary.get("config") or {}),
        rules=_build(Rules, summary.get("rules")) or Rules(),
        runs=[_run(r, error) for r in summary.get("runs") or []],
        on_vs_off=tuple(c for c in (_build(Comparison, row) for row in summary.get("on_vs_off") or []) if c),
        partial=bool(summary.get("partial")),
        error=error,
    )
    for key in ("started_at", "finished_at", "duration_s", "time_to_verdict_s", "out_dir", "files", "notes"):
        if summary.get(key) is not None:
            setattr(result, key, summary[key])
    return result
