"""Scale: the rollout worker from 8 to 8192 agents, against the stand-in server and the embedded engine.

Each point is one vectorized step of the parallel env (``batch_size = agents / 8``,
``group_size = 8``, one shared prefix) driven by this package's ``RolloutWorker``, in a
fresh process: reset, every agent's request (at most 1024 in flight, the prefix test's
default), grading. Per point: requests/s, client CPU per agent, and the worker
process's peak memory per agent (peak RSS minus the RSS after imports, over agents).

Targets:

- the STAND-IN server (``standin_server.py``, answers instantly; used only to isolate
  the worker's own cost);
- the embedded vLLM engine (prefix caching on; the env's prompt primed once first, so
  every point hits the same cached prefix).

Both use the env's system prompt aligned to the engine's cache blocks (the block size its
metrics report, 128 on CPU; ``align_system_prompt``, one worked example added): the
shipped prompt without a run tag leaves 118 shared tokens past the last whole 128-token
block, which every agent would recompute. The engine runs first, so its block size is
known when the stand-in's points use the same prompt.

The ratios that matter are between points of the same target in the same run: how
cost per agent changes as agents grow (the shape), and where it stops growing linearly.

Full: stand-in 8, 128, 1024, 8192 agents; engine 8, 128, 1024; 4 tokens per reply
(about 10 minutes). The engine's 8192-agent step is opt-in (``--engine-agents 8 128
1024 8192``): at the 5-25 requests/s a 2-core CPU serves, it alone takes 6-25 minutes.
``--quick``: stand-in 8, 128, 1024; engine 8, 128 (about 3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    cache_block_size,
    fmt,
    machine_facts,
    markdown_table,
    peak_rss_mb,
    ratio,
    server_facts,
    table,
    warm_up_engine,
    write_result,
)

NAME = "scale"
MAX_TOKENS = 4
MAX_IN_FLIGHT = 1024
"""The prefix test's default ``max_concurrency``."""


