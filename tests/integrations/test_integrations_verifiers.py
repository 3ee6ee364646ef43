"""verifiers integration: load_environment, the rubric, multi-turn rollouts, and vf-eval against the engine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import verifiers as vf
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice

import echo_env
from echo_env.envs.task import CORRECT_FEEDBACK, EchoTask, Turn
from echo_env.errors import ConfigError
from echo_env.integrations.verifiers_env import ENV_ID, load_environment


def test_verifiers_finds_the_environment_by_its_id() -> None:
    env = vf.load_environment(ENV_ID, num_examples=4, num_eval_examples=3)
    assert isinstance(env, vf.SingleTurnEnv)
    assert env.message_type == "completion" and env.sampling_args["stop"] == ["\n"]
    row = env.get_eval_dataset(3)[0]
    assert row["prompt"] == EchoTask().transcript(row["answer"])
    assert row["info"] == {"word": row["answer"]}
    assert echo_env.load_environment is not None


def test_chat_form_and_bad_arguments() -> None:
    env = load_environment(num_examples=2, num_eval_examples=2, message_type="chat")
    prompt = env.get_dataset(2)[0]["prompt"]
    assert prompt[0]["role"] == "system" and prompt[-1]["role"] == "user"
    with pytest.raises(ConfigError):
        load_environment(message_type="xml")


@pytest.mark.parametrize(
    ("completion", "reward", "correct", "format_error"),
    [(" Echo: chalk", 1.0, 1.0, 0.0), (" Echo: cheese", 0.0, 0.0, 0.0), (" I will echo chalk", -1.0, 0.0, 1.0)],
)
def test_rubric_scores_with_the_env_grading(
    completion: str, reward: float, correct: float, format_error: float
) -> None:
    env = load_environment(num_examples=1, num_eval_examples=1)
    state: dict[str, Any] = {
        "prompt": "...",
        "completion": completion,
        "answer": "chalk",
        "task": ENV_ID,
        "info": {"word": "chalk"},
        "timing": {"total_ms": 0.0},
    }
    asyncio.run(env.rubric.score_rollout(state))
    assert state["reward"] == reward
    assert state["metrics"]["correct"] == correct and state["metrics"]["format_error"] == format_error


# ----- multi-turn rollouts, offline -----------------------------------------------------------


class FakeOpenAI:
    """Just enough of ``AsyncOpenAI`` for verifiers: replies from a function of the prompt, prompts kept."""

    def __init__(self, reply: Callable[[Any], str]) -> None:
        self.reply = reply
        self.prompts: list[Any] = []
        self.base_url = "http://fake/v1"
        self.completions = self
        self.chat = self

    async def create(self, model: str, prompt: Any = None, messages: Any = None, **_: Any) -> Any:
        if messages is None:
            self.prompts.append(prompt)
            text = self.reply(prompt)
            choice = CompletionChoice(finish_reason="stop", index=0, text=text)
            usage = CompletionUsage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
            return Completion(id="c", choices=[choice], created=0, model=model, object="text_completion", usage=usage)
        self.prompts.append(messages)
        message = ChatCompletionMessage(role="assistant", content=self.reply(messages))
        choices = [Choice(finish_reason="stop", index=0, message=message)]
        return ChatCompletion(id="c", choices=choices, created=0, model=model, object="chat.completion")


def asked(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return re.findall(r"following word: (\S+)", text)[-1]


def evaluate(env: Any, client: FakeOpenAI, n: int = 1) -> list[dict[str, Any]]:
    results = asyncio.run(env.evaluate(client=client, model="m", num_examples=n, rollouts_per_example=1))
    return list(results["outputs"])


def test_default_is_single_turn_and_turns_make_a_multi_turn_env() -> None:
    assert isinstance(load_environment(num_examples=2, num_eval_examples=2), vf.SingleTurnEnv)
    for kwargs in ({"turns": 3}, {"max_turns": 2}):
        env = load_environment(num_examples=2, num_eval_examples=2, **kwargs)
        assert isinstance(env, vf.MultiTurnEnv) and not isinstance(env, vf.SingleTurnEnv)
    env = load_environment(num_examples=4, num_eval_examples=2, turns=3)
    single = load_environment(num_examples=4, num_eval_examples=2)
    rows, single_rows = env.get_dataset(4), single.get_dataset(4)
    assert [r["answer"] for r in rows] == [r["answer"] for r in single_rows]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in single_rows]
    for row in rows:
        words = row["info"]["words"]
        assert words[0] == row["answer"] and len(set(words)) == 3


@pytest.mark.parametrize("kwargs", [{"turns": 0}, {"max_turns": 0}, {"turns": 1000}, {"turns": 100, "max_turns": 3}])
def test_bad_turn_settings_are_config_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        load_environment(num_examples=1, num_eval_examples=1, **kwargs)


def test_a_multi_turn_rollout_asks_each_word_and_each_prompt_extends_the_last() -> None:
    env = load_environment(num_examples=1, num_eval_examples=1, turns=3)
    client = FakeOpenAI(lambda p: f" Echo: {asked(p)}")
    (out,) = evaluate(env, client)
    words = out["info"]["words"]
    assert out["reward"] == 3.0
    assert out["metrics"]["words_correct"] == 1.0 and out["metrics"]["format_errors"] == 0.0
    assert len(client.prompts) == 3
    # Each prompt is the env's own transcript of the conversation so far.
    history: list[Turn] = []
    for i, prompt in enumerate(client.prompts):
        assert prompt == EchoTask().transcript(words[0], history)
        if i:
            assert prompt.startswith(client.prompts[i - 1] + f" Echo: {words[i - 1]}\n")
        next_word = words[i + 1] if i + 1 < 3 else None
        history.append(Turn(reply=f" Echo: {words[i]}", feedback=CORRECT_FEEDBACK, next_word=next_word))
    assert out["completion"].endswith(f"Assistant: Echo: {words[2]}\nUser: Correct! Echo matched.")


def test_attempts_per_word_and_step_rewards() -> None:
    env = load_environment(num_examples=1, num_eval_examples=1, turns=2, max_turns=2)
    replies = iter([" Echo: nope", "wrong", " Echo: {w}"])
    client = FakeOpenAI(lambda p: next(replies).format(w=asked(p)))
    (out,) = evaluate(env, client)
    words = out["info"]["words"]
    # Two failed attempts at the first word, then the second word answered right.
    assert [asked(p) for p in client.prompts] == [words[0], words[0], words[1]]
    assert out["reward"] == 0.0 + -1.0 + 1.0
    assert out["metrics"]["words_correct"] == 0.5
    assert out["metrics"]["format_errors"] == pytest.approx(1 / 3)
    assert out["metrics"]["num_turns"] == 3


def test_chat_rollouts_extend_the_messages() -> None:
    env = load_environment(num_examples=1, num_eval_examples=1, turns=2, message_type="chat")
    client = FakeOpenAI(lambda p: f"Echo: {asked(p)}")
    (out,) = evaluate(env, client)
    first, second = client.prompts
    words = out["info"]["words"]
    assert second[: len(first)] == first
    assert second[len(first) :] == [
        {"role": "assistant", "content": f"Echo: {words[0]}"},
        {"role": "user", "content": f"Correct! Echo matched. Please echo the following word: {words[1]}"},
    ]
    assert out["completion"][-1] == {"role": "user", "content": "Correct! Echo matched."}
    assert out["reward"] == 2.0


@pytest.mark.engine
def test_multi_turn_evaluate_against_the_engine(engine: Any) -> None:
    from openai import AsyncOpenAI

    env = load_environment(num_examples=2, num_eval_examples=2, run_tag="vf-multi-turn-test", turns=3)
    client = AsyncOpenAI(base_url=engine.base_url, api_key="EMPTY")
    results = asyncio.run(
        env.evaluate(
            client=client,
            model=engine.served_model_name,
            sampling_args={"max_tokens": 16, "temperature": 0.0},
            num_examples=2,
            rollouts_per_example=1,
        )
    )
    for out in results["outputs"]:
        assert out["metrics"]["num_turns"] == 3
        assert -3.0 <= out["reward"] <= 3.0
    assert sum(out["reward"] for out in results["outputs"]) > 0


@pytest.mark.engine
def test_evaluate_against_the_engine(engine: Any) -> None:
    from openai import AsyncOpenAI

    env = load_environment(num_examples=2, num_eval_examples=2, run_tag="vf-evaluate-test")
    client = AsyncOpenAI(base_url=engine.base_url, api_key="EMPTY")
    results = asyncio.run(
        env.evaluate(
            client=client,
            model=engine.served_model_name,
            sampling_args={"max_tokens": 16, "temperature": 1.0},
            num_examples=2,
            rollouts_per_example=3,
        )
    )
    rewards = [out["reward"] for out in results["outputs"]]
    assert len(rewards) == 6 and set(rewards) <= {1.0, 0.0, -1.0}
    assert sum(rewards) > 0


@pytest.mark.engine
def test_vf_eval_command_against_the_engine(engine: Any, tmp_path: Path) -> None:
    """verifiers' own evaluation entry point, `vf-eval echo-env`, on the embedded engine."""
    vf_eval = Path(sys.executable).with_name("vf-eval")
    env = dict(os.environ, OPENAI_API_KEY="EMPTY")
    cmd = [
        str(vf_eval), ENV_ID,
        "-m", engine.served_model_name,
        "-b", engine.base_url,
        "-k", "OPENAI_API_KEY",
        "-n", "3", "-r", "2", "-t", "16", "-T", "1.0",
        "-a", json.dumps({"num_eval_examples": 3, "run_tag": "vf-eval-test"}),
        "-s", "-d",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = list(tmp_path.rglob("results.jsonl"))
    assert saved, f"no results saved: {done.stdout[-1000:]}"
    rows = [json.loads(line) for line in saved[0].read_text().splitlines() if line.strip()]
    assert len(rows) == 6 and all(row["reward"] in (1.0, 0.0, -1.0) for row in rows)
