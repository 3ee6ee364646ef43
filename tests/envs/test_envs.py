"""The Gymnasium env ``EchoPrefix-v0``: registration, checker, rewards, turns, attempts, sessions and misuse."""

from __future__ import annotations

import string
import subprocess
import sys
import textwrap

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import echo_env
from echo_env.envs.gym_env import MAX_ACTION_CHARS, MAX_EPISODE_STEPS, EchoPrefixEnv
from echo_env.envs.task import CORRECT_FEEDBACK, EchoTask, user_turn
from echo_env.errors import ConfigError, EnvUsageError


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
    env = gymnasium.make(echo_env.ENV_ID, max_turns=2, turns=3)
    assert isinstance(env.unwrapped, EchoPrefixEnv)
    assert (env.unwrapped.max_turns, env.unwrapped.turns) == (2, 3)


@pytest.mark.parametrize(("max_turns", "turns"), [(1, 1), (3, 1), (1, 3), (2, 4)])
def test_check_env_passes(max_turns: int, turns: int) -> None:
    check_env(gymnasium.make("echo_env:EchoPrefix-v0", max_turns=max_turns, turns=turns).unwrapped)


def test_a_made_multi_turn_env_runs_a_whole_episode() -> None:
    env = gymnasium.make("EchoPrefix-v0", turns=3)
    _, info = env.reset(seed=0)
    rewards, terminated = [], False
    while not terminated:
        word = info["word"] if "next_word" not in info else info["next_word"]
        _, reward, terminated, _, info = env.step(" Echo: " + word)
        rewards.append(reward)
    assert rewards == [1.0, 1.0, 1.0]


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
    assert info["session_id"] == env.session_id()
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
    assert info["reward"] == reward
    assert info["word"] == "apple"
    assert (info["turn"], info["attempt"], info["next_word"], info["next_turn"]) == (0, 1, None, None)
    assert isinstance(info["feedback"], str) and info["feedback"]
    assert obs.endswith(f"User: {info['feedback']}")
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
    obs, reward, terminated, _, info = env.step(" Echo: Apple")
    assert (reward, terminated, info["turn"], info["attempt"], info["next_word"]) == (0.0, False, 0, 1, "apple")
    assert obs.endswith(
        f"Assistant: Echo: Apple\nUser: {info['feedback']} Please echo the following word: apple\nAssistant:"
    )
    obs, reward, terminated, _, info = env.step(" Echo: apple")
    assert (reward, terminated, info["turn"], info["attempt"]) == (1.0, True, 0, 2)
    assert obs.endswith("Assistant: Echo: apple\nUser: Correct! Echo matched.")


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
@pytest.mark.parametrize(("max_turns", "turns"), [(1, 1), (2, 1), (6, 1), (2, 3)])
def test_every_observation_stays_inside_the_observation_space(action: str, max_turns: int, turns: int) -> None:
    env = EchoPrefixEnv(max_turns=max_turns, turns=turns)
    obs, _ = env.reset(seed=0)
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.step(action)
        assert env.observation_space.contains(obs), len(obs)


@settings(max_examples=60, deadline=None)
@given(actions=st.lists(st.text(max_size=1500), min_size=3, max_size=3))
def test_any_replies_keep_observations_inside_the_space(actions: list[str]) -> None:
    env = EchoPrefixEnv(max_turns=2, turns=2)
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


@pytest.mark.parametrize("kwargs", [{"max_turns": 0}, {"max_turns": -1}, {"render_mode": "human"}, {"turns": 0}])
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        EchoPrefixEnv(**kwargs)  # type: ignore[arg-type]


def test_ansi_render_shows_the_transcript() -> None:
    env = EchoPrefixEnv(render_mode="ansi")
    assert env.render() is None
    obs, _ = env.reset(options={"word": "apple"})
    assert env.render() == obs
    assert EchoPrefixEnv().render() is None


# --- multi-turn episodes ------------------------------------------------------------------


def episode(env: EchoPrefixEnv, actions: list[str]) -> list[tuple[str, float, bool, dict]]:
    out = []
    for action in actions:
        obs, reward, terminated, _, info = env.step(action)
        out.append((obs, reward, terminated, info))
    return out


