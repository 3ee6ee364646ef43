"""Figures for the READMEs, rendered from committed results files (see ``render_docs.py``).

Each function takes the loaded JSON of one or more ``benchmarks/results/*.json`` files and
returns the markdown that goes between a README's ``<!-- results:NAME -->`` markers: a
table with the line saying where and when it was measured, or the sentences that quote
its figures. Nothing here measures; every number comes from the files.
"""

from __future__ import annotations

from typing import Any

from doc_format import Doc, machine_line, span, table, times

# ----- 1. prefix_cache_gain ---------------------------------------------------------------


def _point_label(row: Doc) -> str:
    share = "99%" if row["target_share"] is None else f"{round(row['target_share'] * 100)}%"
    label = f"share {share}, g={row['group_size']}"
    return f"**shipped workload ({label})**" if row["target_share"] is None and row["group_size"] > 1 else label


def prefix_cache_gain_table(doc: Doc) -> str:
    """The caching on/off table, one row per point."""
    rows = []
    for r in doc["rows"]:
        shipped = r["target_share"] is None and r["group_size"] > 1
        bold = (lambda s: f"**{s}**") if shipped else (lambda s: s)
        rows.append(
            [
                _point_label(r),
                f"{r['prefix_share']:.2f}",
                f"{r['prompt_tokens_mean']:.0f}",
                bold(times(r["ttft_p50_speedup"])),
                times(r["ttft_p99_speedup"]),
                bold(times(r["throughput_ratio_rps"])),
                times(r["throughput_ratio_tokens"]),
                bold(f"{r['hit_rate_on']:.3f}"),
                f"{r['hit_rate_ceiling']:.3f}",
                bold(f"{r['hit_rate_vs_ceiling']:.2f}"),
                times(r["ideal_prefill_speedup"], 1),
            ]
        )
    header = ["workload", "share", "prompt tok", "TTFT p50 off/on", "TTFT p99 off/on", "req/s on/off"]
    header += ["tok/s on/off", "hit rate on", "ceiling", "hit/ceiling", "ideal prefill"]
    return table(header, rows) + "\n\n" + machine_line(doc, "prefix_cache_gain.json")


def _shipped(doc: Doc) -> Doc:
    return next(r for r in doc["rows"] if r["target_share"] is None and r["group_size"] > 1)


def prefix_cache_gain_summary(doc: Doc, busy: Doc) -> str:
    """The reading of the caching table, every figure from the two runs."""
    s = _shipped(doc)
    reps = s["per_repeat"]
    at_half = sorted((r for r in doc["rows"] if r["target_share"] == 0.5), key=lambda r: r["group_size"])
    at_80 = next(r for r in doc["rows"] if r["target_share"] == 0.8)
    gaps = max(abs(r["hit_rate_on"] - r["hit_rate_ceiling"]) for r in doc["rows"])
    b = _shipped(busy)
    lines = [
        f"- **The cache works to the token**: the largest gap between the hit rate from the server's counter "
        f"deltas and the ceiling the prompts allow is {gaps:.3f} over all {len(doc['rows'])} points.",
        f"- **What it buys on the shipped workload: {times(s['throughput_ratio_rps'], 1)} the throughput and "
        f"{times(s['ttft_p50_speedup'], 1)} faster median TTFT** (per repeat: "
        f"{'/'.join(times(r['throughput_ratio'], 1) for r in reps)} throughput, "
        f"{'/'.join(times(r['ttft_p50_speedup'], 1) for r in reps)} TTFT). The ideal prefill speedup is "
        f"{times(s['ideal_prefill_speedup'], 0)}: decode steps, scheduling and the HTTP path are not cached.",
        f"- Against the ideal prefill speedup: {times(at_half[0]['throughput_ratio_rps'], 1)} vs "
        f"{times(at_half[0]['ideal_prefill_speedup'], 1)} at the 50% share, "
        f"{times(at_80['throughput_ratio_rps'], 1)} vs {times(at_80['ideal_prefill_speedup'], 1)} at 80%.",
        "- group_size at the 50% share: ceiling "
        + " -> ".join(f"{r['hit_rate_ceiling']:.2f}" for r in at_half)
        + ", throughput "
        + " -> ".join(times(r["throughput_ratio_rps"]) for r in at_half)
        + " for g = "
        + ", ".join(str(r["group_size"]) for r in at_half)
        + ".",
        f"- An earlier full run while the machine was busy (load average "
        f"{busy['machine']['load_average_1_5_15'][0]:.1f} at its end; `results/prefix_cache_gain-busy.json`, "
        f"{busy['machine']['timestamp_utc'][:10]}, commit `{busy['machine']['git_commit']}`) measured the shipped "
        f"workload at {times(b['throughput_ratio_rps'], 1)} throughput and {times(b['ttft_p50_speedup'], 1)} "
        f"TTFT p50.",
    ]
    return "\n".join(lines)


