"""``echo-prefix rollout``: run echo episodes against a server and report reward and latency.

The config names its server with the shared :class:`~echo_env.launch.target.ServerTarget`
keys; the records and the summary go to disk through the report's redacting writers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from echo_env.commands.common import emit, fmt, setup_logging
from echo_env.config import check_agents
from echo_env.errors import ConfigError
from echo_env.interrupts import run_main
from echo_env.launch.target import OpenServer, ServerTarget, open_target
from echo_env.rollout.worker import RolloutWorker, SamplingConfig, summarize_rollout


@dataclass(frozen=True)
class RolloutConfig:
    """Settings of ``echo-prefix rollout``."""

    server: ServerTarget = field(default_factory=lambda: ServerTarget(timeout_s=120.0, max_concurrency=256))
    """Which server: ``base_url``, ``model_name``, ``api_key``, ..."""
    api: Literal["completions", "chat"] = "completions"
    """Endpoint: plain transcript or chat messages."""
    batching: Literal["per_agent", "per_group", "batched"] = "per_agent"
    """How agents' calls are grouped into requests."""
    batch_size: int = 16
    """Distinct prompts per episode."""
    group_size: int = 8
    """Agents per prompt."""
    max_turns: int = 1
    """Attempts per word."""
    max_tokens: int = 32
    """Generation limit."""
    temperature: float = 0.0
    """Sampling temperature."""
    seed: int = 0
    """Seeds words and sampling."""
    steps: int = 1
    """Episodes to run."""
    prompt_format: Literal["text", "tokens"] = "text"
    """``tokens`` sends token ids."""
    out_dir: str | None = None
    """Write per-request records and the summary here."""
    debug: bool = False
    """Tracebacks and per-step timing logs."""

    def __post_init__(self) -> None:
        # Every value is checked before an engine starts: a typo must not cost a minute of start-up.
        for key in ("batch_size", "group_size", "max_turns", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        check_agents(self.batch_size, self.group_size)
        self.sampling()

    def sampling(self) -> SamplingConfig:
        """The worker's sampling settings (validated)."""
        return SamplingConfig(
            api=self.api,
            batching=self.batching,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            prompt_format=self.prompt_format,
        )


Config = RolloutConfig
"""The command's settings (``echo-prefix rollout --help`` lists them)."""


def command(config: RolloutConfig) -> int:
    """``echo-prefix rollout``: run the episodes and print the summary as a table."""
    setup_logging(config.debug)
    lines = []
    for key, value in run_rollout(config).items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={fmt(v, 1000, 1)}ms" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"{key:>24}  {value}")
    emit("\n".join(lines))
    return 0


def run_rollout(config: RolloutConfig) -> dict[str, Any]:
    """Run ``steps`` episodes (starting the embedded engine when no ``base_url``); return the summary."""
    with open_target(config.server) as server:
        return run_main(lambda: _rollout(config, server))


async def _rollout(config: RolloutConfig, server: OpenServer) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from echo_env.envs.parallel import EchoPrefixParallelEnv
    from echo_env.envs.wrappers import ParallelTimingWrapper
    from echo_env.report.files import write_json_file, write_records
    from echo_env.wire.client import LLMClient

    target = config.server
    async with LLMClient(server.client) as client:
        model = await client.model()
        tokenizer = None
        if config.prompt_format == "tokens":
            from echo_env.launch.model import load_tokenizer

            tokenizer = load_tokenizer(server.tokenizer_source or target.model_name)
        worker = RolloutWorker(client, config.sampling(), tokenizer=tokenizer)
        env = ParallelTimingWrapper(
            EchoPrefixParallelEnv(
                batch_size=config.batch_size, group_size=config.group_size, max_turns=config.max_turns
            )
        )
        bar = tqdm(total=config.batch_size * config.group_size * config.steps, desc="rollout", unit="agent")
        worker.on_record = lambda record: bar.update(record.num_prompts * record.n)
        steps = []
        start = time.perf_counter()
        try:
            for episode in range(config.steps):
                steps.extend(await worker.run_episode(env, seed=config.seed + episode))
        finally:
            bar.close()
            if config.out_dir:
                write_records(Path(config.out_dir) / "requests.jsonl", [r.to_json() for r in worker.records])
        summary = {"model": model, "batching": config.batching}
        summary.update(dataclasses.asdict(summarize_rollout(steps, time.perf_counter() - start)))
        if config.out_dir:
            write_json_file(Path(config.out_dir) / "summary.json", summary)
        return summary
