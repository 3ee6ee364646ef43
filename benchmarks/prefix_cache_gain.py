"""What prefix caching saves: the same echo workload on the embedded engine, cache on vs off.

For each sweep point the workload is the prefix test's cold + warm sequence: the first
agent's request alone on a prefix the server has never seen (a run tag at the very
start of the prompt), then every other agent all in flight. The engine runs once with
``--enable-prefix-caching`` and once with ``--no-enable-prefix-caching``, in the order
on, off, off, on (ABBA: a slow drift of the shared machine's load cancels), one engine at
a time. Every figure is a ratio of the two, measured in the same run:

- TTFT p50 and p99 of the warm phase, off / on (the speedup);
- throughput of the warm phase (requests/s and tokens/s), on / off;
- the warm phase's hit rate from the server's counters vs the ceiling the prompts
  allow (block granularity, last token always computed);
- the ideal prefill speedup ``prompt_tokens / uncached_tokens`` beside the measured one.

Sweeps: the shared-prefix share of the prompt (about 50%, 80% and the shipped prompt's
~99%) with one agent per prompt, so the prefix is the only reuse; and group_size
(1, 4, 8, 16: agents sending the very same prompt) at the 50% share, where a group's
own text (more than a block long) can be cached too. The shipped workload (default
share, group_size 8) is the headline row. With caching off every request computes its
whole prompt whatever its group, so the cache-off baseline is measured once per share
(one agent per prompt) and serves every group_size of that share.

Full mode: 7 points, 48 agents each, 2 repeats per server (about 12-15 minutes on 2
busy cores, three engine starts included). ``--quick``: 3 points, 16 agents, 1 repeat
(about 5 minutes, most of it two engine starts).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    Measured,
    cache_block_size,
    fmt,
    machine_facts,
    markdown_table,
    measure_burst,
    ratio,
    result_path,
    server_facts,
    table,
    warm_up_engine,
    write_result,
)
from tqdm.auto import tqdm

from echo_env.envs.task import EchoTask, default_system_prompt, find_worked_examples, with_examples
from echo_env.launch.target import OpenServer, ServerTarget, open_target
from echo_env.measure.figures import PhaseFigures, pool
from echo_env.measure.phase import CounterProbe
from echo_env.measure.tokens import plan_tokens, shared_prefix_length
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient
from echo_env.wire.info import ServerFacts
from echo_env.wire.tokenizer import encode_prompts

NAME = "prefix_cache_gain"


@dataclass(frozen=True)
class Point:
    """One workload of the sweep."""

    share: float | None
    """Target shared-prefix share of the prompt; None: the shipped prompt (~97%)."""
    group_size: int
    """Agents per distinct prompt."""

    @property
    def label(self) -> str:
        """``share=50% g=1``."""
        share = "default" if self.share is None else f"{self.share:.0%}"
        return f"share={share} g={self.group_size}"


FULL_POINTS = (
    Point(None, 8),  # the shipped workload: the headline
    Point(0.5, 1),
    Point(0.8, 1),
    Point(None, 1),
    Point(0.5, 4),
    Point(0.5, 8),
    Point(0.5, 16),
)
QUICK_POINTS = (Point(None, 8), Point(0.5, 1), Point(0.5, 8))


# ----- the workloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How a share variant is built from the shipped prompt."""

    keep: int
    """Worked examples of the shipped prompt kept (shared by every prompt)."""
    filler: int
    """Worked examples of each group's own (different words per group)."""


def _variant_task(tag: str, shape: Shape | None, filler_words: Sequence[str]) -> EchoTask:
    if shape is None:
        return EchoTask(run_tag=tag)
    prompt = with_examples(default_system_prompt(), shape.keep, filler_words)
    return EchoTask(system_prompt=prompt, run_tag=tag)


def _filler(words: Sequence[str], group: int, count: int, seed: int) -> list[str]:
    # The first filler word differs between groups, so groups part right there.
    rng = np.random.default_rng(seed * 100_003 + group)
    first = words[group % len(words)]
    rest = [words[int(i)] for i in rng.choice(len(words), size=count, replace=False) if words[int(i)] != first]
    return [first, *rest][:count]


def _pool() -> list[str]:
    used = {w for _, _, w in find_worked_examples(default_system_prompt())}
    return [w for w in EchoTask().words if w not in used]


