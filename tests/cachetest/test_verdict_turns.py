"""Every multi-turn verdict reason, from evidence built by hand (no server).

Rows start from :func:`test_verdict.good` (a healthy vLLM server, PASS) with a later turn
added, and change what a real situation changes: a template that rewrites history, an
answer re-tokenized across its boundary, a stamp at the top, a server that drops the
blocks filled by generated tokens. Each row asserts the verdict, the exit code, the rule
that decided and the words a user acts on.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_verdict import Change, good, phase

from echo_env.cachetest.results import EXIT_CODES, Evidence
from echo_env.cachetest.verdict import CHECKS, decide
from echo_env.measure.extension import Cause, ExtensionBreak, ExtensionEvidence, TurnReuse

NEW_RULES = {"history_extends", "answer_blocks_kept"}


def brk(cause: Cause, position: int = 540, lost: int = 0) -> ExtensionBreak:
    return ExtensionBreak(
        agent="group0_agent1",
        turn=0,
        position=position,
        prompt_tokens=536,
        generated_tokens=4,
        expected_ids=(108,),
        actual_ids=(107, 2887),
        expected_text="\n\n",
        actual_text="\nUser",
        before_text=" Echo: river",
        cause=cause,
        lost_tokens=lost,
    )


def turns(
    rate: float = 0.95,
    ceiling: float = 0.96,
    prompt_only: float = 0.96,
    first: ExtensionBreak | None = None,
    extended: int = 16,
    by: str = "server",
) -> Change:
    """One later turn: its figures, and how its 16 agent-turns extended."""
    lost = first.lost_tokens if first else 0
    ext = ExtensionEvidence("turn1", 16, extended, by, first, lost)
    reuse = TurnReuse("turn1", ext, prompt_only, ceiling)
    figures = phase("turn1", requests=16, prompt_tokens=560, rate=rate, reported=rate, ceiling=ceiling)
    return lambda e: dataclasses.replace(e, turns=(figures,), history=(reuse,))


def then(a: Change, b: Change) -> Change:
    return lambda e: b(a(e))


ROWS: list[tuple[str, Change, str, str, str]] = [
    (
        "every prompt extends and the answers' blocks hit",
        turns(rate=0.95, ceiling=0.96, prompt_only=0.80),
        "PASS",
        "pass",
        "prefix caching works",
    ),
    (
        "a stop token the text does not carry, costing no whole unit (the default workload)",
        turns(first=brk("whitespace", lost=0), extended=0),
        "PASS",
        "pass",
        "prefix caching works",
    ),
    (
        "a chat template that strips the earlier answer",
        turns(first=brk("history_rewritten", position=536), extended=0),
        "FAIL",
        "history_extends",
        "keep earlier assistant turns as generated",
    ),
    (
        "an answer re-tokenized across its boundary, costing whole units",
        turns(first=brk("retokenized", position=600, lost=128), extended=3),
        "FAIL",
        "history_extends",
        "re-tokenized across its boundary",
    ),
    (
        "a date stamped at the top of every turn",
        turns(first=brk("changed_near_start", position=3, lost=512), extended=0, rate=0.0, ceiling=0.0),
        "FAIL",
        "history_extends",
        "move what varies to the end",
    ),
    (
        "a server that drops the blocks filled by generated tokens",
        turns(rate=0.80, ceiling=0.96, prompt_only=0.80),
        "FAIL",
        "answer_blocks_kept",
        "does not keep the cache blocks filled by generated tokens",
    ),
    (
        "dropped answers that a long prompt would hide in the total hit rate",
        turns(rate=0.917, ceiling=0.961, prompt_only=0.917),
        "FAIL",
        "answer_blocks_kept",
        "their answers' full blocks 0.04 more",
    ),
    (
        "dropped answer blocks, but the prompts did not extend: the break is the reason",
        turns(rate=0.60, ceiling=0.96, prompt_only=0.60, first=brk("history_rewritten", 536), extended=0),
        "FAIL",
        "history_extends",
        "do not extend the last prompt + answer",
    ),
    (
        "history lost beyond the answers (under the prompt-only ceiling too)",
        turns(rate=0.30, ceiling=0.96, prompt_only=0.80),
        "FAIL",
        "history_reuse",
        "history not reused: turn1 hit 0.30 of a 0.96 ceiling",
    ),
]


@pytest.mark.parametrize(("case", "change", "verdict", "reason_id", "words"), ROWS, ids=[r[0] for r in ROWS])
def test_every_multi_turn_reason(case: str, change: Change, verdict: str, reason_id: str, words: str) -> None:
    decision = decide(change(good()))
    assert (decision.verdict, decision.reason_id) == (verdict, reason_id), decision.reason
    assert words in decision.reason
    assert decision.exit_code == EXIT_CODES[verdict]
    decisive = [c for c in decision.checks if c.name == reason_id]
    assert reason_id == "pass" or decisive[0].outcome in ("fail", "unknown")


def test_every_new_rule_has_a_row_and_runs_before_history_reuse() -> None:
    assert {r[3] for r in ROWS} >= NEW_RULES
    names = [name for name, _, _ in CHECKS]
    assert names.index("history_extends") < names.index("answer_blocks_kept") < names.index("history_reuse")


def test_the_failure_names_the_first_differing_token_and_the_fix() -> None:
    decision = decide(turns(first=brk("history_rewritten", position=536), extended=0)(good()))
    assert "token 536" in decision.reason and "'\\n\\n'" in decision.reason and "[107, 2887]" in decision.reason
    assert "0 of 16 agent-turns" in decision.reason


def test_re_tokenized_generated_ids_are_marked_as_weaker_evidence() -> None:
    decision = decide(turns(by="retokenized")(good()))
    check = next(c for c in decision.checks if c.name == "history_extends")
    assert check.outcome == "pass" and "re-tokenized from text (weaker)" in check.detail


def test_single_turn_runs_skip_the_new_checks() -> None:
    e: Evidence = good()
    checks = {c.name: c.outcome for c in decide(e).checks}
    assert checks["history_extends"] == "skip" and checks["answer_blocks_kept"] == "skip"


def test_turns_without_token_ids_are_noted_not_judged() -> None:
    decision = decide(
        dataclasses.replace(
            turns()(good()),
            history=(TurnReuse("turn1", ExtensionEvidence("turn1", 0, 0, "server", None, 0), 0.8, 0.96),),
        )
    )
    check = next(c for c in decision.checks if c.name == "history_extends")
    assert check.outcome == "unknown" and "nothing to compare" in check.detail
    assert decision.verdict == "PASS"


def test_a_ceiling_counts_the_answers_blocks() -> None:
    from echo_env.measure.tokens import plan_tokens

    prompt, answer = list(range(100)), list(range(1000, 1060))
    following = [*prompt, *answer, 7, 8, 9]
    # Prompts only: the next prompt hits the last prompt's 6 full 16-token blocks (96 tokens).
    assert plan_tokens([following], 16, warm=[prompt]).max_hit_tokens == 96
    # With the answer: 159 tokens with KV, 9 full blocks (144 tokens).
    assert plan_tokens([following], 16, warm=[prompt, [*prompt, *answer]]).max_hit_tokens == 144
