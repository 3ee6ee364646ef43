"""Routing many replicas: which vllm-router policy lets the prefix cache pay.

Two embedded vLLM replicas (one core and a 1 GiB KV cache each) behind PyPI
``vllm-router``. For each policy the router is restarted (about a second) while the
replicas stay up, and three workloads are sent through it, each on a prefix of its own
and on freshly reset caches:

- ``default``: the shipped echo workload, groups of agents sending the same prompt; the
  groups differ only in the word, inside the last (never cached) block, so they share
  nothing cacheable beyond the system prompt;
- ``group_text``: each group's prompt carries about three blocks of its own worked
  examples after the shared text, so a group gains from landing where its text is;
- ``multi_turn``: sessions of several turns, each turn's prompt extending the last one's
  with the reply; a session gains from staying on one replica.

Every request carries its group (or session) in the ``X-Session-ID`` header, which
vllm-router's ``consistent_hash`` hashes (the other policies ignore it);
``consistent_hash (no key)`` leaves it out, and the router then hashes the prompt text,
so identical prompts still meet on one replica. (The OpenAI ``user`` body field, which
vllm-router's docs list as a key, was not honoured for ``/v1/completions`` in 0.1.17.)

The replicas run with ``--enable-scale-out`` (``FleetConfig.scale_out``): ``cache_aware``
tokenizes each request through a replica's ``POST /v1/completions/render``, which vLLM
0.32 refuses (403) otherwise, and the router then spreads requests as round_robin does.
``results/routing.json`` was taken before that switch (its cache_aware rows are that
fallback); ``results/routing-scale-out.json`` has cache_aware with the endpoint on.

Each replica's own ``/metrics`` is read before and after every phase (the router's
``/metrics`` answers for one replica per call). Figures: the fleet
hit rate against the workload's three ceilings (one server, affinity, scatter; see
:mod:`echo_env.measure.fleet`), each replica's share of requests, client TTFT p50/p99,
requests per second, the routing verdict, and each policy's ratios against round_robin
on the same workload.

Full mode: 8 groups x 4 agents (32 requests), 8 sessions x 10 turns, six policy runs
(about 25 minutes on a busy 2-core machine, the fleet start included). ``--quick``: 4 x 4
agents, 4 sessions x 2 turns, three policies. The machine is shared: compare policies by
their ratios to round_robin on the same workload, not by absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import fmt, machine_facts, markdown_table, ratio, table, warm_up_engine, write_result

from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.envs.task import EchoTask, Turn, default_system_prompt, find_worked_examples, grade, with_examples
from echo_env.errors import MetricsError
from echo_env.launch.engine import group_members
from echo_env.launch.fleet import EmbeddedFleet, FleetConfig, mem_available_gib
from echo_env.measure.fleet import FleetEvidence, fleet_ceilings, router_worker_requests
from echo_env.measure.replicas import ReplicaProbe, fleet_evidence
from echo_env.measure.stats import summarize
from echo_env.rollout.worker import SESSION_HEADER
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord
from echo_env.wire.metrics import parse_prometheus
from echo_env.wire.tokenizer import encode_prompts

NAME = "routing"
MAX_TOKENS = 8
WORKLOADS = ("default", "group_text", "multi_turn")


@dataclass(frozen=True)
class PolicyRun:
    """One router configuration of the sweep."""

    label: str
    """How the table names it."""
    policy: str
    """The vllm-router policy."""
    session_key: bool
    """Whether requests carry their group as the ``X-Session-ID`` header."""


FULL_RUNS = (
    PolicyRun("round_robin", "round_robin", True),
    PolicyRun("random", "random", True),
    PolicyRun("cache_aware", "cache_aware", True),
    PolicyRun("consistent_hash", "consistent_hash", True),
    PolicyRun("consistent_hash (no key)", "consistent_hash", False),
    PolicyRun("power_of_two", "power_of_two", True),
)
QUICK_RUNS = (FULL_RUNS[0], FULL_RUNS[2], FULL_RUNS[3])


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    groups: int
    """Groups of the default and group_text workloads."""
    group_size: int
    """Agents per group."""
    sessions: int
    """Sessions of the multi_turn workload."""
    turns: int
    """Turns per session."""
    group_examples: int
    """Worked examples of each group's own text (about 12 tokens each)."""


# Echo turns add ~21 tokens each, so a session fills a 128-token block of its own only
# after about 6 turns and a later turn can hit it from the 8th on: with 7 turns affinity
# and scatter tie (0.848 both); with 10 they part (0.873 vs 0.855).
FULL = Sizes(groups=8, group_size=4, sessions=8, turns=10, group_examples=24)
QUICK = Sizes(groups=4, group_size=4, sessions=4, turns=2, group_examples=24)