def choose_shape(share: float, tokenizer: Any) -> Shape:
    """The kept/filler example counts whose prompt comes closest to ``share`` shared tokens.

    Ties go to the prompt closest in length to the shipped one, so the sweep changes
    what is shared rather than how long prompts are.
    """
    pool = _pool()
    tag = "[echo-prefix run 5f3a9c2e-on00]"
    default_len = len(encode_prompts(tokenizer, [EchoTask(run_tag=tag).transcript("apple")])[0])
    n = len(find_worked_examples(default_system_prompt()))
    best: tuple[float, int, Shape] | None = None
    for keep in range(1, n + 1):
        for filler in range(0, 40):
            prompts = [
                _variant_task(tag, Shape(keep, filler), _filler(pool, g, filler, 0)).transcript(w)
                for g, w in ((0, "apple"), (1, "river"))
            ]
            ids = encode_prompts(tokenizer, prompts)
            got = shared_prefix_length(ids) / len(ids[0])
            key = (round(abs(got - share), 2), abs(len(ids[0]) - default_len), Shape(keep, filler))
            if best is None or key[:2] < best[:2]:
                best = key
            if got < share - 0.05:
                break  # more filler only lowers the share further
    assert best is not None
    return best[2]


def build_prompts(
    point: Point, shape: Shape | None, tag: str, agents: int, seed: int
) -> tuple[dict[str, str], dict[str, str]]:
    """The cold prompt (first agent) and the warm prompts (every other agent) of one run."""
    groups = agents // point.group_size
    task = EchoTask()
    words = task.sample_words(groups, seed=seed)
    pool = _pool()
    prompts: dict[str, str] = {}
    for g, word in enumerate(words):
        filler = _filler(pool, g, shape.filler, seed) if shape is not None else []
        text = _variant_task(tag, shape, filler).transcript(word)
        for i in range(point.group_size):
            prompts[f"group{g}_agent{i}"] = text
    first = next(iter(prompts))
    return {first: prompts[first]}, {a: p for a, p in prompts.items() if a != first}


# ----- measuring ---------------------------------------------------------------------------


@dataclass
class Run:
    """One point on one server in one repeat."""

    point: Point
    server: str
    repeat: int
    cold: Measured
    warm: Measured
    prefix_share: float | None
    """Shared-prefix tokens over prompt tokens (None: every agent sends the same prompt)."""


async def run_block(
    server: OpenServer,
    facts: ServerFacts,
    label: str,
    repeats: Sequence[int],
    points: Sequence[Point],
    shapes: dict[float | None, Shape | None],
    agents: int,
    run_id: str,
    tokenizer: Any,
    bar: Any,
) -> list[Run]:
    """Every point, for each repeat in ``repeats``, on one open server."""
    probe = CounterProbe.of_server(facts)
    block = cache_block_size(facts)
    sampling = SamplingConfig(max_tokens=32, temperature=0.0, seed=0)
    runs: list[Run] = []
    if label == "cache_off":
        points = off_points(points)
    config = ClientConfig(base_url=server.base_url, model=server.model, timeout_s=900, max_concurrency=1024)
    async with LLMClient(config) as client:
        worker = RolloutWorker(client, sampling)
        worker.on_record = lambda _r: bar.update(1)
        for repeat in repeats:
            # Odd repeats go through the points backwards, so no point is always the
            # first after an engine start (the slowest slot) or the last.
            ordered = list(enumerate(points))
            for k, point in ordered if repeat % 2 == 0 else ordered[::-1]:
                tag = f"[echo-prefix run {run_id}-{label[-3:]}{repeat}{k}]"
                cold, warm = build_prompts(point, shapes[point.share], tag, agents, seed=repeat)
                ids = encode_prompts(tokenizer, list(cold.values()) + list(warm.values()))
                plan = plan_tokens(ids[1:], block, warm=ids[:1])
                cold_phase = await measure_burst("cold", worker, cold, probe, server=label, repeat=repeat)
                warm_phase = await measure_burst("warm", worker, warm, probe, plan=plan, server=label, repeat=repeat)
                shared = shared_prefix_length([ids[0], ids[-1]]) if point.group_size < agents else None
                runs.append(Run(point, label, repeat, cold_phase, warm_phase, shared / len(ids[0]) if shared else None))
                f = warm_phase.figures
                bar.write(
                    f"  {label:9} r{repeat} {point.label:18} warm TTFT p50 {fmt(f.ttft.p50, 3)} s, "
                    f"{fmt(f.throughput_rps, 1)} req/s, hit rate {fmt(f.hit.value, 3)} "
                    f"(ceiling {fmt(f.hit.ceiling, 3)})"
                )
    return runs


def off_points(points: Sequence[Point]) -> list[Point]:
    """The cache-off baselines: one per prefix share, with one agent per prompt.

    With caching off every request computes its whole prompt, so group_size changes
    nothing the server does: the group points of a share compare against one baseline.
    """
    shares = list(dict.fromkeys(p.share for p in points))
    return [Point(share, 1) for share in shares]


