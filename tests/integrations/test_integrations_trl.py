"""TRL GRPO integration: dataset, reward, stop ids, and both rollout functions in TRL's real trainer.

The trainer tests use a tiny random Gemma 3 (the real tokenizer's vocabulary, two small
layers) so a GRPO step takes seconds; ``test_train.py`` runs the real model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError
from echo_env.integrations.trl_grpo import (
    EchoRollout,
    SharedPrefixRollout,
    echo_dataset,
    echo_reward,
    grpo_trainer_class,
    newline_token_ids,
    stop_at_newline,
)
from echo_env.integrations.trl_model import _cut_at_stop
from echo_env.launch.model import load_tokenizer
from echo_env.measure.tokens import reusable_prefix_length


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(None)


def tiny_gemma(vocab_size: int) -> Any:
    """A two-layer random Gemma 3 with the real vocabulary: GRPO steps in seconds."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
    )
    model = Gemma3ForCausalLM(config)
    model.generation_config.eos_token_id = [1, 106]
    model.generation_config.pad_token_id = 0
    return model


def grpo_args(tmp_path: Path, **overrides: Any) -> Any:
    from trl import GRPOConfig

    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 6,
        "temperature": 1.0,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


# ----- pieces ----------------------------------------------------------------------------


def test_dataset_has_one_row_per_prompt_with_its_word() -> None:
    ds = echo_dataset(6, seed=1)
    assert ds.column_names == ["prompt", "word"]
    assert len(ds) == 6
    task = EchoTask()
    assert all(row["prompt"] == task.transcript(row["word"]) for row in ds)


def test_reward_grades_and_logs_outcome_shares() -> None:
    logged: dict[str, float] = {}
    rewards = echo_reward(
        [" Echo: apple", "Echo: pear", "nope", " Echo: fig\n"],
        word=["apple", "apple", "apple", "fig"],
        log_metric=logged.__setitem__,
        rollout_ttft_s=[0.2, 0.1, None, 0.3],
        rollout_hit_rate=[0.9, 0.9, 0.9, 0.9],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0, -1.0, 1.0]
    assert logged["echo/frac_correct"] == 0.5
    assert logged["echo/frac_format_error"] == 0.25
    assert logged["rollout/ttft_p50_s"] == 0.2
    assert logged["rollout/hit_rate"] == 0.9


def test_reward_takes_chat_completions() -> None:
    assert echo_reward([[{"role": "assistant", "content": "Echo: kiwi"}]], word=["kiwi"]) == [1.0]


def test_newline_ids_stop_generation_at_the_end_of_the_line(tokenizer: Any) -> None:
    ids = newline_token_ids(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert set(newline) <= set(ids)
    assert all("\n" in tokenizer.decode([i]) or "\r" in tokenizer.decode([i]) for i in ids)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 106]))
    eos = stop_at_newline(model, tokenizer)
    assert {1, 106, *newline} <= set(eos) and model.generation_config.eos_token_id == eos


def test_prefix_and_stop_helpers() -> None:
    assert reusable_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    # The last token of the shortest prompt is never shared: its logits start the answer.
    assert reusable_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert reusable_prefix_length([]) == 0
    assert _cut_at_stop([5, 6, 107, 0, 0], {107}, pad_id=0) == [5, 6, 107]
    assert _cut_at_stop([5, 6, 0, 0], {107}, pad_id=0) == [5, 6]


def test_rollout_checks_its_address_at_once() -> None:
    with pytest.raises(ConfigError):
        EchoRollout("localhost:8000")
    assert EchoRollout("http://127.0.0.1:9/v1").metrics_url == "http://127.0.0.1:9/metrics"


# ----- TRL's real trainer ----------------------------------------------------------------


