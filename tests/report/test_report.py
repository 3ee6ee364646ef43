"""The report of a prefix-cache test: console, files, plots and redaction, from typed results built by hand."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import sys
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from echo_env.cachetest.results import (
    Check,
    Comparison,
    Decision,
    Evidence,
    FirstDifference,
    PrefixEvidence,
    ServerEvidence,
    ServerRun,
    TestResult,
    TTFTEvidence,
)
from echo_env.errors import ConfigError
from echo_env.measure.figures import HitRate, PhaseFigures, pool
from echo_env.measure.stats import RepeatRatioCI, summarize
from echo_env.report import RunWriter, format_console, redact
from echo_env.report import plots as report_plots
from echo_env.report.files import (
    PHASE_COLUMNS,
    PHASES_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    write_json_file,
    write_records,
)
from echo_env.report.html import REPORT_FILE
from echo_env.report.plots import (
    HIT_RATE_PLOT_FILE,
    PLOTS_INSTALL_HINT,
    TTFT_PLOT_FILE,
    TTFT_REPEATS_PLOT_FILE,
)
from echo_env.report.redact import REDACTED, is_secret_key
from echo_env.wire.metrics import CounterDelta

FAKE_KEY = "sk-test-DO-NOT-LEAK-4242"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {TTFT_PLOT_FILE, HIT_RATE_PLOT_FILE, TTFT_REPEATS_PLOT_FILE}

# --- results built by hand -------------------------------------------------------------------


def figures(
    name: str,
    *,
    server: str = "cache_on",
    repeat: int | None = None,
    ttft_ms: float = 50.0,
    n: int = 24,
    failed: int = 0,
    counters: float | None = 0.98,
    reported: float | None = 0.98,
    ceiling: float | None = 0.98,
    reset: bool = False,
    first_error: str | None = None,
) -> PhaseFigures:
    """One phase's figures with TTFT samples scattered around ``ttft_ms``."""
    rng = random.Random(zlib.crc32(f"{name}{server}{repeat}".encode()))
    ok = n - failed
    ttfts = tuple(ttft_ms / 1000 * rng.lognormvariate(0, 0.15) for _ in range(ok))
    e2es = tuple(t + 0.12 for t in ttfts)
    prompt = 612 * ok
    if reset:
        delta: CounterDelta | None = CounterDelta(source="vllm", reset=True)
    elif counters is None:
        delta = None
    else:
        delta = CounterDelta(source="vllm", reset=False, queries=float(prompt), hits=prompt * counters)
    wall = 0.2 + n * 0.012
    return PhaseFigures(
        name=name,
        server=server,
        repeat=repeat,
        requests=n,
        failed=failed,
        first_error=first_error or ("ReadTimeout" if failed else None),
        wall_s=wall,
        ttft=summarize(ttfts),
        e2e=summarize(e2es),
        completion_tokens=4 * ok,
        prompt_tokens=prompt,
        cached_tokens=None if reported is None else int(prompt * reported),
        planned_prompt_tokens=prompt,
        ceiling_tokens=None if ceiling is None else int(prompt * ceiling),
        counters=delta,
        counters_note=None if counters is not None and not reset else "the server exposes no prefix-cache hit counters",
        hit=HitRate(None if reset else counters, reported, ceiling),
        ttft_samples=ttfts,
        e2e_samples=e2es,
    )


# (phase, requests per repeat, TTFT ms, hit rate with cache on, ceiling)
PHASE_PLAN = (
    ("cold", 1, 190.0, 0.0, 0.0),
    ("warm", 40, 985.0, 0.98, 0.98),
    ("warm_single", 1, 76.7, 0.98, 0.98),
    ("ttft_warm", 8, 45.0, 0.98, 0.98),
    ("ttft_control", 8, 480.0, 0.0, 0.0),
)


def measured(
    server: str, repeats: int = 3, *, caching: bool = True, counters: bool = True
) -> tuple[tuple[PhaseFigures, ...], dict[str, PhaseFigures]]:
    """Every phase of every repeat on one server, and the same pooled over repeats."""
    phases = []
    for repeat in range(repeats):
        for name, n, ttft, hit, ceiling in PHASE_PLAN:
            rate = hit if caching else 0.0
            slow = 1.0 if caching or name not in ("warm", "warm_single", "ttft_warm") else 10.0
            phases.append(
                figures(
                    name,
                    server=server,
                    repeat=repeat,
                    n=n,
                    ttft_ms=ttft * slow,
                    counters=rate if counters and caching else None,
                    reported=rate,
                    ceiling=ceiling,
                )
            )
    pooled = {name: pool(name, [p for p in phases if p.name == name], server) for name, *_ in PHASE_PLAN}
    return tuple(phases), pooled


def vllm_server(*, caching: bool = True, url: str = "http://127.0.0.1:33445/v1") -> ServerEvidence:
    return ServerEvidence(
        kind="vllm",
        base_url=url,
        model="echo-gemma3-270m",
        version="0.32.0",
        caching_enabled=caching,
        caching_enabled_source="vllm:cache_config_info",
        unit_tokens=128,
        unit_source="vllm:cache_config_info block_size",
        slots=None,
        metrics_url=url.replace("/v1", "/metrics"),
        metrics_error=None,
        caching_disabled_fix="start vLLM with --enable-prefix-caching",
        no_counters_fix="vLLM exposes its counters at /metrics; pass metrics_url=",
        embedded=True,
    )


