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

The checks (:func:`check_outputs_equal`, :func:`check_weight_update`) are pure; the
verdict runs them after ``history_reuse`` and before ``ttft_gain``, so a wrong answer
decides before a timing does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from echo_env.cachetest.answer_evidence import Answer, OutputsEvidence, WeightUpdateEvidence, first_divergence
from echo_env.cachetest.results import Evidence, Rules
from echo_env.cachetest.steps import Step, failed, passed, unknown
from echo_env.cachetest.weights import apply_update
from echo_env.errors import EchoEnvError
from echo_env.wire.client import LLMClient
from echo_env.wire.control import VllmControl

ANSWER_TOKENS = 8
"""Tokens generated per answer: enough to show a changed answer, few enough to stay cheap."""


class RequestFailed(EchoEnvError):
    """A request of an answer check failed; the check cannot be made."""


async def ask(client: LLMClient, prompt: Any, label: str, salt: str | None, token_ids: bool) -> Answer:
    """Send ``prompt`` alone, greedily, with logprobs; the answer as the server gave it.

    Args:
        client: The client of the server under test.
        prompt: Transcript text or token ids (completions).
        label: What this request is, kept in the answer.
        salt: ``cache_salt`` to send (None: none).
        token_ids: Ask for the generated token ids (vLLM's ``return_token_ids``).

    Raises:
        RequestFailed: The request failed.
    """
    body: dict[str, Any] = {}
    if token_ids:
        body["return_token_ids"] = True
    if salt is not None:
        body["cache_salt"] = salt
    record = await client.generate(
        prompt, max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=1, extra_body=body or None,
        tag=f"answers/{label}", want_tokens=True, want_itl=False,
    )  # fmt: skip
    if not record.ok or not record.outputs:
        raise RequestFailed(f"the {label} request failed: {record.error}")
    out = record.outputs[0]
    return Answer(
        label=label, token_ids=tuple(out.token_ids or ()), logprobs=tuple(out.logprobs or ()), text=out.text,
        cached_tokens=record.cached_tokens, ttft_s=record.ttft_s, salt=salt,
    )  # fmt: skip


def new_salt(name: str) -> str:
    """A salt no other request has used."""
    return f"echo-{name}-{uuid.uuid4().hex[:8]}"


async def measure_outputs(client: LLMClient, prompt: Any, salted: bool) -> OutputsEvidence:
    """Fresh, cached and (with a salt) fresh again: the evidence of output equivalence.

    Args:
        client: The client of the server under test.
        prompt: A prompt no request has sent yet.
        salted: The server takes ``cache_salt`` (vLLM): a second fresh computation gives the floor.
    """
    method = "cache_salt" if salted else "first_send"
    fresh = cached = again = None
    error = None
    started = time.perf_counter()
    try:
        fresh = await ask(client, prompt, "fresh", None, salted)
        cached = await ask(client, prompt, "cached", None, salted)
        if salted:
            again = await ask(client, prompt, "fresh_again", new_salt("fresh"), salted)
    except RequestFailed as exc:
        error = str(exc)
    return OutputsEvidence(method, fresh, cached, again, error=error, seconds=time.perf_counter() - started)


async def measure_weight_update(
    client: LLMClient, control: VllmControl, prompt: Any, method: str, weights_path: str | None, salted: bool
) -> WeightUpdateEvidence:
    """Warm, update, ask again, compute afresh: the evidence of the stale-KV check.

    Args:
        client: The client of the server under test.
        control: Its control endpoints.
        prompt: A prompt no request has sent yet.
        method: ``weight_update`` (see :mod:`echo_env.cachetest.weights`).
        weights_path: The new weights' folder, for the built-in methods.
        salted: Compute afresh under another ``cache_salt`` (else reset the prefix cache).
    """
    fresh_method = "cache_salt" if salted else "reset_prefix_cache"
    before = after = fresh = None
    versions: tuple[str | None, str | None] = (None, None)
    seconds = 0.0
    try:
        await ask(client, prompt, "warm", None, salted)
        before = await ask(client, prompt, "before_update", None, salted)
        done = await apply_update(method, control, weights_path)
        versions, seconds = (done.version_before, done.version_after), done.seconds
        after = await ask(client, prompt, "after_update", None, salted)
        if not salted:
            await control.reset_prefix_cache()
        fresh = await ask(client, prompt, "fresh_new_weights", new_salt("fresh") if salted else None, salted)
        error = None
    except EchoEnvError as exc:
        error = str(exc)
    return WeightUpdateEvidence(
        method, before, after, fresh, fresh_method, *versions, update_s=seconds, weights_path=weights_path,
        error=error,
    )  # fmt: skip


# ----- the checks (pure) -------------------------------------------------------------------


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