# ----- 2. block_alignment -----------------------------------------------------------------


def _alignment_key(r: Doc) -> tuple[Any, ...]:
    fields = ("examples_before", "examples_after", "shared_before", "shared_after", "cacheable_before")
    return (r["run_tag"], r["render"], *tuple(r[f] for f in fields), r["cacheable_after"])


def block_alignment_computed(doc: Doc) -> str:
    """The computed ceilings, block sizes with equal figures folded into one row."""
    groups: list[list[Doc]] = []
    for r in doc["computed"]:
        if groups and _alignment_key(groups[-1][-1]) == _alignment_key(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    rows = []
    for g in groups:
        r, blocks = g[0], [x["block_size"] for x in g]
        bold = (lambda s: f"**{s}**") if r["block_size"] == 128 and not r["run_tag"] else (lambda s: s)
        rows.append(
            [
                "yes" if r["run_tag"] else "no",
                r["render"],
                str(blocks[0]) if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}",
                f"{r['examples_before']} -> {r['examples_after']}",
                f"{r['shared_before']} -> {r['shared_after']}",
                f"{r['cacheable_before']} -> {r['cacheable_after']}",
                bold(f"{r['ceiling_before']:.3f}"),
                bold(f"{r['ceiling_after']:.3f}"),
            ]
        )
    header = ["run tag", "render", "block", "examples", "shared tokens", "cacheable", "ceiling before", "after"]
    return table(header, rows)


def block_alignment_measured(doc: Doc) -> str:
    """Shipped vs aligned prompt on the engine, and the ratios."""
    summary, ratios = doc["measured"]["summary"], doc["measured"]["ratios"]
    rows = [
        [
            name,
            f"{s['prompt_tokens_per_request']:.0f}",
            f"{s['hit_rate_ceiling']:.3f}",
            f"{s['hit_rate_median_of_runs']:.3f}",
            f"{s['ttft_p50_s_median_of_runs']:.3f} s",
            f"{s['ttft_p99_s_median_of_runs']:.3f} s",
            f"{s['requests_per_s_median_of_runs']:.1f}",
        ]
        for name, s in summary.items()
    ]
    header = ["prompt", "tokens", "ceiling", "hit rate", "warm TTFT p50", "warm TTFT p99", "req/s"]
    per_run = ", ".join(f"{v:.1f}" for v in ratios["ttft_p50_speedup_per_run"])
    extra = summary["aligned"]["prompt_tokens_per_request"] - summary["shipped"]["prompt_tokens_per_request"]
    text = (
        f"**Aligned vs shipped: ceiling and measured hit rate {times(ratios['ceiling_after_over_before'])}, "
        f"warm TTFT p50 {times(ratios['ttft_p50_speedup_median_of_runs'], 1)} faster (per run {per_run}), "
        f"throughput {times(ratios['throughput_ratio_median_of_runs'], 1)}**, for a prompt {extra:.0f} tokens longer."
    )
    return table(header, rows) + "\n\n" + machine_line(doc, "block_alignment.json") + "\n\n" + text


# ----- 3. client_overhead -----------------------------------------------------------------

CLIENT_LABELS = {
    "worker": "**worker** (as shipped: aiohttp, own SSE parser)",
    "worker+openai": 'worker, `transport="openai"` (SDK, httpx)',
    "worker+openai-aiohttp": 'worker, `transport="openai"` + SDK\'s aiohttp transport',
    "naive": "naive `AsyncOpenAI` + `gather`",
    "vllm-bench": "`vllm bench serve` client",
}


