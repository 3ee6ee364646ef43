"""Block-aligned prefixes: the hit-rate ceiling and measured TTFT before and after aligning the system prompt.

A prefix cache serves whole blocks only (128 tokens on vLLM's CPU backend, 16 on GPUs),
so the shared tokens past the last block boundary are computed again for every prompt.
``echo_env.measure.tokens.align_system_prompt`` pads or trims the system prompt's worked
examples so the shared prefix ends just past a boundary.

1. *Computed* (no server): the ceiling for the default model's tokenizer, before and
   after alignment, for block sizes 16-256, the transcript and chat renderings, with and
   without the prefix test's run tag.
2. *Measured* (embedded engine, aligned to the block size its metrics report: 128 on
   CPU): the shipped prompt as the env sends it (no run tag: its shared prefix is 502
   tokens, so only 384 can be cached at 128) against the same prompt aligned (one example
   added: 518 shared, 512 cacheable). Each run resets the
   engine's prefix cache (``POST /reset_prefix_cache``, dev mode) so the same prompt is
   cold again, sends the first agent alone, then every other agent all in flight.
   Before and after alternate (ABBA...) on the one engine, so both see the same load.

Full: 48 agents (6 groups of 8), 4 runs of each (about 4 minutes with the engine start).
``--quick``: 16 agents, 2 runs of each (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
from common import (
    cache_block_size,
    fmt,
    machine_facts,
    markdown_table,
    measure_burst,
    median,
    ratio,
    server_facts,
    table,
    warm_up_engine,
    write_result,
)
from tqdm.auto import tqdm

from echo_env.cachetest.align import align_system_prompt, prefix_geometry
from echo_env.envs.task import EchoTask, find_worked_examples
from echo_env.launch.target import OpenServer, ServerTarget, open_target
from echo_env.measure.phase import CounterProbe
from echo_env.measure.tokens import plan_tokens
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient
from echo_env.wire.info import ServerFacts, server_root
from echo_env.wire.tokenizer import encode_prompts

NAME = "block_alignment"
TAG = "[echo-prefix run 5f3a9c2e-on00]"
"""A run tag of the prefix test's form (it is part of the prefix)."""


def computed_table(tokenizer: Any) -> list[dict[str, Any]]:
    """Ceilings before/after alignment for several block sizes and renderings (no server)."""
    rows = []
    for tagged in (False, True):
        task = EchoTask(run_tag=TAG if tagged else "")
        for render in ("transcript", "chat"):
            for block in (16, 32, 64, 128, 256):
                before = prefix_geometry(task, tokenizer, block, render)  # type: ignore[arg-type]
                aligned = align_system_prompt(task, tokenizer, block, render=render)  # type: ignore[arg-type]
                after = prefix_geometry(aligned, tokenizer, block, render)  # type: ignore[arg-type]
                rows.append(
                    {
                        "run_tag": tagged,
                        "render": render,
                        "block_size": block,
                        "examples_before": len(find_worked_examples(task.system_prompt)),
                        "examples_after": len(find_worked_examples(aligned.system_prompt)),
                        "shared_before": before.shared_tokens,
                        "shared_after": after.shared_tokens,
                        "cacheable_before": before.cacheable_tokens,
                        "cacheable_after": after.cacheable_tokens,
                        "ceiling_before": before.hit_rate_ceiling,
                        "ceiling_after": after.hit_rate_ceiling,
                    }
                )
    return rows


