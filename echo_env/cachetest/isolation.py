"""Tenant isolation (``isolation=true``): does ``cache_salt`` keep tenants' cached blocks apart?

A shared prefix cache is a timing side channel: whether another user sent a prompt shows
in the time to its first token. vLLM takes a ``cache_salt`` per request and shares blocks
only between requests of the same salt. One new prompt is sent five times, each alone:

1. salt A, first (nothing to hit);
2. salt A again: must hit (a tenant keeps its own cache);
3. salt B: must not hit (tenants are apart);
4. no salt, first: must not hit (a salted tenant's blocks serve no one else);
5. no salt again: hits (unsalted requests share: the side channel, reported in ms and as
   a ratio of TTFTs).

A server that ignores the salt (or a proxy that drops it) FAILs; a server kind that takes
no salt (anything but vLLM) leaves the verdict UNKNOWN, since the user asked for
isolation and it cannot be shown. The sends are
:func:`echo_env.cachetest.answer_run.measure_isolation`'s; the verdict runs :func:`check_isolation` after the
answer checks and before ``ttft_gain``.
"""

from __future__ import annotations

from echo_env.cachetest.answer_evidence import Answer
from echo_env.cachetest.results import Evidence, Rules
from echo_env.cachetest.steps import Step, failed, passed, unknown


def _hit(a: Answer | None) -> int | None:
    return a.cached_tokens if a is not None else None


def check_isolation(e: Evidence, r: Rules) -> Step:
    i = e.isolation
    if i is None:
        return Step("skip", "isolation=false")
    if i.skipped is not None:
        return unknown(
            i.skipped, f"isolation was asked for but cannot be shown: {i.skipped}; vLLM isolates tenants by cache_salt"
        )
    hits = [_hit(a) for a in (i.first_salt_a, i.again_salt_a, i.salt_b, i.no_salt_first, i.no_salt_again)]
    if any(h is None for h in hits):
        return unknown(
            "no cached_tokens in the responses",
            "isolation needs each response's cached_tokens: start vLLM with --enable-prompt-tokens-details",
        )
    first_a, again_a, b, plain, plain_again = hits
    ms, ratio = i.side_channel_ms, i.side_channel_ratio
    channel = f"without a salt TTFT {ms:.0f} ms lower when sent before ({ratio:.2f}x)" if ms and ratio else ""
    detail = (
        f"cached tokens: salt A {first_a} then {again_a}, salt B {b}, no salt {plain} then {plain_again}; {channel}"
    )
    if b or plain or first_a:
        who = "another salt" if b else "no salt" if plain else "a new salt"
        return failed(
            detail,
            f"cache_salt is ignored: a request with {who} hit {b or plain or first_a} tokens another tenant cached, "
            f"so tenants share the cache and see each other's prompts in TTFT ({channel}); is a proxy dropping "
            "cache_salt from the request body?",
        )
    if not again_a:
        return failed(
            detail,
            "requests with the same cache_salt do not share cached blocks: salted tenants get no prefix caching",
        )
    return passed(detail)