def client_overhead_table(doc: Doc) -> str:
    """One row per concurrency and client."""
    rows = []
    for r in doc["summary"]:
        worker = r["client"] == "worker"
        bold = (lambda s: f"**{s}**") if worker else (lambda s: s)
        rows.append(
            [
                r["concurrency"],
                CLIENT_LABELS.get(r["client"], r["client"]),
                f"{r['requests_per_s']:.0f}",
                f"{r['cpu_ms_per_request']:.2f}",
                bold(times(r["vs_vllm_bench"])),
                bold(times(r["vs_naive"])),
                f"{r['ok_share']:.2f}",
                f"{r['server_cpu_ms_per_request']:.3f}",
            ]
        )
    header = ["in flight", "client", "req/s", "client CPU ms/req", "vs vllm bench", "vs naive", "ok"]
    return table([*header, "stand-in CPU ms/req"], rows) + "\n\n" + machine_line(doc, "client_overhead.json")


def _by_client(doc: Doc, client: str, key: str) -> list[float]:
    return [r[key] for r in doc["summary"] if r["client"] == client]


def client_overhead_summary(doc: Doc, other: Doc) -> str:
    """The worker against vLLM's client and the naive loop, on this run and on another machine."""
    by_repeat = [v for vals in doc["worker_vs_vllm_bench_by_repeat"].values() for v in vals]
    vs_vllm = _by_client(doc, "worker", "vs_vllm_bench")
    met = "met" if min(vs_vllm) >= 1.0 else f"missed at {times(min(vs_vllm))}"
    om = other["machine"]
    lines = [
        f"- **The worker sustains {span(_by_client(doc, 'worker', 'vs_naive'), '{:.1f}', 'x')} the naive loop "
        f"(goal 2x) and {span(vs_vllm, '{:.2f}', 'x')} vLLM's benchmark client (goal 1x: {met}; per repeat "
        f"{span(by_repeat, '{:.2f}', 'x')})**, spending {span(_by_client(doc, 'worker', 'cpu_ms_per_request'))} ms "
        f"of CPU per streamed request against vLLM's client's "
        f"{span(_by_client(doc, 'vllm-bench', 'cpu_ms_per_request'))} ms.",
        f'- Through the `openai` SDK (`transport="openai"`) the worker spent '
        f"{span(_by_client(doc, 'worker+openai', 'cpu_ms_per_request'), '{:.1f}')} ms per request and ran at "
        f"{span(_by_client(doc, 'worker+openai', 'vs_naive'))}x the naive loop; the SDK's aiohttp transport "
        f"{span(_by_client(doc, 'worker+openai-aiohttp', 'cpu_ms_per_request'), '{:.1f}')} ms, "
        f"{span(_by_client(doc, 'worker+openai-aiohttp', 'vs_vllm_bench'))}x vLLM's client.",
        f"- The same benchmark on another machine ({om['cpu_model']}, {om['timestamp_utc'][:10]}, commit "
        f"`{om['git_commit']}`, `results/client_overhead-intel.json`) had the worker at "
        f"{span(_by_client(other, 'worker', 'vs_vllm_bench'))}x vLLM's client and "
        f"{span(_by_client(other, 'worker', 'vs_naive'), '{:.1f}')}x the naive loop: the ratio to vLLM's "
        f"client depends on the machine, the lead over the naive loop does not.",
    ]
    return "\n".join(lines)


# ----- 4. clock_honesty -------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:+.0f} ms"


def clock_honesty_table(doc: Doc) -> str:
    """The three clocks over the same requests, burst and serial."""
    rows = [
        [
            r["mode"],
            r["requests"],
            f"{r['echo_env_ttft_p50_s']:.3f} s",
            f"{r['vllm_bench_ttft_p50_s']:.3f} s",
            f"**{times(r['echo_env_over_vllm_bench_p50'])}**",
            _ms(r["echo_env_minus_server_mean_ms"]),
            _ms(r["vllm_bench_minus_server_mean_ms"]),
            _ms(r["echo_env_minus_server_p50_ms"]),
            _ms(r["vllm_bench_minus_server_p50_ms"]),
        ]
        for r in doc["rows"]
    ]
    header = ["mode", "requests", "echo_env p50", "vllm bench p50", "echo_env / vllm", "echo_env - server (mean)"]
    header += ["vllm - server (mean)", "echo_env - server (p50, buckets)", "vllm - server (p50, buckets)"]
    return table(header, rows) + "\n\n" + machine_line(doc, "clock_honesty.json")


