"""The verdict: a pure function from typed evidence to PASS, FAIL or UNKNOWN, with the reason.

The checks run in a fixed order and each returns its outcome and the figures behind it.
The first check that decides gives the verdict and its reason; the later ones are still
shown (as ``skip`` when they cannot apply). No I/O here: every branch is a row in
``tests/cachetest/test_verdict.py``, built from evidence made by hand.

The order, and why:

1. the run finished (a crash or Ctrl-C leaves nothing to judge);
2. caching is on (a server that says it is off fails whatever else it shows);
3. a ceiling is known (no PASS without knowing what the best possible is);
4. the prefix is shared (a workload that cannot hit says nothing about the cache);
5. the phases are complete (failed requests leave a phase short of evidence);
6. the counters are intact (a restart mid-phase makes deltas meaningless);
7. hits are visible (counters or ``cached_tokens``);
8. the counters count only this test's traffic;
9. the two sources agree;
10. the hit rate is not above its ceiling (behind a router: the ceiling of the placement that happened);
11. hits are not zero;
12. hits reach the ceiling (behind a router with no request count per replica: UNKNOWN);
13. the control phase stays within its own ceiling;
14. later turns of multi-turn episodes reuse the conversation so far: first each turn's prompt
    extends the last prompt plus the generated tokens, then the answers' blocks stay cached
    (:mod:`echo_env.cachetest.history_checks`), then the hit rate reaches its ceiling;
15. answers served from the cache equal fresh ones (``check_outputs``, :mod:`echo_env.cachetest.answers`);
16. no stale KV after a weight update (``weight_update=``, same module);
17. ``cache_salt`` keeps tenants apart (``isolation=true``, :mod:`echo_env.cachetest.isolation`);
18. warm TTFT beats control TTFT by the minimum effect, over independent repeats, where the
    measured prefill cost says the hits can buy it (else PASS on the hits: ``pass_prefill_cheap``).

15-17 come before the TTFT gain: a cache that changes the answers is wrong however fast it is.
"""

from __future__ import annotations

from collections.abc import Callable

from echo_env.cachetest.answers import check_outputs_equal, check_weight_update
from echo_env.cachetest.history_checks import check_answer_blocks_kept, check_history_extends
from echo_env.cachetest.isolation import check_isolation
from echo_env.cachetest.results import Decision, Evidence, PrefillEvidence, Rules, TTFTEvidence, Verdict
from echo_env.cachetest.steps import Step, failed, note, passed, run_checks, unknown
from echo_env.measure.figures import PhaseFigures

CheckFn = Callable[[Evidence, Rules], Step]


# ----- the checks, in order ----------------------------------------------------------------


def check_run_finished(e: Evidence, r: Rules) -> Step:
    if e.run_error:
        return unknown(e.run_error, f"the run did not finish: {e.run_error}")
    return passed("every phase ran")


def check_caching_enabled(e: Evidence, r: Rules) -> Step:
    s = e.server
    if s.caching_enabled is False:
        detail = f"{s.caching_enabled_source} says caching is off"
        return failed(detail, f"caching disabled on the server: {s.caching_disabled_fix}")
    if s.caching_enabled is True:
        return passed(f"{s.caching_enabled_source} says caching is on")
    return note("the server does not say")


def check_ceiling_known(e: Evidence, r: Rules) -> Step:
    s = e.server
    if s.unit_tokens is None:
        return unknown(
            f"the {s.kind} server does not say its cache granularity",
            "no hit-rate ceiling: the server does not say its cache block size; pass block_size= (vLLM on CPU 128, "
            "on GPU 16; SGLang its --page-size; llama.cpp 1)",
        )
    if e.prefix is None:
        return unknown(
            "the prompts could not be tokenized (no tokenize endpoint, no local tokenizer)",
            "no hit-rate ceiling: the prompts could not be tokenized as the server sees them; give model_name= a "
            "tokenizer the server uses, or use a server with a tokenize endpoint",
        )
    p = e.prefix
    return passed(f"{p.unit_tokens}-token units ({p.unit_source}), tokenized by the {p.tokenized_by}")