PREFIX = PrefixEvidence(
    tokenized_by="server",
    unit_tokens=128,
    unit_source="vllm:cache_config_info block_size",
    prompt_tokens_min=523,
    prompt_tokens_max=524,
    shared_tokens=519,
    cacheable_shared_tokens=512,
    first_difference=FirstDifference(519, 8, "User: Please echo the following word: berry"),
    workload_ceiling=0.9689,
)

CHECK_TABLE = (
    ("run_finished", "the run finished"),
    ("caching_enabled", "caching enabled on the server"),
    ("ceiling_known", "a hit-rate ceiling is known"),
    ("prefix_shared", "prompts share a prefix in whole cache units"),
    ("phases_complete", "every phase has its requests"),
    ("counters_intact", "counters never went back"),
    ("hits_visible", "hits are visible"),
    ("own_traffic", "counters count only this test's traffic"),
    ("sources_agree", "counters and cached_tokens agree"),
    ("not_above_ceiling", "hit rate within the ceiling"),
    ("hits_nonzero", "the cache hits"),
    ("hits_reach_ceiling", "hits reach the ceiling"),
    ("control_baseline", "the control phase hits only what it shares"),
    ("ttft_gain", "warm TTFT below control TTFT, over repeats"),
)


def decision(verdict: str, reason: str, reason_id: str, outcomes: dict[str, tuple[str, str]]) -> Decision:
    """A decision whose checks run in the verdict's order: listed outcomes, pass before the decisive one, skip after."""
    checks = []
    decided = False
    for name, title in CHECK_TABLE:
        if decided:
            checks.append(Check(name, title, "skip", "decided by an earlier check"))
            continue
        outcome, detail = outcomes.get(name, ("pass", f"{name} ok"))
        checks.append(Check(name, title, outcome, detail))  # type: ignore[arg-type]
        decided = name == reason_id
    return Decision(verdict, reason, reason_id, tuple(checks))  # type: ignore[arg-type]


RATIOS = (10.21, 10.62, 11.03)
CI = RepeatRatioCI(ratio=10.62, low=9.46, high=11.4, n=3, confidence=0.95, per_repeat=RATIOS)
PASS_REASON = (
    "prefix caching works: hit rate 0.98 of a 0.98 ceiling (100%), warm TTFT 10.6x faster (CI 9.5-11.4 over 3 repeats)"
)


def config(out_dir: Path) -> dict[str, Any]:
    return {
        "base_url": None,
        "model_name": "echo-gemma3-270m",
        "batch_size": 16,
        "group_size": 8,
        "max_tokens": 32,
        "min_effect": 1.2,
        "hit_fraction": 0.9,
        "api_key": FAKE_KEY,
        "hf_token": FAKE_KEY,
        "baseline_url": f"http://user:{FAKE_KEY}@10.0.0.2:8000/v1",
        "client": {"headers": {"Authorization": f"Bearer {FAKE_KEY}"}},
        "out_dir": str(out_dir),
    }


def pass_result(out_dir: Path) -> TestResult:
    """PASS on vLLM, with the cache-off baseline compared (its FAIL is expected)."""
    on_phases, on = measured("cache_on")
    off_phases, off = measured("cache_off", caching=False)
    on_run = ServerRun(
        label="cache_on",
        evidence=Evidence(
            server=vllm_server(),
            prefix=PREFIX,
            warm=on["warm"],
            control=on["ttft_control"],
            ttft_warm=on["ttft_warm"],
            ttft=TTFTEvidence(RATIOS, CI, "above", ("warm", "control", "warm")),
            other_phases=(on["cold"], on["warm_single"]),
        ),
        decision=decision("PASS", PASS_REASON, "pass", {}),
        phases=on_phases,
        pooled=tuple(on.values()),
        comparisons=(
            Comparison("warm vs control TTFT (over repeats)", CI.ratio, CI.low, CI.high),
            Comparison("warm vs control req/s (TTFT bursts)", 12.26),
            Comparison("cold prompt sent again: TTFT", 2.48),
        ),
    )
    off_ratios = (1.01, 0.98, 1.02)
    off_reason = "caching disabled on the server: start vLLM with --enable-prefix-caching"
    off_run = ServerRun(
        label="cache_off",
        evidence=Evidence(
            server=vllm_server(caching=False, url="http://127.0.0.1:33446/v1"),
            prefix=PREFIX,
            warm=off["warm"],
            control=off["ttft_control"],
            ttft_warm=off["ttft_warm"],
            ttft=TTFTEvidence(off_ratios, RepeatRatioCI(1.0, 0.95, 1.05, 3, 0.95, off_ratios), "below"),
        ),
        decision=decision(
            "FAIL",
            off_reason,
            "caching_enabled",
            {"caching_enabled": ("fail", "vllm:cache_config_info says caching is off")},
        ),
        phases=off_phases,
        pooled=tuple(off.values()),
    )
    return TestResult(
        config=config(out_dir),
        runs=[on_run, off_run],
        on_vs_off=(
            Comparison("cache on vs off: warm burst TTFT p50", 11.1),
            Comparison("cache on vs off: warm burst req/s", 12.76),
        ),
        started_at="2025-06-01T12:00:00+00:00",
        finished_at="2025-06-01T12:04:45+00:00",
        duration_s=285.0,
        time_to_verdict_s=95.2,
        out_dir=str(out_dir),
    )


FAIL_REASON = "hit rate far under the ceiling: 0.410 vs 0.980 (42%, needs 90%); the cache may be too small or evicting"


