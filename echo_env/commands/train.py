"""``echo-prefix train``: GRPO on the echo task with TRL.

``echo-prefix train [key=value ...]`` (or ``python -m echo_env.commands.train``) trains the default
model (Gemma 3 270M, base) with TRL's ``GRPOTrainer`` on the pieces in
:mod:`echo_env.integrations.trl_grpo`. On a CPU, TRL generates with the model itself
(transformers), only the last ``train_layers`` blocks are trained and the batch is small,
so a step takes tens of seconds. With ``generation=server`` the groups are sampled on a
vLLM server through the echo worker; with ``sync_weights=true`` (a GPU and a ``trl
vllm-serve`` server) TRL pushes every update into that server.

Every step is logged to the console, to ``<out_dir>/train_log.jsonl`` (one JSON object
per step: TRL's metrics plus ``echo/frac_*``, ``time/rollout_s``, ``time/step_s`` and,
with a server, ``rollout/ttft_p50_s`` and ``rollout/hit_rate``) and to wandb when
``wandb_project`` is set. ``summary.json`` holds the reward curve and seconds per step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from echo_env.commands.common import default_out_dir, fmt, setup_logging
from echo_env.config import describe, parse_overrides
from echo_env.errors import ConfigError, EchoEnvError
from echo_env.launch.engine import cpu_has_bf16
from echo_env.wire.info import server_root

log = logging.getLogger(__name__)

# transformers and TRL announce experimental features and defaults at WARNING.
_NOISY = ("transformers", "trl", "accelerate", "datasets", "vllm")

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``echo-prefix train``."""

    model_name: str | None = None
    """Model to train: unset for Gemma 3 270M (base), a model folder, or a hub id."""
    steps: int = 20
    """Optimizer steps (one generation batch each)."""
    batch_size: int = 2
    """Distinct prompts per step."""
    group_size: int = 4
    """Completions per prompt (GRPO's G, TRL's num_generations); at least 2."""
    learning_rate: float = 2e-5
    """AdamW learning rate (constant)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_tokens: int = 8
    """Longest completion, in tokens (``Echo: <word>`` needs about 5)."""
    beta: float = 0.0
    """KL penalty against the initial model (0: none, and no reference model is kept)."""
    train_layers: int = 4
    """Train only the last N transformer blocks (embeddings frozen); 0 trains every weight."""
    generation: Literal["transformers", "trl", "server"] = "transformers"
    """Who samples: ``transformers``, the model in this process with the shared prefix
    computed once per batch; ``trl``, TRL's own generation (the whole prompt for every
    completion); ``server``, a vLLM server at ``base_url``."""
    base_url: str | None = None
    """The server's OpenAI API root, for ``generation=server``."""
    served_model_name: str | None = None
    """Model name on the server (unset: its first)."""
    sync_weights: bool = True
    """``generation=server``: push each update into the server (GPU and ``trl vllm-serve``);
    false samples from the server's fixed weights (off-policy, for timing runs on a CPU)."""
    num_prompts: int = 256
    """Prompts in the dataset (distinct words while the list lasts)."""
    seed: int = 0
    """Seeds words, sampling and initialisation."""
    threads: int = 2
    """Torch CPU threads."""
    bf16: bool = True
    """bf16 autocast over fp32 weights (on CPUs with bf16 support, and GPUs)."""
    out_dir: str | None = None
    """Where the log and summary go (default ``echo_prefix_results/train-<time>-<id>``)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""
    wandb_name: str | None = None
    """wandb run name."""
    debug: bool = False
    """Tracebacks and TRL's own log lines."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_tokens", "num_prompts", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigError(
                f"group_size must be at least 2, got {self.group_size}: GRPO compares answers within a group"
            )
        if not 0.0 < self.temperature <= 10.0:
            raise ConfigError(f"temperature={self.temperature} is out of range: use a value in (0, 10]")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.beta < 0:
            raise ConfigError(f"beta must be zero or more, got {self.beta}")
        if self.train_layers < 0:
            raise ConfigError(f"train_layers must be zero (all) or more, got {self.train_layers}")
        if self.generation == "server" and not self.base_url:
            raise ConfigError("generation=server needs base_url=http://HOST:PORT/v1 (a vLLM server)")
        if self.generation != "server" and self.base_url:
            raise ConfigError("base_url is only used with generation=server: add generation=server, or drop base_url")


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"echo-prefix train needs {module}: pip install 'echo-prefix-env[{extra}]'")


