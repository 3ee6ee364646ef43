"""Faults during a run: the server stalls, restarts or dies, or the user presses Ctrl-C.

What must hold whatever happens: the run ends within the configured timeouts, every
request is accounted for once (finished, or failed with its reason), counter deltas
never go negative, and what was measured is on disk with an honest verdict (UNKNOWN,
exit status 2, when the run could not finish).

The real-engine tests kill, stop and restart a server, so they use an engine of their
own (``own_engine``, one per module), never the session's. They run in file order:
SIGSTOP/SIGCONT first, then the restart, then SIGKILL last, which leaves it dead. The
Ctrl-C test runs first of all, before ``own_engine`` exists, because its command starts
an embedded engine itself (one engine of ours at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeOpenAIServer

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.commands.test import run_prefix_test
from echo_env.config import build
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.envs.task import EchoTask
from echo_env.envs.wrappers import ParallelTimingWrapper
from echo_env.errors import ServerUnreachableError
from echo_env.launch.engine import EmbeddedEngine, EngineConfig, group_members
from echo_env.rollout.worker import RolloutWorker, SamplingConfig, summarize_rollout
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord

pytestmark = pytest.mark.faults

# ----- helpers ------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended (status {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _numbers(obj: Any) -> Iterator[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and a
    # child inherits that: the command could then never see the Ctrl-C these tests send.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "echo_env", "test", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


# ----- without the engine: a restart and a SIGTERM, played by the stand-in ---------------


@pytest.mark.timeout(120)
def test_counters_reset_mid_phase_make_that_phase_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in 'restarts' as the warm phase starts; its counters end up *above* their old
    values, so only the changed ``_created`` time gives the restart away."""
    original = RolloutWorker.complete
    calls = {"n": 0}
    with FakeOpenAIServer() as fake:

        async def complete(self: RolloutWorker, prompts: Any, sessions: Any = None) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:  # cold, then warm
                fake.restart_counters()
            return await original(self, prompts, sessions)

        monkeypatch.setattr(RolloutWorker, "complete", complete)
        config = build(
            PrefixTestConfig, base_url=fake.base_url, batch_size=2, group_size=4, max_repeats=2, min_repeats=2,
            out_dir=str(tmp_path),
        )  # fmt: skip
        summary = run_prefix_test(config, show_progress=False).to_json()
    pooled = {p["name"]: p for p in summary["runs"][0]["pooled"]}
    warm = pooled["warm"]
    assert warm["counter_reset"] is True and warm["hit_rate_counters"] is None
    assert summary["verdict"] == "UNKNOWN" and summary["reason_id"] == "counters_intact"
    assert "restarted during the warm phase" in summary["reason"]
    assert all(x >= 0 for x in _numbers(summary["runs"][0]["phases"])), "a counter delta went negative"
    # The other phases kept their figures.
    assert pooled["ttft_control"]["hit_rate_counters"] is not None


@pytest.mark.timeout(120)
def test_sigterm_to_the_test_command_leaves_partial_results(tmp_path: Path) -> None:
    """``kill`` (or a CI job cancelled) ends the run like Ctrl-C: partial summary, exit 2."""
    with FakeOpenAIServer() as fake:
        fake.chunk_delay_s = 0.5  # keeps the warm phase in flight
        out = tmp_path / "run"
        proc = _cli(f"base_url={fake.base_url}", "batch_size=2", "group_size=4", "max_repeats=3", f"out_dir={out}")
        try:
            _wait_for(lambda: len(_lines(out / "requests.jsonl")) >= 1, 60, "the cold phase", proc)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 2, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "UNKNOWN" and summary["partial"] is True
    assert "interrupted" in summary["reason"]
    assert _lines(out / "requests.jsonl")


# ----- SIGTERM reaches a program in async or sync code: cleanup runs, no stray traceback ------