def fail_result(out_dir: Path) -> TestResult:
    """FAIL: hits far under the ceiling; no cache-off run."""
    phases, pooled = measured("cache_on")
    warm = dataclasses.replace(pooled["warm"], hit=HitRate(0.41, 0.40, 0.98))
    run = ServerRun(
        label="cache_on",
        evidence=Evidence(
            server=vllm_server(),
            prefix=PREFIX,
            warm=warm,
            control=pooled["ttft_control"],
            ttft_warm=pooled["ttft_warm"],
            ttft=TTFTEvidence(RATIOS, CI, "above"),
        ),
        decision=decision(
            "FAIL",
            FAIL_REASON,
            "hits_reach_ceiling",
            {"hits_reach_ceiling": ("fail", "warm hit rate 0.410 (counters) vs ceiling 0.980: 42%")},
        ),
        phases=phases,
        pooled=(*(p for p in pooled.values() if p.name != "warm"), warm),
    )
    return TestResult(config=config(out_dir), runs=[run], duration_s=120.0, out_dir=str(out_dir))


RUN_ERROR = f"ServerUnreachableError: nothing answered at http://admin:{FAKE_KEY}@localhost:8000/v1"


def partial_result(out_dir: Path) -> TestResult:
    """UNKNOWN: the server's facts were read, then it stopped answering before any phase."""
    evidence = Evidence(
        server=dataclasses.replace(
            vllm_server(), version=None, caching_enabled=None, unit_tokens=None, unit_source=None, embedded=False
        ),
        prefix=None,
        warm=None,
        control=None,
        ttft_warm=None,
        ttft=None,
        run_error=RUN_ERROR,
    )
    run = ServerRun(
        label="cache_on",
        evidence=evidence,
        decision=decision(
            "UNKNOWN", f"the run did not finish: {RUN_ERROR}", "run_finished", {"run_finished": ("unknown", RUN_ERROR)}
        ),
        phases=(),
        pooled=(),
    )
    return TestResult(config=config(out_dir), runs=[run], partial=True, error=RUN_ERROR, out_dir=str(out_dir))


def no_counters_result(out_dir: Path) -> TestResult:
    """llama.cpp without counters: the hit rate comes from cached_tokens alone."""
    phases, pooled = measured("cache_on", counters=False)
    server = ServerEvidence(
        kind="llamacpp",
        base_url="http://127.0.0.1:8080/v1",
        model="gemma-3-270m-it-Q8_0.gguf",
        version="b6000",
        caching_enabled=True,
        caching_enabled_source="/props",
        unit_tokens=1,
        unit_source="llama.cpp reuses any prefix",
        slots=4,
        metrics_url=None,
        metrics_error="GET /metrics: 501 (start llama-server with --metrics)",
        caching_disabled_fix="drop --no-cache-prompt",
        no_counters_fix="start llama-server with --metrics",
    )
    run = ServerRun(
        label="cache_on",
        evidence=Evidence(
            server=server,
            prefix=dataclasses.replace(PREFIX, unit_tokens=1, cacheable_shared_tokens=519, first_difference=None),
            warm=pooled["warm"],
            control=pooled["ttft_control"],
            ttft_warm=pooled["ttft_warm"],
            ttft=TTFTEvidence(RATIOS, CI, "above"),
        ),
        decision=decision(
            "PASS",
            "prefix caching works: hit rate 0.98 (cached_tokens) of a 0.98 ceiling",
            "pass",
            {"counters_intact": ("unknown", "GET /metrics: 501"), "sources_agree": ("skip", "one source only")},
        ),
        phases=phases,
        pooled=tuple(pooled.values()),
    )
    return TestResult(config=config(out_dir), runs=[run], out_dir=str(out_dir))


