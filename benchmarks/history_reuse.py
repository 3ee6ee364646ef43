"""History reuse per turn: hit rate vs the ceiling that counts the answers, text vs token ids.

Multi-turn RL rollouts pay off most across turns: turn ``t+1``'s prompt is turn ``t``'s
prompt, the generated tokens and a little more. This script runs the prefix-cache test's
multi-turn workload (``turns=3``) on one embedded engine, once with each turn's prompt
rendered as text and tokenized again (``prompt_format=text``) and once token-in
(``prompt_format=tokens``: the last prompt's ids + the generated ids + the new turn's ids),
each with short one-line answers and with long answers (``long_answer=true``, no newline
stop, up to 160 tokens: more than a 128-token block each). Per turn it reports, all from the
test's own typed result:

- the hit rate from the server's counters vs the ceiling that counts the previous
  prompts' and answers' full blocks, and vs the prompt-only ceiling (the old one);
- the share of agent-turns whose prompt begins with the last prompt + generated ids, the
  first break's cause and the cache tokens the breaks cost;
- TTFT p50 of the turn's burst (turn 0: the warm burst), and its ratio to turn 0's.

Full: 4 x 2 agents (about 10 minutes on 2 busy cores, one engine start). ``--quick``:
2 x 2 agents (about 6 minutes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from common import fmt, machine_facts, markdown_table, ratio, table, write_result

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.record import NullSink
from echo_env.cachetest.results import TestResult
from echo_env.commands.test import run_test
from echo_env.config import build
from echo_env.launch.target import ServerTarget, open_target

NAME = "history_reuse"
TURNS = 3
LONG_TOKENS = 160
"""A long answer's limit: more than one 128-token CPU block, so its full blocks count."""


def _case(base_url: str, fmt_: str, long_answer: bool, agents: tuple[int, int]) -> TestResult:
    extra: dict[str, Any] = {"long_answer": True, "max_tokens": LONG_TOKENS} if long_answer else {}
    config = build(
        PrefixTestConfig, base_url=base_url, turns=TURNS, prompt_format=fmt_, batch_size=agents[0],
        group_size=agents[1], ttft_burst=2, min_repeats=2, max_repeats=2, **extra,
    )  # fmt: skip
    return run_test(config, NullSink())


def turn_rows(result: TestResult) -> list[dict[str, Any]]:
    """One row per turn (turn 0 is the warm burst), from the result's typed evidence."""
    run = result.runs[0]
    ev = run.evidence
    history = {h.phase: h for h in ev.history}
    rows: list[dict[str, Any]] = []
    first = ev.warm
    phases = [("turn0", first), *((p.name, p) for p in ev.turns)]
    for name, p in phases:
        if p is None:
            continue
        h = history.get(name)
        b = h.extension.first_break if h else None
        rows.append(
            {
                "turn": name,
                "hit_rate": p.hit.value,
                "ceiling": p.hit.ceiling,
                "prompt_only_ceiling": h.prompt_only_ceiling if h else None,
                "vs_ceiling": p.hit.vs_ceiling,
                "extension_share": h.extension.share if h else None,
                "generated_by": h.extension.generated_by if h else None,
                "lost_tokens": h.extension.lost_tokens if h else None,
                "first_break": b.describe() if b else None,
                "ttft_p50_s": p.ttft.p50,
                "ttft_vs_turn0": ratio(p.ttft.p50, first.ttft.p50) if first else None,
                "prompt_tokens": p.prompt_tokens,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases on one engine, print the table, write ``results/history_reuse[-quick].json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 x 2 agents (CI)")
    parser.add_argument("--base-url", help="a running server's OpenAI API root instead of the embedded engine")
    args = parser.parse_args(argv)
    agents = (2, 2) if args.quick else (4, 2)
    answers = (False, True)
    cases: list[dict[str, Any]] = []
    started = time.perf_counter()
    with open_target(ServerTarget(base_url=args.base_url)) as server:
        for long_answer in answers:
            for fmt_ in ("text", "tokens"):
                t0 = time.perf_counter()
                result = _case(server.base_url, fmt_, long_answer, agents)
                label = f"{fmt_}{' long' if long_answer else ''}"
                print(f"{label}: {result.verdict} ({result.decision.reason_id}) in {time.perf_counter() - t0:.0f} s")
                cases.append(
                    {
                        "case": label,
                        "prompt_format": fmt_,
                        "long_answer": long_answer,
                        "verdict": result.verdict,
                        "reason_id": result.decision.reason_id,
                        "reason": result.decision.reason,
                        "turns": turn_rows(result),
                    }
                )
    headers = ["case", "turn", "hit", "ceiling", "prompt-only", "extend", "lost tok", "TTFT p50", "vs turn0"]
    rows = [
        [c["case"], r["turn"], fmt(r["hit_rate"], 3), fmt(r["ceiling"], 3), fmt(r["prompt_only_ceiling"], 3),
         fmt(r["extension_share"]), r["lost_tokens"], fmt(r["ttft_p50_s"], 3, " s"), fmt(r["ttft_vs_turn0"])]
        for c in cases for r in c["turns"]
    ]  # fmt: skip
    print(table(headers, rows))
    path = write_result(
        NAME,
        args.quick,
        {
            "cases": cases,
            "table_markdown": markdown_table(headers, rows),
            "wall_s": time.perf_counter() - started,
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base)"),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
