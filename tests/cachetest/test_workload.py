"""The prefix test's workload: every phase's prompts built once, as the env and the task render them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.prefill import SHORT_REPEATS
from echo_env.cachetest.turns import Episode
from echo_env.cachetest.workload import CHECK_PURPOSES, build_workload, run_tag
from echo_env.envs.parallel import EchoPrefixParallelEnv


def _config(**changes: object) -> PrefixTestConfig:
    return dataclasses.replace(
        PrefixTestConfig(batch_size=3, group_size=2, ttft_burst=4, max_repeats=5), **changes  # type: ignore[arg-type]
    )


def test_every_phase_is_built_once_in_one_frozen_value() -> None:
    work = build_workload(_config(), "0123abcd-cache_on")
    assert len(work.cold) == 1 and len(work.warm) == 5 and len(work.ttft) == 5
    assert list(work.warm_single.values()) == list(work.cold.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        work.cold = {}  # type: ignore[misc]
    for r, repeat in enumerate(work.ttft):
        assert len(repeat.warm) == len(repeat.control) == 4
        assert bool(repeat.short) == (r < SHORT_REPEATS)
    # Tokenized up front: the hit-rate burst and every repeat's warm and control bursts.
    assert len(work.to_tokenize) == 6 + 5 * 8


def test_the_hit_rate_prompts_are_the_grading_envs_own_observations() -> None:
    config = _config(turns=2)
    work = build_workload(config, "0123abcd-cache_on")
    episode = Episode(config, work)
    assert episode.prompts() == work.prompts
    chat = _config(api="chat")
    chat_work = build_workload(chat, "0123abcd-cache_on")
    assert Episode(chat, chat_work).prompts() == chat_work.prompts


def test_control_prompts_ask_the_warm_words_under_tags_of_their_own() -> None:
    work = build_workload(_config(), "0123abcd-cache_on")
    tag = run_tag("0123abcd-cache_on")
    for r, repeat in enumerate(work.ttft):
        for warm, control in zip(repeat.warm.values(), repeat.control.values(), strict=True):
            assert warm.startswith(tag) and not control.startswith(tag)
            assert control.startswith(f"[echo-prefix ctrl 0123abcd-cache_on.{r}.")
            assert control.split("]", 1)[1] == warm.split("]", 1)[1]  # the same text after the tag
        # The same words the old design's env of ttft_burst agents drew for this repeat.
        env = EchoPrefixParallelEnv(batch_size=4, group_size=1, task=work.task)
        observations, _ = env.reset(seed=1 + r)
        assert list(repeat.warm.values()) == list(observations.values())


def test_short_prompts_ask_the_same_words_after_a_short_prompt_of_their_own() -> None:
    for api in ("completions", "chat"):
        work = build_workload(_config(api=api), "0123abcd-cache_on")
        first = work.ttft[0]
        for i, (short, control) in enumerate(zip(first.short.values(), first.control.values(), strict=True)):
            chat = api == "chat"
            text, control_text = (short[0]["content"], control[0]["content"]) if chat else (short, control)
            assert text.startswith(f"[echo-prefix short 0123abcd-cache_on.0.{i:03d}]")
            assert len(text) < len(control_text) / 5
            if api == "completions":
                assert short.split("\n\n")[-1] == control.split("\n\n")[-1]  # the same request
            else:
                assert short[1:] == control[1:]


def test_vary_before_prefix_puts_an_agent_mark_before_the_shared_text() -> None:
    work = build_workload(_config(vary_before_prefix=True), "0123abcd-cache_on")
    marks = [p.split(" [echo-prefix run", 1)[0] for p in work.prompts.values()]
    assert marks == [f"[agent {i:04d}]" for i in range(6)]


def test_the_answer_checks_get_text_prompts_of_their_own_under_chat_too() -> None:
    work = build_workload(_config(api="chat"), "0123abcd-cache_on")
    assert set(work.checks) == set(CHECK_PURPOSES)
    for purpose, prompt in work.checks.items():
        assert prompt.startswith(run_tag(f"0123abcd-cache_on-{purpose}"))


def test_grading_steps_the_env_and_leaves_failed_answers_out() -> None:
    config = _config(batch_size=1, group_size=2)
    work = build_workload(config, "0123abcd-cache_on")
    episode = Episode(config, work)
    word = work.words[0][0]
    done = {
        "group0_agent0": SimpleNamespace(text=f" Echo: {word}", timing={}, error=None),
        "group0_agent1": SimpleNamespace(text="", timing={}, error="timeout"),
    }
    assert episode.grade(done) == [1.0]
    assert episode.answered == done and episode.observations == {}  # one word each: every episode is over


def test_the_warm_burst_misses_all_but_one_of_its_first_wave_on_independent_slots() -> None:
    from echo_env.wire.info import ServerFacts
    from echo_env.wire.kinds import CacheGranularity

    config = _config(align_prefix="off")  # 6 agents: the cold one, then a warm burst of 5
    assert build_workload(config, "0123abcd-cache_on").warm_misses == 0
    facts = ServerFacts("http://127.0.0.1:9/v1", None, "m", granularity=CacheGranularity(1, "props", slots=4))
    work = build_workload(config, "0123abcd-cache_on", facts)
    assert len(work.warm) == 5 and work.warm_misses == 3  # 4 slots: the first wave of 4, one of them hits
    shared = dataclasses.replace(facts, granularity=CacheGranularity(16, "vllm:cache_config_info block_size"))
    assert build_workload(config, "0123abcd-cache_on", shared).warm_misses == 0
