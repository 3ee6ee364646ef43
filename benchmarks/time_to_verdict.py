"""Time to verdict: the prefix-cache test's old design against its new one, on one engine, side by side.

The issue: "today the default test takes about 140 s from a healthy engine to the verdict
on a 2-core machine; goal: at most 60 s from a healthy engine to a verdict of the same
confidence". Both designs run here against ONE embedded engine, started once and warmed
with one unmeasured burst, in the order old, new, new, old (ABBA: a drift in the shared
machine's load lands on both), each on a run tag of its own so nothing is cached for it.

- **old** (the design before the TTFT repeats), rebuilt from the package's own parts (the
  workload's prompts, the rollout worker, ``measure_phase``): 3 repeats, each on a new
  prefix, of ``cold`` (the first agent alone), ``warm`` (the other
  ``batch_size x group_size - 1`` = 127 agents all in flight), ``warm_single`` (the cold
  prompt again) and ``control`` (127 requests of the same lengths, each with a tag of its
  own). Each repeat's prompts are tokenized by the server before it runs, as the old
  runner did. The verdict is the old one: caching on, warm hit rate (counters, pooled over
  the repeats) at 90% of its ceiling, control hit rate at most 0.05, and
  ``bootstrap_ratio_ci`` of control over warm TTFT medians, every request of the 3
  repeats pooled, PASS when its low end is above 1.0.
- **new**: ``run_prefix_test`` with the defaults (cold, the 127-request warm burst,
  warm_single, then pairs of 8-request warm and control bursts until the interval over
  repeats decides, 3 to 8 repeats, minimum effect 1.2x). Its ``time_to_verdict_s`` is
  from the moment the server is open to the cache-on verdict; the files it writes after
  (summary, CSV, plots) are in its wall time only.

"Time to verdict" is from a healthy engine to the verdict: the server's facts, the
tokenization, every phase and the statistics, for both. Neither counts the engine start.
The two TTFT ratios are not the same statistic: the old one pools requests (and so
calls chance a gain: ``ttft_false_positive.py``), the new one has one ratio per repeat.

Full: old, new, new, old (about 10 minutes with the engine start). ``--quick``: old, new.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.workload import build_workload, control_tag
from echo_env.commands.test import run_prefix_test
from echo_env.config import build
from echo_env.launch.target import OpenServer, ServerTarget, open_target
from echo_env.measure.figures import PhaseFigures, pool
from echo_env.measure.phase import CounterProbe
from echo_env.measure.stats import RatioCI, bootstrap_ratio_ci
from echo_env.measure.tokens import TokenPlan, plan_tokens
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient
from echo_env.wire.info import ServerFacts, read_server_facts, tokenize_prompts

NAME = "time_to_verdict"
OLD_REPEATS = 3
"""Repeats of cold, warm, warm_single and control in the old design."""
OLD_HIT_FRACTION = 0.9
"""The old verdict's share of the ceiling the warm hit rate had to reach."""
OLD_CONTROL_HIT_LIMIT = 0.05
"""Above this hit rate the old verdict took the control phase for no uncached baseline."""
GOAL_S = 60.0
"""The issue's goal: seconds from a healthy engine to the verdict."""


@dataclass(frozen=True)
class Outcome:
    """One run of one design: how long it took to its verdict, and what the verdict said."""

    design: str
    """``old`` or ``new``."""
    position: int
    """Where it ran in the sequence (0 first)."""
    time_to_verdict_s: float | None
    """From a healthy engine to the verdict (None: the run stopped before one)."""
    wall_s: float
    """The whole call (for the new design: writing its files and plots included)."""
    sending_s: float
    """The phases' own wall time (requests in flight), summed."""
    requests: int
    """Requests sent."""
    failed: int
    """Requests that failed (a timeout included): their TTFTs are missing from the verdict."""
    repeats: int
    """TTFT repeats run."""
    verdict: str
    """PASS, FAIL or UNKNOWN."""
    reason: str
    """The verdict's sentence."""
    ttft_ratio: float | None
    """Control over warm TTFT, as the design reports it."""
    ttft_low: float | None
    """Low end of its interval."""
    ttft_high: float | None
    """High end of its interval."""
    ttft_unit: str
    """What the interval's samples are."""
    hit_rate: float | None
    """The warm hit rate the verdict read."""
    hit_rate_ceiling: float | None
    """Its ceiling."""
    load_avg_start: float
    """The 1-minute load average when the run started."""
    load_avg_end: float
    """And when it ended."""