def clock_honesty_summary(doc: Doc, sdk: Doc) -> str:
    """Within 10% of vLLM's client, never below the server; and the SDK path before."""
    rows = {r["mode"]: r for r in doc["rows"]}
    sdk_rows = {r["mode"]: r for r in sdk["rows"]}
    within = all(r["within_10pct_of_vllm_bench"] for r in doc["rows"])
    never_below = all(r["never_below_server"] for r in doc["rows"])
    sm = sdk["machine"]
    return "\n".join(
        [
            f"- **Within 10% of vLLM's client: {'met' if within else 'missed'}**, "
            f"{times(rows['burst']['echo_env_over_vllm_bench_p50'])} in a {rows['burst']['requests']}-request burst "
            f"and {times(rows['serial']['echo_env_over_vllm_bench_p50'])} one at a time.",
            f"- **Never below the server's own mean TTFT over the same requests: "
            f"{'met in every run' if never_below else 'missed'}** (the mean is exact: histogram sum / count; "
            "the p50 columns are only as good as vLLM's buckets).",
            f"- Before, with generation through the `openai` SDK (`results/clock_honesty-sdk.json`, "
            f"{sm['timestamp_utc'][:10]}, commit `{sm['git_commit']}`, busy machine: load average "
            f"{sm['load_average_1_5_15'][0]:.1f}), the same script measured "
            f"{times(sdk_rows['burst']['echo_env_over_vllm_bench_p50'])} burst and "
            f"{times(sdk_rows['serial']['echo_env_over_vllm_bench_p50'])} serial.",
        ]
    )


# ----- 5. scale ---------------------------------------------------------------------------


def _scale_rows(doc: Doc) -> list[Doc]:
    """The measured points (the engine's unmeasured priming step left out)."""
    return [r for r in doc["rows"] if r["target"] in ("stand-in", "engine")]


def scale_table(doc: Doc) -> str:
    """One row per target and agent count."""
    rows = [
        [
            r["target"],
            r["agents"],
            r["ok"],
            f"{r['requests_per_s']:.1f}",
            f"{r['step_s']:.2f}",
            f"{r['client_cpu_ms_per_agent']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_kb_per_agent']:.0f}",
        ]
        for r in _scale_rows(doc)
    ]
    header = ["target", "agents", "ok", "req/s", "step s", "CPU ms/agent", "peak MB", "KB/agent (all-in)"]
    return table(header, rows) + "\n\n" + machine_line(doc, "scale.json")


def scale_summary(doc: Doc) -> str:
    """How time, memory and CPU grow with agents."""
    rows = _scale_rows(doc)
    top = max(r["agents"] for r in rows)
    big = [r for r in rows if r["agents"] >= 1024]
    slopes = [s["step_time_slope"] for per in doc["shape"].values() for s in per if s["from"] >= 1024]
    lo = min((r for r in big if r["target"] == "stand-in"), key=lambda r: r["agents"])
    hi = max((r for r in big if r["target"] == "stand-in"), key=lambda r: r["agents"])
    per_agent_kb = (hi["peak_rss_mb"] - lo["peak_rss_mb"]) * 1024 / (hi["agents"] - lo["agents"])
    engine = [r for r in rows if r["target"] == "engine" and r["agents"] >= 128]
    standin = [r for r in rows if r["target"] == "stand-in" and r["agents"] >= 1024]
    failed = sum(r["agents"] - r["ok"] for r in rows)
    return "\n".join(
        [
            f"- **Memory**: {lo['rss_after_imports_mb']:.0f} MB after imports, then {lo['peak_rss_mb']:.0f} -> "
            f"{hi['peak_rss_mb']:.0f} MB from {lo['agents']} to {hi['agents']} agents, "
            f"{per_agent_kb:.1f} KB per added agent.",
            f"- **Time is linear in agents**: step time grows as agents^{span(slopes)} from 1024 to {top}; CPU per "
            f"agent {span((r['client_cpu_ms_per_agent'] for r in rows if r['agents'] >= 128), '{:.1f}')} ms from "
            "128 agents up.",
            f"- **The worker alone sustains {span((r['requests_per_s'] for r in standin), '{:,.0f}')} requests/s** "
            f"(stand-in, 1024 agents and up); **against the engine the engine sets the pace**, "
            f"{span((r['requests_per_s'] for r in engine), '{:.0f}')} requests/s from 128 agents up.",
            f"- **Where it breaks**: {failed} of {sum(r['agents'] for r in rows)} requests failed over all points, "
            f"up to {top} agents on either target.",
        ]
    )


