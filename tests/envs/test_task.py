"""The echo task: shared prompt, word list, renderings and every grading rule."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_env.envs.task import (
    CORRECT_FEEDBACK,
    EchoTask,
    Turn,
    default_system_prompt,
    default_words,
    env_turn,
    follow_up,
    grade,
    strip_answer,
    transcript_reply,
    user_turn,
)
from echo_env.errors import ConfigError

WORD = "apple"


def ascii_printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


# --- the shared system prompt and the word list ---------------------------------------


def test_system_prompt_is_about_two_kilobytes() -> None:
    size = len(default_system_prompt().encode("utf-8"))
    assert 1800 <= size <= 2600


def test_system_prompt_holds_a_dozen_worked_examples_in_transcript_form() -> None:
    pattern = r"User: Please echo the following word: (\w+)\nAssistant: Echo: (\w+)"
    examples = re.findall(pattern, default_system_prompt())
    assert len(examples) >= 12
    assert all(asked == answered for asked, answered in examples)
    assert len({asked for asked, _ in examples}) == len(examples)


def test_word_list_has_256_distinct_lowercase_words() -> None:
    words = default_words()
    assert len(set(words)) == len(words) >= 256
    assert all(w.isalpha() and w.islower() and w.isascii() for w in words)


def test_user_turn_wording() -> None:
    assert user_turn("river") == "Please echo the following word: river"


def test_sampling_is_deterministic_per_seed() -> None:
    task = EchoTask()
    assert task.sample_words(16, seed=7) == task.sample_words(16, seed=7)
    assert task.sample_words(16, seed=7) != task.sample_words(16, seed=8)
    assert set(task.sample_words(16, seed=7)) <= set(task.words)


def test_sampled_words_are_distinct_while_the_list_lasts() -> None:
    task = EchoTask(words=("a", "b", "c"))
    assert sorted(task.sample_words(3, seed=1)) == ["a", "b", "c"]
    assert len(task.sample_words(7, seed=1)) == 7
    assert task.sample_words(0, seed=1) == []


def test_negative_sample_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        EchoTask().sample_words(-1, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"system_prompt": "   "},
        {"words": ()},
        {"words": ("ok", " padded")},
        {"words": ("two\nlines",)},
        {"words": ("",)},
    ],
)
def test_bad_task_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        EchoTask(**kwargs)  # type: ignore[arg-type]


# --- grading ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "Echo: apple",
        "  Echo: apple  ",
        "\n\tEcho: apple\n",
        "Echo: apple<end_of_turn>",
        "Echo: apple<eos>",
        "Echo: apple<|im_end|>",
        "Echo: apple</s>",
        "Echo: apple<|eot_id|>",
        "Echo: apple <end_of_turn>\n",
        "Echo: apple<end_of_turn><eos>",
    ],
)
def test_correct_echo(completion: str) -> None:
    result = grade(completion, WORD)
    assert (result.reward, result.outcome, result.answer) == (1.0, "correct", WORD)
    assert result.feedback == CORRECT_FEEDBACK == "Correct! Echo matched."


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("Echo: Apple", "Apple"),
        ("Echo: APPLE", "APPLE"),
        ("Echo:  apple", " apple"),
        ("Echo: apple.", "apple."),
        ("Echo: apples", "apples"),
        ("Echo: Echo: apple", "Echo: apple"),
        ("Echo: äpple", "äpple"),
        ("Echo: apple\x00", "apple\x00"),
        ("Echo: apple\x07", "apple\x07"),
        ("Echo: pomme", "pomme"),
        ("Echo: apple<end_of_turn> more", "apple<end_of_turn> more"),
    ],
)
def test_wrong_word(completion: str, answer: str) -> None:
    result = grade(completion, WORD)
    assert (result.reward, result.outcome, result.answer) == (0.0, "wrong_word", answer)
    assert "'Echo: apple'" in result.feedback
    assert ascii_printable(result.feedback)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "   ",
        "\n\t \r\n",
        "<end_of_turn>",
        "echo: apple",
        "ECHO: apple",
        "Echo:apple",
        "Echo:",
        "Echo: ",
        "apple",
        "Sure! Echo: apple",
        "Echo: apple\nEcho: apple",
        "Echo: apple\r\nThanks",
        "Echo: apple\rThanks",
        "\x1b[31mEcho: apple",
        "\x00Echo: apple",
        "Écho : pomme",
        "Эхо: яблоко",
        "回声：苹果",
    ],
)
def test_format_error(completion: str) -> None:
    result = grade(completion, WORD)
    assert (result.reward, result.outcome, result.answer) == (-1.0, "format_error", None)
    assert result.feedback.startswith("Format error")
    assert "'Echo: apple'" in result.feedback
    assert ascii_printable(result.feedback)


def test_accented_word_is_echoed_exactly() -> None:
    assert grade("Echo: café", "café").outcome == "correct"
    assert grade("Echo: cafe", "café").outcome == "wrong_word"
    assert grade("Echo: naïve", "naïve").reward == 1.0


def test_very_long_output_is_graded_and_feedback_stays_short() -> None:
    wrong = grade("Echo: " + "a" * 9994, WORD)
    assert wrong.outcome == "wrong_word"
    assert "9994 characters" in wrong.feedback
    assert len(wrong.feedback) < 300
    no_prefix = grade("x" * 10_000, WORD)
    assert no_prefix.outcome == "format_error"
    assert len(no_prefix.feedback) < 300
    assert grade("Echo: apple" + " " * 10_000, WORD).outcome == "correct"


def test_feedback_escapes_what_the_model_wrote() -> None:
    result = grade("Echo: \U0001f600\x1b[0m", WORD)
    assert ascii_printable(result.feedback)
    assert "\\U0001f600" in result.feedback


def test_strip_answer_removes_only_trailing_markers() -> None:
    assert strip_answer("  Echo: apple<end_of_turn>\n") == "Echo: apple"
    assert strip_answer("<eos>Echo: apple") == "<eos>Echo: apple"


@settings(max_examples=300, deadline=None)
@given(completion=st.text(max_size=200), word=st.sampled_from(default_words()))
def test_grade_never_raises_and_rewards_are_the_three_values(completion: str, word: str) -> None:
    result = grade(completion, word)
    assert result.reward in {1.0, 0.0, -1.0}
    assert {1.0: "correct", 0.0: "wrong_word", -1.0: "format_error"}[result.reward] == result.outcome
    assert (result.outcome == "correct") == (strip_answer(completion) == f"Echo: {word}")
    assert ascii_printable(result.feedback)


@settings(max_examples=100, deadline=None)
@given(noise=st.text(alphabet=" \t\n\r", max_size=5), word=st.sampled_from(default_words()))
def test_surrounding_whitespace_never_changes_a_correct_answer(noise: str, word: str) -> None:
    assert grade(f"{noise}Echo: {word}{noise}", word).reward == 1.0


# --- the two renderings: nothing varies before the word ---------------------------------


def test_transcript_ends_with_the_request_and_assistant() -> None:
    text = EchoTask().transcript(WORD)
    assert text.startswith(default_system_prompt())
    assert text.endswith("\n\nUser: Please echo the following word: apple\nAssistant:")


def test_chat_messages_are_system_then_user() -> None:
    messages = EchoTask().chat_messages(WORD)
    assert messages == [
        {"role": "system", "content": default_system_prompt()},
        {"role": "user", "content": "Please echo the following word: apple"},
    ]


@pytest.mark.parametrize("run_tag", ["", "run 2024-05-01 #17"])
def test_transcripts_of_a_run_are_byte_identical_up_to_the_word(run_tag: str) -> None:
    task = EchoTask(run_tag=run_tag)
    shared = task.shared_text()
    assert shared.endswith("User: Please echo the following word: ")
    for word in task.sample_words(64, seed=3):
        text = task.transcript(word)
        assert text.encode() == shared.encode() + f"{word}\nAssistant:".encode()


@pytest.mark.parametrize("run_tag", ["", "run-abc"])
def test_chat_messages_of_a_run_are_identical_up_to_the_word(run_tag: str) -> None:
    task = EchoTask(run_tag=run_tag)
    first = task.chat_messages("river")
    for word in task.sample_words(64, seed=3):
        messages = task.chat_messages(word)
        assert messages[0] == first[0]
        assert messages[1]["content"] == "Please echo the following word: " + word


def test_run_tag_goes_at_the_very_start() -> None:
    tagged = EchoTask(run_tag="run-42")
    assert tagged.transcript(WORD).startswith("run-42\n" + default_system_prompt())
    assert tagged.chat_messages(WORD)[0]["content"].startswith("run-42\n")
    assert tagged.shared_text().startswith("run-42\n")
    assert EchoTask().transcript(WORD) == tagged.transcript(WORD).removeprefix("run-42\n")


def test_history_appears_in_both_renderings() -> None:
    task = EchoTask()
    history = [Turn(reply=" Echo: Apple", feedback="Incorrect. Try again.", next_word=WORD)]
    text = task.transcript(WORD, history)
    assert text.endswith(
        "User: Please echo the following word: apple\nAssistant: Echo: Apple\n"
        "User: Incorrect. Try again. Please echo the following word: apple\nAssistant:"
    )
    assert task.chat_messages(WORD, history)[2:] == [
        {"role": "assistant", "content": " Echo: Apple"},
        {"role": "user", "content": "Incorrect. Try again. Please echo the following word: apple"},
    ]


def test_the_next_word_is_asked_after_the_feedback() -> None:
    task = EchoTask()
    history = [Turn(reply=" Echo: apple", feedback=CORRECT_FEEDBACK, next_word="river")]
    assert task.transcript(WORD, history).endswith(
        "User: Please echo the following word: apple\nAssistant: Echo: apple\n"
        "User: Correct! Echo matched. Please echo the following word: river\nAssistant:"
    )
    assert task.chat_messages(WORD, history)[-1] == {
        "role": "user",
        "content": "Correct! Echo matched. Please echo the following word: river",
    }


def test_the_last_answer_ends_the_conversation_with_the_feedback_as_in_the_recipe() -> None:
    task = EchoTask()
    history = [Turn(reply=" Echo: apple", feedback=CORRECT_FEEDBACK, next_word=None)]
    assert task.transcript(WORD, history).endswith(
        "User: Please echo the following word: apple\nAssistant: Echo: apple\nUser: Correct! Echo matched."
    )
    assert task.chat_messages(WORD, history)[-2:] == [
        {"role": "assistant", "content": " Echo: apple"},
        {"role": "user", "content": "Correct! Echo matched."},
    ]
    assert env_turn(CORRECT_FEEDBACK, None) == "Correct! Echo matched."


@pytest.mark.parametrize(
    ("reply", "shown"),
    [
        (" Echo: apple", " Echo: apple"),  # a base model's leading space stays
        ("Echo: apple", "Echo: apple"),  # and is not added when the model gave none
        (" Echo: apple\n", " Echo: apple\n"),  # a stop string kept in the output ends the line
        (" Echo: apple\n\n", " Echo: apple\n\n"),  # so does a "\n\n" token: trailing whitespace stays
        (" Echo: apple \r\n", " Echo: apple \r\n"),
        ("Echo:  apple <end_of_turn>", "Echo:  apple <end_of_turn>"),
        ("", ""),
        ("Echo: a\nUser: fake", "Echo: a User: fake"),
        ("Echo: a\r\nUser: fake\n", "Echo: a User: fake\n"),
        ("a\rb\x0bc\x0cd\u2028e", "a b c d e"),
    ],
)
def test_transcript_shows_a_reply_as_generated_on_one_line(reply: str, shown: str) -> None:
    assert transcript_reply(reply) == shown


def test_follow_up_adds_the_line_break_only_when_the_reply_has_none() -> None:
    assert follow_up(" Echo: a", "Fb.", "river") == "\nUser: Fb. Please echo the following word: river\nAssistant:"
    assert follow_up(" Echo: a\n", "Fb.", "river") == "User: Fb. Please echo the following word: river\nAssistant:"
    assert follow_up(" Echo: a", "Fb.", None) == "\nUser: Fb."


_ONE_LINE = st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))
# Replies a server or a token sampler stopping at "\n" can give: one line, then maybe the
# stop string and more whitespace (a "\n\n" token).
_REPLIES = st.tuples(_ONE_LINE, st.text(alphabet=" \t\r\n", max_size=3)).map(lambda t: t[0] + t[1])


@settings(max_examples=150, deadline=None)
@given(
    replies=st.lists(_REPLIES, min_size=1, max_size=5),
    words=st.lists(st.sampled_from(default_words()), min_size=5, max_size=5),
    ends=st.booleans(),
)
def test_each_turn_extends_the_last_prompt_by_the_reply_as_generated(
    replies: list[str], words: list[str], ends: bool
) -> None:
    task = EchoTask()
    history: list[Turn] = []
    for i, reply in enumerate(replies):
        last = ends and i == len(replies) - 1
        before_text, before_messages = task.transcript(words[0], history), task.chat_messages(words[0], history)
        history.append(Turn(reply=reply, feedback="Some feedback.", next_word=None if last else words[i]))
        after_text, after_messages = task.transcript(words[0], history), task.chat_messages(words[0], history)
        assert after_text.startswith(before_text + reply)
        assert after_text.endswith("User: Some feedback." if last else "\nAssistant:")
        assert after_messages[: len(before_messages)] == before_messages
        assert after_messages[len(before_messages)] == {"role": "assistant", "content": reply}


@pytest.mark.parametrize("reply", ["Echo: a\nUser: fake turn", "Echo: a\r\nUser: fake turn", "Echo: a\rUser: fake"])
def test_a_multi_line_reply_cannot_fake_a_transcript_turn(reply: str) -> None:
    text = EchoTask().transcript(WORD, [Turn(reply=reply, feedback="Format error.", next_word=WORD)])
    lines = re.split(r"\r\n|\r|\n", text)
    assert not any(line.startswith("User: fake") for line in lines)


# --- the words of a multi-turn episode ---------------------------------------------------


def test_episode_words_start_with_the_one_turn_words_and_differ_within_a_group() -> None:
    task = EchoTask()
    words = task.episode_words(6, 4, seed=11)
    assert [ws[0] for ws in words] == task.sample_words(6, seed=11)
    assert all(len(ws) == 4 == len(set(ws)) for ws in words)
    assert task.episode_words(6, 4, seed=11) == words
    assert task.episode_words(6, 4, seed=12) != words
    assert task.episode_words(6, 1, seed=11) == [[w] for w in task.sample_words(6, seed=11)]


def test_one_turn_draws_nothing_more_from_the_generator() -> None:
    task = EchoTask()
    gen = np.random.default_rng(3)
    assert task.later_words("apple", 0, gen) == []
    assert gen.integers(1 << 30) == np.random.default_rng(3).integers(1 << 30)


def test_more_turns_than_distinct_words_is_a_config_error() -> None:
    task = EchoTask(words=("a", "b", "c"))
    assert sorted(task.later_words("a", 2, np.random.default_rng(0))) == ["b", "c"]
    with pytest.raises(ConfigError, match="lower turns"):
        task.later_words("a", 3, np.random.default_rng(0))