# ----- the old design ----------------------------------------------------------------------


def old_verdict(
    caching_enabled: bool | None,
    shared_plan: TokenPlan | None,
    warm: PhaseFigures,
    control: PhaseFigures,
    ci: RatioCI | None,
) -> tuple[str, str]:
    """The old runner's verdict, in its order of checks, from the pooled figures (pure)."""
    hit = warm.hit
    if caching_enabled is False:
        return "FAIL", "caching disabled on the server"
    if shared_plan is not None and shared_plan.cacheable_shared_tokens == 0:
        return "FAIL", "prefix not shared in whole blocks"
    if warm.requests and warm.finished == 0:
        return "UNKNOWN", f"no warm request finished ({warm.first_error})"
    if warm.counters is not None and warm.counters.reset:
        return "UNKNOWN", "the server restarted during a warm phase"
    if hit.value is None:
        return "UNKNOWN", "cannot see cache hits"
    if hit.value == 0:
        return "FAIL", "hits at zero"
    if hit.ceiling and hit.value < OLD_HIT_FRACTION * hit.ceiling:
        return "FAIL", f"hit rate far under the ceiling: {hit.value:.3f} vs {hit.ceiling:.3f}"
    if control.hit.value is not None and control.hit.value > OLD_CONTROL_HIT_LIMIT:
        return "UNKNOWN", f"the control phase hit the cache ({control.hit.value:.2f})"
    if ci is None:
        return "UNKNOWN", "too few requests finished to compare TTFT"
    if ci.low <= 1.0:
        return (
            "FAIL",
            f"warm TTFT not lower than control beyond the CI ({ci.ratio:.2f}x, CI {ci.low:.2f}-{ci.high:.2f})",
        )
    ceiling = f" of a {hit.ceiling:.2f} ceiling" if hit.ceiling else ""
    return (
        "PASS",
        f"hit rate {hit.value:.2f}{ceiling}, warm TTFT {ci.ratio:.1f}x faster (CI {ci.low:.2f}-{ci.high:.2f})",
    )


def _plans(ids: list[list[int]] | None, block: int, warm_n: int) -> dict[str, TokenPlan | None]:
    """Each old phase's token plan from one repeat's ids (cold, warm, control), as the old runner made them."""
    if ids is None:
        return dict.fromkeys(("cold", "warm", "warm_single", "control", "shared"))
    cold, warm, control = ids[:1], ids[1 : 1 + warm_n], ids[1 + warm_n :]
    return {
        "cold": plan_tokens(cold, block),
        "warm": plan_tokens(warm, block, warm=cold),
        "warm_single": plan_tokens(cold, block, warm=cold),
        "control": plan_tokens(control, block),
        "shared": plan_tokens(cold + warm, block),
    }


async def _old_repeat(
    config: PrefixTestConfig,
    worker: RolloutWorker,
    facts: ServerFacts,
    probe: CounterProbe,
    tag: str,
    repeat: int,
    log: Callable[[str], None],
) -> tuple[list[PhaseFigures], TokenPlan | None]:
    """One repeat of the old design (cold, warm, warm_single, control): its phases and its shared-prefix plan."""
    work = build_workload(dataclasses.replace(config, seed=config.seed + repeat), tag)
    cold, warm = work.cold, work.warm
    # A tag of its own per control request in place of the run tag: same lengths, nothing to hit.
    control = {
        f"control{i}": p.replace(work.task.run_tag, control_tag(tag, repeat, i), 1) for i, p in enumerate(warm.values())
    }
    tokenized = await tokenize_prompts(facts, [*cold.values(), *warm.values(), *control.values()])
    plans = _plans(tokenized.ids if tokenized else None, cache_block_size(facts), len(warm))
    first, prompt = next(iter(cold.items()))
    phases: list[PhaseFigures] = []
    for name, prompts in (
        ("cold", cold),
        ("warm", warm),
        ("warm_single", {f"{first}-again": prompt}),
        ("control", control),
    ):
        measured = await measure_burst(name, worker, prompts, probe, plan=plans[name], repeat=repeat, log=log)
        phases.append(measured.figures)
        log(f"  old #{repeat} {name}: {measured.figures.requests} requests in {measured.figures.wall_s:.1f} s")
    return phases, plans["shared"]