# ----- 7. ttft_false_positive -------------------------------------------------------------

METHODS = {
    "old": "old: requests pooled over 3 bursts a side, bootstrap, low > 1.0 (128-request bursts)",
    "old_small": "old analysis on 16-request bursts",
    "new": "new: one ratio per repeat, looks at 3-8 repeats, min_effect 1.2",
    "new_no_min": "new with min_effect 1.0 (the change of unit alone), looks at 3-8 repeats",
}


def _rate(p: Doc) -> str:
    return f"{p['rate'] * 100:.1f}% ({p['low'] * 100:.1f}-{p['high'] * 100:.1f})"


def ttft_false_positive_table(doc: Doc) -> str:
    """PASS rate per method and true effect."""
    effects = [r["effect"] for r in doc["rows"]]
    header = ["method"] + [("PASS at no effect" if e == 1.0 else f"PASS at {e:g}x") for e in effects]
    rows = []
    for key, label in METHODS.items():
        cells = [_rate(r[key]["pass"]) for r in doc["rows"]]
        if cells and doc["rows"][0]["effect"] == 1.0 and key in ("old", "new"):
            cells[0] = f"**{cells[0].split(' ')[0]}** {cells[0].split(' ', 1)[1]}"
        rows.append([label, *cells, doc["rows"][0][key]["pass"]["trials"]])
    return table([*header, "trials per effect"], rows) + "\n\n" + machine_line(doc, "ttft_false_positive.json")


def ttft_false_positive_setup(doc: Doc) -> str:
    """What the simulation assumes, from its settings."""
    s = doc["settings"]
    effects = [e for e in s["effects"] if e != 1.0]
    return (
        f"No server: simulated bursts of TTFTs in which every burst has its own slowdown ({s['burst_sigma']:.0%} "
        f"between bursts) and every request its own spread ({s['request_sigma']:.0%}) around it, so requests of one "
        'burst move together as they do on a real server. It counts how often each analysis says "warm is '
        'faster" (PASS) under no true effect (the false-positive rate) and under true control/warm effects of '
        f"{min(effects):g}x to {max(effects):g}x (the power). `old` is the old test's analysis (requests of "
        f"{s['old_repeats']} bursts of {s['old_burst']} pooled per side, `bootstrap_ratio_ci`, PASS when the low end "
        f"is above 1.0); `new` is the current one (one ratio per repeat of two {s['burst']}-request bursts, "
        f"`sequential_decision` at {s['min_repeats']}..{s['max_repeats']} repeats, minimum effect "
        f"{s['min_effect']:g}x, so under {(1 - s['confidence']) / 2:.1%} PASS at the minimum effect itself)."
    )


def ttft_false_positive_sentence(doc: Doc) -> str:
    """The one sentence the main README quotes."""
    null = next(r for r in doc["rows"] if r["effect"] == 1.0)
    s = doc["settings"]
    return (
        f"Simulated with {s['burst_sigma'] * 100:.0f}% burst-to-burst noise and no true effect "
        f"(`benchmarks/ttft_false_positive.py`, `benchmarks/results/ttft_false_positive.json`), the old "
        f'per-request bootstrap said "faster" in {null["old"]["pass"]["rate"] * 100:.0f}% of runs, this design '
        f"in {null['new']['pass']['rate'] * 100:.1f}% ({null['new']['pass']['count']} of "
        f"{null['new']['pass']['trials']:,})."
    )


# ----- routing ----------------------------------------------------------------------------


def _routing_row(doc: Doc, policy: str, workload: str) -> Doc:
    return next(r for r in doc["rows"] if r["policy"] == policy and r["workload"] == workload)