def check_prefix_shared(e: Evidence, r: Rules) -> Step:
    p = e.prefix
    if p is None:
        return Step("skip", "no token plan")
    where = ""
    if p.first_difference is not None:
        d = p.first_difference
        where = f"; they first differ at token {d.position} ({d.context!r})"
    detail = (
        f"{p.shared_tokens} shared tokens, {p.cacheable_shared_tokens} in whole {p.unit_tokens}-token units, "
        f"of {p.prompt_tokens_min}-{p.prompt_tokens_max}-token prompts ({p.shared_fraction:.0%}){where}"
    )
    if p.prompt_tokens_max <= p.unit_tokens:
        return failed(detail, f"prompts shorter than one cache block ({p.unit_tokens} tokens): nothing can be cached")
    if p.shared_fraction < r.min_shared_fraction:
        return failed(
            detail,
            f"prompts share only {p.cacheable_shared_tokens} of {p.prompt_tokens_max} tokens in whole cache units"
            f"{where}: move what varies after the shared text",
        )
    return passed(detail)


def _verdict_phases(e: Evidence) -> list[PhaseFigures]:
    return [p for p in (*e.other_phases, e.warm, *e.turns, e.ttft_warm, e.control) if p is not None]


def check_phases_complete(e: Evidence, r: Rules) -> Step:
    phases = _verdict_phases(e)
    missing = [name for name, p in (("warm", e.warm), ("control", e.control), ("TTFT warm", e.ttft_warm)) if p is None]
    short = [p for p in phases if p.requests and p.failed / p.requests > r.max_failed_fraction]
    with_failures = [p for p in phases if p.failed]
    if short:
        worst = short[0]
        listing = ", ".join(f"{p.failed} of {p.requests} {p.name}" for p in short)
        return unknown(
            f"failed requests: {listing}; first error: {worst.first_error}",
            f"{listing} requests failed (first error: {worst.first_error}): the evidence is incomplete; fix what the "
            "error names and rerun, or raise max_failed_fraction",
        )
    if missing:
        return unknown(
            f"no {', '.join(missing)} phase", f"the run is short of its evidence: no {', '.join(missing)} phase ran"
        )
    empty = [p.name for p in phases if p.requests == 0]
    if empty:
        return unknown(f"phases with no request: {', '.join(empty)}", f"phases sent nothing: {', '.join(empty)}")
    tail = f" ({sum(p.failed for p in with_failures)} failed, within max_failed_fraction)" if with_failures else ""
    return passed(f"{sum(p.finished for p in phases)} of {sum(p.requests for p in phases)} requests finished{tail}")


def check_counters_intact(e: Evidence, r: Rules) -> Step:
    reset = [p.name for p in _verdict_phases(e) if p.counters is not None and p.counters.reset]
    if reset:
        return unknown(
            f"counters went back during {', '.join(reset)}",
            f"the server restarted during the {', '.join(reset)} phase (its counters went back), so hit rates are "
            "unknown: rerun on a server that stays up",
        )
    read = [p for p in _verdict_phases(e) if p.counters is not None]
    if not read:
        return note(e.server.metrics_error or "no counters were read")
    return passed(f"counters read around {len(read)} phases, none went back")


def check_hits_visible(e: Evidence, r: Rules) -> Step:
    assert e.warm is not None and e.control is not None  # phases_complete decided otherwise
    warm, control = e.warm.hit, e.control.hit
    if warm.value is None:
        why = e.warm.counters_note or e.server.metrics_error or "no counters"
        return unknown(
            f"no counters ({why}) and no cached_tokens",
            f"cannot see cache hits ({why}): {e.server.no_counters_fix}",
        )
    if control.value is None:
        return unknown(
            f"the control phase has no hit rate ({e.control.counters_note})",
            "cannot see the control phase's hits, so it is no checked baseline: "
            f"{e.control.counters_note}; {e.server.no_counters_fix}",
        )
    return passed(f"warm hit rate from {warm.source}, control from {control.source}")


def check_own_traffic(e: Evidence, r: Rules) -> Step:
    over = []
    for p in _verdict_phases(e):
        c = p.counters
        sent = p.planned_prompt_tokens or p.prompt_tokens
        if c is None or c.reset or c.queries is None or not sent:
            continue
        if c.queries > sent * (1 + r.traffic_tolerance) + 16:
            over.append(f"{p.name}: {c.queries:.0f} counted vs {sent} sent")
    if over:
        return unknown(
            "; ".join(over),
            "the server's counters include other traffic (" + over[0] + " prompt tokens): counter deltas cover the "
            "whole server, so run the test on a server nobody else uses, or behind no load balancer",
        )
    return passed("counted prompt tokens match what this test sent")