def test_each_turn_asks_the_next_word_after_the_feedback() -> None:
    env = EchoPrefixEnv(turns=3)
    obs0, _ = env.reset(options={"words": ["apple", "garden", "candle"]})
    assert obs0 == EchoTask().transcript("apple")
    assert env.words == ["apple", "garden", "candle"]
    obs1, r1, t1, _, info1 = env.step(" Echo: apple")
    assert (r1, t1) == (1.0, False)
    assert (
        obs1 == obs0 + " Echo: apple\nUser: Correct! Echo matched. Please echo the following word: garden\nAssistant:"
    )
    assert (info1["word"], info1["turn"], info1["attempt"]) == ("apple", 0, 1)
    assert (info1["next_word"], info1["next_turn"]) == ("garden", 1)
    assert env.word == "garden"
    obs2, r2, t2, _, info2 = env.step(" Echo: gardens")
    assert (r2, t2, info2["outcome"], info2["turn"], info2["next_word"]) == (0.0, False, "wrong_word", 1, "candle")
    assert obs2.endswith(f"User: {info2['feedback']} Please echo the following word: candle\nAssistant:")
    obs3, r3, t3, _, info3 = env.step("nope")
    assert (r3, t3, info3["outcome"], info3["turn"], info3["next_word"]) == (-1.0, True, "format_error", 2, None)
    assert obs3 == obs2 + f"nope\nUser: {info3['feedback']}"
    with pytest.raises(EnvUsageError, match="reset"):
        env.step(" Echo: candle")


def test_each_word_allows_max_turns_attempts_then_the_next_word_comes() -> None:
    env = EchoPrefixEnv(turns=2, max_turns=2)
    env.reset(options={"words": ["apple", "garden"]})
    steps = episode(env, ["wrong", "still wrong", " Echo: pear", " Echo: garden"])
    assert [(i["turn"], i["attempt"], i["next_word"]) for *_, i in steps] == [
        (0, 1, "apple"),
        (0, 2, "garden"),
        (1, 1, "garden"),
        (1, 2, None),
    ]
    assert [r for _, r, _, _ in steps] == [-1.0, -1.0, 0.0, 1.0]
    assert [t for _, _, t, _ in steps] == [False, False, False, True]


def test_a_right_answer_moves_on_at_once() -> None:
    env = EchoPrefixEnv(turns=2, max_turns=3)
    env.reset(options={"words": ["apple", "garden"]})
    steps = episode(env, [" Echo: apple", "x", " Echo: garden"])
    assert [(i["turn"], i["attempt"]) for *_, i in steps] == [(0, 1), (1, 1), (1, 2)]
    assert steps[-1][2] is True


@pytest.mark.parametrize(("turns", "max_turns"), [(1, 1), (3, 1), (2, 3), (4, 2)])
def test_an_episode_takes_turns_to_turns_times_max_turns_steps(turns: int, max_turns: int) -> None:
    env = EchoPrefixEnv(turns=turns, max_turns=max_turns)
    env.reset(seed=1)
    right = 0
    while True:
        *_, terminated, _, _ = env.step(" Echo: " + env.word)
        right += 1
        if terminated:
            break
    assert right == turns
    env.reset(seed=1)
    wrong = 0
    while not env.step("wrong")[2]:
        wrong += 1
    assert wrong + 1 == turns * max_turns


_ONE_LINE = st.text(alphabet=st.sampled_from(sorted(set(string.printable) - set("\n\r\x0b\x0c"))), max_size=60)