def _rss_mb() -> float:
    """This process's resident memory now, in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1024**2


async def _point(url: str, model: str, agents: int, system_prompt: str) -> dict[str, Any]:
    from echo_env import ParallelTimingWrapper, parallel_env
    from echo_env.envs.task import EchoTask
    from echo_env.rollout.worker import RolloutWorker, SamplingConfig
    from echo_env.wire.client import ClientConfig, LLMClient

    task = EchoTask(system_prompt=system_prompt)
    rss0 = _rss_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    env = ParallelTimingWrapper(parallel_env(batch_size=agents // 8, group_size=8, task=task))
    observations, infos = env.reset(seed=0)
    reset_s = time.perf_counter() - wall0
    config = ClientConfig(
        base_url=url, model=model, max_concurrency=min(agents, MAX_IN_FLIGHT), timeout_s=1800, max_retries=0
    )
    async with LLMClient(config) as client:
        worker = RolloutWorker(client, SamplingConfig(max_tokens=MAX_TOKENS, temperature=0.0))
        step = await worker.step(env, observations, infos)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    ok = sum(1 for r in step.records if r.ok)
    errors = sorted({(r.error or "")[:120] for r in step.records if not r.ok})
    peak = peak_rss_mb()
    return {
        "agents": agents,
        "ok": ok,
        "errors": errors[:3],
        "reset_s": reset_s,
        "step_s": step.wall_s,
        "wall_s": wall,
        "requests_per_s": ok / step.wall_s if step.wall_s > 0 else None,
        "client_cpu_ms_per_agent": 1000 * cpu / agents,
        "rss_after_imports_mb": rss0,
        "peak_rss_mb": peak,
        "peak_kb_per_agent": 1024 * (peak - rss0) / agents,
        "mean_reward": sum(step.rewards.values()) / len(step.rewards) if step.rewards else None,
    }


def run_point(target: str, url: str, model: str, agents: int, prompt_file: Path) -> dict[str, Any]:
    """One point in a fresh process (so peak memory is this point's own)."""
    cmd = [sys.executable, __file__, "--point", str(agents), "--url", url, "--model", model]
    cmd += ["--system-prompt-file", str(prompt_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"agents": agents, "target": target, "ok": 0, "errors": [out.stderr.strip()[-300:]], "crashed": True}
    fig = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    fig["target"] = target
    return fig


def shape(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Between neighbouring points: how step time and memory grow (log-log slope; 1.0 is linear)."""
    out = []
    for a, b in itertools.pairwise(points):
        if not a.get("step_s") or not b.get("step_s"):
            continue
        grow = math.log(b["agents"] / a["agents"])
        out.append(
            {
                "from": a["agents"],
                "to": b["agents"],
                "step_time_slope": math.log(b["step_s"] / a["step_s"]) / grow,
                "peak_memory_slope": math.log(max(b["peak_rss_mb"] - b["rss_after_imports_mb"], 1e-3) /
                                              max(a["peak_rss_mb"] - a["rss_after_imports_mb"], 1e-3)) / grow,
                "cpu_per_agent_ratio": ratio(b["client_cpu_ms_per_agent"], a["client_cpu_ms_per_agent"]),
            }
        )  # fmt: skip
    return out


def measure_engine(points: Sequence[int], prompt_file: Path, bar: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The engine's points, on the env's prompt aligned to the engine's block size (written to ``prompt_file``).

    Returns:
        The rows (the priming step included, as ``engine-prime``) and the server's facts.
    """
    from echo_env.cachetest.align import align_system_prompt
    from echo_env.envs.task import EchoTask
    from echo_env.launch.model import load_tokenizer
    from echo_env.launch.target import ServerTarget, open_target

    rows: list[dict[str, Any]] = []
    with open_target(ServerTarget()) as server:
        facts = server_facts(server, log=bar.write)
        # Aligned to the engine's blocks: computing the shared tokens past the last whole
        # block for every agent would make the engine points a prefill benchmark, not a worker one.
        block = cache_block_size(facts)
        prompt_file.write_text(align_system_prompt(EchoTask(), load_tokenizer(None), block).system_prompt)
        model = server.model or facts.model
        asyncio.run(warm_up_engine(server, log=bar.write))
        # Prime the env's shared prefix once, so every point sees the same warm cache.
        rows.append(run_point("engine-prime", server.base_url, model, 8, prompt_file))
        for n in points:
            rows.append(run_point("engine", server.base_url, model, n, prompt_file))
            bar.update(n)
    return rows, {**facts.to_json(), "prompt_aligned_to_block": block}


def measure_standin(points: Sequence[int], prompt_file: Path, bar: Any) -> list[dict[str, Any]]:
    """The stand-in server's points (the worker's own cost), on the same prompt as the engine's."""
    from client_overhead import MODEL as STANDIN_MODEL
    from client_overhead import standin_server

    rows = []
    with standin_server() as (root, _pid):
        for n in points:
            rows.append(run_point("stand-in", f"{root}/v1", STANDIN_MODEL, n, prompt_file))
            bar.update(n)
    return rows


def measure_all(
    standin_points: Sequence[int], engine_points: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """The engine's points, then the stand-in's; the rows (stand-in first), the engine's facts, any engine failure."""
    from tqdm.auto import tqdm

    from echo_env.envs.task import EchoTask

    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    failure: str | None = None
    bar = tqdm(total=sum(standin_points) + sum(engine_points), desc=NAME, unit="agent")
    with tempfile.TemporaryDirectory() as scratch:
        prompt_file = Path(scratch) / "system_prompt.txt"
        # Without the engine's block size the stand-in gets the shipped prompt (its cost is the same).
        prompt_file.write_text(EchoTask().system_prompt)
        try:
            # On a shared machine the engine can die under someone else's memory pressure
            # (the OOM killer took it once here): keep the stand-in figures and say so.
            try:
                rows, facts = measure_engine(engine_points, prompt_file, bar)
            except Exception as exc:
                failure = f"engine part failed: {type(exc).__name__}: {exc}"
                bar.write(failure)
            rows = measure_standin(standin_points, prompt_file, bar) + rows
        finally:
            bar.close()
    return rows, facts, failure


def report(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], dict[str, list[dict[str, Any]]]]:
    """Print the table and the growth shape; return the table and the shapes for the JSON."""
    headers = ["target", "agents", "ok", "req/s", "step s", "CPU ms/agent", "peak MB", "KB/agent", "errors"]
    body = [
        [
            r["target"],
            r["agents"],
            r.get("ok"),
            fmt(r.get("requests_per_s"), 1),
            fmt(r.get("step_s"), 2),
            fmt(r.get("client_cpu_ms_per_agent"), 2),
            fmt(r.get("peak_rss_mb"), 0),
            fmt(r.get("peak_kb_per_agent"), 1),
            "; ".join(r.get("errors") or []) or "-",
        ]
        for r in rows
        if r["target"] != "engine-prime"
    ]
    shapes = {t: shape([r for r in rows if r["target"] == t]) for t in ("stand-in", "engine")}
    print(f"\nscale: one vectorized step, groups of 8, <= {MAX_IN_FLIGHT} in flight, {MAX_TOKENS} tokens per reply")
    print(table(headers, body))
    for target, steps in shapes.items():
        for s in steps:
            print(
                f"{target}: {s['from']} -> {s['to']} agents: step time grows as agents^{s['step_time_slope']:.2f}, "
                f"peak memory as agents^{s['peak_memory_slope']:.2f}, CPU per agent x{s['cpu_per_agent_ratio']:.2f}"
            )
    return headers, body, shapes


def main(argv: Sequence[str] | None = None) -> int:
    """Run both targets' points, print the table and the growth shape, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="stand-in 8-1024, engine 8-128")
    parser.add_argument("--engine-agents", type=int, nargs="+", help="engine points (default 8 128 1024)")
    parser.add_argument("--standin-agents", type=int, nargs="+", help="stand-in points (default 8 128 1024 8192)")
    parser.add_argument("--result-name", default=NAME, help="write results/<name>.json (default: scale)")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--system-prompt-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        prompt = args.system_prompt_file.read_text()
        print(json.dumps(asyncio.run(_point(args.url, args.model, args.point, prompt))))
        return 0

    standin_points = args.standin_agents or ([8, 128, 1024] if args.quick else [8, 128, 1024, 8192])
    engine_points = args.engine_agents or ([8, 128] if args.quick else [8, 128, 1024])
    rows, facts, failure = measure_all(standin_points, engine_points)
    headers, body, shapes = report(rows)
    path = write_result(
        args.result_name,
        args.quick,
        {
            "what": "one vectorized worker step at 8..8192 agents: throughput, CPU and peak memory per agent",
            "settings": {"max_tokens": MAX_TOKENS, "max_in_flight": MAX_IN_FLIGHT, "group_size": 8},
            "machine": machine_facts(model="echo-gemma3-270m (engine) / stand-in (no model)", server=facts),
            "rows": rows,
            "shape": shapes,
            "failure": failure,
            "markdown": markdown_table(headers, body),
        },
    )
    print(f"\nwrote {path}")
    return 1 if failure else 0


if __name__ == "__main__":
    raise SystemExit(main())
