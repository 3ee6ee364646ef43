"""Does the cache change the answers? Output equivalence, and stale KV after a weight update.

Both checks send one prompt (the cold agent's, under a new run tag so nothing else hit it)
greedily (temperature 0) with logprobs, each request alone so every computation has the
same batch shape, and compare token by token.

**Output equivalence** (``check_outputs``): the prompt computed afresh, then served from
the cache, then (vLLM) computed afresh again under another ``cache_salt``. The greedy
tokens must match; the logprobs must agree within ``max(logprob_tolerance, 3 x floor)``,
the floor being the largest gap between the two fresh computations. Why a fixed allowance
on top of the floor: on one machine two fresh computations of the same shape are bitwise
equal (floor 0), but serving from the cache is another computation: the suffix's attention
reads K/V stored in the cache's dtype and runs in chunks of another shape, so its sums are
taken in another order. In bf16 (8 significant bits, a relative error of 2^-8 per value)
on logits of magnitude 10-30 that moves logprobs by a few hundredths to a tenth of a nat:
measured on the CPU engine, 0.07 at most. ``logprob_tolerance`` (0.25 by default) leaves
room for that and catches what stale or wrong blocks do (other tokens, gaps of whole nats);
an f32 engine would allow 1e-3, a quantized KV cache more.

**Weight update** (``weight_update=``): the prompt is warmed and sent again (its hits
and TTFT before), the weights are updated (:mod:`echo_env.cachetest.weights`), the prompt
is sent again (served however the server chooses) and computed afresh under the new
weights (another ``cache_salt``, or after ``/reset_prefix_cache``). An answer after the
update that parts from the fresh one while it hit the cache is stale KV.

The requests are sent by :mod:`echo_env.cachetest.answer_run`; the checks here
(:func:`check_outputs_equal`, :func:`check_weight_update`) are pure. The verdict runs them
after ``history_reuse`` and before ``ttft_gain``, so a wrong answer decides before a timing does.
"""

from __future__ import annotations

from echo_env.cachetest.answer_evidence import Answer, first_divergence
from echo_env.cachetest.results import Evidence, Rules
from echo_env.cachetest.steps import Step, failed, passed, unknown


def allowance(floor: float | None, r: Rules) -> float:
    """The logprob gap still taken as the same computation: the fixed tolerance or 3x the measured floor."""
    return max(r.logprob_tolerance, 3 * (floor or 0.0))


def check_outputs_equal(e: Evidence, r: Rules) -> Step:
    o = e.outputs
    if o is None:
        return Step("skip", "check_outputs=false")
    if o.error is not None or o.fresh is None or o.cached is None:
        return unknown(f"no comparison: {o.error}", f"cannot compare cached and fresh answers: {o.error}")
    # A server that caches single tokens (llama.cpp) shares the prompts' common start even with a new tag.
    if o.fresh.cached_tokens and o.fresh.cached_tokens >= (o.cached.cached_tokens or 0):
        return unknown(
            f"the fresh computation hit {o.fresh.cached_tokens} cached tokens, the cached one {o.cached.cached_tokens}",
            "the output check's fresh computation hit the cache as much as the cached one (another request sent "
            "the same prompt?): rerun",
        )
    if o.cached.cached_tokens == 0:
        return unknown(
            "the second send hit 0 cached tokens",
            "the output check's prompt sent again was not served from the cache, so nothing compares cached with "
            "fresh answers: is the cache evicting at once?",
        )
    floor = o.noise_floor
    allowed = allowance(floor, r)
    floor_text = f"noise floor {floor:.3f}" if floor is not None else "no noise floor (the server takes no salt)"
    div = first_divergence(o.fresh, o.cached, allowed)
    if div is not None:
        what = div.describe(o.fresh, o.cached)
        return failed(
            f"{what}; {floor_text}, allowance {allowed:.3f}",
            f"the cache changes the answers: served from the cache ({o.cached.cached_tokens} cached tokens) the same "
            f"prompt at temperature 0 parts from a fresh computation at {what} ({floor_text}, allowance "
            f"{allowed:.3f} nats)",
        )
    gap = o.divergence
    return passed(
        f"{len(o.fresh.token_ids) or len(o.fresh.text)} greedy tokens equal, cached ({o.cached.cached_tokens} tokens) "
        f"vs fresh logprobs within {gap or 0.0:.3f} ({floor_text}, allowance {allowed:.3f}, fresh by {o.method})"
    )


def _ms(a: Answer | None) -> str:
    return f"{a.ttft_s * 1000:.0f} ms" if a is not None and a.ttft_s is not None else "?"


def check_weight_update(e: Evidence, r: Rules) -> Step:
    w = e.weight_update
    if w is None:
        return Step("skip", "weight_update not set")
    if w.error is not None or w.before is None or w.after is None or w.fresh is None:
        return unknown(f"no comparison: {w.error}", f"the weight-update check could not be made: {w.error}")
    versions = f"weight version {w.version_before} -> {w.version_after}"
    cost = (
        f"hits {w.before.cached_tokens} -> {w.after.cached_tokens} cached tokens, TTFT {_ms(w.before)} -> "
        f"{_ms(w.after)} (fresh {_ms(w.fresh)}), update {w.update_s:.1f} s"
    )
    div = first_divergence(w.after, w.fresh, r.logprob_tolerance)
    if div is not None:
        what = div.describe(w.after, w.fresh)
        stale = "stale KV" if w.after.cached_tokens else "answers after the update differ from a fresh computation"
        return failed(
            f"{what}; {versions}; {cost}",
            f"{stale}: after weight_update={w.method} ({versions}) the prompt hit {w.after.cached_tokens} cached "
            f"tokens and answered {w.after.text!r}, a fresh computation under the new weights {w.fresh.text!r} "
            f"({what}): blocks from the old weights are served; clear the prefix cache with every update "
            "(vLLM: /pause ... /resume, or /reset_prefix_cache)",
        )
    if w.after.cached_tokens and not w.weights_changed:
        return unknown(
            f"the new weights answer as the old ones ({w.fresh.text!r}); {versions}; {cost}",
            f"weight_update={w.method} changed no answer, so cached blocks from the old weights cannot be told from "
            "fresh ones: update to weights that differ (weights_path=)",
        )
    kept = "caches dropped" if not w.after.cached_tokens else "cached blocks consistent with the new weights"
    return passed(f"{kept} after weight_update={w.method}: {versions}; {cost}")