@settings(max_examples=80, deadline=None)
@given(
    replies=st.lists(
        st.one_of(_ONE_LINE, _ONE_LINE.map(lambda r: r + "\n"), st.sampled_from([" Echo: {w}", "Echo: {w}\n"])),
        min_size=1,
        max_size=8,
    ),
    turns=st.integers(1, 3),
    max_turns=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_every_observation_extends_the_last_one_by_the_reply_as_generated(
    replies: list[str], turns: int, max_turns: int, seed: int
) -> None:
    env = EchoPrefixEnv(turns=turns, max_turns=max_turns)
    obs, info = env.reset(seed=seed)
    messages = info["messages"]
    for template in replies:
        reply = template.replace("{w}", env.word)
        next_obs, _, terminated, _, info = env.step(reply)
        assert next_obs.startswith(obs + reply)
        assert env.observation_space.contains(next_obs)
        assert info["messages"][: len(messages)] == messages
        assert info["messages"][len(messages)] == {"role": "assistant", "content": reply}
        assert info["messages"][-1]["content"].startswith(info["feedback"])
        assert next_obs.endswith("\nAssistant:") != terminated
        obs, messages = next_obs, info["messages"]
        if terminated:
            assert info["messages"][-1] == {"role": "user", "content": info["feedback"]}
            break
        assert info["messages"][-1]["content"] == f"{info['feedback']} {user_turn(info['next_word'])}"


@pytest.mark.parametrize(
    ("reply", "shown"),
    [
        ("Echo: \u00e4pple", "Echo: ?pple"),  # outside the Text space: '?'
        ("x" * 2000, "x" * MAX_ACTION_CHARS),  # cut to the action space
        ("Echo: a\nUser: fake", "Echo: a User: fake"),  # cannot start a line of its own
    ],
)
def test_replies_the_text_space_cannot_hold_are_shown_changed(reply: str, shown: str) -> None:
    env = EchoPrefixEnv(turns=2)
    obs, _ = env.reset(seed=0)
    next_obs, *_ = env.step(reply)
    assert next_obs.startswith(obs + shown + "\nUser: ")


def test_words_are_different_within_an_episode_and_seeded() -> None:
    env = EchoPrefixEnv(turns=5)
    for seed in range(10):
        env.reset(seed=seed)
        assert len(set(env.words)) == 5
    env.reset(seed=4)
    first = env.words
    env.reset(seed=4)
    assert env.words == first
    # The first word is the one a one-turn env asks for the same seed.
    assert EchoPrefixEnv().reset(seed=4)[1]["word"] == first[0]


def test_word_option_sets_the_first_word_and_words_sets_them_all() -> None:
    env = EchoPrefixEnv(turns=3)
    _, info = env.reset(seed=0, options={"word": "apple"})
    assert info["word"] == "apple" and env.words[0] == "apple" and len(set(env.words)) == 3
    env.reset(options={"words": ["forest", "apple", "candle"]})
    assert env.words == ["forest", "apple", "candle"]


@pytest.mark.parametrize(
    "words", [["apple", "garden"], ["apple", "apple", "garden"], ["apple", "garden", "\u00e4pple"], "apple", 7]
)
def test_bad_words_options_are_config_errors(words: object) -> None:
    with pytest.raises(ConfigError):
        EchoPrefixEnv(turns=3).reset(options={"words": words})


def test_session_id_is_stable_over_an_episode_and_new_for_the_next() -> None:
    env = EchoPrefixEnv(turns=3)
    _, info = env.reset(seed=7)
    sid = info["session_id"]
    assert sid == env.session_id() == "seed7-ep0"
    for _ in range(3):
        *_, info = env.step(" Echo: " + env.word)
        assert info["session_id"] == sid
    _, info = env.reset()
    assert info["session_id"] == "seed7-ep1"
    assert env.reset(seed=7)[1]["session_id"] == sid  # the same seed replays the same conversation
    assert EchoPrefixEnv(task=EchoTask(run_tag="run-1")).reset(seed=7)[1]["session_id"].startswith("seed7-")
    assert EchoPrefixEnv(task=EchoTask(run_tag="run-1")).reset(seed=7)[1]["session_id"] != sid
    unseeded = {EchoPrefixEnv().reset()[1]["session_id"] for _ in range(3)}
    assert len(unseeded) == 3
    with pytest.raises(EnvUsageError, match="reset"):
        EchoPrefixEnv().session_id()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"turns": 0}, "turns must be at least 1"),
        ({"turns": -2}, "turns must be at least 1"),
        ({"turns": 1.5}, "turns must be a whole number"),
        ({"max_turns": 0}, "max_turns must be at least 1"),
        ({"turns": 3, "task": EchoTask(words=("alpha", "beta"))}, "lower turns to at most 2"),
        ({"turns": MAX_EPISODE_STEPS, "max_turns": 2}, "lower turns or max_turns"),
    ],
)
def test_bad_turn_settings_are_config_errors_naming_the_fix(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EchoPrefixEnv(**kwargs)  # type: ignore[arg-type]


def test_observation_space_fits_the_longest_episode() -> None:
    env = EchoPrefixEnv(turns=3, max_turns=2)
    env.reset(seed=0)
    worst = "Echo: " + "\U0001f600" * 5000
    terminated, steps = False, 0
    while not terminated:
        obs, _, terminated, _, _ = env.step(worst)
        steps += 1
        assert env.observation_space.contains(obs), len(obs)
    assert steps == 6
    assert env.observation_space.max_length > EchoPrefixEnv(max_turns=2).observation_space.max_length
