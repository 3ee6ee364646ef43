"""tinker-cookbook integration: the dataset builder, groups, envs and the cookbook's own rollout code.

No test needs a Tinker key: envs are stepped with canned completions, and the cookbook's
rollout loop samples from the vLLM engine through ``OpenAITokenCompleter``.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
import tinker
from tinker_cookbook.completers import StopCondition, TokenCompleter, TokensWithLogprobs
from tinker_cookbook.rl.data_processing import compute_advantages
from tinker_cookbook.rl.rollouts import do_group_rollout

from echo_env.serving.client import ClientConfig, LLMClient
from echo_env.errors import ConfigError
from echo_env.integrations.tinker_env import (
    TRANSCRIPT_RENDERER,
    EchoDataset,
    EchoDatasetBuilder,
    EchoEnv,
    EchoGroupBuilder,
    OpenAITokenCompleter,
    recipe_config,
)
from echo_env.serving.model import load_tokenizer


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class CannedCompleter(TokenCompleter):
    """Answers with the given replies in turn, as tokens."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = replies
        self.calls = 0

    async def __call__(
        self, model_input: tinker.ModelInput, stop: StopCondition, *, max_tokens: int | None = None
    ) -> TokensWithLogprobs:
        reply = self.replies[self.calls % len(self.replies)]
        self.calls += 1
        return TokensWithLogprobs(tokens=self.tokenizer.encode(reply, add_special_tokens=False), maybe_logprobs=None)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(None)


def test_builder_makes_batches_of_groups_with_the_recipe_parameters() -> None:
    train, test = run(EchoDatasetBuilder(batch_size=3, group_size=4, model_name_for_tokenizer="default")())
    assert test is None and len(train) == 100
    batch = train.get_batch(0)
    assert len(batch) == 3 and len({b.word for b in batch}) == 3
    assert all(isinstance(b, EchoGroupBuilder) and b.num_envs == 4 for b in batch)
    assert [b.word for b in train.get_batch(0)] == [b.word for b in batch]  # a batch is reproducible
    assert [b.word for b in train.get_batch(1)] != [b.word for b in batch]
    assert batch[0].logging_tags() == ["echo"]
    # Builders travel to rollout workers by pickle.
    assert pickle.loads(pickle.dumps(batch[0])) == batch[0]
    with_test = EchoDatasetBuilder(batch_size=2, group_size=4, model_name_for_tokenizer="default", n_test_batches=1)
    _, test = run(with_test())
    assert test is not None and test.get_batch(0)[0].num_envs == 1
    with pytest.raises(IndexError):
        train.get_batch(100)
    with pytest.raises(ConfigError):
        EchoDataset(batch_size=0, group_size=2, model_name_for_tokenizer="default")


def test_group_envs_share_one_prompt_ending_in_assistant(tokenizer: Any) -> None:
    group = EchoGroupBuilder(word="apple", num_envs=3, model_name_for_tokenizer="default")
    envs = run(group.make_envs())
    observations = [run(env.initial_observation()) for env in envs]
    tokens = [ob.to_ints() for ob, _ in observations]
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[0][0] == 2  # Gemma's <bos>
    assert tokenizer.decode(tokens[0]).endswith("Please echo the following word: apple\nAssistant:")
    assert observations[0][1] == ["\n"]


@pytest.mark.parametrize(
    ("reply", "reward", "metric"),
    [(" Echo: apple\n", 1.0, "correct"), (" Echo: pear\n", 0.0, "wrong_word"), (" Sure!\n", -1.0, "format_error")],
)
def test_stepping_with_canned_completions_grades_like_the_env(
    tokenizer: Any, reply: str, reward: float, metric: str
) -> None:
    env = EchoEnv("apple", tokenizer)
    run(env.initial_observation())
    result = run(env.step(tokenizer.encode(reply, add_special_tokens=False)))
    assert result.reward == reward and result.episode_done
    assert result.metrics[metric] == 1.0
    assert result.next_observation.length == 0
    assert result.logs["word"] == "apple"


