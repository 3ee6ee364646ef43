"""verifiers integration: load_environment, the rubric, and vf-eval against the engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import verifiers as vf

import echo_env
from echo_env.errors import ConfigError
from echo_env.integrations.verifiers_env import ENV_ID, load_environment
from echo_env.envs.task import EchoTask


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
