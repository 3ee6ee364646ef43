"""What the client costs: sustained requests/s and client CPU per request, against a stand-in server.

The server here is a STAND-IN (``standin_server.py``): a minimal streaming
OpenAI-compatible endpoint that answers at once with 16 tokens, streamed as a real server
streams them: one event per token, each written on its own turn of the server's loop, so
a client reads a request's tokens in many small pieces. It is used only to isolate the
client's cost; it says nothing about any inference engine. Its own CPU per request is
reported too, to show it is not the bottleneck.

Clients, each in a fresh process, at the same concurrency (requests in flight), on the
same prompts (the echo env's real ~2 KB transcripts), 16 streamed tokens per request:

- ``worker``: this package's ``RolloutWorker`` over ``LLMClient`` as shipped
  (``transport="sse"``: aiohttp, a pool sized to the concurrency, server-sent events
  parsed by ``echo_env.wire.sse.SSEDecoder``);
- ``worker+openai``: the same worker with ``transport="openai"``: generation through the
  ``openai`` SDK's streaming client and its default httpx transport (the shipped path
  before this benchmark chose the other);
- ``worker+openai-aiohttp``: ``transport="openai"`` with the SDK's own aiohttp transport
  (``openai.DefaultAioHttpClient``): is the SDK's cost its transport or its streaming?
- ``naive``: ``AsyncOpenAI()`` with its defaults, one ``completions.create(stream=True)``
  per prompt under a semaphore, ``asyncio.gather``;
- ``vllm-bench``: vLLM's own ``vllm bench serve`` client (aiohttp, run through
  ``vllm_bench.py``), on the same prompts as a ``custom`` dataset.

Client CPU time is the client process's user+system time over the request loop only
(imports and prompt building excluded; for ``vllm-bench`` the time inside its
``benchmark()`` coroutine). Repeats rotate the client order, so the shared machine's
load falls on every client alike.

Full: concurrency 64, 256, 1024; max(1024, 3 x concurrency) requests; 2 repeats (~12 min).
``--quick``: concurrency 64 and 256, 256 requests, 1 repeat (~2 min).
``--all-at-once``: the stand-in writes each answer in one piece instead (what a client
that pays per read is flattered by).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    fmt,
    machine_facts,
    markdown_table,
    median,
    peak_rss_mb,
    ratio,
    run_vllm_bench,
    table,
    write_result,
)

NAME = "client_overhead"
CLIENTS = ("worker", "worker+openai", "worker+openai-aiohttp", "naive", "vllm-bench")
"""Every client compared."""
MODEL = "standin-echo"
TOKENS = 16
"""Streamed tokens per request."""


# ----- the stand-in server -----------------------------------------------------------------


@contextlib.contextmanager
def standin_server(all_at_once: bool = False) -> Iterator[tuple[str, int]]:
    """Start ``standin_server.py`` on a free port; yield (root URL, pid); stop it."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "standin_server.py"), "--port", "0"]
        + (["--all-at-once"] if all_at_once else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            raise RuntimeError(f"the stand-in server did not start: {line}")
        yield f"http://127.0.0.1:{line[1]}", proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


def _cpu_of(pid: int) -> float:
    """User+system CPU seconds of a process so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


# ----- the clients (each runs in its own process) -----------------------------------------


def _prompts(path: Path, n: int) -> dict[str, str]:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return {f"agent{i}": rows[i % len(rows)] for i in range(n)}


async def _trial_worker(variant: str, url: str, prompts: dict[str, str], concurrency: int) -> tuple[int, float, float]:
    import openai

    from echo_env.rollout.worker import RolloutWorker, SamplingConfig
    from echo_env.wire.client import ClientConfig, LLMClient, Transport

    transport: Transport = "sse" if variant == "worker" else "openai"
    config = ClientConfig(
        base_url=f"{url}/v1", model=MODEL, max_concurrency=concurrency, timeout_s=600, transport=transport
    )
    client = LLMClient(config)
    if variant == "worker+openai-aiohttp":
        # The SDK's own aiohttp transport, with the same pool size as the shipped client.
        import httpx2

        assert client._openai is not None  # made for transport="openai"
        await client._openai.close()
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client._openai = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key="EMPTY",
            max_retries=0,
            timeout=config.timeout_s,
            http_client=openai.DefaultAioHttpClient(limits=limits, timeout=config.timeout_s),
        )
    worker = RolloutWorker(client, SamplingConfig(max_tokens=TOKENS, stop=(), temperature=0.0))
    async with client:
        cpu, wall = time.process_time(), time.perf_counter()
        _, records = await worker.complete(prompts)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ok = sum(1 for r in records if r.ok and (r.completion_tokens or 0) == TOKENS)
    return ok, wall, cpu


async def _trial_naive(url: str, prompts: dict[str, str], concurrency: int) -> tuple[int, float, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY")
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> bool:
        async with sem:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, stream=True)
            chunks = 0
            async for chunk in stream:
                chunks += 1 if chunk.choices and chunk.choices[0].text else 0
            return chunks == TOKENS

    cpu, wall = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts.values()), return_exceptions=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.close()
    return sum(1 for r in results if r is True), wall, cpu


def run_trial(client: str, url: str, prompts_path: Path, concurrency: int, requests: int) -> None:
    """In the child process: run one client, print one JSON line of its figures."""
    prompts = _prompts(prompts_path, requests)
    if client == "naive":
        ok, wall, cpu = asyncio.run(_trial_naive(url, prompts, concurrency))
    else:
        ok, wall, cpu = asyncio.run(_trial_worker(client, url, prompts, concurrency))
    peak = peak_rss_mb()
    print(json.dumps({"ok": ok, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak}))


def _vllm_bench(url: str, prompts_path: Path, concurrency: int, requests: int, tokenizer: str) -> dict[str, Any]:
    rows = [json.loads(line)["prompt"] for line in prompts_path.read_text().splitlines() if line.strip()]
    prompts = [rows[i % len(rows)] for i in range(requests)]
    result = run_vllm_bench(url, MODEL, tokenizer, prompts, concurrency, TOKENS)
    # vLLM's duration is its request loop; the CPU is its whole benchmark() coroutine.
    return {"ok": result["completed"], "wall_s": result["duration"], "cpu_s": result["client_cpu_s"]}


def _child(client: str, url: str, prompts: Path, concurrency: int, requests: int, tokenizer: str) -> dict[str, Any]:
    if client == "vllm-bench":
        return _vllm_bench(url, prompts, concurrency, requests, tokenizer)
    cmd = [sys.executable, __file__, "--trial", client, "--url", url, "--prompts", str(prompts)]
    cmd += ["--concurrency", str(concurrency), "--requests", str(requests)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{client} trial failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ----- main ------------------------------------------------------------------------------


def _ratios_by_repeat(
    rows: Sequence[dict[str, Any]], concurrencies: Sequence[int], repeats: int
) -> dict[int, list[float]]:
    """The worker's req/s over vLLM's client's in each repeat: the goal is >= 1 in every one, not in the median."""
    out: dict[int, list[float]] = {}
    for c in concurrencies:
        ratios = []
        for rep in range(repeats):
            mine = {r["client"]: r["ok"] / r["wall_s"] for r in rows if r["concurrency"] == c and r["repeat"] == rep}
            if "worker" in mine and mine.get("vllm-bench"):
                ratios.append(mine["worker"] / mine["vllm-bench"])
        if ratios:
            out[c] = ratios
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 64 and 256, 256 requests, 1 repeat")
    parser.add_argument("--concurrency", type=int, nargs="+", help="requests in flight (default 64 256 1024)")
    parser.add_argument("--repeats", type=int, help="repeats (default 2; quick 1)")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--all-at-once", action="store_true", help="the stand-in writes each answer in one piece")
    parser.add_argument("--trial", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _n_requests(quick: bool, concurrency: int) -> int:
    """Requests per trial: enough for several waves at every concurrency."""
    return 256 if quick else max(1024, 3 * concurrency)


def _run_trials(args: argparse.Namespace, concurrencies: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Every client at every concurrency in every repeat, each in its own process; one row per trial."""
    from tqdm.auto import tqdm

    from echo_env import parallel_env
    from echo_env.launch.model import load_tokenizer, resolve_model

    tokenizer = resolve_model(None)  # vLLM's client needs a tokenizer to size prompts
    load_tokenizer(tokenizer)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, standin_server(args.all_at_once) as (url, server_pid):
        prompts = Path(tmp) / "prompts.jsonl"
        env = parallel_env(batch_size=128, group_size=8)
        observations, _ = env.reset(seed=0)
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in observations.values()))
        bar = tqdm(total=repeats * len(concurrencies) * len(args.clients), desc=NAME, unit="trial")
        for repeat in range(repeats):
            for k, c in enumerate(concurrencies):
                shift = (repeat + k) % len(args.clients)
                for client in args.clients[shift:] + args.clients[:shift]:
                    n = _n_requests(args.quick, c)
                    server_cpu = _cpu_of(server_pid)
                    fig = _child(client, url, prompts, c, n, tokenizer)
                    fig["server_cpu_s"] = _cpu_of(server_pid) - server_cpu
                    fig.update({"client": client, "concurrency": c, "requests": n, "repeat": repeat})
                    rows.append(fig)
                    bar.set_postfix_str(f"{client}@{c}: {fig['ok'] / fig['wall_s']:.0f} req/s")
                    bar.update(1)
        bar.close()
    return rows


def _summarize(
    rows: Sequence[dict[str, Any]], concurrencies: Sequence[int], clients: Sequence[str]
) -> list[dict[str, Any]]:
    """Per concurrency and client: medians over repeats, and the ratios to the other clients."""
    summary = []
    for c in concurrencies:
        by: dict[str, dict[str, Any]] = {}
        for client in clients:
            mine = [r for r in rows if r["client"] == client and r["concurrency"] == c]
            by[client] = {
                "requests_per_s": median([r["ok"] / r["wall_s"] for r in mine]),
                "cpu_ms_per_request": median([1000 * r["cpu_s"] / max(r["ok"], 1) for r in mine]),
                "ok_share": sum(r["ok"] for r in mine) / sum(r["requests"] for r in mine),
                "server_cpu_ms_per_request": median([1000 * r["server_cpu_s"] / max(r["ok"], 1) for r in mine]),
                "peak_rss_mb": median([r["peak_rss_mb"] for r in mine if "peak_rss_mb" in r]),
            }
        base_w = by.get("worker", {}).get("requests_per_s")
        for client, f in by.items():
            f["vs_vllm_bench"] = ratio(f["requests_per_s"], by.get("vllm-bench", {}).get("requests_per_s"))
            f["vs_naive"] = ratio(f["requests_per_s"], by.get("naive", {}).get("requests_per_s"))
            f["vs_worker"] = ratio(f["requests_per_s"], base_w)
            summary.append({"concurrency": c, "client": client, **f})
    return summary


def _summary_table(summary: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["concurrency", "client", "req/s", "CPU ms/req", "vs vllm-bench", "vs naive", "ok", "stand-in CPU ms/req"]
    body = [
        [
            s["concurrency"],
            s["client"],
            fmt(s["requests_per_s"], 0),
            fmt(s["cpu_ms_per_request"], 2),
            fmt(s["vs_vllm_bench"], 2, "x"),
            fmt(s["vs_naive"], 2, "x"),
            fmt(s["ok_share"], 2),
            fmt(s["server_cpu_ms_per_request"], 3),
        ]
        for s in summary
    ]
    return headers, body


def main(argv: Sequence[str] | None = None) -> int:
    """Run every client at every concurrency, print the ratios, write the JSON."""
    args = _parse_args(argv)
    if args.trial:
        run_trial(args.trial, args.url, args.prompts, args.concurrency[0], args.requests)
        return 0
    concurrencies = args.concurrency or ([64, 256] if args.quick else [64, 256, 1024])
    repeats = args.repeats or (1 if args.quick else 2)
    rows = _run_trials(args, concurrencies, repeats)
    summary = _summarize(rows, concurrencies, args.clients)
    headers, body = _summary_table(summary)
    pacing = "each answer written whole" if args.all_at_once else "one event per token, one per loop turn"
    print(
        f"\nclient cost against the STAND-IN server ({TOKENS} streamed tokens/request, {pacing}; "
        f"medians of {repeats} run(s))"
    )
    print(table(headers, body))
    by_repeat = _ratios_by_repeat(rows, concurrencies, repeats)
    if by_repeat:
        print("\nworker vs vllm-bench, req/s ratio in each repeat:")
        for c, ratios in by_repeat.items():
            print(f"  {c:>5} in flight: " + "  ".join(f"{r:.2f}x" for r in ratios))
    path = write_result(
        NAME,
        args.quick,
        {
            "what": "client throughput and CPU per request against a stand-in server that answers at once, "
            "streaming one event per token (stand-in used only to isolate client cost)",
            "worker_vs_vllm_bench_by_repeat": {str(c): r for c, r in by_repeat.items()},
            "settings": {
                "concurrency": concurrencies,
                "requests": {str(c): _n_requests(args.quick, c) for c in concurrencies},
                "streamed_tokens": TOKENS,
                "standin_pacing": pacing,
                "repeats": repeats,
                "prompts": "echo env transcripts (~520 tokens, ~2 KB)",
            },
            "machine": machine_facts(model=f"{MODEL} (stand-in, no model)"),
            "summary": summary,
            "trials": rows,
            "markdown": markdown_table(headers, body),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
