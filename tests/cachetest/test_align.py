"""Block alignment: padding or trimming the worked examples so the shared prefix fills whole blocks.

The pure tests use a tokenizer with one token per character, so every expected count can
be worked out from the text; the ``engine``-marked ones use the default model's real
tokenizer (converting the model on first use, as the engine tests do).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_env.cachetest.align import align_system_prompt, prefix_geometry
from echo_env.envs.task import EchoTask, default_system_prompt, find_worked_examples, with_examples, worked_example
from echo_env.errors import ConfigError
from echo_env.measure.tokens import plan_tokens
from echo_env.wire.tokenizer import encode_prompts

BOS = 2


class CharTokenizer:
    """One token per character, ``<bos>`` first: token counts are character counts."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}

    def apply_chat_template(self, conversation: Sequence[dict[str, str]], **kwargs: Any) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<model>"
        return self(text)["input_ids"]


TOK = CharTokenizer()


def shared_chars(task: EchoTask) -> int:
    """The shared prefix in CharTokenizer tokens: ``<bos>`` plus every character before the word."""
    return 1 + len(task.shared_text())


def longest_example(task: EchoTask) -> int:
    """The most tokens one added or removed example (with its blank line) can change the prefix by."""
    return max(len("\n\n" + worked_example(w)) for w in task.words)


# --- the worked examples in the system prompt ------------------------------------------


def test_the_shipped_prompt_has_its_examples_found_in_order() -> None:
    spans = find_worked_examples(default_system_prompt())
    assert len(spans) >= 12
    assert spans[0][2] == "river"
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def test_a_malformed_example_is_not_counted() -> None:
    text = "Intro.\n\nUser: Please echo the following word: cat\nAssistant: Echo: dog"
    assert find_worked_examples(text) == []


def test_keeping_every_example_leaves_the_prompt_unchanged() -> None:
    prompt = default_system_prompt()
    assert with_examples(prompt, len(find_worked_examples(prompt))) == prompt


def test_trimming_drops_the_last_examples_and_keeps_the_intro() -> None:
    prompt = default_system_prompt()
    trimmed = with_examples(prompt, 3)
    assert [w for _, _, w in find_worked_examples(trimmed)] == ["river", "lighthouse", "pretzel"]
    assert trimmed.startswith(prompt[: find_worked_examples(prompt)[0][0]])


def test_padding_appends_examples_in_the_prompt_form() -> None:
    prompt = "Intro.\n\n" + worked_example("cat") + "\n\nThat is all."
    padded = with_examples(prompt, 1, ["dog", "emu"])
    assert padded == (
        "Intro.\n\n"
        + worked_example("cat")
        + "\n\n"
        + worked_example("dog")
        + "\n\n"
        + worked_example("emu")
        + "\n\nThat is all."
    )


@pytest.mark.parametrize("keep", [0, 99])
def test_keeping_an_impossible_count_is_refused(keep: int) -> None:
    with pytest.raises(ConfigError, match="keep"):
        with_examples(default_system_prompt(), keep)


# --- geometry ----------------------------------------------------------------------------


