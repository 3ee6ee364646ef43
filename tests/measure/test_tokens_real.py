"""The shared prefix at token level, with the real Gemma tokenizer of the default model.

Marked ``engine``: the first run converts the default model (about a minute), which
is what the engine tests need anyway.
"""

from __future__ import annotations

from typing import Any

import pytest

from echo_env.envs.task import EchoTask
from echo_env.measure.tokens import first_difference, max_cached_tokens, plan_tokens, shared_prefix_length
from echo_env.wire.tokenizer import encode_prompts

pytestmark = pytest.mark.engine

CPU_BLOCK = 128
"""vLLM's block size on CPU."""


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from echo_env.launch.model import load_tokenizer, prepare_default_model

    return load_tokenizer(str(prepare_default_model()))


@pytest.fixture(scope="module")
def task() -> EchoTask:
    return EchoTask()


def test_transcripts_share_every_token_before_the_word(tokenizer: Any, task: EchoTask) -> None:
    words = task.sample_words(16, seed=0)
    ids = encode_prompts(tokenizer, [task.transcript(w) for w in words])
    assert all(seq[0] == tokenizer.bos_token_id for seq in ids)
    shared = shared_prefix_length(ids)
    # The space before the word may join the word's first token, nothing earlier may differ.
    assert shared >= len(tokenizer(task.shared_text())["input_ids"]) - 1
    assert tokenizer.decode(ids[0][:shared], skip_special_tokens=True) == task.shared_text().rstrip()
    for j in range(1, len(ids)):
        diff = first_difference([ids[0], ids[j]])
        assert diff is not None and diff.position >= shared


def test_chat_prompts_share_every_token_before_the_word(tokenizer: Any, task: EchoTask) -> None:
    words = task.sample_words(16, seed=0)
    ids = encode_prompts(tokenizer, [task.chat_messages(w) for w in words])
    assert all(seq[0] == tokenizer.bos_token_id for seq in ids)
    shared_text = tokenizer.decode(ids[0][: shared_prefix_length(ids)], skip_special_tokens=True)
    assert task.system_prompt in shared_text
    assert shared_text.rstrip().endswith("Please echo the following word:")


@pytest.mark.parametrize("render", ["transcript", "chat_messages"])
def test_a_group_sends_token_identical_prompts(tokenizer: Any, task: EchoTask, render: str) -> None:
    prompts = [getattr(task, render)("apple") for _ in range(8)]
    ids = encode_prompts(tokenizer, prompts)
    assert all(seq == ids[0] for seq in ids)


@pytest.mark.parametrize("render", ["transcript", "chat_messages"])
def test_run_tag_changes_the_prefix_from_the_first_token(tokenizer: Any, render: str) -> None:
    plain, tagged = EchoTask(), EchoTask(run_tag="run-1234")
    ids = encode_prompts(tokenizer, [getattr(plain, render)("apple"), getattr(tagged, render)("apple")])
    diff = first_difference(ids)
    assert diff is not None
    # Right after <bos> (and, for chat, the fixed turn header).
    assert diff.position <= 4
    tagged_ids = encode_prompts(tokenizer, [getattr(tagged, render)(w) for w in ("apple", "forest", "candle")])
    assert shared_prefix_length(tagged_ids) > 3 * CPU_BLOCK


def test_the_shared_prefix_fills_cpu_blocks(tokenizer: Any, task: EchoTask) -> None:
    # 4 groups x 8 agents, as vLLM on CPU would cache them.
    words = task.sample_words(4, seed=1)
    ids = encode_prompts(tokenizer, [task.transcript(w) for w in words for _ in range(8)])
    plan = plan_tokens(ids, CPU_BLOCK)
    assert plan.cacheable_shared_tokens >= 3 * CPU_BLOCK
    # Every prompt but the run's first hits at least the shared blocks, at most its ceiling.
    assert 31 * plan.cacheable_shared_tokens <= plan.max_hit_tokens
    assert plan.max_hit_tokens <= 31 * max_cached_tokens(plan.max_prompt_tokens, CPU_BLOCK)
    assert plan.hit_rate_ceiling > 0.6
