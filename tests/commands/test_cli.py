"""The ``echo-prefix`` command line: errors a user meets, and the main job end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "echo_env", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["test", "batch_siz=3"], "did you mean batch_size"),
        (["test", "batch_size=0"], "batch_size must be at least 1"),
        (["test", "batch_size=many"], "not a whole number"),
        (["test", "max_tokens=100000"], "max_tokens=100000 is out of range"),
        (["test", "api=grpc"], "use one of completions, chat"),
        (["test", "nonsense"], "key=value"),
        (["rollout", "batching=everything"], "use one of per_agent, per_group, batched"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(args: list[str], needle: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback() -> None:
    proc = _cli("test", "batch_size=0", "debug=true")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unreachable_server_is_reported_not_crashed(tmp_path: Path) -> None:
    from echo_env.launch.engine import find_free_port

    url = f"http://127.0.0.1:{find_free_port()}/v1"
    proc = _cli("test", f"base_url={url}", f"out_dir={tmp_path}", "max_repeats=2", "min_repeats=2")
    assert proc.returncode == 2
    assert "no server answers" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "UNKNOWN" and summary["partial"] is True


def test_help_lists_every_key() -> None:
    proc = _cli("test", "--help")
    assert proc.returncode == 0
    for key in ("base_url", "batch_size", "group_size", "compare_without_cache", "baseline_url", "max_repeats"):
        assert key in proc.stdout


@pytest.mark.engine
def test_command_line_compare_without_cache_restarts_the_embedded_engine(tmp_path: Path) -> None:
    """The README's main job, shrunk: exit 0 on PASS, and the cache-off run fails its hit-rate check."""
    out = tmp_path / "run"
    args = [
        "compare_without_cache=true",
        "batch_size=4",
        "group_size=4",
        "max_repeats=4",
        "ttft_burst=4",
        f"out_dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "echo_env", "test", *args], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("PASS")
    summary = json.loads((out / "summary.json").read_text())
    on, off = summary["runs"]
    assert on["server"]["embedded"] is True and off["server"]["embedded"] is True
    assert off["verdict"] == "FAIL" and "caching disabled" in off["reason"]
    ratios = {c["name"]: c["ratio"] for c in summary["on_vs_off"]}
    assert ratios["cache on vs off: warm burst req/s"] > 1.0


@pytest.mark.engine
def test_rollout_prints_reward_and_latency_table(engine: Any, tmp_path: Path) -> None:
    proc = _cli(
        "rollout",
        f"base_url={engine.base_url}",
        "batch_size=2",
        "group_size=2",
        "max_tokens=8",
        "batching=per_group",
        f"out_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("mean_reward", "frac_correct", "frac_format_error", "ttft_s", "requests_per_s"):
        assert key in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["agents"] == 4 and summary["failed"] == 0
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 2


# ----- the exit status when the reader of the output goes away -----------------------------


def _cli_reader_gone(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command with its stdout reader gone before the first write (``echo-prefix ... | true``)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command starts: its first write meets EPIPE, every time
    try:
        return subprocess.run(
            [sys.executable, "-m", "echo_env", *args],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=timeout,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    ("case", "verdict", "status"),
    [("something varies before the shared text", "FAIL", 1), ("no metrics, no cached_tokens", "UNKNOWN", 2)],
)
def test_a_reader_that_went_away_keeps_the_verdicts_exit_status(
    tmp_path: Path, case: str, verdict: str, status: int
) -> None:
    """``echo-prefix test ... | true`` in a CI gate: a FAIL must still exit 1, never 0."""
    from fake_servers import BLOCK_SIZE, FakeOpenAIServer

    args = ["batch_size=2", "group_size=2", "ttft_burst=2", "max_repeats=3", "timeout_s=5", f"out_dir={tmp_path}"]
    with FakeOpenAIServer() as fake:
        if verdict == "FAIL":
            args.append("vary_before_prefix=true")
        else:
            fake.metrics_mode, fake.report_cached_tokens = "missing", False
            args.append(f"block_size={BLOCK_SIZE}")
        proc = _cli_reader_gone("test", f"base_url={fake.base_url}", *args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == verdict and summary["exit_code"] == status
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("verdict", ["PASS", "FAIL", "UNKNOWN"])
def test_cut_off_output_returns_the_exit_code_of_every_verdict(
    verdict: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every verdict's status survives a print that meets a closed pipe (the stdout write raises)."""
    import io

    import echo_env.commands.test
    from echo_env.cachetest.results import EXIT_CODES
    from echo_env.cli import main

    class _Result:
        exit_code = EXIT_CODES[verdict]
        error = None
        out_dir = "nowhere"

    class _ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(echo_env.commands.test, "run_prefix_test", lambda config, show_progress: _Result())
    monkeypatch.setattr(echo_env.commands.test, "format_console", lambda result: f"{verdict}: the report\n" * 5000)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["test", "base_url=http://127.0.0.1:9/v1"]) == EXIT_CODES[verdict]
    assert "Traceback" not in capsys.readouterr().err