async def old_design(config: PrefixTestConfig, server: OpenServer, log: Callable[[str], None] = print) -> Outcome:
    """The old design's run on ``server``: 3 x (cold, warm, warm_single, control), pooled TTFT bootstrap."""
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    target = config.server
    client_config = ClientConfig(
        base_url=server.base_url, model=server.model, timeout_s=target.timeout_s, max_concurrency=target.max_concurrency
    )
    run_id = uuid.uuid4().hex[:8]
    phases: list[PhaseFigures] = []
    shared: TokenPlan | None = None
    async with LLMClient(client_config) as client:
        facts = await read_server_facts(server.base_url, await client.model(), None, embedded=server.embedded)
        probe = CounterProbe.of_server(facts)
        sampling = SamplingConfig(
            api=config.api, max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed
        )
        worker = RolloutWorker(client, sampling)
        for repeat in range(OLD_REPEATS):
            figures, repeat_shared = await _old_repeat(
                config, worker, facts, probe, f"{run_id}-on{repeat:02d}", repeat, log
            )
            shared = shared or repeat_shared
            phases += figures
    warm_all = pool("warm", [p for p in phases if p.name == "warm"])
    control_all = pool("control", [p for p in phases if p.name == "control"])
    ci = None
    if len(control_all.ttft_samples) >= 2 and len(warm_all.ttft_samples) >= 2:
        ci = bootstrap_ratio_ci(control_all.ttft_samples, warm_all.ttft_samples, seed=config.seed)
    verdict, reason = old_verdict(facts.caching_enabled, shared, warm_all, control_all, ci)
    decided = time.perf_counter() - start
    return Outcome(
        design="old",
        position=-1,
        time_to_verdict_s=decided,
        wall_s=time.perf_counter() - start,
        sending_s=sum(p.wall_s for p in phases),
        requests=sum(p.requests for p in phases),
        failed=sum(p.failed for p in phases),
        repeats=OLD_REPEATS,
        verdict=verdict,
        reason=reason,
        ttft_ratio=ci.ratio if ci else None,
        ttft_low=ci.low if ci else None,
        ttft_high=ci.high if ci else None,
        ttft_unit=f"requests pooled over {OLD_REPEATS} repeats (bootstrap, 95%)",
        hit_rate=warm_all.hit.value,
        hit_rate_ceiling=warm_all.hit.ceiling,
        load_avg_start=load_start,
        load_avg_end=os.getloadavg()[0],
    )


# ----- the new design ----------------------------------------------------------------------


def new_design(server: OpenServer, out_dir: Path) -> Outcome:
    """``run_prefix_test`` with its defaults on ``server``."""
    load_start = os.getloadavg()[0]
    config = build(PrefixTestConfig, base_url=server.base_url, out_dir=str(out_dir))
    start = time.perf_counter()
    result = run_prefix_test(config, show_progress=True)
    wall = time.perf_counter() - start
    run = result.main
    ttft = run.evidence.ttft if run else None
    ci = ttft.ci if ttft else None
    warm = run.evidence.warm if run else None
    return Outcome(
        design="new",
        position=-1,
        time_to_verdict_s=result.time_to_verdict_s,
        wall_s=wall,
        sending_s=sum(p.wall_s for p in run.phases) if run else 0.0,
        requests=sum(p.requests for p in run.phases) if run else 0,
        failed=sum(p.failed for p in run.phases) if run else 0,
        repeats=len(ttft.ratios) if ttft else 0,
        verdict=result.verdict,
        reason=result.decision.reason,
        ttft_ratio=ci.ratio if ci else None,
        ttft_low=ci.low if ci else None,
        ttft_high=ci.high if ci else None,
        ttft_unit="repeats (t-interval, 95% over every look)",
        hit_rate=warm.hit.value if warm else None,
        hit_rate_ceiling=warm.hit.ceiling if warm else None,
        load_avg_start=load_start,
        load_avg_end=os.getloadavg()[0],
    )


# ----- running both ------------------------------------------------------------------------