def freeze_all_but_last(model: Any, train_layers: int) -> tuple[int, int]:
    """Leave only the last ``train_layers`` transformer blocks (and what follows them) trainable.

    On a CPU the backward pass through all blocks and the 168M-parameter embedding of
    Gemma 3 270M costs more than the rest of the step together; the last blocks are where
    "answer in this form" is decided.

    Args:
        model: A ``transformers`` causal LM.
        train_layers: Blocks to train; 0 leaves every weight trainable.

    Returns:
        ``(trainable, total)`` parameter counts.

    Raises:
        ConfigError: The model's blocks cannot be found by name, or there are fewer than asked.
    """
    params = list(model.named_parameters())
    if train_layers > 0:
        indices = {int(m.group(1)) for name, _ in params if (m := _LAYER_INDEX.search(name))}
        if not indices:
            raise ConfigError("cannot find this model's transformer blocks by name: use train_layers=0")
        if train_layers > len(indices):
            raise ConfigError(f"train_layers={train_layers}, but the model has {len(indices)} blocks")
        first = max(indices) + 1 - train_layers
        for name, param in params:
            match = _LAYER_INDEX.search(name)
            # Blocks before `first` and the (tied) embeddings stay fixed; final norms train.
            frozen = (match is not None and int(match.group(1)) < first) or "embed" in name or "lm_head" in name
            param.requires_grad_(not frozen)
    else:
        for _, param in params:
            param.requires_grad_(True)
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    return trainable, total


def step_line(record: dict[str, Any], steps: int) -> str:
    """The console line for one logged step."""
    parts = [
        f"step {record['step']:>3}/{steps}",
        f"reward {fmt(record.get('reward'))}",
        f"correct {fmt(record.get('echo/frac_correct'), digits=2)}",
        f"wrong {fmt(record.get('echo/frac_wrong_word'), digits=2)}",
        f"format_err {fmt(record.get('echo/frac_format_error'), digits=2)}",
        f"rollout {fmt(record.get('time/rollout_s'), digits=1)}s",
        f"step {fmt(record.get('time/step_s'), digits=1)}s",
    ]
    if record.get("rollout/ttft_p50_s") is not None:
        parts.append(f"ttft_p50 {record['rollout/ttft_p50_s'] * 1000:.0f}ms")
    if record.get("rollout/hit_rate") is not None:
        parts.append(f"hit_rate {record['rollout/hit_rate']:.2f}")
    return "  ".join(parts)