def workload(task: EchoTask, agents: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Cold (first agent) and warm (the rest) transcripts; groups of 8 agents share a word."""
    group = 8 if agents % 8 == 0 else 1
    words = task.sample_words(agents // group, seed=seed)
    prompts = {f"group{g}_agent{i}": task.transcript(w) for g, w in enumerate(words) for i in range(group)}
    first = next(iter(prompts))
    return {first: prompts[first]}, {a: p for a, p in prompts.items() if a != first}


async def measure(
    server: OpenServer,
    facts: ServerFacts,
    variants: dict[str, EchoTask],
    agents: int,
    runs: int,
    tokenizer: Any,
    bar: Any,
) -> list[dict[str, Any]]:
    """Alternate the variants (ABBA...), each run on a freshly reset prefix cache."""
    probe = CounterProbe.of_server(facts)
    block = cache_block_size(facts)
    config = ClientConfig(base_url=server.base_url, model=server.model, timeout_s=900, max_concurrency=1024)
    out: list[dict[str, Any]] = []
    names = list(variants)
    async with LLMClient(config) as client, httpx.AsyncClient(timeout=60) as http:
        worker = RolloutWorker(client, SamplingConfig(max_tokens=32, temperature=0.0, seed=0))
        worker.on_record = lambda _r: bar.update(1)
        for run in range(runs):
            order = names if run % 2 == 0 else names[::-1]
            for name in order:
                resp = await http.post(f"{server_root(server.base_url)}/reset_prefix_cache")
                resp.raise_for_status()
                cold, warm = workload(variants[name], agents, seed=run)
                ids = encode_prompts(tokenizer, list(cold.values()) + list(warm.values()))
                cold_phase = await measure_burst("cold", worker, cold, probe, repeat=run, log=bar.write)
                plan = plan_tokens(ids[1:], block, warm=ids[:1])
                warm_phase = await measure_burst("warm", worker, warm, probe, plan=plan, repeat=run, log=bar.write)
                f = warm_phase.figures
                out.append(warm_phase.to_json(variant=name, run=run, cold_ttft_s=cold_phase.figures.ttft.p50))
                bar.write(
                    f"  run {run} {name:7} warm TTFT p50 {fmt(f.ttft.p50, 3)} s, hit rate "
                    f"{fmt(f.hit.value, 3)} (ceiling {fmt(f.hit.ceiling, 3)})"
                )
    return out


def measure_engine(tokenizer: Any, agents: int, runs: int) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Start the embedded engine (dev mode, for the cache reset), align to its block size, measure both prompts.

    Returns:
        Every warm phase's row, the server's facts, and its block size.
    """
    bar = tqdm(total=2 * runs * agents, desc=NAME, unit="req")
    try:
        with open_target(ServerTarget(), dev_mode=True) as server:
            facts = server_facts(server, log=bar.write)
            block = cache_block_size(facts)
            shipped = EchoTask()
            variants = {"shipped": shipped, "aligned": align_system_prompt(shipped, tokenizer, block)}
            asyncio.run(warm_up_engine(server, log=bar.write))
            measured = asyncio.run(measure(server, facts, variants, agents, runs, tokenizer, bar))
    finally:
        bar.close()
    return measured, facts.to_json(), block


def summarize_measured(
    measured: Sequence[dict[str, Any]], names: Sequence[str], agents: int, runs: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], list[str], list[list[str]]]:
    """Medians over runs per variant, per-run ratios, headline ratios and the table rows."""

    def pooled(name: str, key: str) -> float | None:
        return median([m[key] for m in measured if m["variant"] == name and m.get(key) is not None])

    def per_request(name: str) -> float | None:
        total = pooled(name, "planned_prompt_tokens")
        return total / (agents - 1) if total is not None else None

    summary = {
        name: {
            "ttft_p50_s_median_of_runs": pooled(name, "ttft_p50_s"),
            "ttft_p99_s_median_of_runs": pooled(name, "ttft_p99_s"),
            "requests_per_s_median_of_runs": pooled(name, "throughput_rps"),
            "hit_rate_median_of_runs": pooled(name, "hit_rate"),
            "hit_rate_ceiling": pooled(name, "hit_rate_ceiling"),
            "cold_ttft_s_median_of_runs": pooled(name, "cold_ttft_s"),
            "prompt_tokens_per_request": per_request(name),
        }
        for name in names
    }
    per_run = []
    for run in range(runs):
        a = next(m for m in measured if m["run"] == run and m["variant"] == "shipped")
        b = next(m for m in measured if m["run"] == run and m["variant"] == "aligned")
        per_run.append(
            {
                "run": run,
                "ttft_p50_speedup": ratio(a["ttft_p50_s"], b["ttft_p50_s"]),
                "throughput_ratio": ratio(b["throughput_rps"], a["throughput_rps"]),
            }
        )
    s, al = summary["shipped"], summary["aligned"]
    m_headers = ["prompt", "tokens", "ceiling", "hit rate", "warm TTFT p50", "warm TTFT p99", "req/s"]
    m_body = [
        [
            name,
            fmt(f["prompt_tokens_per_request"], 0),
            fmt(f["hit_rate_ceiling"], 3),
            fmt(f["hit_rate_median_of_runs"], 3),
            fmt(f["ttft_p50_s_median_of_runs"], 3, " s"),
            fmt(f["ttft_p99_s_median_of_runs"], 3, " s"),
            fmt(f["requests_per_s_median_of_runs"], 1),
        ]
        for name, f in summary.items()
    ]
    speedups = [p["ttft_p50_speedup"] for p in per_run if p["ttft_p50_speedup"]]
    tputs = [p["throughput_ratio"] for p in per_run if p["throughput_ratio"]]
    ratios = {
        "ceiling_after_over_before": ratio(al["hit_rate_ceiling"], s["hit_rate_ceiling"]),
        "hit_rate_after_over_before": ratio(al["hit_rate_median_of_runs"], s["hit_rate_median_of_runs"]),
        "ttft_p50_speedup_median_of_runs": median(speedups),
        "ttft_p50_speedup_per_run": speedups,
        "throughput_ratio_median_of_runs": median(tputs),
    }
    return summary, per_run, ratios, m_headers, m_body


