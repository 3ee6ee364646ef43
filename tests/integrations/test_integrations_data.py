"""The rows and batch grading every RL-library adapter shares."""

from __future__ import annotations

import pytest

from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError
from echo_env.integrations.data import completion_text, echo_rows, grade_batch, group_advantages, outcome_fractions


def test_rows_share_the_prefix_and_differ_by_word() -> None:
    task = EchoTask()
    rows = echo_rows(5, seed=3)
    assert len({r["word"] for r in rows}) == 5
    for row in rows:
        assert row["prompt"].startswith(task.shared_text())
        assert row["prompt"] == task.transcript(row["word"])
    assert echo_rows(5, seed=3) == rows
    assert echo_rows(5, seed=4) != rows


def test_chat_rows_carry_messages() -> None:
    rows = echo_rows(2, prompt_style="chat")
    assert rows[0]["prompt"][0]["role"] == "system"
    assert rows[0]["prompt"][-1]["content"].endswith(rows[0]["word"])


@pytest.mark.parametrize("bad", [{"num_prompts": 0}, {"num_prompts": 2, "prompt_style": "yaml"}])
def test_bad_rows_arguments_name_the_fix(bad: dict) -> None:
    with pytest.raises(ConfigError):
        echo_rows(**bad)


def test_completion_text_reads_every_form_libraries_use() -> None:
    assert completion_text(" Echo: a") == " Echo: a"
    assert completion_text([{"role": "assistant", "content": "Echo: b"}]) == "Echo: b"
    assert completion_text({"role": "assistant", "content": "Echo: c"}) == "Echo: c"
    assert completion_text(None) == ""


def test_grading_and_shares_follow_the_env_rules() -> None:
    grades = grade_batch(
        [" Echo: apple\n", "Echo: pear", "apple", [{"role": "assistant", "content": "Echo: fig"}]],
        ["apple", "apple", "apple", "fig"],
    )
    assert [g.reward for g in grades] == [1.0, 0.0, -1.0, 1.0]
    shares = outcome_fractions(grades)
    assert shares == {"reward": 0.25, "frac_correct": 0.5, "frac_wrong_word": 0.25, "frac_format_error": 0.25}
    assert outcome_fractions([]) == {}
    with pytest.raises(ConfigError):
        grade_batch(["Echo: a"], [])


def test_group_advantages_centre_each_group() -> None:
    adv = group_advantages([1.0, 0.0, -1.0, 1.0, 1.0, 1.0], group_size=3)
    assert adv == [1.0, 0.0, -1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        group_advantages([1.0, 0.0, 1.0], group_size=2)
