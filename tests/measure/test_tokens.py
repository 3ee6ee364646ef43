"""Token accounting: shared prefixes and the block ceiling, with a tiny fake tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError
from echo_env.measure.tokens import (
    FirstDifference,
    common_prefix_length,
    first_difference,
    max_cached_tokens,
    plan_tokens,
    shared_prefix_length,
)
from echo_env.wire.tokenizer import encode_prompts

BOS = 2


class FakeTokenizer:
    """One token per character (its code point), ``<bos>`` first; a toy chat template."""

    def __init__(self, chat_returns_dict: bool = False) -> None:
        self.chat_returns_dict = chat_returns_dict

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}

    def apply_chat_template(self, conversation: Sequence[dict[str, str]], **kwargs: Any) -> Any:
        assert kwargs.get("add_generation_prompt") and kwargs.get("tokenize")
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<model>"
        ids = self(text, add_special_tokens=True)["input_ids"]
        return {"input_ids": ids} if self.chat_returns_dict else ids


# --- encode_prompts ----------------------------------------------------------------------


def test_plain_prompts_get_special_tokens() -> None:
    assert encode_prompts(FakeTokenizer(), ["ab", "c"]) == [[BOS, 97, 98], [BOS, 99]]


@pytest.mark.parametrize("returns_dict", [False, True])
def test_chat_prompts_go_through_the_chat_template(returns_dict: bool) -> None:
    messages = [{"role": "user", "content": "hi"}]
    (ids,) = encode_prompts(FakeTokenizer(chat_returns_dict=returns_dict), [messages])
    assert ids == [BOS, *map(ord, "<user>hi<model>")]


def test_fake_token_prefix_of_a_run_reaches_the_word() -> None:
    task = EchoTask()
    words = task.sample_words(8, seed=0)
    ids = encode_prompts(FakeTokenizer(), [task.transcript(w) for w in words])
    # One token per character plus <bos>: the shared prefix is the shared text exactly
    # (and maybe the first letter, if several words share it).
    assert shared_prefix_length(ids) >= 1 + len(task.shared_text())
    chat_ids = encode_prompts(FakeTokenizer(), [task.chat_messages(w) for w in words])
    chat_shared = f"<system>{task.system_text}<user>Please echo the following word: "
    assert shared_prefix_length(chat_ids) >= 1 + len(chat_shared)


# --- shared prefixes -----------------------------------------------------------------------


def test_shared_prefix_length() -> None:
    assert shared_prefix_length([]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 9], [1, 2, 3]]) == 1
    assert shared_prefix_length([[1, 2, 3], [1, 2]]) == 2
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0
    assert shared_prefix_length([[1, 2], []]) == 0
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2


def test_first_difference_finds_the_earliest_departure() -> None:
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 9, 3, 4], [1, 2]]
    assert first_difference(seqs) == FirstDifference(position=1, first_index=0, other_index=2)
    assert first_difference([[1, 2, 3], [1, 2, 4]]) == FirstDifference(position=2, first_index=0, other_index=1)


@pytest.mark.parametrize("seqs", [[], [[1, 2]], [[1, 2], [1, 2]], [[1, 2, 3], [1, 2]], [[1], [1, 2, 3]]])
def test_no_first_difference_when_all_agree(seqs: list[list[int]]) -> None:
    assert first_difference(seqs) is None


# --- the block ceiling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_tokens", "expected"),
    [(0, 0), (1, 0), (16, 0), (17, 16), (32, 16), (33, 32), (100, 96)],
)
def test_max_cached_tokens_edges(prompt_tokens: int, expected: int) -> None:
    # B = 16: P=0, 1, B, B+1, 2B, 2B+1: the last token is always computed, only full blocks hit.
    assert max_cached_tokens(prompt_tokens, 16) == expected


def test_max_cached_tokens_matches_the_formula() -> None:
    for block in (1, 16, 128):
        for p in range(1, 400):
            assert max_cached_tokens(p, block) == block * ((p - 1) // block)


@pytest.mark.parametrize("block_size", [0, -16])
def test_invalid_block_size_is_a_config_error(block_size: int) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        max_cached_tokens(100, block_size)
    with pytest.raises(ConfigError, match="block_size"):
        plan_tokens([[1, 2, 3]], block_size)


def prompt(prefix_len: int, tail: Sequence[int]) -> list[int]:
    return [*range(1000, 1000 + prefix_len), *tail]


def test_group_of_eight_identical_prompts_has_seven_warm() -> None:
    group = [prompt(100, [1, 2, 3])] * 8  # 103 tokens
    plan = plan_tokens(group, block_size=16)
    assert plan.max_hit_tokens == 7 * 96
    assert plan.prompt_tokens == 8 * 103
    assert plan.shared_prefix_tokens == 103
    assert plan.hit_rate_ceiling == pytest.approx(7 * 96 / (8 * 103))


def test_identical_prompts_filling_whole_blocks_keep_the_last_token_uncached() -> None:
    plan = plan_tokens([prompt(32, [])] * 4, block_size=16)
    assert plan.max_hit_tokens == 3 * 16
    assert plan.shared_prefix_tokens == 32
    # Only one block of the shared 32 tokens can ever be served: the last token is computed.
    assert plan.cacheable_shared_tokens == 16


def test_batch_sharing_only_the_system_prompt() -> None:
    # 4 prompts share 40 tokens, then differ: only the 2 full blocks of the shared part hit.
    batch = [prompt(40, [k, k, k, k, k, k, k, k, k, k]) for k in range(4)]
    plan = plan_tokens(batch, block_size=16)
    assert plan.shared_prefix_tokens == 40
    assert plan.cacheable_shared_tokens == 32
    assert plan.max_hit_tokens == 3 * 32
    assert first_difference(batch) == FirstDifference(position=40, first_index=0, other_index=1)


def test_groups_of_a_batch() -> None:
    # 3 groups x 4 agents: the first prompt of the run is cold, the first of each other
    # group hits the shared blocks only, every other agent hits its whole ceiling.
    groups = [[prompt(40, [g] * 30)] * 4 for g in range(3)]  # 70 tokens each
    prompts = [p for group in groups for p in group]
    plan = plan_tokens(prompts, block_size=16)
    assert plan.max_hit_tokens == 2 * 32 + 9 * 64
    assert plan.num_prompts == 12
    assert (plan.min_prompt_tokens, plan.max_prompt_tokens) == (70, 70)


def test_warm_prompts_make_the_first_request_hit() -> None:
    p = prompt(50, [7, 8])
    assert plan_tokens([p], 16).max_hit_tokens == 0
    assert plan_tokens([p], 16, warm=[p]).max_hit_tokens == 48
    assert plan_tokens([p], 16, warm=[prompt(20, [9] * 20)]).max_hit_tokens == 16


def test_a_block_hits_only_after_its_whole_prefix() -> None:
    a = [1] * 16 + [2] * 16 + [3]
    b = [9] * 16 + [2] * 16 + [3]  # same second block, different first
    assert plan_tokens([a, b], 16).max_hit_tokens == 0


def test_empty_plan() -> None:
    plan = plan_tokens([], 16)
    assert (plan.prompt_tokens, plan.max_hit_tokens, plan.hit_rate_ceiling) == (0, 0, 0.0)
    assert (plan.min_prompt_tokens, plan.max_prompt_tokens, plan.shared_prefix_tokens) == (0, 0, 0)