def check_sources_agree(e: Evidence, r: Rules) -> Step:
    assert e.warm is not None
    h = e.warm.hit
    if h.counters is None or h.reported is None:
        return Step("skip", f"one source only ({h.source})")
    if abs(h.counters - h.reported) > r.sources_tolerance:
        return unknown(
            f"counters {h.counters:.3f} vs cached_tokens {h.reported:.3f}",
            f"the server's counters say a warm hit rate of {h.counters:.2f} but its responses' cached_tokens say "
            f"{h.reported:.2f}: one of them is wrong (other traffic, a proxy, or metrics of another server)",
        )
    return passed(f"counters {h.counters:.3f}, cached_tokens {h.reported:.3f}")


def warm_ceiling(e: Evidence) -> tuple[float | None, str]:
    """The ceiling the warm hit rate is held to, and its name.

    On one server, the token plan's. Behind a router, the one the placement that happened
    allows (:attr:`Evidence.fleet_ceiling`), with the one-server ceiling named beside it
    for reference; None when where the requests went is unknown.
    """
    assert e.warm is not None
    h, f = e.warm.hit, e.fleet_ceiling
    if f is None:
        return h.ceiling, "ceiling"
    one = "n/a" if h.ceiling is None else f"{h.ceiling:.3f}"
    return f.value, f"fleet ceiling ({f.described}; one server {one})"


def check_not_above_ceiling(e: Evidence, r: Rules) -> Step:
    assert e.warm is not None
    h = e.warm.hit
    ceiling, name = warm_ceiling(e)
    if ceiling is None:  # a fleet whose placement is unknown still cannot beat one server
        ceiling, name = h.ceiling, "one-server ceiling"
    if h.value is None or ceiling is None:
        return Step("skip", "no ceiling")
    if h.value > ceiling + r.ceiling_tolerance:
        return unknown(
            f"warm hit rate {h.value:.3f} ({h.source}) above the {name} {ceiling:.3f}",
            f"the warm hit rate {h.value:.3f} is above the most the prompts allow ({name} {ceiling:.3f}): other "
            "traffic in the counters, or a wrong block size (block_size=)",
        )
    return passed(f"{h.value:.3f} <= {name} {ceiling:.3f}")


def check_hits_nonzero(e: Evidence, r: Rules) -> Step:
    assert e.warm is not None
    h = e.warm.hit
    if h.value == 0:
        return failed(
            f"warm hit rate 0 ({h.source})",
            "hits at zero: the server computed every prompt token although the prefix repeats; is caching off? "
            f"({e.server.caching_disabled_fix})",
        )
    return passed(f"warm hit rate {h.value:.3f} ({h.source})")


def check_hits_reach_ceiling(e: Evidence, r: Rules) -> Step:
    assert e.warm is not None
    h = e.warm.hit
    ceiling, name = warm_ceiling(e)
    assert h.value is not None
    if ceiling is None:
        why = e.fleet_ceiling.why_unknown if e.fleet_ceiling else "no ceiling"
        return unknown(
            f"fleet placement unknown: {why}",
            f"behind a router the hit rate depends on where requests went, and {why}: the warm hit rate "
            f"{h.value:.3f} has no fleet ceiling to be held to; pass replica_urls= so each replica's counters are read",
        )
    share = h.value / ceiling if ceiling else 0.0
    detail = f"warm hit rate {h.value:.3f} ({h.source}) vs {name} {ceiling:.3f}: {share:.0%}"
    if h.value < r.hit_fraction * ceiling:
        return failed(
            detail,
            f"hit rate far under the {name}: {h.value:.3f} vs {ceiling:.3f} ({share:.0%}, needs "
            f"{r.hit_fraction:.0%}); the cache may be too small or evicting",
        )
    return passed(detail)


def check_control_baseline(e: Evidence, r: Rules) -> Step:
    assert e.control is not None
    h = e.control.hit
    ceiling = h.ceiling if h.ceiling is not None else 0.0
    assert h.value is not None
    detail = f"control hit rate {h.value:.3f} ({h.source}) vs its own ceiling {ceiling:.3f}"
    if h.value > ceiling + r.control_tolerance:
        return unknown(
            detail,
            f"the control phase hit the cache ({h.value:.2f}) beyond what its prompts share ({ceiling:.2f}), so it "
            "is no uncached baseline: is a proxy or template rewriting the prompts' start, or is other traffic "
            "sending the same prompts?",
        )
    return passed(detail)


