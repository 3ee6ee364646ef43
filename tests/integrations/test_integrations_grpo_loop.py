"""examples/grpo_loop.py: group-relative advantages over the PettingZoo env, no RL library."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_loop.py"


@pytest.fixture(scope="module")
def grpo_loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpo_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_loop"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_advantages_are_reward_minus_group_mean(grpo_loop: ModuleType) -> None:
    rewards = {"group0_agent0": 1.0, "group0_agent1": -1.0, "group1_agent0": 0.0, "group1_agent1": 0.0}
    assert grpo_loop.group_relative_advantages(rewards) == {
        "group0_agent0": 1.0,
        "group0_agent1": -1.0,
        "group1_agent0": 0.0,
        "group1_agent1": 0.0,
    }


def test_config_refuses_groups_of_one(grpo_loop: ModuleType) -> None:
    from echo_env.errors import ConfigError

    with pytest.raises(ConfigError):
        grpo_loop.LoopConfig(group_size=1)


@pytest.mark.engine
def test_loop_against_the_engine(grpo_loop: ModuleType, engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = grpo_loop.LoopConfig(model_name=engine.served_model_name, steps=2, batch_size=2, group_size=3)
    history = asyncio.run(grpo_loop.run_loop(config, engine.base_url))
    assert len(history) == 2
    for step in history:
        assert len(step["advantages"]) == 6 and step["failed"] == 0
        for group in (0, 1):
            advs = [a for agent, a in step["advantages"].items() if agent.startswith(f"group{group}_")]
            assert abs(sum(advs)) < 1e-9
        assert step["loss"] is not None
    assert "adv" in capsys.readouterr().out