def routing_sentence(doc: Doc, scale_out: Doc) -> str:
    """The main README's paragraph on routing policies, from both routing runs."""
    rr = _routing_row(doc, "round_robin", "group_text")
    ch = _routing_row(doc, "consistent_hash", "group_text")
    ca = _routing_row(doc, "cache_aware", "group_text")
    ca_out = _routing_row(scale_out, "cache_aware", "default")
    defaults = [r["fleet_hit_rate"] for r in doc["rows"] if r["workload"] == "default"]
    turns = scale_out["settings"]["sizes"]["turns"]
    return (
        f"`benchmarks/routing.py` measured {len(doc['machine']['fleet']['replicas'])} replicas "
        f"(`benchmarks/results/routing.json`): on a workload whose groups share several blocks of their own, "
        f"round_robin reached {rr['fleet_hit_rate']:.3f} (scatter model {rr['ceiling_scatter']:.3f}, affinity "
        f"{rr['ceiling_affinity']:.3f}: {rr['verdict']}), consistent_hash with an `X-Session-ID` per group "
        f"{ch['fleet_hit_rate']:.3f} ({ch['verdict']}), {times(ch['ttft_p50_vs_rr'])} the TTFT p50 and "
        f"{times(ch['rps_vs_rr'])} the req/s of round_robin; `cache_aware` reached {ca['fleet_hit_rate']:.3f} "
        f"with shares {'/'.join(f'{v:.0%}' for v in ca['replica_shares'])}. In a second run with {turns} turns "
        f"(`benchmarks/results/routing-scale-out.json`) `cache_aware` sent "
        f"{max(ca_out['replica_shares']):.0%} of the requests to one replica ({ca_out['verdict']}). On the "
        f"default workload every policy ties ({span(defaults)}): each replica pays the shared system prompt once."
    )


def routing_table(doc: Doc, source: str = "routing.json") -> str:
    """Per policy and workload: hit rate against the ceilings, shares, TTFT and verdict."""
    rows = [
        [
            r["policy"],
            r["workload"],
            f"{r['fleet_hit_rate']:.3f}",
            f"{r['ceiling_one_server']:.3f}",
            f"{r['ceiling_affinity']:.3f}",
            f"{r['ceiling_scatter']:.3f}",
            "/".join(f"{v:.0%}" for v in r["replica_shares"]),
            times(r["ttft_p50_vs_rr"]),
            times(r["rps_vs_rr"]),
            r["verdict"],
        ]
        for r in doc["rows"]
    ]
    header = ["policy", "workload", "hit rate", "one server", "affinity", "scatter", "shares", "p50 vs rr"]
    return table([*header, "req/s vs rr", "verdict"], rows) + "\n\n" + machine_line(doc, source)


def routing_scale_out_table(doc: Doc) -> str:
    """The same table for the longer multi-turn run."""
    return routing_table(doc, "routing-scale-out.json")


# ----- goals ------------------------------------------------------------------------------