def check_history_reuse(e: Evidence, r: Rules) -> Step:
    if not e.turns:
        return Step("skip", "single-turn episodes")
    details, short = [], []
    for p in e.turns:
        h = p.hit
        if h.value is None or h.ceiling is None:
            return unknown(f"{p.name}: no hit rate or ceiling", f"cannot judge history reuse on {p.name}: no hit rate")
        details.append(f"{p.name} {h.value:.3f} of {h.ceiling:.3f}")
        if h.value < r.hit_fraction * h.ceiling:
            short.append((p.name, h.value, h.ceiling))
    if short:
        name, value, ceiling = short[0]
        return failed(
            "; ".join(details),
            f"history not reused: {name} hit {value:.2f} of a {ceiling:.2f} ceiling (the earlier prompts and the full "
            "blocks of their answers); the cache may drop finished requests' blocks, or something in the history "
            "changes",
        )
    return passed("; ".join(details))


def check_ttft_gain(e: Evidence, r: Rules) -> Step:
    t = e.ttft
    n = len(t.ratios) if t else 0
    if t is None or t.ci is None or n < r.min_repeats:
        return unknown(
            f"{n} TTFT repeats",
            f"too few TTFT repeats for an interval ({n}, needs {r.min_repeats}): raise max_repeats or fix what "
            "stopped the repeats",
        )
    ci = t.ci
    per = ", ".join(f"{x:.2f}" for x in t.ratios)
    # The interval is at the per-look confidence; together the looks keep r.confidence.
    detail = (
        f"control/warm TTFT {ci.ratio:.2f}x (CI {ci.low:.2f}-{ci.high:.2f} over {n} repeats, {r.confidence:.0%} over "
        f"every look: {per}); minimum effect {r.min_effect:.2f}x{_expected_text(t)}"
    )
    if t.decision == "above":
        return passed(detail)
    if prefill_too_cheap(e, r):
        return note(f"{detail}; TTFT cannot show caching here: the hits can buy less than the minimum effect")
    expected = f"; the hits and the prefill cost should buy {t.prefill.expected_gain:.2f}x" if t.prefill else ""
    if t.decision == "below":
        return failed(
            detail,
            f"hits are there but warm TTFT is not {r.min_effect:.2f}x below control: {ci.ratio:.2f}x "
            f"(CI {ci.low:.2f}-{ci.high:.2f} over {n} repeats){expected}",
        )
    return unknown(
        detail,
        f"TTFT gain undecided: {ci.ratio:.2f}x, CI {ci.low:.2f}-{ci.high:.2f} over {n} repeats includes the "
        f"minimum effect {r.min_effect:.2f}x{expected}; {_undecided_advice(t)}",
    )


def _expected_text(t: TTFTEvidence) -> str:
    p = t.prefill
    if p is None:
        return ""
    return (
        f"; expected from the hit rate and the prefill cost: {p.expected_gain:.2f}x; "
        f"measured {t.ci.ratio if t.ci else 0:.2f}x"
        f" ({p.prefill_per_token_s * 1e6:.0f} us per prompt token, {p.cached_tokens:.0f} cached tokens a request save "
        f"{p.saved_s * 1e3:.1f} ms of {p.control_ttft_s * 1e3:.1f} ms)"
    )


def _undecided_advice(t: TTFTEvidence) -> str:
    """What narrows the interval: a quieter machine only when the repeats disagree beyond their bursts' spread."""
    s = t.spread
    if s is not None and s.noisy_machine:
        return (
            f"the repeats disagree more than their bursts explain (log-ratio spread {s.between_repeats:.3f} between "
            f"repeats vs {s.within_bursts:.3f} within bursts): run on a quieter machine, or raise max_repeats"
        )
    if s is not None and s.order_effect:
        return (
            "the ratio depends on which burst of a repeat runs first (log-ratio spread "
            f"{s.between_repeats:.3f} between repeats vs {s.within_bursts:.3f} within bursts, agreeing within each "
            "order): the server keeps state from one burst to the next (llama.cpp's slots hold the last burst's "
            "prompts); raise ttft_burst well above its slots, or max_repeats"
        )
    why = (
        f" (the repeats agree within their bursts' spread: {s.between_repeats:.3f} vs {s.within_bursts:.3f})"
        if s is not None
        else ""
    )
    return f"raise max_repeats or ttft_burst{why}"


def _prefill_cost(p: PrefillEvidence) -> str:
    slope = f"the lowest of {p.repeats} repeats' slopes of TTFT over prompt tokens"
    if p.prefill_per_token_s <= 0:
        # A slope at or under zero is TTFT noise hiding prefill, not prefill that costs nothing.
        return f"prefill costs less than TTFT can resolve here ({slope} is not above zero)"
    return f"prefill costs {p.prefill_per_token_s * 1e6:.0f} us a token ({slope})"