def records(n: int = 30) -> list[dict[str, Any]]:
    """Request records as the runner appends them (``RequestRecord.to_json()`` plus phase, server, repeat)."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "request_id": f"req-{i}",
                "phase": "warm",
                "server": "cache_on",
                "repeat": i % 3,
                "ttft_s": 0.05 + i * 0.001,
                "e2e_s": 0.2,
                "prompt_tokens": 612,
                "cached_tokens": 512,
                "ok": True,
                "error": None,
                "text": "Echo: apple",
            }
        )
    return rows


def text_lines(text: str) -> list[str]:
    return text.splitlines()


def block(text: str, label: str) -> str:
    """The console lines from the one starting with ``label`` to the last of its indented continuation lines."""
    lines = text_lines(text)
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 8) and lines[end].strip():
        end += 1
    return " ".join(line.strip() for line in lines[start:end])


# --- console ------------------------------------------------------------------------------------


def test_first_line_is_the_verdict_and_its_whole_reason(tmp_path: Path) -> None:
    lines = text_lines(format_console(pass_result(tmp_path), ascii_only=False))
    # The reason is wrapped at the width, never clipped.
    joined = " ".join(line.strip() for line in lines[:2])
    assert lines[0].startswith("PASS  prefix caching works: hit rate 0.98 of a 0.98 ceiling")
    assert PASS_REASON in joined
    assert "…" not in lines[0] + lines[1]


def test_headline_figures_of_a_pass_with_cache_off_compared(tmp_path: Path) -> None:
    text = format_console(pass_result(tmp_path), ascii_only=False)
    assert "hit rate 0.98 of a 0.98 ceiling (100%)" in text
    assert "control/warm TTFT 10.6x (95% CI 9.46–11.40 over 3 repeats: 10.21 10.62 11.03; needs > 1.20x)" in text
    assert "warm vs control req/s (TTFT bursts) 12.26x" in text
    assert "cold prompt sent again: TTFT 2.48x" in text
    assert "cache off: FAIL (caching disabled on the server: start vLLM with --enable-prefix-caching)" in text
    assert "cache on vs off: warm burst TTFT p50 11.10x" in text and "cache on vs off: warm burst req/s 12.76x" in text
    # The comparison that only repeats the interval is not printed a second time.
    assert "warm vs control TTFT (over repeats)" not in text


def test_server_and_token_lines(tmp_path: Path) -> None:
    text = format_console(pass_result(tmp_path), ascii_only=False)
    server = block(text, "server")
    for part in (
        "cache on: vllm 0.32.0",
        "echo-gemma3-270m",
        "prefix caching on (vllm:cache_config_info)",
        "block 128 (vllm:cache_config_info block_size)",
        "embedded",
        "http://127.0.0.1:33445/v1",
    ):
        assert part in server
    assert "cache off: vllm 0.32.0 · echo-gemma3-270m · prefix caching OFF" in text
    assert "prompts 523–524 tokens · shared prefix 519 (512 in whole 128-token units)" in text
    assert "workload ceiling 0.97 (cold requests included) · tokenized by the server" in text
    assert "prompts first differ at token 519 (prompt #8): 'User: Please echo the following word: berry'" in text


def test_phase_table_has_both_servers_pooled(tmp_path: Path) -> None:
    result = pass_result(tmp_path)
    lines = text_lines(format_console(result, ascii_only=False))
    header = next(line for line in lines if "TTFT p50" in line and "reqs" in line)
    for column in ("reqs", "fail", "p90", "p99", "e2e p50", "req/s", "tok/s", "hit rate", "reported", "ceiling"):
        assert column in header
    warm_on = next(line for line in lines if line.split()[:2] == ["warm", "120"])
    warm = result.runs[0].pooled[1]
    assert warm.name == "warm"
    cells = warm_on.split()
    assert cells[:3] == ["warm", "120", "0"]
    assert warm.ttft.p50 is not None and cells[3] == f"{warm.ttft.p50 * 1000:.0f}"
    assert cells[-3:] == ["0.98", "0.98", "0.98"]
    cache_off = next(line for line in lines if line.strip().startswith("cache off") and "cold" in line)
    assert cache_off.split()[-3:] == ["n/a", "0.00", "0.00"]  # caching off: no counters, never a made-up 0
    assert sum(1 for line in lines if "ttft_control" in line) == 2  # one per server


def test_checks_are_marked_and_the_ones_not_made_named_once(tmp_path: Path) -> None:
    text = format_console(pass_result(tmp_path), ascii_only=False)
    assert "✓ the run finished" in text
    assert "✓ warm TTFT below control TTFT, over repeats" in text
    fail = format_console(fail_result(tmp_path), ascii_only=False)
    lines = text_lines(fail)
    assert lines[0] == f"FAIL  {FAIL_REASON}"
    assert any(line.startswith("  ✗ hits reach the ceiling") and "42%" in line for line in lines)
    skipped = [line for line in lines if line.startswith("  · ")]
    assert len(skipped) == 1
    assert skipped[0].startswith("  · 2 more not checked, decided above: the control phase hits only what it shares")


def test_a_long_check_detail_is_wrapped_under_itself(tmp_path: Path) -> None:
    result = fail_result(tmp_path)
    run = result.runs[0]
    detail = (
        "521 shared tokens, 512 in whole 128-token units, of 525-525-token prompts (98%); they first differ at "
        "token 521 ('User: Please echo the following word: cereal')"
    )
    checks = tuple(
        dataclasses.replace(c, detail=detail) if c.name == "prefix_shared" else c for c in run.decision.checks
    )
    result.runs[0] = dataclasses.replace(run, decision=dataclasses.replace(run.decision, checks=checks))
    lines = text_lines(format_console(result, ascii_only=False, width=110))
    at = next(i for i, line in enumerate(lines) if "✓ prompts share a prefix" in line)
    column = lines[at].index("521 shared")
    wrapped = [lines[at][column:]]
    for line in lines[at + 1 :]:
        if not line.startswith(" " * column):
            break
        wrapped.append(line[column:])
    assert len(wrapped) > 1 and " ".join(wrapped) == detail
    assert all(len(line) <= 110 for line in lines[at : at + len(wrapped)])


def test_unknown_and_skipped_checks_keep_their_marks(tmp_path: Path) -> None:
    text = format_console(no_counters_result(tmp_path), ascii_only=False)
    assert "? counters never went back" in text and "GET /metrics: 501" in text
    assert "· counters and cached_tokens agree" in text and "one source only" in text


def test_missing_counters_read_na_never_zero(tmp_path: Path) -> None:
    text = format_console(no_counters_result(tmp_path), ascii_only=False)
    lines = text_lines(text)
    assert "hit rate 0.98 from cached_tokens of a 0.98 ceiling (100%)" in lines[1]
    warm = next(line for line in lines if line.startswith("  warm "))
    assert warm.split()[-3:] == ["n/a", "0.98", "0.98"]
    assert "None" not in text and "nan" not in text
    server = block(text, "server")
    assert "4 slots" in server and "block 1 (llama.cpp reuses any prefix)" in server
    assert "no counters: GET /metrics: 501" in server


def test_counters_that_went_back_are_flagged(tmp_path: Path) -> None:
    result = fail_result(tmp_path)
    run = result.runs[0]
    reset = figures("warm", n=40, reset=True)
    result.runs[0] = dataclasses.replace(run, pooled=(reset,))
    lines = text_lines(format_console(result, ascii_only=False))
    warm = next(line for line in lines if line.split()[:1] == ["warm"])
    assert warm.split()[-3:] == ["n/a!", "0.98", "0.98"]
    assert any(line.startswith("  ! the server's counters went back during that phase") for line in lines)


def test_a_partial_run_with_no_phases(tmp_path: Path) -> None:
    text = format_console(partial_result(tmp_path), ascii_only=False)
    lines = text_lines(text)
    assert lines[0].startswith("UNKNOWN  the run did not finish: ServerUnreachableError")
    assert "hit rate n/a (no warm burst)" in text and "control/warm TTFT n/a" in text
    # The reason already names the error: no second line repeats it.
    assert not any("run incomplete" in line for line in lines)
    assert "phases  none measured" in lines
    assert "tokens  n/a: the prompts were not tokenized" in lines
    assert "prefix caching unknown" in text and "block n/a" in text
    assert "? the run finished" in text
    assert "None" not in text
    assert FAKE_KEY not in text and f"admin:{REDACTED}@localhost" in text


def test_a_run_that_never_reached_a_server(tmp_path: Path) -> None:
    result = TestResult(config={}, partial=True, error="ModelError: model not found")
    text = format_console(result, ascii_only=False)
    assert text_lines(text)[0] == "UNKNOWN  the run did not finish: ModelError: model not found"
    assert "phases  none measured" in text and "None" not in text


def test_lines_fit_the_width_except_verdict_paths_and_notes(tmp_path: Path) -> None:
    result = pass_result(tmp_path / ("deep-" * 30))
    result.files = [str(tmp_path / "summary.json")]
    result.notes = ["plots skipped: matplotlib is not installed; " + PLOTS_INSTALL_HINT + " " + "x" * 100]
    for width in (118, 90):
        lines = text_lines(format_console(result, ascii_only=False, width=width))
        long = [line for line in lines if len(line) > width]
        assert all(line.startswith(("PASS", "files", "note")) for line in long), long
        assert lines[-2].endswith(PLOTS_INSTALL_HINT + " " + "x" * 100)  # notes are whole
    lines = text_lines(format_console(result, ascii_only=False))
    assert len(lines) <= 50


def test_files_notes_and_times(tmp_path: Path) -> None:
    result = pass_result(tmp_path)
    result.files = [str(tmp_path / name) for name in (SUMMARY_FILE, RECORDS_FILE)]
    result.notes = ["hit_rate.png not drawn: no hit rate or ceiling was measured"]
    lines = text_lines(format_console(result, ascii_only=False))
    at = lines.index(f"files   {tmp_path}/")
    assert lines[at + 1] == f"        {SUMMARY_FILE} {RECORDS_FILE}"
    assert lines[at + 2] == "note    hit_rate.png not drawn: no hit rate or ceiling was measured"
    assert lines[at + 3] == "time    verdict 95.2 s after the server was healthy · whole run 285.0 s"


def test_ascii_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = fail_result(tmp_path)
    text = format_console(result, ascii_only=True)
    assert text.isascii()
    assert "  + the run finished" in text and "  x hits reach the ceiling" in text
    assert "  - 2 more not checked, decided above:" in text
    # None: decided from the terminal's encoding.
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    assert format_console(result) == text
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert "✓ the run finished" in format_console(result)


def test_console_redacts_urls_and_bearer_tokens(tmp_path: Path) -> None:
    result = pass_result(tmp_path)
    on = result.runs[0]
    leaky = dataclasses.replace(on.evidence.server, base_url=f"https://me:{FAKE_KEY}@api.example.com/v1")
    result.runs[0] = dataclasses.replace(on, evidence=dataclasses.replace(on.evidence, server=leaky))
    result.notes = [f"wandb said: 401 for Authorization: Bearer {FAKE_KEY}"]
    text = format_console(result, ascii_only=False)
    assert FAKE_KEY not in text
    assert f"https://me:{REDACTED}@api.example.com/v1" in text and f"Bearer {REDACTED}" in text


# --- files --------------------------------------------------------------------------------------


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or ()), list(reader)


def test_finish_writes_every_file_and_lists_them(tmp_path: Path) -> None:
    out = tmp_path / "run"
    writer = RunWriter(out)
    writer.append_records(records())
    result = pass_result(out)
    paths = writer.finish(result)

    assert {p.name for p in paths} == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, *ALL_PLOTS, REPORT_FILE}
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    for name in ALL_PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert result.files == [str(p) for p in paths] and result.notes == []

    saved = json.loads((out / SUMMARY_FILE).read_text())
    assert saved == json.loads(json.dumps(redact(result.to_json())))
    assert saved["verdict"] == "PASS" and saved["exit_code"] == 0 and saved["hit_rate"] == pytest.approx(0.98)
    assert [c["outcome"] for c in saved["checks"]] == ["pass"] * len(CHECK_TABLE)
    assert [r["label"] for r in saved["runs"]] == ["cache_on", "cache_off"]
    assert saved["runs"][0]["ttft"]["ci"]["per_repeat"] == list(RATIOS)
    assert {Path(f).name for f in saved["files"]} == {p.name for p in paths}

    # The console lists the files written.
    assert block(format_console(result, ascii_only=False), "files").split()[2:] == [p.name for p in paths]


def test_phases_csv_has_every_repeat_then_pooled_rows(tmp_path: Path) -> None:
    result = pass_result(tmp_path)
    RunWriter(tmp_path).finish(result)
    columns, rows = csv_rows(tmp_path / PHASES_FILE)
    assert tuple(columns) == PHASE_COLUMNS
    assert columns[:4] == ["name", "server", "repeat", "pooled"]
    per_server = 3 * len(PHASE_PLAN) + len(PHASE_PLAN)
    assert len(rows) == 2 * per_server
    on = rows[:per_server]
    assert [r["repeat"] for r in on[: len(PHASE_PLAN)]] == ["0"] * len(PHASE_PLAN)
    pooled = [r for r in on if r["pooled"] == "true"]
    assert [r["name"] for r in pooled] == [name for name, *_ in PHASE_PLAN]
    assert all(r["repeat"] == "" for r in pooled)
    warm = next(r for r in pooled if r["name"] == "warm")
    assert int(warm["requests"]) == 120 and float(warm["hit_rate_counters"]) == pytest.approx(0.98)
    assert float(warm["ttft_p50_s"]) == pytest.approx(result.runs[0].pooled[1].ttft.p50)
    off_warm = next(r for r in rows[per_server:] if r["name"] == "warm" and r["pooled"] == "true")
    assert off_warm["server"] == "cache_off" and off_warm["hit_rate_counters"] == ""  # unknown, not 0


def test_a_partial_run_keeps_summary_csv_and_says_why_no_plot(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    result = partial_result(tmp_path)
    paths = writer.finish(result)
    assert {p.name for p in paths} == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, REPORT_FILE}
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["verdict"] == "UNKNOWN" and saved["partial"] is True and saved["hit_rate"] is None
    assert saved["notes"] == result.notes
    assert result.notes == [
        f"{TTFT_PLOT_FILE} not drawn: no request finished with a time to first token",
        f"{HIT_RATE_PLOT_FILE} not drawn: no hit rate or ceiling was measured",
        f"{TTFT_REPEATS_PLOT_FILE} not drawn: no TTFT repeat finished",
    ]
    columns, rows = csv_rows(tmp_path / PHASES_FILE)
    assert tuple(columns) == PHASE_COLUMNS and rows == []
    text = format_console(result, ascii_only=False)
    assert f"note    {TTFT_PLOT_FILE} not drawn" in text


def test_a_result_with_no_server_at_all_is_written(tmp_path: Path) -> None:
    result = TestResult(config={"api_key": FAKE_KEY}, partial=True, error="ConfigError: bad model_name")
    RunWriter(tmp_path).finish(result)
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["verdict"] == "UNKNOWN" and saved["reason"] == "the run did not finish: ConfigError: bad model_name"
    assert saved["config"]["api_key"] == REDACTED and saved["out_dir"] == str(tmp_path)


def test_finish_twice_does_not_repeat_notes(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    result = partial_result(tmp_path)
    writer.finish(result)
    writer.finish(result)
    assert len(result.notes) == 3


def test_a_reused_folder_loses_the_old_runs_plots_and_records(tmp_path: Path) -> None:
    first = RunWriter(tmp_path)
    first.append_records(records())
    first.finish(pass_result(tmp_path))
    second = RunWriter(tmp_path)
    second.append_records(records(1))
    second.finish(partial_result(tmp_path))
    assert not any((tmp_path / name).exists() for name in ALL_PLOTS)
    assert (tmp_path / RECORDS_FILE).read_text().count("\n") == 1


def test_append_records_flushes_each_call(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    rows = records(30)
    for start in range(0, len(rows), 7):
        assert writer.append_records(rows[start : start + 7]) == len(rows[start : start + 7])
        # Readable at once by another process: nothing waits for close() or finish().
        assert len((tmp_path / RECORDS_FILE).read_text().splitlines()) == min(start + 7, len(rows))
    assert writer.append_records([]) == 0
    assert writer.records_written == len(rows)
    saved = [json.loads(line) for line in (tmp_path / RECORDS_FILE).read_text().splitlines()]
    assert [r["request_id"] for r in saved] == [r["request_id"] for r in rows]


def test_records_with_nan_and_odd_types_stay_valid_json(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.append_records([{"request_id": "x", "ttft_s": float("nan"), "out": tmp_path, "ok": False, "ids": (1, 2)}])
    rec = json.loads((tmp_path / RECORDS_FILE).read_text())
    assert rec == {"request_id": "x", "ttft_s": None, "out": str(tmp_path), "ok": False, "ids": [1, 2]}


def test_write_summary_is_atomic_and_takes_partial_results(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    result = pass_result(tmp_path)
    result.config["padding"] = "x" * 500_000
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                text = (tmp_path / SUMMARY_FILE).read_text()
            except FileNotFoundError:
                continue
            json.loads(text)  # raises if a half-written file is ever visible
            seen.append(text[:20])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            result.partial = i < 19
            result.duration_s = float(i)
            writer.write_summary(result)
        writer.write_summary(partial_result(tmp_path))
    finally:
        stop.set()
        thread.join()
    assert seen
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["verdict"] == "UNKNOWN" and saved["partial"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_an_unwritable_out_dir_names_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="out_dir="):
        RunWriter(blocker / "run")


@dataclasses.dataclass(frozen=True)
class _ClientConfig:
    base_url: str
    api_key: str


def test_no_written_file_contains_a_secret(tmp_path: Path) -> None:
    """An api_key, a bearer token and a URL password, in every file the run writes."""
    writer = RunWriter(tmp_path)
    rows = records()
    rows[0]["error"] = f"401 from server, sent Authorization: Bearer {FAKE_KEY}"
    rows[1]["api_key"] = FAKE_KEY
    rows[2]["url"] = f"http://user:{FAKE_KEY}@10.0.0.2:8000/v1/completions"
    writer.append_records(rows)
    result = pass_result(tmp_path)
    on = result.runs[0]
    leaky_server = dataclasses.replace(on.evidence.server, base_url=f"http://user:{FAKE_KEY}@127.0.0.1:8000/v1")
    leaky_phase = dataclasses.replace(on.phases[0], first_error=f"403: Bearer {FAKE_KEY} refused")
    result.runs[0] = dataclasses.replace(
        on,
        evidence=dataclasses.replace(on.evidence, server=leaky_server),
        phases=(leaky_phase, *on.phases[1:]),
    )
    result.config["client_config"] = _ClientConfig("http://127.0.0.1:8011/v1", FAKE_KEY)
    result.error = f"ServerResponseError: http://user:{FAKE_KEY}@127.0.0.1:8000/v1 said 500"
    writer.write_summary(result)
    paths = writer.finish(result)
    assert {PHASES_FILE, SUMMARY_FILE, RECORDS_FILE} <= {p.name for p in paths}
    for path in tmp_path.iterdir():
        assert FAKE_KEY.encode() not in path.read_bytes(), path.name
    assert FAKE_KEY not in format_console(result)

    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["config"]["api_key"] == REDACTED and saved["config"]["client"]["headers"]["Authorization"] == REDACTED
    assert saved["config"]["client_config"]["api_key"] == REDACTED
    assert saved["runs"][0]["server"]["base_url"] == f"http://user:{REDACTED}@127.0.0.1:8000/v1"
    assert saved["config"]["max_tokens"] == 32  # counts of tokens are no secrets
    _, csv_saved = csv_rows(tmp_path / PHASES_FILE)
    assert csv_saved[0]["first_error"] == f"403: Bearer {REDACTED} refused"
    lines = [json.loads(line) for line in (tmp_path / RECORDS_FILE).read_text().splitlines()]
    assert lines[1]["api_key"] == REDACTED and lines[0]["error"].endswith(f"Bearer {REDACTED}")
    assert lines[2]["url"] == f"http://user:{REDACTED}@10.0.0.2:8000/v1/completions"


def test_other_commands_write_through_the_same_redaction(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    path = write_json_file(
        tmp_path / "bench" / "result.json",
        {
            "api_key": FAKE_KEY,
            "rps": np.float64(12.5),
            "samples": np.array([1.0, float("nan")]),
            "config": _ClientConfig(f"http://u:{FAKE_KEY}@h/v1", FAKE_KEY),
        },
    )
    saved = json.loads(path.read_text())
    assert saved == {
        "api_key": REDACTED,
        "rps": 12.5,
        "samples": [1.0, None],
        "config": {"base_url": f"http://u:{REDACTED}@h/v1", "api_key": REDACTED},
    }
    rows = tmp_path / "rollout" / "requests.jsonl"
    assert write_records(rows, [{"hf_token": FAKE_KEY}, {"n": 1}]) == 2
    assert write_records(rows, [{"n": 2}]) == 1  # replaces unless told to append
    assert write_records(rows, [{"n": 3}], append=True) == 1
    assert [json.loads(line) for line in rows.read_text().splitlines()] == [{"n": 2}, {"n": 3}]
    write_records(rows, [{"hf_token": FAKE_KEY}])
    assert FAKE_KEY not in rows.read_text()


# --- plots --------------------------------------------------------------------------------------


class _Drawn:
    """What the plots asked matplotlib to draw: texts, bar heights, horizontal lines, titles."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from matplotlib.axes import Axes

        self.texts: list[str] = []
        self.bars: list[float] = []
        self.hlines: list[float] = []
        self.titles: list[str] = []

        def spy(name: str, record: Any) -> None:
            original = getattr(Axes, name)

            def wrapper(ax: Any, *args: Any, **kwargs: Any) -> Any:
                record(*args, **kwargs)
                return original(ax, *args, **kwargs)

            monkeypatch.setattr(Axes, name, wrapper)

        spy("annotate", lambda text, *a, **k: self.texts.append(str(text)))
        spy("bar", lambda xs, heights, *a, **k: self.bars.extend(heights))
        spy("axhline", lambda y=0, *a, **k: self.hlines.append(y))
        spy("set_title", lambda label, *a, **k: self.titles.append(label))