def test_grpo_step_with_the_shared_prefix_rollout(tokenizer: Any, tmp_path: Path) -> None:
    """A real GRPOTrainer step: our rollout_func, reward and timing metrics in TRL's logs."""
    model = tiny_gemma(len(tokenizer))
    stop_at_newline(model, tokenizer)
    rollout = SharedPrefixRollout()
    trainer = grpo_trainer_class()(
        model=model,
        reward_funcs=echo_reward,
        args=grpo_args(tmp_path),
        train_dataset=echo_dataset(4),
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("reward", "echo/frac_correct", "echo/frac_format_error", "time/rollout_s", "time/step_s"):
        assert key in logs, key
    assert -1.0 <= logs["reward"] <= 1.0
    (batch,) = rollout.history
    # Two prompts (two words) sharing everything up to the word: one prefix, two groups.
    assert batch["groups"] == 2 and batch["prefix_tokens"] > 400


def test_grpo_step_with_trls_own_generation(tokenizer: Any, tmp_path: Path) -> None:
    """Without a rollout_func TRL generates itself; stop_at_newline ends the answers at the line."""
    model = tiny_gemma(len(tokenizer))
    eos = stop_at_newline(model, tokenizer)
    trainer = grpo_trainer_class()(
        model=model,
        reward_funcs=echo_reward,
        args=grpo_args(tmp_path),
        train_dataset=echo_dataset(4),
        processing_class=tokenizer,
    )
    assert set(eos) <= set(trainer.eos_token_ids)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "echo/frac_correct" in logs and "time/rollout_s" in logs


def test_shared_prefix_rollout_matches_plain_generation(tokenizer: Any) -> None:
    """Greedy completions from the shared prefix cache equal those of plain generate()."""
    import torch
    from transformers import GenerationConfig

    model = tiny_gemma(len(tokenizer))
    task = EchoTask()
    prompts = [task.transcript("apple")] * 2 + [task.transcript("river")] * 2
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=[1], pad_token_id=0)
    trainer = SimpleNamespace(
        processing_class=tokenizer,
        model=model,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        generation_config=config,
        args=SimpleNamespace(bf16=False),
    )
    out = SharedPrefixRollout()(prompts, trainer)
    assert out["logprobs"] is None and len(out["completion_ids"]) == 4
    for prompt, ids, completion in zip(prompts, out["prompt_ids"], out["completion_ids"]):
        assert ids == tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids])
        plain = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        assert completion == _cut_at_stop(plain[0, len(ids) :].tolist(), {1}, 0)


@pytest.mark.engine
def test_echo_rollout_returns_the_servers_tokens_and_logprobs(engine: Any, tokenizer: Any) -> None:
    task = EchoTask(run_tag="trl-rollout-test")
    prompts = [task.transcript("apple")] * 3 + [task.transcript("river")] * 3
    rollout = EchoRollout(engine.base_url, model=engine.served_model_name)
    trainer = SimpleNamespace(
        args=SimpleNamespace(max_completion_length=8, temperature=1.0, top_p=1.0), processing_class=tokenizer
    )
    out = rollout(prompts, trainer)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == 6
    for prompt, ids, completion, logprobs in zip(prompts, out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        assert ids == tokenizer(prompt)["input_ids"]  # the server's tokens are the trainer's
        assert 1 <= len(completion) <= 8 and len(logprobs) == len(completion)
        assert all(lp <= 0.0 for lp in logprobs)
    assert echo_reward(tokenizer.batch_decode(out["completion_ids"]), ["apple"] * 3 + ["river"] * 3)
    (stats,) = rollout.history
    assert stats.requests == 2  # one request per group
    # The second group's prompt shares the first one's whole-block prefix.
    assert stats.hit_rate is not None and stats.hit_rate > 0.3
    assert out["rollout_hit_rate"] == stats.hit_rate


@pytest.mark.engine
def test_grpo_step_sampling_on_the_server(engine: Any, tokenizer: Any, tmp_path: Path) -> None:
    """GRPOTrainer takes EchoRollout's output as is, and logs the server's figures."""
    trainer = grpo_trainer_class()(
        model=tiny_gemma(len(tokenizer)),
        reward_funcs=echo_reward,
        args=grpo_args(tmp_path),
        train_dataset=echo_dataset(4, seed=5),
        processing_class=tokenizer,
        rollout_func=EchoRollout(engine.base_url, model=engine.served_model_name),
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in ("reward", "echo/frac_correct", "rollout/ttft_p50_s", "rollout/hit_rate", "time/rollout_s"):
        assert key in logs, key
    # The served model knows the task: most answers are right even at temperature 1.
    assert logs["reward"] > 0.0