def prefill_too_cheap(e: Evidence, r: Rules) -> bool:
    """Whether the measured hits and prefill cost can buy less TTFT gain than ``min_effect``, so TTFT cannot judge."""
    t = e.ttft
    return t is not None and t.prefill is not None and t.decision != "above" and t.prefill.expected_gain < r.min_effect


CHECKS: tuple[tuple[str, str, CheckFn], ...] = (
    ("run_finished", "the run finished", check_run_finished),
    ("caching_enabled", "caching enabled on the server", check_caching_enabled),
    ("ceiling_known", "a hit-rate ceiling is known", check_ceiling_known),
    ("prefix_shared", "prompts share a prefix in whole cache units", check_prefix_shared),
    ("phases_complete", "every phase has its requests", check_phases_complete),
    ("counters_intact", "counters never went back", check_counters_intact),
    ("hits_visible", "hits are visible", check_hits_visible),
    ("own_traffic", "counters count only this test's traffic", check_own_traffic),
    ("sources_agree", "counters and cached_tokens agree", check_sources_agree),
    ("not_above_ceiling", "hit rate within the ceiling", check_not_above_ceiling),
    ("hits_nonzero", "the cache hits", check_hits_nonzero),
    ("hits_reach_ceiling", "hits reach the ceiling", check_hits_reach_ceiling),
    ("control_baseline", "the control phase hits only what it shares", check_control_baseline),
    ("history_extends", "each turn's prompt extends the last prompt + answer", check_history_extends),
    ("answer_blocks_kept", "the answers' cache blocks are kept", check_answer_blocks_kept),
    ("history_reuse", "later turns reuse the conversation so far", check_history_reuse),
    ("outputs_equal", "answers from the cache equal fresh ones", check_outputs_equal),
    ("weight_update", "no stale KV after a weight update", check_weight_update),
    ("isolation", "cache_salt keeps tenants apart", check_isolation),
    ("ttft_gain", "warm TTFT below control TTFT, over repeats", check_ttft_gain),
)
"""Every check: (id, title, function), in the order they decide."""


def decide(evidence: Evidence, rules: Rules | None = None) -> Decision:
    """The verdict on one server from its evidence.

    Args:
        evidence: What was measured and read.
        rules: The thresholds (defaults: :class:`Rules`).

    Returns:
        The verdict, the reason from the first check that decides, and every check.
    """
    checks, decided = run_checks(CHECKS, evidence, rules or Rules())
    final = decided if decided is not None else _passed(evidence, rules or Rules())
    return Decision(final[0], final[1], final[2], checks)


def _passed(evidence: Evidence, rules: Rules) -> tuple[Verdict, str, str]:
    """The PASS sentence, once every check has passed (or TTFT could not judge: ``pass_prefill_cheap``)."""
    warm, ttft = evidence.warm, evidence.ttft
    assert warm is not None and ttft is not None and ttft.ci is not None
    h = warm.hit
    ceiling, name = warm_ceiling(evidence)
    assert h.value is not None and ceiling
    hits = f"hit rate {h.value:.2f} of a {ceiling:.2f} {name} ({h.value / ceiling:.0%})"
    ci = ttft.ci
    if prefill_too_cheap(evidence, rules):
        p = ttft.prefill
        assert p is not None
        agree = ", counters and cached_tokens agree" if h.counters is not None and h.reported is not None else ""
        return (
            "PASS",
            f"prefix caching works by its hits: {hits}{agree}. TTFT cannot show caching here: {_prefill_cost(p)}, "
            f"so the {p.cached_tokens:.0f} cached tokens a request "
            f"save {p.saved_s * 1e3:.1f} ms of a {p.control_ttft_s * 1e3:.1f} ms TTFT; expected from the hit rate "
            f"and the prefill cost: {p.expected_gain:.2f}x, under the minimum effect {rules.min_effect:.2f}x; "
            f"measured {ci.ratio:.2f}x (CI {ci.low:.2f}-{ci.high:.2f} over {len(ttft.ratios)} repeats)",
            "pass_prefill_cheap",
        )
    p = ttft.prefill
    expected = f"; expected {p.expected_gain:.1f}x from the hits and the prefill cost" if p else ""
    return (
        "PASS",
        f"prefix caching works: {hits}, warm TTFT {ci.ratio:.1f}x faster (CI {ci.low:.1f}-{ci.high:.1f} over "
        f"{len(ttft.ratios)} repeats{expected})",
        "pass",
    )