def test_ttft_by_phase_has_one_panel_per_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _Drawn(monkeypatch)
    assert report_plots.plot_ttft_by_phase(tmp_path / TTFT_PLOT_FILE, pass_result(tmp_path))
    assert drawn.titles == ["cache on", "cache off"]
    assert any(text.startswith("p50 ") and text.endswith(" ms") for text in drawn.texts)
    assert (tmp_path / TTFT_PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_hit_rate_plot_writes_na_instead_of_a_zero_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _Drawn(monkeypatch)
    assert report_plots.plot_hit_rate(tmp_path / HIT_RATE_PLOT_FILE, no_counters_result(tmp_path))
    # counters missing: no bar for them, "n/a" where it would be; cached_tokens and ceiling drawn.
    assert drawn.bars == [pytest.approx(0.98, abs=1e-3), pytest.approx(0.98, abs=1e-3)]
    assert drawn.texts.count("n/a") == 1
    drawn.bars.clear()
    drawn.texts.clear()
    assert report_plots.plot_hit_rate(tmp_path / HIT_RATE_PLOT_FILE, pass_result(tmp_path))
    # cache off has no counters (n/a) but a real 0.00 from cached_tokens.
    assert drawn.texts.count("n/a") == 1 and "0.00\n(0%)" in drawn.texts


def test_ttft_repeats_plot_draws_the_minimum_effect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _Drawn(monkeypatch)
    result = pass_result(tmp_path)
    assert report_plots.plot_ttft_repeats(tmp_path / TTFT_REPEATS_PLOT_FILE, result)
    assert drawn.hlines == [1.0, 1.2]
    assert "10.6x\n95% CI 9.46–11.4" in drawn.texts
    assert (tmp_path / TTFT_REPEATS_PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as when
    # the `plots` extra is not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_without_matplotlib_the_rest_is_written_and_the_reason_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_matplotlib(monkeypatch)
    writer = RunWriter(tmp_path)
    writer.append_records(records())
    result = pass_result(tmp_path)
    paths = writer.finish(result)
    assert {p.name for p in paths} == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, REPORT_FILE}
    assert len(result.notes) == 1 and "matplotlib is not installed" in result.notes[0]
    assert PLOTS_INSTALL_HINT in result.notes[0]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["notes"] == result.notes
    assert "note    plots skipped: matplotlib is not installed" in format_console(result, ascii_only=False)


def test_a_failing_plot_loses_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path, result: TestResult) -> bool:
        raise ValueError("bad data")

    broken = tuple(dataclasses.replace(p, draw=boom) if p.file == TTFT_PLOT_FILE else p for p in report_plots.PLOTS)
    monkeypatch.setattr(report_plots, "PLOTS", broken)
    result = pass_result(tmp_path)
    names = {p.name for p in RunWriter(tmp_path).finish(result)}
    assert names == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, HIT_RATE_PLOT_FILE, TTFT_REPEATS_PLOT_FILE, REPORT_FILE}
    assert result.notes == [f"{TTFT_PLOT_FILE} not drawn: ValueError: bad data"]