def test_geometry_counts_the_shared_text_and_its_whole_blocks() -> None:
    task = EchoTask(run_tag="[run 7]")
    geo = prefix_geometry(task, TOK, 128)
    assert geo.shared_tokens == shared_chars(task)
    assert geo.cacheable_tokens == 128 * (geo.shared_tokens // 128)
    assert geo.tail_tokens == geo.shared_tokens % 128
    assert geo.hit_rate_ceiling == pytest.approx(geo.cacheable_tokens / geo.prompt_tokens)


def test_geometry_of_chat_prompts_goes_through_the_chat_template() -> None:
    task = EchoTask()
    assert prefix_geometry(task, TOK, 64, "chat").shared_tokens > prefix_geometry(task, TOK, 64).shared_tokens


# --- alignment ---------------------------------------------------------------------------


def test_an_aligned_prompt_is_returned_unchanged() -> None:
    task = EchoTask()
    block = shared_chars(task) - 3  # the prefix ends 3 tokens past a boundary already
    assert align_system_prompt(task, TOK, block) is task


@pytest.mark.parametrize("mode", ["auto", "pad", "trim"])
def test_alignment_ends_the_prefix_just_past_a_boundary(mode: str) -> None:
    task = EchoTask()
    block = 256  # the shipped prompt's prefix is ~2,160 characters: 112 past 8 blocks
    before = prefix_geometry(task, TOK, block)
    aligned = align_system_prompt(task, TOK, block, mode=mode)  # type: ignore[arg-type]
    after = prefix_geometry(aligned, TOK, block)
    assert after.tail_tokens < longest_example(task) < before.tail_tokens
    assert after.hit_rate_ceiling > before.hit_rate_ceiling
    examples_before = len(find_worked_examples(task.system_prompt))
    examples_after = len(find_worked_examples(aligned.system_prompt))
    if mode == "pad":
        assert examples_after > examples_before
    if mode == "trim":
        assert examples_after < examples_before


def test_auto_takes_the_fewest_changes() -> None:
    task = EchoTask()
    n = len(find_worked_examples(task.system_prompt))
    block = 256
    changes = {
        mode: abs(len(find_worked_examples(align_system_prompt(task, TOK, block, mode=mode).system_prompt)) - n)
        for mode in ("pad", "trim")
    }
    auto = len(find_worked_examples(align_system_prompt(task, TOK, block).system_prompt))
    assert abs(auto - n) == min(changes.values())


def test_alignment_keeps_the_run_tag_and_the_task_otherwise() -> None:
    task = EchoTask(run_tag="[run 42]", words=("ant", "bee", "cow", "dog", "eel", "fox", "gnu", "hen"))
    aligned = align_system_prompt(task, TOK, 200)
    assert aligned.run_tag == task.run_tag and aligned.words == task.words
    # Padding words come from the task's list and are well-formed examples.
    words = [w for _, _, w in find_worked_examples(aligned.system_prompt)]
    added = words[len(find_worked_examples(task.system_prompt)) :]
    assert set(added) <= set(task.words)


def test_slack_keeps_room_for_a_shorter_run_tag() -> None:
    task = EchoTask(run_tag="[run 12345678]")
    aligned = align_system_prompt(task, TOK, 128, slack_tokens=10)
    assert prefix_geometry(aligned, TOK, 128).tail_tokens >= 10
    # A tag 10 characters shorter still leaves the same whole blocks.
    shorter = EchoTask(system_prompt=aligned.system_prompt, run_tag="[run]")
    assert prefix_geometry(shorter, TOK, 128).cacheable_tokens == prefix_geometry(aligned, TOK, 128).cacheable_tokens


@settings(max_examples=40, deadline=None)
@given(block=st.integers(min_value=24, max_value=640), slack=st.integers(min_value=0, max_value=23))
def test_any_block_size_gets_a_tail_within_one_example(block: int, slack: int) -> None:
    task = EchoTask()
    aligned = align_system_prompt(task, TOK, block, slack_tokens=slack)
    geo = prefix_geometry(aligned, TOK, block)
    tail = geo.shared_tokens - block * ((geo.shared_tokens - slack) // block)
    assert geo.cacheable_tokens >= block
    assert slack <= tail < slack + max(longest_example(task), 1) or aligned is task


def test_a_prompt_without_examples_cannot_be_aligned() -> None:
    with pytest.raises(ConfigError, match="no worked examples"):
        align_system_prompt(EchoTask(system_prompt="Echo the word you are given."), TOK, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"slack_tokens": 128}, "slack_tokens"),
        ({"max_tail_tokens": 0}, "max_tail_tokens"),
        ({"min_examples": 0}, "min_examples"),
        ({"mode": "round"}, "mode"),
    ],
)
def test_bad_settings_name_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        align_system_prompt(EchoTask(), TOK, 128, **kwargs)