def abba_blocks(repeats: int) -> list[tuple[str, list[int]]]:
    """ABBA over servers (on, off, off, on...), neighbouring blocks of one server merged into one engine start."""
    order = [("cache_on", "cache_off") if r % 2 == 0 else ("cache_off", "cache_on") for r in range(repeats)]
    blocks: list[tuple[str, list[int]]] = []
    for r, pair in enumerate(order):
        for server in pair:
            if blocks and blocks[-1][0] == server:
                blocks[-1][1].append(r)
            else:
                blocks.append((server, [r]))
    return blocks


def measure_all(
    points: Sequence[Point], shapes: dict[float | None, Shape | None], agents: int, repeats: int, tokenizer: Any
) -> tuple[list[Run], dict[str, Any]]:
    """Every block of repeats on its own embedded engine, one engine at a time; the runs and each server's facts."""
    run_id = uuid.uuid4().hex[:8]
    runs: list[Run] = []
    facts: dict[str, Any] = {}
    bar = tqdm(total=repeats * (len(points) + len(off_points(points))) * agents, desc=NAME, unit="req")
    try:
        for label, block_repeats in abba_blocks(repeats):
            with open_target(ServerTarget(), caching=label == "cache_on") as server:
                info = server_facts(server, log=bar.write)
                facts[label] = info.to_json()
                asyncio.run(warm_up_engine(server, log=bar.write))
                runs += asyncio.run(
                    run_block(server, info, label, block_repeats, points, shapes, agents, run_id, tokenizer, bar)
                )
    finally:
        bar.close()
    return runs, facts


# ----- figures ---------------------------------------------------------------------------


def _pooled_json(figures: PhaseFigures, runs: Sequence[Run]) -> dict[str, Any]:
    """The pooled warm figures' row, with what this benchmark adds: ideal speedup, prefix share, load."""
    planned, best = figures.planned_prompt_tokens, figures.ceiling_tokens
    shares = [r.prefix_share for r in runs if r.prefix_share is not None]
    # Prompt tokens over the tokens a perfect cache still computes: the prefill's best case.
    ideal = planned / (planned - best) if planned is not None and best is not None and planned > best else None
    return {
        **figures.to_json(),
        "ideal_prefill_speedup": ideal,
        "prefix_share": float(np.mean(shares)) if shares else None,
        "prompt_tokens_mean": planned / figures.requests if planned is not None and figures.requests else None,
        "load_avg_1m": [r.warm.load_avg_1m for r in runs],
    }


def summarize_point(point: Point, runs: Sequence[Run]) -> dict[str, Any]:
    """The on/off ratios of one point, pooled over repeats, plus each repeat's own ratio."""
    on = [r for r in runs if r.point == point and r.server == "cache_on"]
    off = [r for r in runs if r.point.share == point.share and r.server == "cache_off"]
    f_on, f_off = pool("warm", [r.warm.figures for r in on]), pool("warm", [r.warm.figures for r in off])
    per_repeat = []
    for a in on:
        b = next((x for x in off if x.repeat == a.repeat), None)
        if b is not None:
            fa, fb = a.warm.figures, b.warm.figures
            per_repeat.append(
                {
                    "repeat": a.repeat,
                    "ttft_p50_speedup": ratio(fb.ttft.p50, fa.ttft.p50),
                    "throughput_ratio": ratio(fa.throughput_rps, fb.throughput_rps),
                }
            )
    row_on, row_off = _pooled_json(f_on, on), _pooled_json(f_off, off)
    return {
        "point": point.label,
        "target_share": point.share,
        "group_size": point.group_size,
        "prefix_share": row_on["prefix_share"],
        "prompt_tokens_mean": row_on["prompt_tokens_mean"],
        "ttft_p50_speedup": ratio(f_off.ttft.p50, f_on.ttft.p50),
        "ttft_p99_speedup": ratio(f_off.ttft.p99, f_on.ttft.p99),
        "throughput_ratio_rps": ratio(f_on.throughput_rps, f_off.throughput_rps),
        "throughput_ratio_tokens": ratio(f_on.tokens_per_s, f_off.tokens_per_s),
        "hit_rate_on": f_on.hit.value,
        "hit_rate_off": f_off.hit.value,
        "hit_rate_ceiling": f_on.hit.ceiling,
        "hit_rate_vs_ceiling": f_on.hit.vs_ceiling,
        "ideal_prefill_speedup": row_on["ideal_prefill_speedup"],
        "per_repeat": per_repeat,
        "cache_on": row_on,
        "cache_off": row_off,
    }