# --- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "API_KEY",
        "wandb_api_key",
        "Authorization",
        "hf_token",
        "token",
        "password",
        "openai-api-key",
        "secret_key",
    ],
)
def test_secret_keys_are_recognised(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "prompt_tokens",
        "max_tokens",
        "cached_tokens",
        "completion_tokens",
        "token_plan",
        "tokenized_by",
        "tokens_per_s",
        "shared_prefix_tokens",
        "key_count",
        "unit_tokens",
        "ceiling_tokens",
    ],
)
def test_token_counts_are_not_secrets(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_hides_keys_urls_and_bearer_tokens_but_keeps_counts() -> None:
    cfg = config(Path("/tmp"))
    clean = redact({"config": cfg, "usage": {"prompt_tokens": 612, "max_tokens": 32}})
    assert FAKE_KEY not in json.dumps(clean)
    assert clean["config"]["api_key"] == REDACTED and clean["config"]["client"]["headers"]["Authorization"] == REDACTED
    assert clean["config"]["baseline_url"] == f"http://user:{REDACTED}@10.0.0.2:8000/v1"
    assert clean["usage"] == {"prompt_tokens": 612, "max_tokens": 32}
    assert redact({"api_key": None}) == {"api_key": None}  # "no key set" stays visible
    assert cfg["api_key"] == FAKE_KEY  # the input is not modified


def test_redaction_of_a_long_value_stays_fast() -> None:
    # An unbounded URL-scheme pattern backtracks quadratically over a long run of letters.
    value: Sequence[str] = ["a" * 200_000 + "://x"]
    assert redact(value) == list(value)


class _FakeWandb:
    """Stands in for the ``wandb`` module (not installed in CI): keeps what the sink asked of it."""

    def __init__(self) -> None:
        self.init_kwargs: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []
        self.finished = False

    def init(self, **kwargs: Any) -> _FakeWandb:
        self.init_kwargs = kwargs
        return self

    def log(self, figures: dict[str, Any]) -> None:
        self.logged.append(figures)

    def finish(self) -> None:
        self.finished = True


class _Kept:
    def __init__(self) -> None:
        self.finished: list[TestResult] = []

    def append_records(self, rows: Any) -> int:
        return len(list(rows))

    def write_summary(self, result: TestResult) -> None:
        return None

    def finish(self, result: TestResult) -> str:
        self.finished.append(result)
        return "files written"


def test_wandb_gets_the_final_figures_and_settings_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from echo_env.report.wandb_log import WandbLog

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    inner = _Kept()
    result = pass_result(tmp_path)
    assert WandbLog(inner, "echo-runs", "night-1").finish(result) == "files written"
    assert inner.finished == [result]
    assert fake.init_kwargs["project"] == "echo-runs" and fake.init_kwargs["name"] == "night-1"
    assert FAKE_KEY not in json.dumps(fake.init_kwargs["config"])
    assert fake.init_kwargs["config"]["batch_size"] == result.config["batch_size"]
    (figures,) = fake.logged
    assert figures["verdict"] == "PASS"
    warm = next(p for p in result.runs[0].pooled if p.name == "warm")
    assert figures["hit_rate/warm"] == warm.hit.value and figures["time/ttft_p50_warm"] == warm.ttft.p50
    assert fake.finished


def test_wandb_missing_leaves_the_files_and_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from echo_env.report.wandb_log import WandbLog

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    inner = _Kept()
    result = partial_result(tmp_path)
    assert WandbLog(inner, "echo-runs").finish(result) == "files written"
    assert inner.finished == [result]
    assert "pip install wandb" in caplog.text