# What the child programs share: requests kept in flight against the stand-in, a task that
# keeps the CPU busy (where a signal raised "in whatever frame runs" used to land), and a
# line printed from each cleanup step so the test can see that it ran.
_CHILD_PRELUDE = """
import asyncio, sys, time
from echo_env.interrupts import run_main, sigterm_as_interrupt
from echo_env.wire.client import ClientConfig, LLMClient

async def spin():
    while True:
        sum(range(20000))
        await asyncio.sleep(0)

async def requests(url):
    async with LLMClient(ClientConfig(base_url=url, model="fake-model", max_retries=0)) as client:
        try:
            busy = asyncio.create_task(spin())
            calls = [client.generate("User: Please echo the following word: apple", max_tokens=8) for _ in range(8)]
            print("READY", flush=True)
            await asyncio.gather(*calls)
            busy.cancel()
        finally:
            print("CLEANUP", flush=True)
"""


def _sigterm_child(fake: FakeOpenAIServer, body: str) -> tuple[int, str, str]:
    """Run ``_CHILD_PRELUDE + body`` with the stand-in's URL; SIGTERM it once it is busy."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_PRELUDE + body, fake.base_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY", proc.communicate()
        _wait_for(lambda: fake.streams_open >= 1, 30, "requests in flight", proc)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "READY\n" + out, err


def _assert_clean_interrupt(status: int, out: str, err: str) -> None:
    assert status == 2, (out, err)
    assert out.split() == ["READY", "CLEANUP", "INTERRUPTED"], (out, err)
    assert "Traceback" not in err and "never retrieved" not in err, err


@pytest.mark.timeout(120)
def test_sigterm_cancels_the_main_coroutine_and_its_cleanup_runs() -> None:
    """``run_main``: SIGTERM cancels the main task like Ctrl-C; the caller gets KeyboardInterrupt."""
    body = """
try:
    run_main(lambda: requests(sys.argv[1]))
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(2)
"""
    with FakeOpenAIServer() as fake:
        fake.chunk_delay_s = 0.5  # keeps the requests in flight
        status, out, err = _sigterm_child(fake, body)
        _wait_for(lambda: fake.connections_open == 0, 10, "the client's connections to close")
    _assert_clean_interrupt(status, out, err)


@pytest.mark.timeout(120)
def test_sigterm_in_an_event_loop_run_by_other_code_lands_outside_every_task() -> None:
    """``sigterm_as_interrupt`` around a plain ``asyncio.run``: the interrupt comes from the loop, not a task."""
    body = """
try:
    with sigterm_as_interrupt():
        asyncio.run(requests(sys.argv[1]))
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(2)
"""
    with FakeOpenAIServer() as fake:
        fake.chunk_delay_s = 0.5
        status, out, err = _sigterm_child(fake, body)
    _assert_clean_interrupt(status, out, err)


@pytest.mark.timeout(60)
def test_sigterm_in_synchronous_code_is_a_keyboard_interrupt() -> None:
    """``sigterm_as_interrupt`` around blocking code (an engine starting, ``serve``): finally blocks run."""
    script = """