HEADERS = (
    "workload",
    "share",
    "prompt tok",
    "TTFT p50 off/on",
    "TTFT p99 off/on",
    "req/s on/off",
    "tok/s on/off",
    "hit rate on",
    "ceiling",
    "hit/ceiling",
    "ideal prefill",
)
"""The table's columns (README section 1)."""


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One table row per point."""
    return [
        [
            r["point"],
            fmt(r["prefix_share"], 2),
            fmt(r["prompt_tokens_mean"], 0),
            fmt(r["ttft_p50_speedup"], 2, "x"),
            fmt(r["ttft_p99_speedup"], 2, "x"),
            fmt(r["throughput_ratio_rps"], 2, "x"),
            fmt(r["throughput_ratio_tokens"], 2, "x"),
            fmt(r["hit_rate_on"], 3),
            fmt(r["hit_rate_ceiling"], 3),
            fmt(r["hit_rate_vs_ceiling"], 2),
            fmt(r["ideal_prefill_speedup"], 1, "x"),
        ]
        for r in rows
    ]


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup against prefix share (one agent per prompt), and against group_size at the 50% share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    times = FuncFormatter(lambda v, _pos: f"{v:g}x")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    share_rows = [r for r in rows if r["group_size"] == 1 and r["prefix_share"]]
    share_rows.sort(key=lambda r: r["prefix_share"])
    x = [100 * r["prefix_share"] for r in share_rows]
    for key, label, style in (
        ("ideal_prefill_speedup", "ideal prefill speedup (prompt / uncached tokens)", "k--o"),
        ("ttft_p50_speedup", "measured TTFT p50 speedup (off / on)", "C0-o"),
        ("ttft_p99_speedup", "measured TTFT p99 speedup", "C0:^"),
        ("throughput_ratio_rps", "measured throughput ratio (on / off, req/s)", "C1-s"),
    ):
        ax1.plot(x, [r[key] for r in share_rows], style, label=label)
    ax1.set_xlabel("shared prefix, % of prompt tokens (group_size 1)")
    ax1.set_ylabel("speedup (x)")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(times)
    ax1.axhline(1, color="grey", lw=0.5)
    ax1.legend(fontsize=7)
    ax1.set_title("cache on vs off, by prefix share")
    group_rows = sorted((r for r in rows if r["target_share"] == 0.5), key=lambda r: r["group_size"])
    g = [r["group_size"] for r in group_rows]
    for key, label, style in (
        ("ideal_prefill_speedup", "ideal prefill speedup", "k--o"),
        ("ttft_p50_speedup", "TTFT p50 speedup", "C0-o"),
        ("throughput_ratio_rps", "throughput ratio (req/s)", "C1-s"),
    ):
        ax2.plot(g, [r[key] for r in group_rows], style, label=label)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(times)
    ax2.yaxis.set_minor_formatter(times)
    ax2.set_xticks(g, [str(v) for v in g])
    ax2.set_xlabel("group_size (agents per identical prompt), ~50% shared prefix")
    ax2.axhline(1, color="grey", lw=0.5)
    ax2.legend(fontsize=7)
    ax2.set_title("cache on vs off, by group size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, print the ratios, write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 agents, 3 points, 1 repeat (CI)")
    parser.add_argument("--agents", type=int, help="agents per point (default 48; quick 16)")
    parser.add_argument("--repeats", type=int, help="repeats per server (default 2; quick 1)")
    args = parser.parse_args(argv)
    agents = args.agents or (16 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 2)
    points = QUICK_POINTS if args.quick else FULL_POINTS
    if any(agents % p.group_size for p in points):
        parser.error(f"--agents must be a multiple of every group size ({sorted({p.group_size for p in points})})")

    from echo_env.launch.model import load_tokenizer

    tokenizer = load_tokenizer(None)
    # Keyed by share: the cache-off baselines use a share's shape with group_size 1.
    shares = dict.fromkeys(p.share for p in points)
    shapes = {share: None if share is None else choose_shape(share, tokenizer) for share in shares}
    runs, facts = measure_all(points, shapes, agents, repeats, tokenizer)

    rows = [summarize_point(p, runs) for p in points]
    body = table_rows(rows)
    print()
    print(f"prefix caching on vs off: warm phase, {agents - 1} requests in flight, {repeats} repeat(s) per server")
    print(table(HEADERS, body))
    png = result_path(NAME, args.quick).with_suffix(".png")
    # The figures first: a plot that fails must not take the measurements with it.
    path = write_result(
        NAME,
        args.quick,
        {
            "what": "warm phase on the embedded vLLM engine, prefix caching on vs off (ABBA, one engine at a time)",
            "settings": {
                "agents_per_point": agents,
                "repeats": repeats,
                "max_tokens": 32,
                "temperature": 0.0,
                "shapes": {str(k): s.__dict__ if s else "shipped prompt" for k, s in shapes.items()},
            },
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base, bf16)", servers=facts),
            "rows": rows,
            "markdown": markdown_table(HEADERS, body),
            "plot": png.name,
        },
    )
    plot(rows, png)
    print(f"\nwrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