def summarize_run(records: Sequence[dict[str, Any]], config: TrainConfig, wall_s: float) -> dict[str, Any]:
    """The run's summary: the reward curve, seconds per step, first vs last steps.

    Args:
        records: The per-step log records.
        config: The run's settings.
        wall_s: Time the whole run took (model loading included).

    Returns:
        A JSON-ready dict.
    """
    rewards = [r.get("reward") for r in records]
    known = [r for r in rewards if r is not None]
    step_times = [r["time/step_s"] for r in records if r.get("time/step_s") is not None]
    k = max(1, len(known) // 4)
    return {
        "config": asdict(config),
        "steps": len(records),
        "reward_by_step": rewards,
        "frac_correct_by_step": [r.get("echo/frac_correct") for r in records],
        "frac_format_error_by_step": [r.get("echo/frac_format_error") for r in records],
        "mean_reward_first_quarter": sum(known[:k]) / k if known else None,
        "mean_reward_last_quarter": sum(known[-k:]) / k if known else None,
        "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,
        "wall_s": wall_s,
    }


def _step_logger(out_dir: Path, steps: int, records: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):  # type: ignore[misc]
        """Writes each step's metrics to the console and ``train_log.jsonl``."""

        def __init__(self) -> None:
            self.started = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if not logs or "train_runtime" in logs:  # the end-of-training summary, not a step
                return
            record = {"step": state.global_step, "elapsed_s": time.perf_counter() - self.started, **logs}
            records.append(record)
            with (out_dir / "train_log.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(step_line(record, steps), flush=True)

    return StepLogger()


def build_trainer(config: TrainConfig, out_dir: Path, records: list[dict[str, Any]]) -> Any:
    """Load the model and build the ``GRPOTrainer`` for ``config`` (nothing trained yet).

    Raises:
        ConfigError: A library is missing or a setting cannot work on this machine.
        ModelError: The model cannot be found or loaded.
    """
    _require("trl", "trl")
    _require("datasets", "trl")
    if config.wandb_project:
        _require("wandb", "wandb")
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from echo_env.integrations.trl_grpo import echo_dataset, echo_reward, grpo_trainer_class, stop_at_newline

    cuda = torch.cuda.is_available()
    if config.generation == "server" and config.sync_weights and not cuda:
        raise ConfigError(
            "sync_weights=true pushes each update into the vLLM server over NCCL, which needs a GPU (and a "
            "`trl vllm-serve` server): on a CPU use generation=transformers, or sync_weights=false to sample "
            "from the server's fixed weights (off-policy)"
        )
    model, tokenizer = _load_model(config)
    if config.generation != "server":
        stop_at_newline(model, tokenizer)
    rollout, vllm_args = _rollout_func(config)
    if config.wandb_project:
        os.environ["WANDB_PROJECT"] = config.wandb_project
    trainer = grpo_trainer_class()(
        model=model,
        reward_funcs=echo_reward,
        args=_grpo_config(config, out_dir, cuda, vllm_args),
        train_dataset=echo_dataset(config.num_prompts, seed=config.seed),
        processing_class=tokenizer,
        rollout_func=rollout,
        callbacks=[_step_logger(out_dir, config.steps, records)],
    )
    # Our own line per step replaces the Trainer's printed dicts.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _load_model(config: TrainConfig) -> tuple[Any, Any]:
    """The model (fp32, all but the last ``train_layers`` blocks frozen) and its tokenizer.

    Raises:
        ModelError: The model cannot be found or loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from echo_env.launch.model import resolve_model

    torch.set_num_threads(config.threads)
    path = resolve_model(config.model_name)
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must not reach for the hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # fp32 weights: bf16 would round small updates away (bf16 autocast does the compute).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        from echo_env.errors import ModelError

        raise ModelError(f"cannot load the model {path!r}: {exc}") from exc
    trainable, total = freeze_all_but_last(model, config.train_layers)
    print(f"model {path}: training {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters", flush=True)
    return model, tokenizer


def _rollout_func(config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """TRL's ``rollout_func`` for ``config.generation``, and the ``GRPOConfig`` fields that sync weights to a server."""
    from echo_env.integrations.trl_grpo import EchoRollout, SharedPrefixRollout

    if config.generation != "server":
        return (SharedPrefixRollout() if config.generation == "transformers" else None), {}
    assert config.base_url is not None
    rollout = EchoRollout(config.base_url, model=config.served_model_name)
    if not config.sync_weights:
        return rollout, {}
    return rollout, {
        "use_vllm": True,
        "vllm_mode": "server",
        "vllm_server_base_url": server_root(config.base_url),
    }


def _grpo_config(config: TrainConfig, out_dir: Path, cuda: bool, vllm_args: dict[str, Any]) -> Any:
    """TRL's ``GRPOConfig`` for ``config``."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size * config.group_size,
        gradient_accumulation_steps=1,
        num_generations=config.group_size,
        max_completion_length=config.max_tokens,
        temperature=config.temperature,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        beta=config.beta,
        logging_steps=1,
        save_strategy="no",
        report_to=["wandb"] if config.wandb_project else "none",
        run_name=config.wandb_name,
        seed=config.seed,
        use_cpu=not cuda,
        bf16=config.bf16 and (cuda or cpu_has_bf16()),
        disable_tqdm=True,
        dataloader_num_workers=0,
        **vllm_args,
    )


def run(config: TrainConfig) -> dict[str, Any]:
    """Train as configured; write ``train_log.jsonl`` and ``summary.json``; return the summary.

    Raises:
        ConfigError, ModelError: A setting, a missing library or the model (with the fix).
    """
    started = time.perf_counter()
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir("train-")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    records: list[dict[str, Any]] = []
    trainer = build_trainer(config, out_dir, records)
    print(
        f"GRPO: {config.steps} steps x {config.batch_size} prompts x {config.group_size} completions, "
        f"generation={config.generation}, log {out_dir / 'train_log.jsonl'}",
        flush=True,
    )
    try:
        trainer.train()
    finally:
        summary = summarize_run(records, config, time.perf_counter() - started)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _setup_logging(debug: bool) -> None:
    setup_logging(debug, hush=_NOISY, debug_level=logging.INFO)
    if not debug:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        # TRL warns that it was tested with older vLLM releases; training here does not use vLLM's API.
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM")


Config = TrainConfig
"""The command's settings (``echo-prefix train --help`` lists them)."""


def command(config: TrainConfig) -> int:
    """``echo-prefix train``: train, then print the reward curve; 0 when training finished."""
    _setup_logging(config.debug)
    summary = run(config)
    curve = " ".join(fmt(r, digits=2) for r in summary["reward_by_step"])
    print(f"reward by step: {curve}")
    print(
        f"mean reward, first quarter {fmt(summary['mean_reward_first_quarter'])} -> last quarter "
        f"{fmt(summary['mean_reward_last_quarter'])}; {fmt(summary['seconds_per_step'], digits=1)} s/step; "
        f"{summary['wall_s']:.0f} s in all"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m echo_env.commands.train`` (``echo-prefix train`` goes through the CLI).

    Args:
        argv: ``key=value`` strings (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when training finished.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print("usage: echo-prefix train [key=value ...]\n\nkeys:")
        print(describe(TrainConfig))
        return 0
    return command(parse_overrides(TrainConfig, args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EchoEnvError as exc:
        print(f"echo_env.commands.train: error: {exc}", file=sys.stderr)
        sys.exit(2)
