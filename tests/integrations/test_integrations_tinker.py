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
from tinker_cookbook.rl.data_processing import compute_advantages, trajectory_to_data
from tinker_cookbook.rl.rollouts import do_group_rollout

from echo_env.envs.task import EchoTask
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
from echo_env.launch.model import load_tokenizer
from echo_env.wire.client import ClientConfig, LLMClient


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class EchoingCompleter(TokenCompleter):
    """Answers every prompt right: `` Echo: <the last word asked>``, then the line break."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    async def __call__(
        self, model_input: tinker.ModelInput, stop: StopCondition, *, max_tokens: int | None = None
    ) -> TokensWithLogprobs:
        word = self.tokenizer.decode(model_input.to_ints()).rsplit("following word: ", 1)[1].split()[0]
        tokens = self.tokenizer.encode(f" Echo: {word}\n", add_special_tokens=False)
        return TokensWithLogprobs(tokens=tokens, maybe_logprobs=[0.0] * len(tokens))


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


# ----- multi-turn episodes -------------------------------------------------------------------


def test_builder_draws_each_groups_later_words(tokenizer: Any) -> None:
    one, _ = run(EchoDatasetBuilder(batch_size=4, group_size=2, model_name_for_tokenizer="default")())
    multi, _ = run(EchoDatasetBuilder(batch_size=4, group_size=2, model_name_for_tokenizer="default", turns=3)())
    batch = multi.get_batch(0)
    assert [b.word for b in batch] == [b.word for b in one.get_batch(0)]  # turns=1 words are the first words
    assert all(len({b.word, *b.later_words}) == 3 for b in batch)
    assert [b.later_words for b in multi.get_batch(0)] == [b.later_words for b in batch]
    assert all(b.later_words == () for b in one.get_batch(0))
    assert pickle.loads(pickle.dumps(batch[0])) == batch[0]
    with pytest.raises(ConfigError, match="turns"):
        EchoDataset(batch_size=1, group_size=1, model_name_for_tokenizer="default", turns=0)
    with pytest.raises(ConfigError, match="lower turns"):
        EchoDataset(1, 1, "default", task=EchoTask(words=("alpha", "beta")), turns=3)


def test_each_turns_observation_extends_the_last_one_token_for_token(tokenizer: Any) -> None:
    env = EchoEnv("apple", tokenizer, later_words=("forest", "candle"))
    ob, _ = run(env.initial_observation())
    tokens = ob.to_ints()
    # The second reply ends in a "\n\n" token, which a server stopping at "\n" sends whole.
    for word, reply in (("apple", " Echo: apple\n"), ("forest", " Echo: forst\n\n"), ("candle", " Echo: candle\n")):
        action = tokenizer.encode(reply, add_special_tokens=False)
        result = run(env.step(action))
        assert result.logs["word"] == word
        if word == "candle":
            assert result.episode_done and result.metrics["stop/completed"] == 1.0
            break
        assert not result.episode_done
        following = result.next_observation.to_ints()
        assert following[: len(tokens) + len(action)] == tokens + action
        tokens = following
    text = tokenizer.decode(tokens)
    assert text.endswith(
        "Assistant: Echo: apple\nUser: Correct! Echo matched. Please echo the following word: forest\n"
        "Assistant: Echo: forst\n\nUser: Incorrect. Expected 'Echo: forest' but the echoed word was 'forst'. "
        "Please echo the following word: candle\nAssistant:"
    )


def test_a_reply_the_env_shows_differently_gets_a_freshly_encoded_observation(tokenizer: Any) -> None:
    env = EchoEnv("apple", tokenizer, later_words=("forest",))
    run(env.initial_observation())
    result = run(env.step(tokenizer.encode(" Echo: apple\nUser: more", add_special_tokens=False)))
    assert result.reward == 1.0
    text = tokenizer.decode(result.next_observation.to_ints(), skip_special_tokens=True)
    assert text == EchoTask().transcript("apple", env.env._conversation().history)
    assert "more" not in text


def test_the_cookbook_trains_a_multi_turn_episode_as_one_sequence(tokenizer: Any) -> None:
    group = EchoGroupBuilder(word="apple", num_envs=2, model_name_for_tokenizer="default", later_words=("forest",))
    trajectories = run(do_group_rollout(group, EchoingCompleter(tokenizer)))
    assert [len(t.transitions) for t in trajectories.trajectories_G] == [2, 2]
    assert trajectories.get_total_rewards() == [2.0, 2.0]
    for trajectory in trajectories.trajectories_G:
        (datum,) = trajectory_to_data(trajectory, 1.0)  # one sequence: each turn extends the last
        assert datum.model_input.length > trajectory.transitions[-1].ob.length


def test_multi_turn_chat_renderer_form(tokenizer: Any) -> None:
    group = EchoGroupBuilder(
        word="apple",
        num_envs=1,
        model_name_for_tokenizer="default",
        renderer_name="role_colon",
        max_turns=2,
        later_words=("forest",),
    )
    (env,) = run(group.make_envs())
    run(env.initial_observation())
    first = run(env.step(tokenizer.encode(" Echo: pear\n\nUser:", add_special_tokens=False)))
    assert not first.episode_done and first.logs["attempt"] == 1
    text = tokenizer.decode(first.next_observation.to_ints())
    assert "Please echo the following word: apple" in text.rsplit("Echo: pear", 1)[1]
    second = run(env.step(tokenizer.encode(" Echo: apple\n\nUser:", add_special_tokens=False)))
    assert "Correct! Echo matched. Please echo the following word: forest" in tokenizer.decode(
        second.next_observation.to_ints()
    )
    third = run(env.step(tokenizer.encode(" Echo: forest\n\nUser:", add_special_tokens=False)))
    assert third.episode_done and third.reward == 1.0 and third.logs["turn"] == 1


def test_recipe_config_is_the_cookbooks_train_config() -> None:
    from tinker_cookbook.rl import train

    config = recipe_config(model_name="meta-llama/Llama-3.2-1B").make_from_argv(
        ["dataset_builder.batch_size=4", "max_tokens=12"]
    )
    assert isinstance(config, train.Config)
    assert config.model_name == "meta-llama/Llama-3.2-1B" and config.max_tokens == 12
    assert isinstance(config.dataset_builder, EchoDatasetBuilder)
    assert config.dataset_builder.batch_size == 4 and config.dataset_builder.renderer_name == TRANSCRIPT_RENDERER
    assert config.dataset_builder.turns == 1
    multi = recipe_config(turns=2).make_from_argv(["dataset_builder.turns=3", "dataset_builder.max_turns=2"])
    assert (multi.dataset_builder.turns, multi.dataset_builder.max_turns) == (3, 2)


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


@pytest.mark.engine
def test_multi_turn_rollouts_against_the_engine_reuse_the_history(engine: Any, tokenizer: Any) -> None:
    """Three-word episodes sampled from vLLM: later turns find their own history in the cache."""
    dataset = EchoDataset(batch_size=1, group_size=2, model_name_for_tokenizer="default", seed=11, turns=3)

    async def rollouts() -> Any:
        config = ClientConfig(base_url=engine.base_url, model=engine.served_model_name)
        async with LLMClient(config) as client:
            policy = OpenAITokenCompleter(client, max_tokens=12, temperature=0.0)
            return await do_group_rollout(dataset.get_batch(0)[0], policy)

    group = run(rollouts())
    for traj in group.trajectories_G:
        assert len(traj.transitions) == 3
        assert all(t.reward in (1.0, 0.0, -1.0) for t in traj.transitions)
        (datum,) = trajectory_to_data(traj, 1.0)
        assert datum.model_input.length > traj.transitions[-1].ob.length
        # Each later turn's prompt is the earlier prompt plus the sampled tokens: every whole
        # block of those is served from the cache (128 tokens: vLLM's block on CPU; a
        # smaller block only raises the count).
        for before, after in zip(traj.transitions, traj.transitions[1:]):
            history = before.ob.length + len(before.ac.tokens)
            assert after.ac.prompt_cache_hit_tokens >= history // 128 * 128