def test_text_after_the_line_break_is_cut_as_a_server_stop_would(tokenizer: Any) -> None:
    env = EchoEnv("apple", tokenizer)
    run(env.initial_observation())
    result = run(env.step(tokenizer.encode(" Echo: apple\nUser: more", add_special_tokens=False)))
    assert result.reward == 1.0


def test_a_wrong_answer_gets_feedback_and_another_turn(tokenizer: Any) -> None:
    env = EchoEnv("apple", tokenizer, max_turns=2)
    run(env.initial_observation())
    first = run(env.step(tokenizer.encode(" Echo: pear", add_special_tokens=False)))
    assert not first.episode_done and first.reward == 0.0
    assert "Incorrect" in tokenizer.decode(first.next_observation.to_ints())
    second = run(env.step(tokenizer.encode(" Echo: apple", add_special_tokens=False)))
    assert second.episode_done and second.reward == 1.0 and second.metrics["stop/completed"] == 1.0


def test_chat_renderer_form(tokenizer: Any) -> None:
    group = EchoGroupBuilder(word="apple", num_envs=1, model_name_for_tokenizer="default", renderer_name="role_colon")
    (env,) = run(group.make_envs())
    ob, stop = run(env.initial_observation())
    text = tokenizer.decode(ob.to_ints())
    assert "User: Please echo the following word: apple" in text and text.rstrip().endswith("Assistant:")
    assert stop == ["\n\nUser:"]
    result = run(env.step(tokenizer.encode(" Echo: apple\n\nUser:", add_special_tokens=False)))
    assert result.reward == 1.0


def test_the_cookbooks_rollout_loop_runs_a_group(tokenizer: Any) -> None:
    group = EchoGroupBuilder(word="apple", num_envs=4, model_name_for_tokenizer="default")
    policy = CannedCompleter(tokenizer, [" Echo: apple\n", " Echo: apple\n", " Echo: pear\n", " nope\n"])
    trajectories = run(do_group_rollout(group, policy))
    assert trajectories.get_total_rewards() == [1.0, 1.0, 0.0, -1.0]
    (advantages,) = compute_advantages([trajectories])
    assert advantages.tolist() == [0.75, 0.75, -0.25, -1.25]


def test_recipe_config_is_the_cookbooks_train_config() -> None:
    from tinker_cookbook.rl import train

    config = recipe_config(model_name="meta-llama/Llama-3.2-1B").make_from_argv(
        ["dataset_builder.batch_size=4", "max_tokens=12"]
    )
    assert isinstance(config, train.Config)
    assert config.model_name == "meta-llama/Llama-3.2-1B" and config.max_tokens == 12
    assert isinstance(config.dataset_builder, EchoDatasetBuilder)
    assert config.dataset_builder.batch_size == 4 and config.dataset_builder.renderer_name == TRANSCRIPT_RENDERER


@pytest.mark.engine
def test_cookbook_rollouts_against_the_engine(engine: Any, tokenizer: Any) -> None:
    """The cookbook's do_group_rollout, sampling from vLLM: rewards, advantages, cache hits."""
    dataset = EchoDataset(batch_size=2, group_size=4, model_name_for_tokenizer="default", seed=7)

    async def rollouts() -> list[Any]:
        config = ClientConfig(base_url=engine.base_url, model=engine.served_model_name)
        async with LLMClient(config) as client:
            policy = OpenAITokenCompleter(client, max_tokens=12, temperature=1.0)
            return [await do_group_rollout(group, policy) for group in dataset.get_batch(0)]

    groups = run(rollouts())
    rewards = [r for g in groups for r in g.get_total_rewards()]
    assert len(rewards) == 8 and set(rewards) <= {1.0, 0.0, -1.0}
    assert sum(rewards) > 0  # the served model mostly answers right
    for g, adv in zip(groups, compute_advantages(groups)):
        assert abs(float(adv.sum())) < 1e-6
        for traj in g.trajectories_G:
            (transition,) = traj.transitions
            assert transition.ac.maybe_logprobs is not None
            assert len(transition.ac.logprobs) == len(transition.ac.tokens) >= 1
    # Every prompt after the first starts with cached blocks of the shared system prompt.
    cached = [t.ac.prompt_cache_hit_tokens for g in groups for traj in g.trajectories_G for t in traj.transitions]
    assert max(cached) >= 128
