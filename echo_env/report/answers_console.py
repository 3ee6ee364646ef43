"""The console's answer-check lines: cached vs fresh answers, the weight update, tenant isolation.

One line per check that ran, derived from the evidence (nothing recomputed): what a user
reads first about whether the cache changes the answers; the checks block below carries
the full detail.
"""

from __future__ import annotations

from echo_env.cachetest.answer_evidence import Answer
from echo_env.cachetest.results import Evidence


def _n(a: Answer | None) -> str:
    return "n/a" if a is None or a.cached_tokens is None else str(a.cached_tokens)


def _ms(a: Answer | None) -> str:
    return "n/a" if a is None or a.ttft_s is None else f"{a.ttft_s * 1000:.0f} ms"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def answer_lines(e: Evidence | None) -> list[str]:
    """Up to three lines (``answers``, ``weights``, ``tenants``); none when no answer check ran."""
    if e is None:
        return []
    lines = []
    o = e.outputs
    if o is not None:
        texts = "equal" if o.fresh and o.cached and o.fresh.text == o.cached.text else "differ"
        same = o.error or (
            f"cached ({_n(o.cached)} tokens) vs fresh ({o.method}): max logprob gap {_f(o.divergence)}, "
            f"noise floor {_f(o.noise_floor)}, texts {texts}"
            + (f" ({o.seconds:.1f} s)" if o.seconds is not None else "")
        )
        lines.append(f"answers {same}")
    w = e.weight_update
    if w is not None:
        lines.append(
            f"weights {w.method}: "
            + (
                w.error
                or f"version {w.version_before} -> {w.version_after}, cached tokens {_n(w.before)} -> {_n(w.after)}, "
                f"TTFT {_ms(w.before)} -> {_ms(w.after)}; after {w.after.text if w.after else ''!r} vs fresh "
                f"{w.fresh.text if w.fresh else ''!r}"
            )
        )
    i = e.isolation
    if i is not None:
        if i.skipped:
            lines.append(f"tenants {i.skipped}")
        else:
            ms, ratio = i.side_channel_ms, i.side_channel_ratio
            lines.append(
                f"tenants cached tokens: salt A {_n(i.first_salt_a)} then {_n(i.again_salt_a)}, salt B {_n(i.salt_b)}, "
                f"no salt {_n(i.no_salt_first)} then {_n(i.no_salt_again)}; side channel (no salt) "
                + ("n/a" if ms is None or ratio is None else f"{ms:.0f} ms, {ratio:.2f}x")
            )
    return lines
