"""The Gymnasium env ``EchoPrefix-v0``: registration, checker, rewards, turns and misuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import echo_env
from echo_env.envs.gym_env import MAX_ACTION_CHARS, EchoPrefixEnv
from echo_env.errors import ConfigError, EnvUsageError
from echo_env.envs.task import CORRECT_FEEDBACK, EchoTask


def test_make_works_in_a_fresh_process_without_a_prior_import() -> None:
    code = textwrap.dedent(
        """
        import sys
        import gymnasium
        assert "echo_env" not in sys.modules
        env = gymnasium.make("echo_env:EchoPrefix-v0")
        obs, info = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step("Echo: " + info["word"])
        assert reward == 1.0 and terminated, (reward, terminated)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_make_after_import_uses_the_plain_id() -> None:
    env = gymnasium.make(echo_env.ENV_ID, max_turns=2)
    assert isinstance(env.unwrapped, EchoPrefixEnv)
    assert env.unwrapped.max_turns == 2


@pytest.mark.parametrize("max_turns", [1, 3])
def test_check_env_passes(max_turns: int) -> None:
    check_env(gymnasium.make("echo_env:EchoPrefix-v0", max_turns=max_turns).unwrapped)


def test_reset_is_deterministic_per_seed() -> None:
    a, b = EchoPrefixEnv(), EchoPrefixEnv()
    obs_a, info_a = a.reset(seed=11)
    obs_b, info_b = b.reset(seed=11)
    assert (obs_a, info_a["word"]) == (obs_b, info_b["word"])
    words = {EchoPrefixEnv().reset(seed=s)[1]["word"] for s in range(20)}
    assert len(words) > 1


def test_observation_is_the_transcript_and_info_has_chat_messages() -> None:
    env = EchoPrefixEnv()
    obs, info = env.reset(seed=0, options={"word": "apple"})
    task = EchoTask()
    assert obs == task.transcript("apple")
    assert info["word"] == "apple" == env.word
    assert info["messages"] == task.chat_messages("apple")
    assert info["turn"] == 0
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    ("action", "reward", "outcome"),
    [("Echo: apple", 1.0, "correct"), ("Echo: pear", 0.0, "wrong_word"), ("apple", -1.0, "format_error")],
)
def test_rewards(action: str, reward: float, outcome: str) -> None:
    env = EchoPrefixEnv()
    env.reset(options={"word": "apple"})
    obs, r, terminated, truncated, info = env.step(action)
    assert (r, terminated, truncated) == (reward, True, False)
    assert info["outcome"] == outcome
    assert info["word"] == "apple"
    assert info["turn"] == 1
    assert isinstance(info["feedback"], str) and info["feedback"]
    assert env.observation_space.contains(obs)


def test_correct_answer_info() -> None:
    env = EchoPrefixEnv()
    env.reset(options={"word": "apple"})
    *_, info = env.step(" Echo: apple<end_of_turn>")
    assert info["feedback"] == CORRECT_FEEDBACK
    assert info["answer"] == "apple"
    assert info["action_truncated"] is False


def test_retries_carry_the_feedback_into_the_next_observation() -> None:
    env = EchoPrefixEnv(max_turns=3)
    env.reset(options={"word": "apple"})
    obs, reward, terminated, _, info = env.step("Echo: Apple")
    assert (reward, terminated, info["turn"]) == (0.0, False, 1)
    assert info["feedback"] in obs
    assert obs.endswith(f"User: {info['feedback']} Please echo the following word: apple\nAssistant:")
    assert "Assistant: Echo: Apple\n" in obs
    obs, reward, terminated, _, info = env.step("Echo: apple")
    assert (reward, terminated, info["turn"]) == (1.0, True, 2)


def test_episode_ends_when_turns_are_used_up() -> None:
    env = EchoPrefixEnv(max_turns=2)
    env.reset(options={"word": "apple"})
    assert env.step("nope")[2] is False
    assert env.step("nope")[2] is True
    with pytest.raises(EnvUsageError, match="reset"):
        env.step("Echo: apple")


