"""Every reason the verdict can give, from evidence built by hand (no server).

Each row starts from the evidence of a healthy vLLM server with a working cache (PASS)
and changes what a real situation changes; it asserts the verdict, the exit code, the
rule that decided and the words a user acts on. ``tests/cachetest/test_verdict_branches.py`` checks
that every decisive branch of the checks has a row here or in a check's own table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from echo_env.cachetest.results import (
    Evidence,
    FirstDifference,
    PrefixEvidence,
    Rules,
    ServerEvidence,
    ServerRun,
    TestResult,
    TTFTEvidence,
)
from echo_env.cachetest.verdict import CHECKS, decide
from echo_env.measure.figures import HitRate, PhaseFigures
from echo_env.measure.stats import sequential_decision
from echo_env.wire.metrics import CounterDelta


def phase(
    name: str,
    *,
    requests: int = 127,
    failed: int = 0,
    prompt_tokens: int = 523,
    rate: float | None = 0.979,
    reported: float | None = 0.979,
    ceiling: float | None = 0.979,
    reset: bool = False,
    counters: bool = True,
    queries_scale: float = 1.0,
    first_error: str | None = None,
) -> PhaseFigures:
    """A phase whose counters and cached_tokens say ``rate`` and ``reported`` of ``ceiling``."""
    sent = (requests - failed) * prompt_tokens
    delta = None
    if counters:
        if reset:
            delta = CounterDelta(source="vllm", reset=True)
        else:
            queries = sent * queries_scale
            hits = None if rate is None else rate * queries
            delta = CounterDelta(source="vllm", reset=False, queries=queries, hits=hits)
    hit = HitRate(
        counters=None if delta is None or delta.reset or rate is None else rate,
        reported=reported,
        ceiling=ceiling,
    )
    return PhaseFigures(
        name=name,
        requests=requests,
        failed=failed,
        first_error=first_error or ("server error mid-stream: EngineCore encountered an issue" if failed else None),
        wall_s=2.0,
        prompt_tokens=sent,
        planned_prompt_tokens=requests * prompt_tokens,
        counters=delta,
        hit=hit,
    )


def server(**changes: object) -> ServerEvidence:
    base = ServerEvidence(
        kind="vllm",
        base_url="http://127.0.0.1:8000/v1",
        model="m",
        version="0.32.0",
        caching_enabled=True,
        caching_enabled_source="vllm:cache_config_info",
        unit_tokens=128,
        unit_source="vllm:cache_config_info block_size",
        slots=None,
        metrics_url="http://127.0.0.1:8000/metrics",
        metrics_error=None,
        caching_disabled_fix="start vLLM with --enable-prefix-caching",
        no_counters_fix="start vLLM with --enable-prompt-tokens-details so responses carry cached_tokens",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def prefix(**changes: object) -> PrefixEvidence:
    base = PrefixEvidence(
        tokenized_by="server",
        unit_tokens=128,
        unit_source="vllm:cache_config_info block_size",
        prompt_tokens_min=523,
        prompt_tokens_max=524,
        shared_tokens=519,
        cacheable_shared_tokens=512,
        first_difference=FirstDifference(519, 8, "User: Please echo the following word: berry"),
        workload_ceiling=0.97,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def ttft(ratios: tuple[float, ...] = (10.2, 9.6, 10.9), min_effect: float = 1.2) -> TTFTEvidence:
    decision, ci = sequential_decision(ratios, min_effect, 0.95, 3, 8)
    return TTFTEvidence(ratios, ci, decision, ("warm", "control", "warm")[: len(ratios)])


def good() -> Evidence:
    return Evidence(
        server=server(),
        prefix=prefix(),
        warm=phase("warm"),
        control=phase("ttft_control", requests=24, rate=0.0, reported=0.0, ceiling=0.0),
        ttft_warm=phase("ttft_warm", requests=24),
        ttft=ttft(),
        other_phases=(phase("cold", requests=1, rate=0.0, reported=0.0, ceiling=0.0),),
    )


Change = Callable[[Evidence], Evidence]


def with_(**changes: object) -> Change:
    return lambda e: dataclasses.replace(e, **changes)  # type: ignore[arg-type]


def chat_template_preamble(e: Evidence) -> Evidence:
    # A server template puts ~200 fixed tokens first, then text that varies per request:
    # 198 of 722 shared; the control phase's hits are exactly the shared preamble.
    return dataclasses.replace(
        e,
        prefix=prefix(
            prompt_tokens_min=720,
            prompt_tokens_max=722,
            shared_tokens=198,
            cacheable_shared_tokens=128,
            first_difference=FirstDifference(198, 1, " request: Please echo the following word"),
            workload_ceiling=0.17,
        ),
        control=phase("ttft_control", requests=24, prompt_tokens=722, rate=0.18, reported=0.18, ceiling=0.17),
    )


ROWS: list[tuple[str, Change, str, int, str, str]] = [
    ("healthy vLLM", lambda e: e, "PASS", 0, "pass", "prefix caching works: hit rate 0.98 of a 0.98 ceiling"),
    (
        "crashed mid-run",
        with_(run_error="ServerUnreachableError: no server"),
        "UNKNOWN",
        2,
        "run_finished",
        "did not finish",
    ),
    (
        "caching off",
        lambda e: dataclasses.replace(e, server=server(caching_enabled=False)),
        "FAIL",
        1,
        "caching_enabled",
        "--enable-prefix-caching",
    ),
    (
        "no block size known (any non-vLLM server)",
        lambda e: dataclasses.replace(e, server=server(kind="openai", unit_tokens=None, unit_source=None)),
        "UNKNOWN",
        2,
        "ceiling_known",
        "block_size=",
    ),
    (
        "tokenization failed: 0.01 hits and 1.05x must not PASS",
        lambda e: dataclasses.replace(
            e,
            prefix=None,
            warm=phase("warm", rate=0.01, reported=0.01, ceiling=None),
            ttft=ttft((1.05, 1.04, 1.06)),
        ),
        "UNKNOWN",
        2,
        "ceiling_known",
        "could not be tokenized",
    ),
    ("a template preamble, then text that varies", chat_template_preamble, "FAIL", 1, "prefix_shared", "at token 198"),
    (
        "something varies before the shared text",
        with_(
            prefix=prefix(
                shared_tokens=3, cacheable_shared_tokens=0, first_difference=FirstDifference(3, 1, "[agent 0001]")
            )
        ),
        "FAIL",
        1,
        "prefix_shared",
        "first differ at token 3",
    ),
    (
        "prompts shorter than one block",
        with_(prefix=prefix(prompt_tokens_min=90, prompt_tokens_max=100, shared_tokens=85, cacheable_shared_tokens=0)),
        "FAIL",
        1,
        "prefix_shared",
        "shorter than one cache block",
    ),
    (
        "a server failing mid-run (31 of 93 control requests)",
        with_(control=phase("ttft_control", requests=93, failed=31, rate=0.0, reported=0.0, ceiling=0.0)),
        "UNKNOWN",
        2,
        "phases_complete",
        "31 of 93 ttft_control",
    ),
    ("no control phase ran", with_(control=None), "UNKNOWN", 2, "phases_complete", "no control"),
    (
        "a phase that sent nothing",
        with_(ttft_warm=phase("ttft_warm", requests=0)),
        "UNKNOWN",
        2,
        "phases_complete",
        "phases sent nothing: ttft_warm",
    ),
    (
        "a restart during the control phase",
        with_(control=phase("ttft_control", requests=24, rate=0.0, reported=0.0, ceiling=0.0, reset=True)),
        "UNKNOWN",
        2,
        "counters_intact",
        "restarted during the ttft_control phase",
    ),
    (
        "no counters and no cached_tokens",
        lambda e: dataclasses.replace(
            e,
            server=server(metrics_error="http://x/metrics answered 404"),
            warm=phase("warm", counters=False, reported=None),
            control=phase("ttft_control", requests=24, counters=False, reported=None, ceiling=0.0),
            ttft_warm=phase("ttft_warm", requests=24, counters=False, reported=None),
            other_phases=(),
        ),
        "UNKNOWN",
        2,
        "hits_visible",
        "--enable-prompt-tokens-details",
    ),
    (
        "the control phase's hits unseen",
        with_(control=phase("ttft_control", requests=24, rate=None, reported=None, ceiling=0.0)),
        "UNKNOWN",
        2,
        "hits_visible",
        "control",
    ),
    (
        "counters raised by other traffic",
        lambda e: dataclasses.replace(e, warm=phase("warm", queries_scale=31.0, rate=0.98, reported=None)),
        "UNKNOWN",
        2,
        "own_traffic",
        "other traffic",
    ),
    (
        "counters at zero while cached_tokens says 0.975",
        with_(warm=phase("warm", rate=0.0, reported=0.975)),
        "UNKNOWN",
        2,
        "sources_agree",
        "counters say a warm hit rate of 0.00",
    ),
    (
        "a hit rate above the ceiling (a wrong block size)",
        with_(warm=phase("warm", rate=0.98, reported=None, ceiling=0.5)),
        "UNKNOWN",
        2,
        "not_above_ceiling",
        "above the most the prompts allow",
    ),
    ("hits at zero", with_(warm=phase("warm", rate=0.0, reported=0.0)), "FAIL", 1, "hits_nonzero", "hits at zero"),
    (
        "hits far under the ceiling (evicting)",
        with_(warm=phase("warm", rate=0.40, reported=0.40)),
        "FAIL",
        1,
        "hits_reach_ceiling",
        "far under the ceiling",
    ),
    (
        "the control phase hit what it does not share",
        with_(control=phase("ttft_control", requests=24, rate=0.6, reported=0.6, ceiling=0.0)),
        "UNKNOWN",
        2,
        "control_baseline",
        "no uncached baseline",
    ),
    (
        "a later turn that does not reuse the conversation",
        with_(turns=(phase("turn1", rate=0.30, reported=0.30, ceiling=0.95),)),
        "FAIL",
        1,
        "history_reuse",
        "history not reused: turn1 hit 0.30 of a 0.95 ceiling",
    ),
    (
        "a later turn with no hit rate to judge",
        with_(turns=(phase("turn1", rate=None, reported=None, ceiling=0.95),)),
        "UNKNOWN",
        2,
        "history_reuse",
        "cannot judge history reuse on turn1: no hit rate",
    ),
    (
        "multi-turn episodes reusing their history",
        with_(turns=(phase("turn1", rate=0.95, reported=0.95, ceiling=0.96),)),
        "PASS",
        0,
        "pass",
        "prefix caching works",
    ),
    ("too few repeats", with_(ttft=ttft((9.0, 10.0))), "UNKNOWN", 2, "ttft_gain", "too few TTFT repeats"),
    ("no repeat finished", with_(ttft=None), "UNKNOWN", 2, "ttft_gain", "too few TTFT repeats"),
    (
        "hits but no TTFT gain",
        with_(ttft=ttft((0.95, 1.0, 1.02, 0.98, 1.01, 0.99))),
        "FAIL",
        1,
        "ttft_gain",
        "not 1.20x below control",
    ),
    (
        "a gain the repeats cannot pin down",
        with_(ttft=ttft((0.46, 2.5, 2.4, 0.6, 3.1, 1.1, 2.2, 0.5))),
        "UNKNOWN",
        2,
        "ttft_gain",
        "TTFT gain undecided",
    ),
]


@pytest.mark.parametrize(
    ("case", "change", "verdict", "exit_code", "reason_id", "words"), ROWS, ids=[r[0] for r in ROWS]
)
def test_every_verdict_reason(
    case: str, change: Change, verdict: str, exit_code: int, reason_id: str, words: str
) -> None:
    decision = decide(change(good()))
    assert (decision.verdict, decision.exit_code, decision.reason_id) == (verdict, exit_code, reason_id), (
        decision.reason
    )
    assert words in decision.reason
    decisive = [c for c in decision.checks if c.name == reason_id]
    assert reason_id == "pass" or decisive[0].outcome in ("fail", "unknown")


def test_checks_after_the_deciding_one_are_skipped_and_shown() -> None:
    decision = decide(dataclasses.replace(good(), server=server(caching_enabled=False)))
    names = [c.name for c in decision.checks]
    assert names == [name for name, _, _ in CHECKS]
    assert all(c.outcome == "skip" for c in decision.checks[2:])


def test_a_failed_request_within_the_allowed_share_is_reported_but_passes() -> None:
    e = dataclasses.replace(
        good(), control=phase("ttft_control", requests=24, failed=1, rate=0.0, reported=0.0, ceiling=0.0)
    )
    decision = decide(e, Rules(max_failed_fraction=0.1))
    assert decision.verdict == "PASS"
    assert "1 failed" in next(c.detail for c in decision.checks if c.name == "phases_complete")


def test_llamacpp_per_token_cache_passes_with_its_ceiling() -> None:
    e = dataclasses.replace(
        good(),
        server=server(kind="llamacpp", unit_tokens=1, unit_source="llama.cpp caches per token", slots=4),
        prefix=prefix(unit_tokens=1, cacheable_shared_tokens=519),
        warm=phase("warm", rate=0.80, reported=0.80, ceiling=0.82),
    )
    decision = decide(e)
    assert decision.verdict == "PASS", decision.reason
    assert "0.80 of a 0.82 ceiling" in decision.reason


def test_cached_tokens_alone_is_enough_evidence() -> None:
    e = good()
    e = dataclasses.replace(
        e,
        warm=phase("warm", counters=False),
        control=phase("ttft_control", requests=24, counters=False, reported=0.0, ceiling=0.0),
    )
    decision = decide(e)
    assert decision.verdict == "PASS"
    assert "cached_tokens" in next(c.detail for c in decision.checks if c.name == "hits_visible")


def test_a_control_hitting_exactly_its_shared_preamble_is_a_baseline() -> None:
    # A template preamble the control shares (0.17 of each prompt) is not a polluted baseline.
    e = dataclasses.replace(good(), control=phase("ttft_control", requests=24, rate=0.18, reported=0.18, ceiling=0.17))
    assert decide(e).verdict == "PASS"


def test_the_minimum_effect_is_a_rule_of_its_own() -> None:
    e = dataclasses.replace(good(), ttft=ttft((1.30, 1.32, 1.31, 1.29, 1.30, 1.31), min_effect=1.5))
    assert decide(e, Rules(min_effect=1.5)).reason_id == "ttft_gain"
    e = dataclasses.replace(good(), ttft=ttft((1.30, 1.32, 1.31, 1.29, 1.30, 1.31), min_effect=1.2))
    assert decide(e, Rules(min_effect=1.2)).verdict == "PASS"


# ----- the whole run's verdict: a stop after the cache-on run -------------------------------


def _result(evidence: Evidence, error: str | None) -> TestResult:
    on = ServerRun("cache_on", evidence, decide(evidence), phases=(), pooled=())
    return TestResult(config={}, runs=[on], partial=error is not None, error=error)


@pytest.mark.parametrize(
    ("case", "evidence", "error", "verdict", "exit_code", "reason_id", "words"),
    [
        ("finished", good(), None, "PASS", 0, "pass", "prefix caching works"),
        ("baseline crashed after a cache-on PASS", good(), "HTTP 500", "UNKNOWN", 2, "run_finished",
         "the cache-off baseline did not finish (HTTP 500); the cache-on run alone says PASS: prefix caching works"),
        ("baseline interrupted after a cache-on FAIL",
         dataclasses.replace(good(), server=server(caching_enabled=False)), "interrupted (Ctrl-C)", "UNKNOWN", 2,
         "run_finished", "the cache-on run alone says FAIL: caching disabled"),
        ("crashed in the cache-on run", dataclasses.replace(good(), run_error="boom"), "boom", "UNKNOWN", 2,
         "run_finished", "the run did not finish: boom"),
    ],
)  # fmt: skip
def test_a_stop_anywhere_in_the_run_gives_unknown(
    case: str, evidence: Evidence, error: str | None, verdict: str, exit_code: int, reason_id: str, words: str
) -> None:
    result = _result(evidence, error)
    d = result.decision
    assert (d.verdict, result.exit_code, d.reason_id) == (verdict, exit_code, reason_id), d.reason
    assert words in d.reason
    # The cache-on run keeps its own verdict and evidence beside the run's.
    assert result.runs[0].decision == decide(evidence)
    finished = next(c for c in d.checks if c.name == "run_finished")
    assert finished.outcome == ("pass" if error is None else "unknown")
