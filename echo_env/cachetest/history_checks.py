"""The verdict's multi-turn checks: the prompts extend the history, and the answer's blocks stay cached.

Both read :attr:`Evidence.history <echo_env.cachetest.results.Evidence.history>` (one
:class:`~echo_env.measure.extension.TurnReuse` per later turn) beside the turn's phase
figures, and both run before the general ``history_reuse`` check, so a run that loses
history is told *why* when the reason can be named:

- ``history_extends``: a turn's prompt does not begin with the last prompt plus the
  generated tokens, and that costs whole cache units or rewrites the history itself
  (a break at the answer's last token, in a partly filled unit, costs nothing and passes);
- ``answer_blocks_kept``: the prompts did extend, the hit rate reaches the prompt-only
  ceiling but the hits beyond it fall short of the answers' blocks (judged on the answers'
  own share, which a long prompt would hide in the total): the server drops the blocks
  filled by generated tokens.
"""

from __future__ import annotations

from echo_env.cachetest.results import Evidence, Rules
from echo_env.cachetest.steps import Step, failed, note, passed
from echo_env.measure.extension import TurnReuse

MIN_ANSWER_SHARE = 0.01
"""The answers' blocks must be at least this share of a turn's prompt tokens to be judged on their own."""

REWRITES = ("history_rewritten", "changed_near_start")
"""Causes that fail whatever they cost now: the history itself changed, so longer episodes lose more."""


def _costly(h: TurnReuse) -> bool:
    b = h.extension.first_break
    return b is not None and (h.extension.lost_tokens > 0 or b.cause in REWRITES)


def check_history_extends(e: Evidence, r: Rules) -> Step:
    if not e.history:
        return Step("skip", "no per-turn token evidence (single-turn, or no block size)")
    if not any(h.extension.agent_turns for h in e.history):
        return note("no agent-turn had its prompt's and answer's token ids: nothing to compare")
    details = []
    for h in e.history:
        x = h.extension
        weak = ", generated ids re-tokenized from text (weaker)" if x.generated_by != "server" else ""
        details.append(f"{h.phase}: {x.extended} of {x.agent_turns} agent-turns extend ({x.share:.0%}){weak}")
    costly = [h for h in e.history if _costly(h)]
    if costly:
        h = costly[0]
        b = h.extension.first_break
        assert b is not None
        return failed(
            "; ".join(details),
            f"turn prompts do not extend the last prompt + answer: {h.extension.extended} of "
            f"{h.extension.agent_turns} agent-turns of {h.phase} do ({h.extension.lost_tokens} cached tokens lost); "
            f"first at {b.describe()}; fix: {b.fix}",
        )
    breaks = [h.extension.first_break for h in e.history if h.extension.first_break is not None]
    tail = f"; breaks at the answer's end cost no whole cache unit (first: {breaks[0].describe()})" if breaks else ""
    return passed("; ".join(details) + tail)


def check_answer_blocks_kept(e: Evidence, r: Rules) -> Step:
    if not e.history:
        return Step("skip", "no per-turn token evidence")
    by_name = {p.name: p for p in e.turns}
    details = []
    for h in e.history:
        phase = by_name.get(h.phase)
        value = phase.hit.value if phase is not None else None
        if value is None or h.ceiling is None or h.prompt_only_ceiling is None:
            continue
        details.append(f"{h.phase} {value:.3f} of {h.ceiling:.3f} (prompts only {h.prompt_only_ceiling:.3f})")
        answer_part = h.ceiling - h.prompt_only_ceiling
        # Judged on the answers' own share: a long prompt would hide dropped answers in the total.
        answers_hit = value - h.prompt_only_ceiling
        kept_history = value >= r.hit_fraction * h.prompt_only_ceiling
        if answer_part >= MIN_ANSWER_SHARE and kept_history and answers_hit < r.hit_fraction * answer_part:
            return failed(
                "; ".join(details),
                f"the server does not keep the cache blocks filled by generated tokens: {h.phase} hit {value:.2f}, "
                f"the previous prompts alone allow {h.prompt_only_ceiling:.2f} and their answers' full blocks "
                f"{answer_part:.2f} more ({h.ceiling:.2f}); the prompts extended, so the answers' blocks were dropped "
                "(check whether the server caches the blocks of output tokens at all; vLLM serving a sliding-window "
                "model such as Gemma 3 did not, until started with --disable-sliding-window: benchmarks/README.md 9b)",
            )
    if not details:
        return Step("skip", "no hit rate or ceilings for the later turns")
    return passed("; ".join(details))