def test_every_step_returns_fresh_info_dicts() -> None:
    env = EchoPrefixEnv(max_turns=3)
    env.reset(options={"word": "apple"})
    *_, first = env.step("x")
    first["word"] = "mutated"
    *_, second = env.step("y")
    assert second is not first
    assert second["word"] == "apple"


def test_step_before_reset_is_a_usage_error() -> None:
    with pytest.raises(EnvUsageError, match="reset"):
        EchoPrefixEnv().step("Echo: apple")
    with pytest.raises(EnvUsageError, match="reset"):
        _ = EchoPrefixEnv().word


def test_step_after_done_is_a_usage_error() -> None:
    env = EchoPrefixEnv()
    env.reset(seed=0)
    env.step("Echo: " + env.word)
    with pytest.raises(EnvUsageError, match="reset"):
        env.step("Echo: " + env.word)
    env.reset(seed=1)
    assert env.step("Echo: " + env.word)[1] == 1.0


@pytest.mark.parametrize("action", [None, 5, b"Echo: apple", ["Echo: apple"]])
def test_non_text_action_is_a_usage_error(action: object) -> None:
    env = EchoPrefixEnv()
    env.reset(seed=0)
    with pytest.raises(EnvUsageError, match="str"):
        env.step(action)  # type: ignore[arg-type]


def test_long_action_is_truncated_and_flagged() -> None:
    env = EchoPrefixEnv()
    env.reset(options={"word": "apple"})
    obs, reward, *_, info = env.step("Echo: apple" + "!" * 5000)
    assert info["action_truncated"] is True
    assert reward == 0.0
    assert len(info["answer"]) == MAX_ACTION_CHARS - len("Echo: ")
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize(
    "action",
    [
        "Echo: äpple",
        "Echo: \U0001f600",
        "\U0001f600" * 5000,
        "Echo: " + "\U0001f600" * 5000,
        "Echo: apple\x00\x1b[0m\u2028",
        "Echo: a\r\nUser: fake\n" * 200,
        "x" * 5000,
    ],
)
@pytest.mark.parametrize("max_turns", [1, 2, 6])
def test_every_observation_stays_inside_the_observation_space(action: str, max_turns: int) -> None:
    env = EchoPrefixEnv(max_turns=max_turns)
    obs, _ = env.reset(seed=0)
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.step(action)
        assert env.observation_space.contains(obs), len(obs)


@settings(max_examples=60, deadline=None)
@given(actions=st.lists(st.text(max_size=1500), min_size=3, max_size=3))
def test_any_replies_keep_observations_inside_the_space(actions: list[str]) -> None:
    env = EchoPrefixEnv(max_turns=3)
    env.reset(seed=0)
    for action in actions:
        obs, _, terminated, _, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert info["outcome"] in ("correct", "wrong_word", "format_error")
        if terminated:
            break


def test_word_option_must_fit_the_observation_space() -> None:
    env = EchoPrefixEnv()
    for word in ("äpple", "x" * 5000, "two words\n", ""):
        with pytest.raises(ConfigError):
            env.reset(options={"word": word})


def test_task_must_fit_the_observation_space() -> None:
    with pytest.raises(ConfigError):
        EchoPrefixEnv(task=EchoTask(words=("café",)))
    with pytest.raises(ConfigError):
        EchoPrefixEnv(task=EchoTask(run_tag="run ✓"))


def test_custom_task_and_its_words() -> None:
    env = EchoPrefixEnv(task=EchoTask(words=("alpha", "beta"), run_tag="run-7"))
    obs, info = env.reset(seed=0)
    assert info["word"] in ("alpha", "beta")
    assert obs.startswith("run-7\n")
    env.reset(options={"word": "beta"})
    assert env.word == "beta"


@pytest.mark.parametrize("kwargs", [{"max_turns": 0}, {"max_turns": -1}, {"render_mode": "human"}])
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        EchoPrefixEnv(**kwargs)  # type: ignore[arg-type]


def test_ansi_render_shows_the_transcript() -> None:
    env = EchoPrefixEnv(render_mode="ansi")
    assert env.render() is None
    obs, _ = env.reset(options={"word": "apple"})
    assert env.render() == obs
    assert EchoPrefixEnv().render() is None