# ----- the workloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request of a wave."""

    prompt: str
    """The plain-text prompt."""
    group: str
    """Its group or session (the session key)."""


def _pool() -> list[str]:
    used = {w for _, _, w in find_worked_examples(default_system_prompt())}
    return [w for w in EchoTask().words if w not in used]


def group_task(tag: str, group: int, examples: int, seed: int) -> EchoTask:
    """A task whose system prompt holds ``examples`` worked examples of this group's own after the shared ones."""
    pool = _pool()
    rng = np.random.default_rng(seed * 100_003 + group)
    # The first added word differs between groups, so groups part right there.
    first = pool[group % len(pool)]
    rest = [pool[int(i)] for i in rng.choice(len(pool), size=examples + 1, replace=False) if pool[int(i)] != first]
    shared = default_system_prompt()
    keep = len(find_worked_examples(shared))
    return EchoTask(system_prompt=with_examples(shared, keep, [first, *rest][:examples]), run_tag=tag)


def single_wave(workload: str, tag: str, sizes: Sizes, seed: int) -> list[Request]:
    """The one wave of the ``default`` or ``group_text`` workload: each group's agents in a row."""
    words = EchoTask().sample_words(sizes.groups, seed=seed)
    out: list[Request] = []
    for g, word in enumerate(words):
        task = EchoTask(run_tag=tag) if workload == "default" else group_task(tag, g, sizes.group_examples, seed)
        text = task.transcript(word)
        out += [Request(text, f"g{g}")] * sizes.group_size
    return out


@dataclass
class Session:
    """One multi-turn conversation."""

    key: str
    """Its session key."""
    words: list[str]
    """The word asked at each turn."""
    history: list[Turn]
    """The answered turns so far."""


def new_sessions(tag: str, sizes: Sizes, seed: int) -> list[Session]:
    """Sessions of ``sizes.turns`` distinct words each."""
    rng = np.random.default_rng(seed)
    words = list(dict.fromkeys(EchoTask().words))
    out = []
    for s in range(sizes.sessions):
        picks = [words[int(i)] for i in rng.choice(len(words), size=sizes.turns, replace=False)]
        out.append(Session(f"s{s}", picks, []))
    return out


def session_prompt(task: EchoTask, session: Session) -> str:
    """The session's next prompt: the first word's request, and every answered turn since."""
    return task.transcript(session.words[0], session.history)


def record_turn(session: Session, reply: str) -> None:
    """Grade the reply and append the turn (the next word follows whatever the grade)."""
    t = len(session.history)
    word = session.words[t]
    nxt = session.words[t + 1] if t + 1 < len(session.words) else None
    session.history.append(Turn(reply=reply, feedback=grade(reply, word).feedback, next_word=nxt))


# ----- one phase ---------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """A workload sent through one policy."""

    run: PolicyRun
    workload: str
    records: list[RequestRecord]
    prompts: list[str]
    groups: list[str]
    wall_s: float
    evidence: FleetEvidence
    router_counts: dict[str, float]


def _router_counts(url: str) -> dict[str, float]:
    with contextlib.suppress(httpx.HTTPError, MetricsError):
        return router_worker_requests(parse_prometheus(httpx.get(url, timeout=10).text, origin=url))
    return {}


async def _send(config: ClientConfig, batch: Sequence[Request], keyed: bool) -> list[RequestRecord]:
    async with LLMClient(config) as client:
        return list(
            await asyncio.gather(
                *(
                    client.generate(
                        r.prompt,
                        max_tokens=MAX_TOKENS,
                        temperature=0.0,
                        stop=["\n"],
                        headers={SESSION_HEADER: r.group} if keyed else None,
                        tag=r.group,
                    )
                    for r in batch
                )
            )
        )