def computed_rows(computed: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The computed table: headers and one row per tag, rendering and block size."""
    headers = ["run tag", "render", "block", "examples", "shared tokens", "cacheable", "ceiling before", "after"]
    body = [
        [
            "yes" if r["run_tag"] else "no",
            r["render"],
            r["block_size"],
            f"{r['examples_before']} -> {r['examples_after']}",
            f"{r['shared_before']} -> {r['shared_after']}",
            f"{r['cacheable_before']} -> {r['cacheable_after']}",
            fmt(r["ceiling_before"], 3),
            fmt(r["ceiling_after"], 3),
        ]
        for r in computed
    ]
    return headers, body


def main(argv: Sequence[str] | None = None) -> int:
    """Print the computed and measured before/after tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 agents, 2 runs of each variant")
    parser.add_argument("--agents", type=int, help="agents per run (default 48; quick 16)")
    parser.add_argument("--runs", type=int, help="runs of each variant (default 4; quick 2)")
    args = parser.parse_args(argv)
    agents = args.agents or (16 if args.quick else 48)
    runs = args.runs or (2 if args.quick else 4)

    from echo_env.launch.model import load_tokenizer

    tokenizer = load_tokenizer(None)
    computed = computed_table(tokenizer)
    c_headers, c_body = computed_rows(computed)
    print("hit-rate ceiling of one warm prompt, default model's tokenizer, before -> after align_system_prompt")
    print(table(c_headers, c_body))

    measured, facts, block = measure_engine(tokenizer, agents, runs)
    summary, per_run, ratios, m_headers, m_body = summarize_measured(measured, ["shipped", "aligned"], agents, runs)
    print(f"\nmeasured on the embedded engine (block {block}), warm phase of {agents - 1} requests, {runs} runs each")
    print(table(m_headers, m_body))
    print(
        f"aligned vs shipped: ceiling {fmt(ratios['ceiling_after_over_before'], 2, 'x')}, "
        f"hit rate {fmt(ratios['hit_rate_after_over_before'], 2, 'x')}, warm TTFT p50 "
        f"{fmt(ratios['ttft_p50_speedup_median_of_runs'], 2, 'x')} faster (per run: "
        f"{', '.join(fmt(x, 2) for x in ratios['ttft_p50_speedup_per_run'])}), "
        f"throughput {fmt(ratios['throughput_ratio_median_of_runs'], 2, 'x')}"
    )
    path = write_result(
        NAME,
        args.quick,
        {
            "what": f"hit-rate ceiling and measured TTFT, shipped system prompt vs align_system_prompt, block {block}",
            "settings": {"agents": agents, "runs_per_variant": runs, "max_tokens": 32, "group_size": 8},
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base, bf16)", server=facts),
            "computed": computed,
            "measured": {"summary": summary, "ratios": ratios, "per_run": per_run, "runs": measured},
            "markdown_computed": markdown_table(c_headers, c_body),
            "markdown_measured": markdown_table(m_headers, m_body),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