def test_trim_only_with_too_few_examples_to_remove_says_so() -> None:
    task = EchoTask()
    n = len(find_worked_examples(task.system_prompt))
    with pytest.raises(ConfigError, match="no count of worked examples"):
        align_system_prompt(task, TOK, 256, mode="trim", min_examples=n)


# --- the real tokenizer of the default model -------------------------------------------


@pytest.fixture(scope="module")
def gemma() -> Any:
    from echo_env.launch.model import load_tokenizer, prepare_default_model

    return load_tokenizer(str(prepare_default_model()))


@pytest.mark.engine
def test_the_default_workload_fills_whole_cpu_blocks(gemma: Any) -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.workload import build_workload

    # The prefix test's workload, with run tags of its own form: ceiling >= 0.95 at block 128.
    for _ in range(5):
        work = build_workload(PrefixTestConfig(), f"{uuid.uuid4().hex[:8]}-cache_on")
        cold, warm = list(work.cold.values()), list(work.warm.values())
        ids = encode_prompts(gemma, cold + warm)
        plan = plan_tokens(ids[1:], 128, warm=ids[:1])
        assert plan.hit_rate_ceiling >= 0.95


@pytest.mark.engine
@pytest.mark.parametrize("block", [16, 128, 256])
@pytest.mark.parametrize("render", ["transcript", "chat"])
def test_alignment_reaches_095_for_the_real_tokenizer(gemma: Any, block: int, render: str) -> None:
    # Without a run tag the shipped prompt ends 118 tokens past a 128-token boundary.
    aligned = align_system_prompt(EchoTask(), gemma, block, render=render)  # type: ignore[arg-type]
    assert prefix_geometry(aligned, gemma, block, render).hit_rate_ceiling >= 0.95  # type: ignore[arg-type]


# --- the prefix test's align_prefix key -----------------------------------------------


def _facts(block: int | None) -> Any:
    from echo_env.wire.info import ServerFacts
    from echo_env.wire.kinds import CacheGranularity

    facts = ServerFacts(base_url="http://127.0.0.1:9/v1", metrics_url=None, model="m")
    facts.granularity = CacheGranularity(block, "test") if block else None
    facts.tokenizer = lambda: TOK  # type: ignore[method-assign]
    return facts


def test_align_prefix_off_keeps_the_shipped_prompt() -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.workload import aligned_system_prompt

    assert aligned_system_prompt(PrefixTestConfig(), _facts(256)) is None


def test_align_prefix_aligns_every_phase_of_the_workload() -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.workload import ALIGN_SLACK_TOKENS, aligned_system_prompt, build_workload

    config = PrefixTestConfig(align_prefix="auto", batch_size=2, group_size=2)
    prompt = aligned_system_prompt(config, _facts(256))
    assert prompt is not None and prompt != default_system_prompt()
    work = build_workload(config, "0123abcd-cache_on", _facts(256))
    warm_burst, control_burst = work.ttft[0].warm, work.ttft[0].control
    for text in [*work.cold.values(), *work.warm.values(), *warm_burst.values(), *control_burst.values()]:
        assert prompt in text
    # The tag is part of the prefix: the whole cold prompt's shared text sits just past a boundary.
    ids = encode_prompts(TOK, [*work.cold.values(), *work.warm.values()])
    plan = plan_tokens(ids, 256)
    assert ALIGN_SLACK_TOKENS <= plan.shared_prefix_tokens - plan.cacheable_shared_tokens < 80


def test_align_prefix_needs_a_block_size() -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.workload import aligned_system_prompt

    with pytest.raises(ConfigError, match="block_size="):
        aligned_system_prompt(PrefixTestConfig(align_prefix="pad"), _facts(None))


def test_align_prefix_is_a_command_line_key() -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.config import parse_overrides

    assert parse_overrides(PrefixTestConfig, ["align_prefix=trim"]).align_prefix == "trim"
