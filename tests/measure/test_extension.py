"""The extension check on hand-made token ids: each cause a user meets, named with its fix."""

from __future__ import annotations

from collections.abc import Sequence

from echo_env.measure.extension import TurnTokens, break_of, check_extension

VOCAB = {
    1: "<bos>",
    10: "Sys",
    11: " prompt",
    12: " text",
    20: "User",
    21: ":",
    22: " echo",
    23: " river",
    30: "Echo",
    31: " Echo",
    107: "\n",
    108: "\n\n",
    40: "Correct",
    50: "<think>",
    51: "</think>",
    52: "hmm",
    60: "[2026-12-04]",
    61: "[2026-12-05]",
    70: " Ech",
    71: "o",
}


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


PROMPT = [1, 60, *([10, 11, 12] * 30), 20, 21, 22, 23, 107]  # 97 tokens


def turn(generated: list[int], next_prompt: list[int], agent: str = "a0") -> TurnTokens:
    return TurnTokens(agent, 0, PROMPT, generated, "server", next_prompt)


def test_a_prompt_that_extends_prompt_plus_answer_has_no_break() -> None:
    t = turn([31, 21, 23, 107], [*PROMPT, 31, 21, 23, 107, 20, 21, 40])
    assert break_of(t, 16, decode) is None
    ev = check_extension("turn1", [t], 16, decode)
    assert (ev.share, ev.extended, ev.first_break, ev.lost_tokens) == (1.0, 1, None, 0)


def test_a_stop_token_the_text_does_not_carry_is_a_whitespace_break() -> None:
    # The case: "\n\n" (108) generated as the stop; the text's "\nUser" tokenizes as 107 then 20.
    n = len(PROMPT)
    t = turn([31, 21, 23, 108], [*PROMPT, 31, 21, 23, 107, 20, 21, 40])
    b = break_of(t, 16, decode)
    assert b is not None
    assert (b.position, b.cause, b.where) == (n + 3, "whitespace", "in the answer")
    assert b.expected_ids == (108,) and b.actual_ids == (107, 20, 21, 40)
    assert b.expected_text == "\n\n" and b.actual_text == "\nUser:Correct"
    assert "prompt_format=tokens" in b.fix
    # 97 + 4 tokens, 100 with KV: the 16-token units end at 96, before the break: nothing lost.
    assert b.lost_tokens == 0


def test_the_same_text_in_other_tokens_is_a_re_tokenized_answer() -> None:
    n = len(PROMPT)
    t = turn([70, 71, 21, 23], [*PROMPT, 31, 21, 23, 107, 20])
    b = break_of(t, 4, decode)
    assert b is not None and (b.position, b.cause) == (n, "retokenized")
    assert "send token ids" in b.fix
    # 97 + 4 tokens, 100 with KV: units of 4 up to 100 were reusable, those up to 96 are kept.
    assert b.lost_tokens == 4


def test_a_template_that_strips_the_earlier_answer_rewrites_history_and_costs_units() -> None:
    n = len(PROMPT)
    answer = [50, *([52] * 40), 51, 31, 21, 23]
    stripped = [*PROMPT, 31, 21, 23, 107, 20]
    b = break_of(turn(answer, stripped), 16, decode)
    assert b is not None and (b.position, b.cause) == (n, "history_rewritten")
    assert b.expected_text == "<think>hmmhmmhmm" and b.actual_text == " Echo: river\n"
    assert "keep earlier assistant turns as generated" in b.fix
    # 97 + 45 = 142 tokens, 141 with KV: units to 128 were reusable, those to 96 kept: 32 lost.
    assert b.lost_tokens == 32


def test_a_stamp_near_the_start_is_named_with_its_fix() -> None:
    stamped = [1, 61, *PROMPT[2:], 31, 21, 23, 107]
    b = break_of(turn([31, 21, 23, 107], stamped), 16, decode)
    assert b is not None and (b.position, b.cause) == (1, "changed_near_start")
    assert "move what varies to the end" in b.fix
    assert b.lost_tokens == 96


def test_history_changed_deep_in_the_prompt_is_history_rewritten() -> None:
    changed = list(PROMPT)
    changed[80] = 40
    b = break_of(turn([31, 21, 23, 107], [*changed, 31, 21, 23, 107]), 16, decode)
    assert b is not None and (b.position, b.cause, b.where) == (80, "history_rewritten", "in the prompt")


def test_share_counts_agent_turns_and_the_first_break_is_the_earliest() -> None:
    good = turn([31, 21, 23, 107], [*PROMPT, 31, 21, 23, 107, 20], "a0")
    late = turn([31, 21, 23, 108], [*PROMPT, 31, 21, 23, 107, 20], "a1")
    early = turn([31, 21, 23, 107], [1, 61, *PROMPT[2:], 31, 21, 23, 107], "a2")
    ev = check_extension("turn1", [good, late, early], 16, decode)
    assert (ev.agent_turns, ev.extended) == (3, 1)
    assert abs(ev.share - 1 / 3) < 1e-9
    assert ev.first_break is not None and ev.first_break.agent == "a2"
    assert ev.lost_tokens == 96
    assert "a2 turn 1 -> 2: token 1" in ev.first_break.describe()


def test_without_a_tokenizer_the_cause_is_told_by_position_and_ids_are_shown() -> None:
    t = turn([31, 21, 23, 108], [*PROMPT, 31, 21, 23, 107, 20])
    b = break_of(t, 16, None)
    assert b is not None and b.cause == "retokenized" and b.expected_text is None
    assert "[108]" in b.describe()


def test_weaker_evidence_is_marked() -> None:
    t = TurnTokens("a0", 0, PROMPT, [31], "retokenized", [*PROMPT, 31, 20])
    assert check_extension("turn1", [t], 16).generated_by == "retokenized"
    mixed = check_extension("turn1", [t, turn([31], [*PROMPT, 31])], 16)
    assert mixed.generated_by == "mixed"