async def run_phase(
    fleet: EmbeddedFleet, run: PolicyRun, workload: str, sizes: Sizes, seed: int, tokenizer: Any
) -> PhaseResult:
    """Reset the caches, send one workload through the router, read every replica around it."""
    tag = f"[echo-prefix routing {uuid.uuid4().hex[:8]}]"
    async with httpx.AsyncClient(timeout=30) as http:
        for root in fleet.replica_urls:
            (await http.post(f"{root}/reset_prefix_cache")).raise_for_status()
    # Each replica's own /metrics, the same reader `echo-prefix test` uses on a fleet.
    replicas = ReplicaProbe(fleet.replica_urls, model_name=fleet.served_model_name)
    before = await replicas.counters()
    router_before = _router_counts(fleet.router_metrics_url)
    config = ClientConfig(base_url=fleet.base_url, model=fleet.served_model_name, timeout_s=900, max_concurrency=1024)
    records: list[RequestRecord] = []
    prompts: list[str] = []
    groups: list[str] = []
    wall = 0.0
    if workload == "multi_turn":
        task = EchoTask(run_tag=tag)
        sessions = new_sessions(tag, sizes, seed)
        for _ in range(sizes.turns):
            wave = [Request(session_prompt(task, s), s.key) for s in sessions]
            start = time.perf_counter()
            got = await _send(config, wave, run.session_key)
            wall += time.perf_counter() - start
            for s, rec in zip(sessions, got):
                record_turn(s, rec.outputs[0].text if rec.ok and rec.outputs else "")
            records += got
            prompts += [r.prompt for r in wave]
            groups += [r.group for r in wave]
    else:
        wave = single_wave(workload, tag, sizes, seed)
        start = time.perf_counter()
        records = await _send(config, wave, run.session_key)
        wall = time.perf_counter() - start
        prompts, groups = [r.prompt for r in wave], [r.group for r in wave]
    after = await replicas.counters()
    for url, why in replicas.errors.items():
        print(f"metrics of {url} unavailable: {why}")
    router_after = _router_counts(fleet.router_metrics_url)
    ids = encode_prompts(tokenizer, prompts)
    ceilings = fleet_ceilings(ids, groups, block_size=128, replicas=len(fleet.replicas))
    sent = sum(1 for r in records if r.ok)
    evidence = fleet_evidence(
        fleet.replica_urls, before, after, requests_sent=sent, ceilings=ceilings, policy=run.policy
    )
    counts = {w: router_after.get(w, 0.0) - router_before.get(w, 0.0) for w in router_after}
    return PhaseResult(run, workload, records, prompts, groups, wall, evidence, counts)


def summarize_phase(p: PhaseResult) -> dict[str, Any]:
    """The phase's figures, JSON-ready."""
    ok = [r for r in p.records if r.ok]
    ttft = summarize([r.ttft_s for r in ok if r.ttft_s is not None])
    e, c = p.evidence, p.evidence.ceilings
    assert c is not None
    decision = decide_fleet(e)
    return {
        "policy": p.run.label,
        "router_policy": p.run.policy,
        "session_key": p.run.session_key,
        "workload": p.workload,
        "requests": len(p.records),
        "failed": len(p.records) - len(ok),
        "first_error": next((r.error for r in p.records if not r.ok), None),
        "wall_s": p.wall_s,
        "requests_per_s": len(ok) / p.wall_s if p.wall_s > 0 else None,
        "ttft_p50_s": ttft.p50,
        "ttft_p99_s": ttft.p99,
        "fleet_hit_rate": e.fleet_hit_rate,
        "ceiling_one_server": c.one_server,
        "ceiling_affinity": c.affinity,
        "ceiling_round_robin": c.round_robin,
        "ceiling_scatter": c.scatter,
        "hit_vs_affinity": ratio(e.fleet_hit_rate, c.affinity),
        "replica_requests": list(e.replica_requests or ()),
        "replica_shares": list(e.request_shares or ()),
        "replica_hit_rates": [r.hit_rate for r in e.replicas],
        "router_counted": p.router_counts,
        "load_avg_1m_after": os.getloadavg()[0],
        "prompt_tokens": c.prompt_tokens,
        "verdict": decision.verdict,
        "reason": decision.reason,
        "reason_id": decision.reason_id,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ratios against the first round_robin row of its workload (above 1 is better)."""
    base = {r["workload"]: r for r in reversed(rows) if r["policy"] == "round_robin"}
    for r in rows:
        b = base.get(r["workload"])
        if b is None:
            continue
        r["ttft_p50_vs_rr"] = ratio(b["ttft_p50_s"], r["ttft_p50_s"])
        r["ttft_p99_vs_rr"] = ratio(b["ttft_p99_s"], r["ttft_p99_s"])
        r["rps_vs_rr"] = ratio(r["requests_per_s"], b["requests_per_s"])
        hr, bhr = r["fleet_hit_rate"], b["fleet_hit_rate"]
        r["hit_rate_minus_rr"] = hr - bhr if hr is not None and bhr is not None else None


def fleet_rss_gib(fleet: EmbeddedFleet) -> float:
    """Resident memory of every replica's processes, GiB."""
    total_kb = 0
    for r in fleet.replicas:
        for pid in group_members(r.pid) if r.pid else []:
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
    return total_kb / 1024**2


# ----- main --------------------------------------------------------------------------------


async def _warm_up(fleet: EmbeddedFleet) -> None:
    # A fresh engine's first big prefills run slow; warm both replicas at once (one core each).
    await asyncio.gather(*(warm_up_engine(r, prompts=4) for r in fleet.replicas))


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizes, tuple[PolicyRun, ...]]:
    """The command line, with the workload sizes and policy runs it picks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, three policies (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="only these workloads")
    parser.add_argument("--policies", nargs="+", help="only these policy runs, by label (e.g. round_robin random)")
    parser.add_argument("--turns", type=int, help="turns per multi_turn session")
    parser.add_argument("--name", help="result file name (default: routing, or routing-<workloads> for a part)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.turns:
        sizes = replace(sizes, turns=args.turns)
    runs: tuple[PolicyRun, ...] = QUICK_RUNS if args.quick else FULL_RUNS
    if args.policies:
        known = {r.label.replace(" ", ""): r for r in FULL_RUNS}
        unknown = [p for p in args.policies if p.replace(" ", "") not in known]
        if unknown:
            parser.error(f"unknown policy runs {unknown}: choose from {[r.label for r in FULL_RUNS]}")
        runs = tuple(known[p.replace(" ", "")] for p in args.policies)
    return args, sizes, runs


def _run_sweep(
    runs: Sequence[PolicyRun], workloads: Sequence[str], sizes: Sizes, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fleet, one router restart per policy run, every workload under each: the rows and the fleet's facts."""
    from echo_env.launch.model import load_tokenizer

    tokenizer = load_tokenizer(None)
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"mem_available_before_gib": mem_available_gib()}
    start = time.perf_counter()
    config = FleetConfig(replicas=2, router=runs[0].policy, kv_cache_gib=1, dev_mode=True)
    with EmbeddedFleet(config) as fleet:
        facts.update(
            {
                "fleet_start_s": time.perf_counter() - start,
                "replica_start_s": fleet.timings.replicas_s,
                "replica_rss_gib": fleet_rss_gib(fleet),
                "mem_available_up_gib": mem_available_gib(),
                "replicas": fleet.replica_urls,
                "cpu_binds": [r.extra_env.get("VLLM_CPU_OMP_THREADS_BIND") for r in fleet.replicas],
            }
        )
        print(f"fleet up in {facts['fleet_start_s']:.0f} s: {fleet.replica_urls} behind {fleet.base_url}")
        asyncio.run(_warm_up(fleet))
        for i, run in enumerate(runs):
            if i > 0:
                fleet.restart_router(run.policy)
            for workload in workloads:
                phase = asyncio.run(run_phase(fleet, run, workload, sizes, seed, tokenizer))
                row = summarize_phase(phase)
                rows.append(row)
                print(
                    f"{run.label:26s} {workload:11s} hit {fmt(row['fleet_hit_rate'], 3)} "
                    f"(affinity {row['ceiling_affinity']:.3f}, scatter {row['ceiling_scatter']:.3f}) "
                    f"shares {[round(s, 2) for s in row['replica_shares']]} {row['verdict']}"
                )
        facts["router_restart_s"] = fleet.timings.router_s
    add_ratios(rows)
    return rows, facts


