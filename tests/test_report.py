"""The report: console summary, files on disk, redaction and plots, all offline."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from echo_env.report.files import (
    HIT_RATE_PLOT_FILE,
    PHASE_COLUMNS,
    PHASES_FILE,
    RECORDS_FILE,
    REDACTED,
    SUMMARY_FILE,
    TTFT_PLOT_FILE,
    RunWriter,
    format_console,
    is_secret_key,
    redact,
    ttft_samples,
)

FAKE_KEY = "sk-test-DO-NOT-LEAK-4242"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- a realistic run ----------------------------------------------------------------------


def _phase(name: str, server: str, repeat: int | None, ttft: float, requests: int, hit: float | None) -> dict[str, Any]:
    return {
        "name": name,
        "server": server,
        "repeat": repeat,
        "requests": requests,
        "failed": 1 if name == "control" and server == "cache_on" else 0,
        "wall_s": 0.4 + requests * 0.01,
        "throughput_rps": requests / (0.4 + requests * 0.01),
        "tokens_per_s": 6 * requests / (0.4 + requests * 0.01),
        "ttft_p50_s": ttft,
        "ttft_p90_s": ttft * 1.3,
        "ttft_p99_s": ttft * 1.6,
        "e2e_p50_s": ttft + 0.05,
        "e2e_p90_s": ttft * 1.3 + 0.05,
        "e2e_p99_s": ttft * 1.6 + 0.05,
        "itl_p50_s": 0.008,
        "itl_p90_s": 0.011,
        "itl_p99_s": 0.02,
        "prompt_tokens": 612 * requests,
        "cached_tokens": None if hit is None else int(612 * requests * hit),
        "hit_rate": hit,
        "hit_rate_reported": None if hit is None else max(hit - 0.01, 0.0),
        "hit_rate_ceiling": 0.0 if name == "control" else (0.0 if name == "cold" else 0.98),
        "counter_reset": False,
        "mean_reward": 1.0,
    }


_TTFT = {
    ("cache_on", "cold"): 0.31,
    ("cache_on", "warm_single"): 0.041,
    ("cache_on", "warm"): 0.045,
    ("cache_on", "control"): 0.118,
}
_TTFT_OFF = {
    ("cache_off", "cold"): 0.30,
    ("cache_off", "warm_single"): 0.29,
    ("cache_off", "warm"): 0.121,
    ("cache_off", "control"): 0.119,
}
_HIT = {"cold": 0.0, "warm_single": 0.96, "warm": 0.97, "control": 0.0}
_SINGLE = ("cold", "warm_single")  # one request per repeat


def full_summary(out_dir: Path) -> dict[str, Any]:
    """A finished PASS run with two repeats and a cache-off comparison."""
    phases = []
    for server, ttfts in (("cache_on", _TTFT), ("cache_off", _TTFT_OFF)):
        for repeat in (0, 1):
            for (_, name), ttft in ttfts.items():
                hit = _HIT[name] if server == "cache_on" else 0.0
                phases.append(_phase(name, server, repeat, ttft, 1 if name in _SINGLE else 127, hit))
    by_phase = {
        server: {
            name: _phase(name, server, None, ttft, 2 if name in _SINGLE else 254, _HIT[name] * (server == "cache_on"))
            for (_, name), ttft in ttfts.items()
        }
        for server, ttfts in (("cache_on", _TTFT), ("cache_off", _TTFT_OFF))
    }
    return {
        "verdict": "PASS",
        "reason": "prefix caching works",
        "checks": [
            {"name": "caching enabled", "passed": True, "detail": "vllm:cache_config_info enable_prefix_caching=True"},
            {"name": "prefix shared", "passed": True, "detail": "598 shared tokens, 592 cacheable (37 blocks of 16)"},
            {"name": "hit rate vs ceiling", "passed": True, "detail": "0.97 >= 90% of 0.98"},
            {"name": "warm TTFT < control", "passed": True, "detail": "2.6x faster, CI 2.3-2.9 excludes 1"},
            {"name": "cached_tokens agree", "passed": None, "detail": "server does not report usage.cached_tokens"},
        ],
        "hit_rate": 0.97,
        "hit_rate_source": "metrics",
        "hit_rate_reported": 0.96,
        "hit_rate_ceiling": 0.98,
        "hit_rate_vs_ceiling": 0.97 / 0.98,
        "workload_hit_rate": 0.965,
        "workload_hit_rate_ceiling": 0.975,
        "server": {
            "base_url": "http://127.0.0.1:8011/v1",
            "metrics_url": "http://127.0.0.1:8011/metrics",
            "kind": "vllm",
            "version": "0.32.0",
            "model": "gemma-3-270m-it",
            "prefix_caching_enabled": True,
            "block_size": 16,
            "embedded": True,
        },
        "token_plan": {
            "tokenized_by": "tokenizer of gemma-3-270m-it",
            "prompt_tokens_min": 609,
            "prompt_tokens_max": 615,
            "shared_prefix_tokens": 598,
            "cacheable_shared_tokens": 592,
            "block_size": 16,
            "hit_rate_ceiling": 0.98,
            "first_difference": None,
        },
        "phases": phases,
        "by_phase": by_phase,
        "ttft_p50_s": {"cold": 0.31, "warm": 0.045, "control": 0.118},
        "throughput_rps": {"cold": 3.2, "warm": 75.1, "control": 70.3},
        "speedup_ttft": {"ratio": 2.62, "low": 2.31, "high": 2.94},
        "speedup_ttft_cold_vs_warm_single": {"ratio": 7.56, "low": 7.1, "high": 8.0},
        "speedup_throughput": 1.07,
        "cache_off": {
            "verdict": "FAIL",
            "reason": "hits at zero",
            "hit_rate": 0.0,
            "ttft_p50_s": {"cold": 0.30, "warm": 0.121, "control": 0.119},
            "throughput_rps": {"cold": 3.3, "warm": 50.2, "control": 51.0},
            "speedup_ttft_on_vs_off": {"ratio": 2.69, "low": 2.4, "high": 3.0},
            "throughput_ratio_on_vs_off": 1.5,
        },
        "config": {
            "base_url": None,
            "model_name": "gemma-3-270m-it",
            "api": "completions",
            "batch_size": 16,
            "group_size": 8,
            "max_tokens": 32,
            "api_key": FAKE_KEY,
            "hf_token": FAKE_KEY,
            "baseline_url": f"http://user:{FAKE_KEY}@10.0.0.2:8000/v1",
            "client": {"headers": {"Authorization": f"Bearer {FAKE_KEY}"}},
        },
        "started_at": "2025-06-01T12:00:00+00:00",
        "finished_at": "2025-06-01T12:00:41+00:00",
        "duration_s": 41.3,
        "partial": False,
        "error": None,
        "out_dir": str(out_dir),
    }


def partial_summary(out_dir: Path) -> dict[str, Any]:
    """A run that died during the warm phase, before anything was pooled."""
    return {
        "verdict": "UNKNOWN",
        "reason": "the run stopped before the warm phase finished",
        "checks": [{"name": "caching enabled", "passed": None, "detail": None}],
        "hit_rate": None,
        "hit_rate_source": None,
        "hit_rate_reported": None,
        "hit_rate_ceiling": None,
        "hit_rate_vs_ceiling": None,
        "server": {
            "base_url": "http://localhost:8000/v1",
            "kind": None,
            "version": None,
            "model": None,
            "prefix_caching_enabled": None,
            "block_size": None,
            "embedded": False,
        },
        "token_plan": None,
        "phases": [
            {
                "name": "cold",
                "server": "cache_on",
                "repeat": 0,
                "requests": 1,
                "failed": 0,
                "ttft_p50_s": 0.3,
                "hit_rate": None,
                "counter_reset": True,
            },
        ],
        "by_phase": None,
        "ttft_p50_s": {"cold": 0.3, "warm": None, "control": None},
        "throughput_rps": None,
        "speedup_ttft": None,
        "speedup_throughput": None,
        "cache_off": None,
        "config": {"api_key": FAKE_KEY},
        "started_at": "2025-06-01T12:00:00+00:00",
        "finished_at": None,
        "duration_s": None,
        "partial": True,
        "error": "ServerUnreachableError: nothing answered at http://localhost:8000/v1",
        "out_dir": str(out_dir),
    }


def fake_records(with_cache_off: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """Per-request records with TTFTs scattered around the phase medians."""
    rng = random.Random(seed)
    table = {**_TTFT, **(_TTFT_OFF if with_cache_off else {})}
    records = []
    for (server, phase), ttft in table.items():
        for i in range(2 if phase in _SINGLE else 60):
            t = ttft * rng.lognormvariate(0, 0.15)
            ok = not (phase == "control" and i == 0)
            records.append(
                {
                    "request_id": f"{server}-{phase}-{i}",
                    "api": "completions",
                    "tag": "run-abc",
                    "phase": phase,
                    "server": server,
                    "repeat": i % 2,
                    "agent": f"agent_{i}",
                    "sent_at": 1000.0 + i * 0.01,
                    "queue_s": 0.0,
                    "ttft_s": t if ok else None,
                    "e2e_s": t + 0.05 if ok else 30.0,
                    "prompt_tokens": 612,
                    "completion_tokens": 6,
                    "cached_tokens": 592 if phase == "warm" and server == "cache_on" else 0,
                    "attempts": 1,
                    "ok": ok,
                    "error": None if ok else "ReadTimeout",
                    "status": 200 if ok else None,
                    "text": "Echo: apple",
                }
            )
    return records


# --- console --------------------------------------------------------------------------------


def test_console_starts_with_verdict_and_reason(tmp_path: Path) -> None:
    text = format_console(full_summary(tmp_path), ascii_only=False)
    first, second, third, fourth = text.splitlines()[:4]
    assert first == "PASS  prefix caching works"
    assert "hit rate 0.97 of a 0.98 ceiling (99%)" in second
    assert "warm vs control: TTFT 2.6x faster (CI 2.3–2.9), req/s 1.07x" in second
    assert "cold prompt sent again: TTFT 7.6x faster (CI 7.1–8.0)" in third
    assert "cache off: FAIL, hit rate 0.00 (hits at zero)" in fourth
    assert "cache on vs off: warm TTFT 2.7x faster (CI 2.4–3.0), req/s 1.50x" in fourth


def test_console_is_short_and_shows_both_servers(tmp_path: Path) -> None:
    lines = format_console(full_summary(tmp_path), files=[tmp_path / SUMMARY_FILE]).splitlines()
    assert len(lines) <= 30
    assert max(len(line) for line in lines) <= 120
    table = "\n".join(lines)
    assert "cache on" in table and "cache off" in table
    # Warm row of cache on: TTFT p50 45 ms, hit rate measured | reported | ceiling.
    warm = next(line for line in lines if line.strip().startswith("warm "))
    assert "45.0" in warm and "0.97" in warm and "0.96" in warm and "0.98" in warm
    files_at = next(i for i, line in enumerate(lines) if line.startswith("files"))
    assert str(tmp_path) in lines[files_at] and SUMMARY_FILE in lines[files_at + 1]


def test_console_marks_checks(tmp_path: Path) -> None:
    text = format_console(full_summary(tmp_path), ascii_only=False)
    assert "✓ caching enabled" in text
    assert "? cached_tokens agree" in text
    ascii_text = format_console(full_summary(tmp_path), ascii_only=True)
    assert ascii_text.isascii()
    assert "+ caching enabled" in ascii_text


def test_console_shows_none_as_na_and_flags_a_partial_run(tmp_path: Path) -> None:
    text = format_console(partial_summary(tmp_path))
    lines = text.splitlines()
    assert lines[0] == "UNKNOWN  the run stopped before the warm phase finished"
    assert "hit rate n/a" in lines[1]
    assert "run incomplete: ServerUnreachableError" in text
    assert "None" not in text
    assert "n/a" in text
    assert "prefix caching unknown" in text
    # The only phase is a per-repeat entry whose counters reset.
    assert "cold #0" in text and "counters reset" in text


def test_console_survives_an_empty_summary() -> None:
    text = format_console({})
    assert text.splitlines()[0].startswith("UNKNOWN")
    assert "None" not in text


def test_console_names_where_prompts_first_differ(tmp_path: Path) -> None:
    summary = full_summary(tmp_path)
    summary["verdict"], summary["reason"] = "FAIL", "prefix not shared: prompts first differ at token 3"
    summary["token_plan"]["first_difference"] = {"position": 3, "other_index": 1, "context": "<bos>agent_1 You"}
    text = format_console(summary)
    assert text.splitlines()[0].startswith("FAIL  prefix not shared")
    assert "first differ at token 3 (prompt #1): '<bos>agent_1 You'" in text


def test_a_long_reason_is_wrapped_not_cut(tmp_path: Path) -> None:
    summary = full_summary(tmp_path)
    summary["verdict"] = "FAIL"
    summary["reason"] = (
        "hit rate far under the ceiling: 0.41 of a 0.98 ceiling (42%); the cache may be too small for "
        "batch_size x group_size agents in flight, raise --gpu-memory-utilization or lower batch_size"
    )
    lines = format_console(summary, ascii_only=False).splitlines()
    assert lines[0].startswith("FAIL  hit rate far under the ceiling")
    assert "lower batch_size" in lines[1] and lines[1].startswith("      ")
    assert "…" not in "".join(lines[:2])


def test_many_unpooled_phase_entries_are_capped(tmp_path: Path) -> None:
    summary = full_summary(tmp_path)
    summary["by_phase"] = None  # a run stopped before pooling: one row per repeat
    lines = format_console(summary, ascii_only=False).splitlines()
    assert len(lines) <= 30
    assert "warm #0" in "\n".join(lines)
    assert f"  … 8 more in {PHASES_FILE}" in lines


# --- files ------------------------------------------------------------------------------------


def test_finish_writes_parseable_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    writer = RunWriter(out)
    records = fake_records()
    writer.append_records(records)
    summary = full_summary(out)
    paths = writer.finish(summary)

    names = {p.name for p in paths}
    assert names == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, TTFT_PLOT_FILE, HIT_RATE_PLOT_FILE}
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)

    saved = json.loads((out / SUMMARY_FILE).read_text())
    assert saved["verdict"] == "PASS" and saved["hit_rate"] == 0.97
    assert saved["speedup_ttft"]["ratio"] == 2.62 and saved["ttft_p50_s"]["warm"] == 0.045
    assert saved["report"]["notes"] == [] and HIT_RATE_PLOT_FILE in saved["report"]["files"]
    assert summary["report"] == saved["report"]  # so the console can list files and notes

    lines = (out / RECORDS_FILE).read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [r["request_id"] for r in records]

    with (out / PHASES_FILE).open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ())[: len(PHASE_COLUMNS)] == PHASE_COLUMNS
        rows = list(reader)
    assert len(rows) == len(summary["phases"])
    assert rows[0]["name"] == "cold" and rows[0]["server"] == "cache_on" and rows[0]["counter_reset"] == "false"
    warm = next(row for row in rows if row["name"] == "warm")
    assert float(warm["ttft_p50_s"]) == pytest.approx(0.045) and float(warm["hit_rate"]) == pytest.approx(0.97)

    for name in (TTFT_PLOT_FILE, HIT_RATE_PLOT_FILE):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # The console can be rebuilt from the file alone, files and notes included.
    assert "ttft_by_phase.png" in format_console(saved)


def test_partial_run_still_writes_json_and_csv(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.append_records([r for r in fake_records(with_cache_off=False) if r["phase"] == "cold"])
    paths = writer.finish(partial_summary(tmp_path))
    names = {p.name for p in paths}
    assert {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, TTFT_PLOT_FILE} <= names
    # No hit rate was measured: no empty chart, and the summary says why.
    assert HIT_RATE_PLOT_FILE not in names
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["partial"] is True and saved["hit_rate"] is None
    assert any("hit_rate.png not drawn" in note for note in saved["report"]["notes"])
    with (tmp_path / PHASES_FILE).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["hit_rate"] == "" and rows[0]["counter_reset"] == "true"


def test_append_records_accumulates_and_flushes_each_call(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    records = fake_records()
    for start in range(0, len(records), 7):
        writer.append_records(records[start : start + 7])
        # Readable at once by another process: nothing waits for close() or finish().
        assert len((tmp_path / RECORDS_FILE).read_text().splitlines()) == min(start + 7, len(records))
    assert writer.append_records([]) == 0
    assert writer.records_written == len(records)


def test_records_with_nan_and_odd_types_stay_valid_json(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer.append_records([{"request_id": "x", "ttft_s": float("nan"), "out": tmp_path, "ok": False}])
    rec = json.loads((tmp_path / RECORDS_FILE).read_text())
    assert rec == {"request_id": "x", "ttft_s": None, "out": str(tmp_path), "ok": False}


def test_a_new_writer_does_not_mix_runs_in_one_folder(tmp_path: Path) -> None:
    RunWriter(tmp_path).append_records(fake_records())
    RunWriter(tmp_path).append_records([{"request_id": "only"}])
    assert (tmp_path / RECORDS_FILE).read_text().count("\n") == 1


def test_write_summary_is_atomic(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    big = full_summary(tmp_path)
    big["config"]["padding"] = "x" * 500_000
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
        for i in range(30):
            big["duration_s"] = float(i)
            writer.write_summary(big)
    finally:
        stop.set()
        thread.join()
    assert seen
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["duration_s"] == 29.0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- secrets --------------------------------------------------------------------------------


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
    ],
)
def test_token_counts_are_not_secrets(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_hides_keys_urls_and_bearer_tokens_but_keeps_counts() -> None:
    config = full_summary(Path("/tmp"))["config"]
    clean = redact({"config": config, "usage": {"prompt_tokens": 612, "max_tokens": 32}})
    assert FAKE_KEY not in json.dumps(clean)
    assert clean["config"]["api_key"] == REDACTED and clean["config"]["client"]["headers"]["Authorization"] == REDACTED
    assert clean["config"]["baseline_url"] == f"http://user:{REDACTED}@10.0.0.2:8000/v1"
    assert clean["usage"] == {"prompt_tokens": 612, "max_tokens": 32}
    assert redact({"api_key": None}) == {"api_key": None}  # "no key set" stays visible
    assert config["api_key"] == FAKE_KEY  # the input is not modified


@dataclasses.dataclass(frozen=True)
class _ClientConfig:
    base_url: str
    api_key: str


def test_no_written_file_contains_the_key(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    records = fake_records()
    records[0]["error"] = f"401 from server, sent Authorization: Bearer {FAKE_KEY}"
    records[1]["api_key"] = FAKE_KEY
    writer.append_records(records)
    summary = full_summary(tmp_path)
    summary["phases"][0]["token"] = FAKE_KEY
    summary["config"]["client_config"] = _ClientConfig("http://127.0.0.1:8011/v1", FAKE_KEY)
    writer.write_summary(summary)
    paths = writer.finish(summary)
    assert len(paths) == 5
    for path in tmp_path.iterdir():
        assert FAKE_KEY.encode() not in path.read_bytes(), path.name
    assert FAKE_KEY not in format_console(summary)
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["config"]["max_tokens"] == 32 and saved["token_plan"]["shared_prefix_tokens"] == 598


# --- plots ----------------------------------------------------------------------------------


def test_without_matplotlib_json_and_csv_are_written_and_the_reason_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as when
    # the `plots` extra is not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)

    writer = RunWriter(tmp_path)
    writer.append_records(fake_records())
    summary = full_summary(tmp_path)
    paths = writer.finish(summary)

    assert {p.name for p in paths} == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE}
    assert not (tmp_path / TTFT_PLOT_FILE).exists()
    assert len(writer.notes) == 1 and "matplotlib is not installed" in writer.notes[0]
    assert "echo-prefix-env[plots]" in writer.notes[0]
    saved = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert saved["report"]["notes"] == writer.notes
    text = format_console(summary, files=paths, notes=writer.notes)
    assert "plots skipped: matplotlib is not installed" in text


def test_a_failing_plot_does_not_lose_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import echo_env.report.files as report

    def boom(*args: Any, **kwargs: Any) -> bool:
        raise ValueError("bad data")

    monkeypatch.setattr(report, "_plot_ttft", boom)
    writer = RunWriter(tmp_path)
    writer.append_records(fake_records())
    names = {p.name for p in writer.finish(full_summary(tmp_path))}
    assert names == {SUMMARY_FILE, RECORDS_FILE, PHASES_FILE, HIT_RATE_PLOT_FILE}
    assert writer.notes == ["ttft_by_phase.png not drawn: ValueError: bad data"]


def test_ttft_samples_keep_only_successful_requests() -> None:
    samples = ttft_samples(fake_records())
    assert len(samples[("cache_on", "warm")]) == 60
    assert len(samples[("cache_on", "control")]) == 59  # the timed-out request has no TTFT
    assert set(samples) == {
        (s, p) for s in ("cache_on", "cache_off") for p in ("cold", "warm_single", "warm", "control")
    }