import signal, sys, time
from echo_env.interrupts import sigterm_as_interrupt
try:
    with sigterm_as_interrupt():
        try:
            print("READY", flush=True)
            time.sleep(60)
        finally:
            print("CLEANUP", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
print("restored" if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else "not restored", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["CLEANUP", "INTERRUPTED", "restored"], (out, err)


# ----- Ctrl-C on the command with its own embedded engine ----------------------------------


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_ctrl_c_stops_the_embedded_engine_and_keeps_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _cli("batch_size=2", "group_size=2", "max_repeats=20", "max_tokens=8", f"out_dir={out}")
    engine_pids: list[int] = []
    try:
        # Engine start-up (about a minute on a CPU), then the cold phase's record.
        _wait_for(lambda: len(_lines(out / "requests.jsonl")) >= 1, 480, "the first phase", proc)
        engine_pids = _children(proc.pid)
        assert engine_pids, "expected the embedded vLLM server as a child of the command"
        proc.send_signal(signal.SIGINT)
        start = time.perf_counter()
        _, stderr = proc.communicate(timeout=90)
        stopped_in = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in engine_pids:  # whatever happened, no engine outlives the test
            _killpg(pid, signal.SIGKILL)
    assert proc.returncode == 2, stderr[-3000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stopped_in < 60
    for pid in engine_pids:
        assert group_members(pid) == [], f"engine process group {pid} survived Ctrl-C"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "UNKNOWN" and summary["partial"] is True
    assert summary["error"] == "interrupted (Ctrl-C)"
    rows = _lines(out / "requests.jsonl")
    assert rows and rows[0]["phase"] == "cold" and rows[0]["ok"]


# ----- an engine of our own, to stop, restart and kill ------------------------------------


@pytest.fixture(scope="module")
def own_engine() -> Iterator[EmbeddedEngine]:
    """An embedded engine these tests may stop, restart and kill (prefix caching on)."""
    engine = EmbeddedEngine(EngineConfig(prefix_caching=True))
    engine.start()
    try:
        yield engine
    finally:
        if engine.pid is not None:
            _killpg(engine.pid, signal.SIGCONT)  # a stopped server would sit out SIGTERM
        engine.stop()


def _client(engine: EmbeddedEngine, **overrides: Any) -> LLMClient:
    config = {"timeout_s": 4.0, "max_retries": 2, "backoff_s": 0.2} | overrides
    return LLMClient(ClientConfig(base_url=engine.base_url, model=engine.served_model_name, **config))


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_stall_then_resume_retries_and_counts_each_request_once(own_engine: EmbeddedEngine) -> None:
    """SIGSTOP for longer than one timeout, then SIGCONT: the attempts that timed out are
    retried, and every agent ends with exactly one record, finished."""
    pgid = own_engine.pid
    assert pgid is not None
    # Attempt 1 times out at 10 s; attempt 2 goes out at ~10.2 s into the stall, and once
    # the server resumes at 12 s it has 8 s to answer, generously, on a loaded 2-core machine.
    timeout_s, stall_s = 10.0, 12.0

    async def go() -> tuple[Any, list[RequestRecord], float]:
        async with _client(own_engine, timeout_s=timeout_s) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=2))
            # Warm the connection pool and the model check before the stall.
            await worker.complete({"warm-up": EchoTask().transcript("apple")})
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=2, group_size=2))
            _killpg(pgid, signal.SIGSTOP)
            resume = asyncio.get_running_loop().call_later(stall_s, _killpg, pgid, signal.SIGCONT)
            start = time.perf_counter()
            try:
                steps = await worker.run_episode(env, seed=0)
            finally:
                resume.cancel()
                _killpg(pgid, signal.SIGCONT)
            return steps, worker.records[1:], time.perf_counter() - start

    steps, records, elapsed = asyncio.run(go())
    assert len(records) == 4, "one record per agent, however many attempts"
    assert all(r.ok for r in records), [r.error for r in records]
    assert all(2 <= r.attempts <= 3 for r in records), [r.attempts for r in records]
    assert elapsed < 3 * timeout_s + 3.0
    print(f"\nstall {stall_s:g} s, timeout {timeout_s:g} s: attempts {[r.attempts for r in records]}, {elapsed:.1f} s")
    step = steps[0]
    assert not step.failures and len(step.rewards) == 4
    summary = summarize_rollout(steps, elapsed)
    assert summary.requests == 4 and summary.agents == 4 and summary.failed == 0
    # Usage is one attempt's: a retried prompt is not counted twice.
    prompt_tokens = {r.prompt_tokens for r in records}
    assert all(p is not None and 400 < p < 700 for p in prompt_tokens), prompt_tokens
    assert summary.prompt_tokens == sum(r.prompt_tokens or 0 for r in records)


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_stall_beyond_every_retry_fails_cleanly_and_the_server_recovers(own_engine: EmbeddedEngine) -> None:
    pgid = own_engine.pid
    assert pgid is not None
    timeout_s, retries = 3.0, 1

    async def stalled() -> tuple[list[RequestRecord], float, BaseException | None]:
        async with _client(own_engine, timeout_s=timeout_s, max_retries=retries) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=2))
            await worker.complete({"warm-up": EchoTask().transcript("river")})
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=1, group_size=3))
            _killpg(pgid, signal.SIGSTOP)
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                await worker.run_episode(env, seed=1)
            except ServerUnreachableError as exc:
                error = exc
            finally:
                elapsed = time.perf_counter() - start
                _killpg(pgid, signal.SIGCONT)
            return worker.records[1:], elapsed, error

    records, elapsed, error = asyncio.run(stalled())
    assert isinstance(error, ServerUnreachableError), "a server that answers nothing must end the run"
    assert len(error.records) == 4  # type: ignore[attr-defined]  # the warm-up and the three failed
    assert len(records) == 3
    for record in records:
        assert not record.ok and record.error == f"timed out after {timeout_s:g} s"
        assert record.attempts == retries + 1
    assert elapsed < (retries + 1) * timeout_s + 3.0

    async def after() -> RequestRecord:
        async with _client(own_engine, timeout_s=120.0) as client:
            return await client.generate(EchoTask().transcript("apple"), max_tokens=4)

    assert asyncio.run(after()).ok, "the server should serve again after SIGCONT"


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_restart_mid_run_gives_no_negative_delta_and_an_unknown_hit_rate(
    own_engine: EmbeddedEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine restarts between the warm phase's two counter snapshots."""
    original = RolloutWorker.complete
    calls = {"n": 0}

    async def complete(self: RolloutWorker, prompts: Any, sessions: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # cold, then warm: restart at the same address
            own_engine.stop()
            own_engine.start()
        return await original(self, prompts, sessions)

    monkeypatch.setattr(RolloutWorker, "complete", complete)
    config = build(
        PrefixTestConfig, base_url=own_engine.base_url, batch_size=2, group_size=2, max_repeats=2, min_repeats=2,
        max_tokens=8, out_dir=str(tmp_path),
    )  # fmt: skip
    summary = run_prefix_test(config, show_progress=False).to_json()
    on = {p["name"]: p for p in summary["runs"][0]["pooled"]}
    assert on["warm"]["counter_reset"] is True and on["warm"]["hit_rate_counters"] is None
    assert on["warm"]["failed"] == 0, on["warm"]["first_error"]
    assert summary["verdict"] == "UNKNOWN" and "restarted" in summary["reason"]
    numbers = list(_numbers(summary["runs"][0]["phases"]))
    assert numbers and all(x >= 0 and not math.isnan(x) for x in numbers), "a counter delta went negative"
    # Phases wholly before or after the restart keep their counters.
    assert on["cold"]["counter_reset"] is False and on["ttft_control"]["counter_reset"] is False
    assert on["ttft_control"]["hit_rate_counters"] is not None


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_server_killed_mid_run_ends_the_command_with_partial_results(
    own_engine: EmbeddedEngine, tmp_path: Path
) -> None:
    """SIGKILL to the server's process group while the command runs. Last: the engine stays dead."""
    pgid = own_engine.pid
    assert pgid is not None
    out = tmp_path / "run"
    timeout_s = 20
    args = ["batch_size=4", "group_size=4", "max_repeats=3", "max_tokens=8", f"timeout_s={timeout_s}", f"out_dir={out}"]
    proc = _cli(f"base_url={own_engine.base_url}", *args)
    try:
        # The cold, warm and warm_single phases are on disk: the first TTFT burst is in flight.
        _wait_for(lambda: len(_lines(out / "requests.jsonl")) >= 17, 300, "three phases", proc)
        time.sleep(0.3)
        _killpg(pgid, signal.SIGKILL)
        killed = time.perf_counter()
        _, stderr = proc.communicate(timeout=timeout_s + 30)
        ended_in = time.perf_counter() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr[-3000:]
    assert "could not reach the server" in stderr and "Traceback" not in stderr
    assert ended_in < timeout_s, f"the command took {ended_in:.1f} s to give up on a dead server"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "UNKNOWN" and summary["partial"] is True
    assert "did not finish" in summary["reason"]
    rows = _lines(out / "requests.jsonl")
    finished = [r for r in rows if r["ok"]]
    failed = [r for r in rows if not r["ok"]]
    assert len(finished) >= 17
    assert failed, "the requests cut off by the kill must be on disk, failed"
    assert all(r["error"].startswith("connection failed") for r in failed), {r["error"] for r in failed}
    # Every request of the phase that was cut off is accounted for: finished or failed, once.
    last = (rows[-1]["phase"], rows[-1]["repeat"])
    in_last = [r for r in rows if (r["phase"], r["repeat"]) == last]
    sizes = {"cold": 1, "warm_single": 1, "warm": 15, "ttft_warm": 8, "ttft_control": 8}  # 4 x 4 agents, bursts of 8
    assert len(in_last) == sizes[last[0]], last
    assert len({r["request_id"] for r in rows}) == len(rows)