def measure_all(order: Sequence[str], base_url: str | None) -> tuple[list[Outcome], dict[str, Any]]:
    """Open one server (the embedded engine unless ``base_url``), warm it, run the designs in ``order``."""
    outcomes: list[Outcome] = []
    with open_target(ServerTarget(base_url=base_url)) as server, tempfile.TemporaryDirectory() as scratch:
        facts = server_facts(server).to_json()
        if server.embedded:
            asyncio.run(warm_up_engine(server))
        config = build(PrefixTestConfig, base_url=server.base_url)
        for position, design in enumerate(order):
            print(f"\n--- {position + 1}/{len(order)}: the {design} design", flush=True)
            if design == "old":
                outcome = asyncio.run(old_design(config, server))
            else:
                outcome = new_design(server, Path(scratch) / f"new-{position}")
            outcome = dataclasses.replace(outcome, position=position)
            outcomes.append(outcome)
            print(
                f"{design}: {outcome.verdict} after {fmt(outcome.time_to_verdict_s, 1)} s ({outcome.requests} "
                f"requests, {outcome.repeats} TTFT repeats; load {outcome.load_avg_start:.1f} -> "
                f"{outcome.load_avg_end:.1f}): {outcome.reason}",
                flush=True,
            )
    return outcomes, facts


def pairs(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """new/old time to verdict within each neighbouring (old, new) or (new, old) pair."""
    out = []
    for i in range(0, len(outcomes) - 1, 2):
        a, b = outcomes[i], outcomes[i + 1]
        old, new = (a, b) if a.design == "old" else (b, a)
        out.append(
            {
                "pair": i // 2,
                "old_s": old.time_to_verdict_s,
                "new_s": new.time_to_verdict_s,
                "new_over_old": ratio(new.time_to_verdict_s, old.time_to_verdict_s),
            }
        )
    return out


HEADERS = (
    "#",
    "design",
    "time to verdict",
    "sending",
    "requests (failed)",
    "TTFT repeats",
    "verdict",
    "TTFT control/warm (95% CI)",
    "hit rate / ceiling",
    "load avg",
)
"""The table's columns."""


def table_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    """One row per run, in the order run."""
    return [
        [
            str(o.position + 1),
            o.design,
            fmt(o.time_to_verdict_s, 1, " s"),
            fmt(o.sending_s, 1, " s"),
            f"{o.requests} ({o.failed})",
            str(o.repeats),
            o.verdict,
            f"{fmt(o.ttft_ratio, 2, 'x')} ({fmt(o.ttft_low, 2)}-{fmt(o.ttft_high, 2)})",
            f"{fmt(o.hit_rate, 3)} / {fmt(o.hit_rate_ceiling, 3)}",
            f"{o.load_avg_start:.1f}-{o.load_avg_end:.1f}",
        ]
        for o in outcomes
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the designs in ABBA order on one server, print the table and the ratios, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="old, new (instead of old, new, new, old)")
    parser.add_argument("--base-url", help="a running server's OpenAI API root instead of the embedded engine")
    args = parser.parse_args(argv)
    order = ("old", "new") if args.quick else ("old", "new", "new", "old")

    outcomes, facts = measure_all(order, args.base_url)
    body = table_rows(outcomes)
    by_pair = pairs(outcomes)
    old_s = median([o.time_to_verdict_s for o in outcomes if o.design == "old"])
    new_s = median([o.time_to_verdict_s for o in outcomes if o.design == "new"])
    print("\ntime from a healthy engine to the verdict, old design vs new, one engine, in the order run")
    print(table(HEADERS, body))
    for p in by_pair:
        print(
            f"pair {p['pair'] + 1}: new/old {fmt(p['new_over_old'], 2, 'x')} ({p['new_s']:.1f} s vs {p['old_s']:.1f} s)"
        )
    goal = new_s is not None and new_s <= GOAL_S
    print(f"median: old {fmt(old_s, 1, ' s')}, new {fmt(new_s, 1, ' s')}; goal <= {GOAL_S:.0f} s: ", end="")
    print("met" if goal else "missed")
    path = write_result(
        NAME,
        args.quick,
        {
            "what": "seconds from a healthy engine to the verdict, old test design vs new, one engine, ABBA order",
            "settings": {
                "order": list(order),
                "old_repeats": OLD_REPEATS,
                "new_config": PrefixTestConfig().public(),
                "goal_s": GOAL_S,
            },
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base, bf16)", server=facts),
            "runs": [dataclasses.asdict(o) for o in outcomes],
            "pairs": by_pair,
            "median_old_s": old_s,
            "median_new_s": new_s,
            "median_new_over_old": ratio(new_s, old_s),
            "goal_met": goal,
            "load_avg_1m": [[o.load_avg_start, o.load_avg_end] for o in outcomes],
            "markdown": markdown_table(HEADERS, body),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