def _rows_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "policy", "workload", "hit rate", "one server", "affinity", "scatter", "hit/affinity", "shares",
        "TTFT p50", "TTFT p99", "req/s", "p50 vs rr", "req/s vs rr", "verdict",
    ]  # fmt: skip
    body = [
        [
            r["policy"],
            r["workload"],
            fmt(r["fleet_hit_rate"], 3),
            fmt(r["ceiling_one_server"], 3),
            fmt(r["ceiling_affinity"], 3),
            fmt(r["ceiling_scatter"], 3),
            fmt(r["hit_vs_affinity"], 2),
            "/".join(f"{s:.0%}" for s in r["replica_shares"]) or "-",
            fmt(r["ttft_p50_s"], 3, " s"),
            fmt(r["ttft_p99_s"], 3, " s"),
            fmt(r["requests_per_s"], 2),
            fmt(r.get("ttft_p50_vs_rr"), 2, "x"),
            fmt(r.get("rps_vs_rr"), 2, "x"),
            r["verdict"],
        ]
        for r in rows
    ]
    return headers, body


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, print the table, write the JSON."""
    args, sizes, runs = _parse_args(argv)
    workloads = tuple(args.workloads or WORKLOADS)
    # A partial sweep writes a file of its own, so it never replaces the whole sweep's.
    name = args.name or (NAME if workloads == WORKLOADS and not args.policies else f"{NAME}-{'-'.join(workloads)}")
    rows, facts = _run_sweep(runs, workloads, sizes, args.seed)
    headers, body = _rows_table(rows)
    print()
    print(table(headers, body))
    path = write_result(
        name,
        args.quick,
        {
            "what": "2 vLLM replicas (1 core, 1 GiB KV each) behind vllm-router, one router restart per policy",
            "settings": {
                "sizes": sizes.__dict__,
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "runs": [r.__dict__ for r in runs],
                "session_key": "X-Session-ID header = the group or session id",
            },
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base, bf16)", fleet=facts),
            "rows": rows,
            "markdown": markdown_table(headers, body),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