def goals_table(gain: Doc, busy: Doc, align: Doc, client: Doc, clock: Doc, sdk: Doc, scale: Doc) -> str:
    """The issue's goals, each with the figure that meets or misses it."""
    s, b = _shipped(gain), _shipped(busy)
    vs_vllm = _by_client(client, "worker", "vs_vllm_bench")
    vs_naive = _by_client(client, "worker", "vs_naive")
    ratios = align["measured"]["ratios"]
    tagged = [r["ceiling_before"] for r in align["computed"] if r["run_tag"]]
    untagged = next(r for r in align["computed"] if not r["run_tag"] and r["block_size"] == 128)
    clocks = {r["mode"]: r["echo_env_over_vllm_bench_p50"] for r in clock["rows"]}
    sdk_clocks = {r["mode"]: r["echo_env_over_vllm_bench_p50"] for r in sdk["rows"]}
    top = max(r["agents"] for r in _scale_rows(scale))
    rows = [
        [
            "caching on vs off, TTFT p50/p99, throughput, hit rate vs ceiling, sweeps, plot",
            f"done (section 1): {times(s['throughput_ratio_rps'], 1)} throughput, {times(s['ttft_p50_speedup'], 1)} "
            f"TTFT p50 on the shipped workload (busy-machine run: {times(b['throughput_ratio_rps'], 1)}, "
            f"{times(b['ttft_p50_speedup'], 1)})",
        ],
        [
            "shipped workload's ceiling >= 0.95 at block 128",
            f"{'met' if min(tagged) >= 0.95 else 'missed'}: {span(tagged)} (with the prefix test's run tag); the "
            f"env without a tag is {untagged['ceiling_before']:.2f}, {untagged['ceiling_after']:.2f} once aligned",
        ],
        [
            "an option to pad/trim the examples to a block boundary",
            "`align_system_prompt` + `echo-prefix test align_prefix=auto\\|pad\\|trim`; aligned vs shipped: "
            f"{times(ratios['ttft_p50_speedup_median_of_runs'], 1)} TTFT, "
            f"{times(ratios['throughput_ratio_median_of_runs'], 1)} throughput",
        ],
        [
            "worker >= vLLM bench client's throughput",
            f"{'met' if min(vs_vllm) >= 1.0 else 'missed'}: {span(vs_vllm)}x at "
            f"{'/'.join(str(c) for c in client['settings']['concurrency'])} in flight",
        ],
        ["worker >= 2x the naive loop", f"{'met' if min(vs_naive) >= 2 else 'missed'}: {span(vs_naive, '{:.1f}')}x"],
        [
            "TTFT within 10% of vLLM bench's",
            f"{'met' if all(r['within_10pct_of_vllm_bench'] for r in clock['rows']) else 'missed'}: "
            f"{times(clocks['burst'])} burst, {times(clocks['serial'])} serial (the SDK path measured "
            f"{times(sdk_clocks['burst'])} / {times(sdk_clocks['serial'])})",
        ],
        [
            "scale 8 -> 8192, shape, where it breaks",
            f"done (section 5): {sum(r['agents'] - r['ok'] for r in _scale_rows(scale))} requests failed up to {top} "
            "agents on either target",
        ],
    ]
    return table(["goal", "result"], rows)


# ----- 9. history_reuse -------------------------------------------------------------------


def history_reuse_table(doc: Doc) -> str:
    """The per-turn table the benchmark printed, each case's verdict, and its machine line."""
    verdicts = "; ".join(f"{c['case']}: {c['verdict']} `{c['reason_id']}`" for c in doc["cases"])
    return doc["table_markdown"].strip("\n") + f"\n\nVerdicts: {verdicts}.\n\n" + machine_line(doc)


def decode_blocks_table(doc: Doc) -> str:
    """Turn 2's hits with and without Gemma 3's sliding window, beside the two ceilings."""
    return doc["table_markdown"].strip("\n") + "\n\n" + machine_line(doc)


# ----- time to verdict ------------------------------------------------------------------


def time_to_verdict_table(doc: Doc) -> str:
    """Each run in ABBA order, then the new/old ratio of each pair and the medians."""
    pairs = "; ".join(
        f"Pair {i}: {p['new_s']:.1f} s vs {p['old_s']:.1f} s ({p['new_over_old']:.2f}x)"
        for i, p in enumerate(doc["pairs"], 1)
    )
    old, new, ratio = doc["median_old_s"], doc["median_new_s"], doc["median_new_over_old"]
    medians = f"Medians: old {old:.1f} s, new {new:.1f} s ({ratio:.2f}x)"
    return "\n\n".join([doc["markdown"].strip("\n"), f"{pairs}. {medians}.", machine_line(doc)])


# ----- fleet ceilings (computed, no server) ---------------------------------------------


def fleet_ceilings_table(doc: Doc) -> str:
    """One row per replica count, workload and simulated router: rates, ceilings, verdicts."""
    rows = [
        [
            str(r["replicas"]),
            f"{r['workload']} / {r['router']}",
            "/".join(str(n) for n in r["replica_requests"]),
            f"{r['fleet_hit_rate']:.3f}",
            f"{r['placement_ceiling']:.3f}",
            f"{r['one_server']:.3f}",
            f"{r['scatter_model']:.3f}",
            f"{r['cache_check']} (one-server rule: {r['cache_check_one_server']})",
            f"{r['routing']} `{r['routing_reason_id']}`",
            str(r["test_exit_code"]),
        ]
        for r in doc["rows"]
    ]
    head = ["replicas", "workload / router", "requests per replica", "fleet hit", "placement ceiling", "one server",
            "scatter model", "cache check", "routing", "exit"]  # fmt: skip
    return table(head, rows) + f"\n\nComputed from token plans with {doc['block_size']}-token blocks; no server."
