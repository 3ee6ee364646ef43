"""`echo-prefix train`: settings, layer freezing, logging, and a real two-step GRPO run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from echo_env.cli import main as cli_main
from echo_env.commands.train import TrainConfig, freeze_all_but_last, step_line, summarize_run
from echo_env.config import parse_overrides
from echo_env.errors import ConfigError


@pytest.mark.parametrize(
    "args",
    [
        ["group_size=1"],
        ["steps=0"],
        ["temperature=0"],
        ["learning_rate=-1"],
        ["generation=server"],  # no base_url
        ["base_url=http://127.0.0.1:8000/v1"],  # base_url without generation=server
        ["generation=vllm"],
        ["stpes=3"],
    ],
)
def test_bad_settings_are_refused_with_the_fix(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_overrides(TrainConfig, args)


def test_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("steps=20", "batch_size=2", "group_size=4", "generation=transformers", "wandb_project"):
        assert key in out


def test_cli_reports_a_bad_key_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "group_size=1"]) == 2
    assert "group_size must be at least 2" in capsys.readouterr().err


def test_freezing_leaves_only_the_last_blocks_trainable() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config)
    trainable, total = freeze_all_but_last(model, 1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("layers.3." in n or n == "model.norm.weight" for n in names)
    assert 0 < trainable < total
    assert freeze_all_but_last(model, 0)[0] == total
    with pytest.raises(ConfigError):
        freeze_all_but_last(model, 5)


def test_step_line_and_summary() -> None:
    records: list[dict[str, Any]] = [
        {"step": i + 1, "reward": r, "echo/frac_correct": (r + 1) / 2, "time/step_s": 10.0}
        for i, r in enumerate([0.0, 0.5, 0.5, 1.0])
    ]
    line = step_line({**records[0], "rollout/hit_rate": 0.97, "rollout/ttft_p50_s": 0.07}, 4)
    assert "step   1/4" in line and "hit_rate 0.97" in line and "ttft_p50 70ms" in line
    summary = summarize_run(records, TrainConfig(steps=4), wall_s=50.0)
    assert summary["reward_by_step"] == [0.0, 0.5, 0.5, 1.0]
    assert summary["mean_reward_first_quarter"] == 0.0 and summary["mean_reward_last_quarter"] == 1.0
    assert summary["seconds_per_step"] == 10.0


# Two real steps take 2-3 minutes on an idle 2-core machine, far longer when it is shared.
@pytest.mark.timeout(2400)
def test_two_steps_of_grpo_on_the_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What CI runs: `echo-prefix train steps=2` (TRL, transformers generation, CPU)."""
    out_dir = tmp_path / "run"
    assert cli_main(["train", "steps=2", f"out_dir={out_dir}"]) == 0
    lines = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for record in lines:
        assert -1.0 <= record["reward"] <= 1.0
        for key in ("echo/frac_correct", "echo/frac_format_error", "time/rollout_s", "time/step_s"):
            assert key in record
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["seconds_per_step"] > 0
    out = capsys.readouterr().out
    assert "step   2/2" in out and "reward by step" in out


@pytest.mark.engine
def test_one_step_sampling_on_the_server(engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """generation=server on a CPU: the worker samples on vLLM, TRL trains; hit rate and TTFT logged."""
    out_dir = tmp_path / "server-run"
    args = [
        "train", "steps=1", "batch_size=1", "group_size=2", "generation=server", "sync_weights=false",
        f"base_url={engine.base_url}", f"served_model_name={engine.served_model_name}", f"out_dir={out_dir}",
    ]  # fmt: skip
    assert cli_main(args) == 0
    (record,) = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert record["rollout/hit_rate"] is not None and record["rollout/ttft_p50_s"] > 0
    assert "hit_rate" in capsys.readouterr().out


def test_sync_weights_needs_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: pushing weights is possible")
    args = ["generation=server", "base_url=http://127.0.0.1:9/v1", f"out_dir={tmp_path}"]
    from echo_env.commands.train import run

    with pytest.raises(ConfigError, match="GPU"):
        run(parse_overrides(TrainConfig, args))
