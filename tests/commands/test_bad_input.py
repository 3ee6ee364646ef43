"""Bad input of every kind, none of which may end in a traceback or a lost request.

- Config values: one line on stderr naming the fix, exit status 2, before any engine
  starts or server is asked (``tests/commands/test_cli.py`` has the first few; these extend it).
- Server answers: malformed JSON, a stream cut half-way, empty choices, 429/500/503, a
  ``/metrics`` page missing, empty or not Prometheus text. The real engine cannot be
  made to send these, so a small stand-in server plays them (``fake_servers.py``).
- Model output: empty, blank, 10,000 characters, replacement characters, control
  characters, another language, ``Echo:`` repeated; graded by the rules, and every
  observation stays inside the env's Text space.
- Misuse of the worker (the envs' own misuse errors are in test_envs/test_parallel).

No test here needs the real engine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium
import pytest
from fake_servers import BLOCK_SIZE, MODEL, FakeOpenAIServer, echo_reply

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.results import EXIT_CODES
from echo_env.commands.test import run_prefix_test
from echo_env.config import build
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.envs.wrappers import ParallelTimingWrapper, TimingWrapper
from echo_env.errors import ConfigError
from echo_env.launch.engine import find_free_port
from echo_env.rollout.worker import RolloutWorker, SamplingConfig, summarize_rollout
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord

pytestmark = pytest.mark.timeout(120)

PROMPT = "User: Please echo the following word: apple\nAssistant:"


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    """A well-behaved stand-in server; each test sets the faults it wants."""
    with FakeOpenAIServer() as server:
        yield server


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "echo_env", *args], capture_output=True, text=True, timeout=timeout)


def _dead_url() -> str:
    return f"http://127.0.0.1:{find_free_port()}/v1"


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # The progress bar (tqdm, on stderr, redrawn with \r) may have started: not an error line.
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


# ----- config values --------------------------------------------------------------------

# Every case names a dead base_url too: if a check ever moved to after the server is
# asked, the test fails on the message instead of quietly starting an engine.
_DEAD = "base_url=http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["test", _DEAD, "group_size=-3"], "group_size must be at least 1"),
        (["test", _DEAD, "max_repeats=0"], "max_repeats must be at least 1"),
        (["test", _DEAD, "batch_size=1", "group_size=1"], "at least 2 agents"),
        (["test", _DEAD, "max_tokens=0"], "max_tokens=0 is out of range"),
        (["test", _DEAD, "timeout_s=0"], "timeout_s must be positive"),
        (["test", _DEAD, "temperature=-1"], "temperature=-1.0 is out of range"),
        (["test", "base_url=localhost:8000"], "not an http(s) URL"),
        (["test", _DEAD, "baseline_url=ftp://x"], "baseline_url='ftp://x' is not an http(s) URL"),
        (["test", _DEAD, "api=chat", "prompt_format=tokens"], "prompt_format=tokens needs api=completions"),
        (["rollout", _DEAD, "batch_size=0"], "batch_size must be at least 1"),
        (["rollout", _DEAD, "group_size=-2"], "group_size must be at least 1"),
        (["rollout", _DEAD, "steps=0"], "steps must be at least 1"),
        (["rollout", _DEAD, "max_turns=0"], "max_turns must be at least 1"),
        (["rollout", _DEAD, "max_tokens=0"], "max_tokens=0 is out of range"),
        (["rollout", _DEAD, "max_tokens=70000"], "max_tokens=70000 is out of range"),
        (["rollout", _DEAD, "timeout_s=-1"], "timeout_s must be positive"),
        (["rollout", _DEAD, "max_concurrency=0"], "max_concurrency must be at least 1"),
        (["rollout", _DEAD, "api=chat", "batching=batched"], "only api=completions"),
        (["rollout", "base_url=127.0.0.1:8000"], "not an http(s) URL"),
        (["test", _DEAD, "batch_size=10000000"], "80,000,000 agents, over the limit of 65,536"),
        (["test", _DEAD, "batch_size=1024", "group_size=1024"], "lower batch_size or group_size"),
        (["test", _DEAD, "ttft_burst=40000"], "640,000 TTFT prompts, over the limit of 65,536"),
        (["test", _DEAD, "max_repeats=100000"], "lower max_repeats or ttft_burst"),
        (["test", _DEAD, "turns=100000"], "lower turns to at most"),
        (["rollout", _DEAD, "batch_size=10000000"], "80,000,000 agents, over the limit of 65,536"),
        (["serve", "port=70000"], "port=70000 is out of range"),
        (["serve", "kv_cache_gib=0"], "kv_cache_gib=0 is too small"),
    ],
)
def test_bad_config_value_is_one_line_naming_the_fix(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the entry point's main), so the many cases stay fast; the end-to-end
    # cases below run the real command.
    from echo_env.cli import main

    start = time.perf_counter()
    status = main(args)
    captured = capsys.readouterr()
    _assert_one_line_error(subprocess.CompletedProcess(args, status, captured.out, captured.err), needle)
    assert time.perf_counter() - start < 10, "a config error must not wait for a server or an engine"


def test_config_classes_refuse_bad_values_before_anything_starts() -> None:
    """Without base_url, a bad value must fail in the config, not after a minute of engine start-up."""
    from echo_env.commands.rollout import RolloutConfig

    for kwargs in ({"timeout_s": 0}, {"temperature": 11.0}, {"max_tokens": 0}, {"group_size": 0}):
        with pytest.raises(ConfigError):
            build(PrefixTestConfig, **kwargs)
        with pytest.raises(ConfigError):
            build(RolloutConfig, **kwargs)


@pytest.mark.parametrize("command", ["test", "rollout"])
def test_absurd_sizes_fail_before_any_engine_starts(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No base_url: the embedded engine would start, then build 80 million prompts; the config says no first."""
    import echo_env.commands.rollout
    import echo_env.commands.test
    import echo_env.launch.target
    from echo_env.cli import main

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("a server was opened for a config that cannot work")

    monkeypatch.setattr(echo_env.launch.target, "open_target", no_server)
    monkeypatch.setattr(echo_env.commands.test, "run_prefix_test", no_server)
    monkeypatch.setattr(echo_env.commands.rollout, "run_rollout", no_server)
    status = main([command, "batch_size=10000000", "group_size=8"])
    captured = capsys.readouterr()
    _assert_one_line_error(subprocess.CompletedProcess([], status, captured.out, captured.err), "limit of 65,536")
    assert "every agent's prompt" in captured.err


@pytest.mark.parametrize("command", ["test", "rollout"])
def test_unreachable_base_url(command: str, tmp_path: Path) -> None:
    proc = _cli(command, f"base_url={_dead_url()}", f"out_dir={tmp_path}", "batch_size=1", "group_size=2")
    _assert_one_line_error(proc, "no server answers at base_url=")


@pytest.mark.parametrize("command", ["test", "rollout"])
def test_base_url_that_is_a_web_page(command: str, fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.html_only = True
    proc = _cli(command, f"base_url={fake.base_url}", f"out_dir={tmp_path}", "batch_size=1", "group_size=2")
    _assert_one_line_error(proc, "did not answer like an OpenAI-compatible server")
    assert "check base_url" in proc.stderr


@pytest.mark.parametrize("command", ["test", "rollout"])
def test_model_the_server_does_not_serve(command: str, fake: FakeOpenAIServer, tmp_path: Path) -> None:
    args = [f"base_url={fake.base_url}", "model_name=no-such-model", f"out_dir={tmp_path}"]
    proc = _cli(command, *args, "batch_size=1", "group_size=2")
    _assert_one_line_error(proc, f"set model_name={MODEL}")
    assert fake.completions_received == 0


def test_debug_shows_the_traceback_of_a_server_error() -> None:
    proc = _cli("rollout", f"base_url={_dead_url()}", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ServerUnreachableError" in proc.stderr


# ----- server answers -------------------------------------------------------------------


def _generate(fake: FakeOpenAIServer, **config: Any) -> RequestRecord:
    async def go() -> RequestRecord:
        cfg = ClientConfig(base_url=fake.base_url, model=MODEL, **({"backoff_s": 0.01} | config))
        async with LLMClient(cfg) as client:
            return await client.generate(PROMPT, max_tokens=8)

    return asyncio.run(go())


@pytest.mark.parametrize("transport", ["sse", "openai"])
@pytest.mark.parametrize(
    ("fault", "status", "error", "retried"),
    [
        ("malformed_json", 200, "malformed response", False),
        ("raw_bytes", 200, "malformed response", False),  # bytes that are not UTF-8
        ("empty_choices", 200, "expected 1 choices, the stream carried 0", False),
        ("cut", 200, "connection failed", True),
        ("status", 429, "HTTP 429", True),
        ("status", 500, "HTTP 500", True),
        ("status", 503, "HTTP 503", True),
        ("status", 400, "HTTP 400", False),
    ],
)
def test_a_bad_answer_is_a_failed_record_with_the_reason(
    fake: FakeOpenAIServer, fault: str, status: int, error: str, retried: bool, transport: str
) -> None:
    fake.fault, fake.fault_status = fault, status
    record = _generate(fake, max_retries=2, transport=transport)
    assert not record.ok
    assert record.error is not None and record.error.startswith(error), record.error
    assert record.attempts == (3 if retried else 1)
    # Each attempt reached the server exactly once: nothing sent twice, nothing dropped.
    assert fake.completions_received == record.attempts
    if fault == "status":
        assert record.status == status


@pytest.mark.parametrize("transport", ["sse", "openai"])
@pytest.mark.parametrize(("fault", "status"), [("status", 429), ("status", 503), ("cut", 200)])
def test_a_passing_fault_is_retried_into_a_clean_record(
    fake: FakeOpenAIServer, fault: str, status: int, transport: str
) -> None:
    fake.fault, fake.fault_status, fake.fault_count = fault, status, 2
    record = _generate(fake, max_retries=2, transport=transport)
    assert record.ok and record.error is None, record.error
    assert record.attempts == 3 and fake.completions_received == 3
    assert [o.text for o in record.outputs] == [" Echo: apple"]
    # Usage is the last attempt's, not a sum over attempts.
    assert record.prompt_tokens == len(PROMPT) and record.completion_tokens == 1


def test_retries_stop_at_the_configured_number(fake: FakeOpenAIServer) -> None:
    fake.fault, fake.fault_status = "status", 503
    record = _generate(fake, max_retries=0)
    assert not record.ok and record.attempts == 1 and fake.completions_received == 1


def test_a_stalled_server_times_out_each_attempt(fake: FakeOpenAIServer) -> None:
    fake.fault, fake.stall_s = "stall", 30
    start = time.perf_counter()
    record = _generate(fake, max_retries=1, timeout_s=0.5)
    elapsed = time.perf_counter() - start
    assert not record.ok and record.error == "timed out after 0.5 s"
    assert record.attempts == 2 and fake.completions_received == 2
    assert elapsed < 2 * 0.5 + 2.0


def test_a_stream_that_stalls_after_text_is_not_retried(fake: FakeOpenAIServer) -> None:
    """Text already streamed: a retry would time another request, so the record fails as is."""
    fake.chunk_delay_s = 2.0
    record = _generate(fake, max_retries=2, timeout_s=0.5)
    assert not record.ok and record.error == "timed out after 0.5 s mid-stream"
    assert record.attempts == 1 and fake.completions_received == 1


@pytest.mark.parametrize("batching", ["per_agent", "per_group", "batched"])
def test_worker_keeps_failed_agents_out_of_the_rewards(fake: FakeOpenAIServer, batching: str) -> None:
    fake.fault, fake.fault_status, fake.fault_count = "status", 400, 1  # the first request fails

    async def go() -> tuple[list[Any], list[RequestRecord]]:
        async with LLMClient(ClientConfig(base_url=fake.base_url, model=MODEL, max_retries=0)) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8, batching=batching))  # type: ignore[arg-type]
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=2, group_size=2))
            return await worker.run_episode(env, seed=0), worker.records

    steps, records = asyncio.run(go())
    step = steps[0]
    failed = {a for a, info in step.infos.items() if "request_error" in info}
    assert failed and set(step.failures) == failed
    assert all(step.failures[a].startswith("HTTP 400") for a in failed)
    summary = summarize_rollout(steps, 1.0)
    assert summary.agents == 4 and summary.failed == len(failed)
    # The failed agents' empty replies are not graded as the model's (batched: one request, all failed).
    assert summary.mean_reward == (None if batching == "batched" else 1.0)
    assert summary.requests == len(records) == fake.completions_received


def _prefix_test(fake: FakeOpenAIServer, out: Path, **overrides: Any) -> dict[str, Any]:
    """The summary.json of a run against the local stand-in (with the server's facts at the top)."""
    config = build(
        PrefixTestConfig, base_url=fake.base_url, batch_size=2, group_size=2, ttft_burst=2, out_dir=str(out),
        timeout_s=5, **overrides,
    )  # fmt: skip
    summary = run_prefix_test(config, show_progress=False).to_json()
    summary["server"] = summary["runs"][0]["server"] if summary["runs"] else {}
    return summary


@pytest.mark.parametrize(
    ("mode", "named"),
    [
        ("missing", "answered 404"),
        ("empty", "the page is empty"),
        ("html", "it is an HTML page"),
        ("garbage", "is not 'name{labels} value [timestamp]'"),
    ],
)
def test_unreadable_metrics_give_unknown_naming_the_problem(
    fake: FakeOpenAIServer, tmp_path: Path, mode: str, named: str
) -> None:
    fake.metrics_mode, fake.report_cached_tokens = mode, False
    # Without its metrics the server does not say its block size either: that is named first.
    summary = _prefix_test(fake, tmp_path)
    assert summary["verdict"] == "UNKNOWN" and summary["reason_id"] == "ceiling_known"
    assert "block_size=" in summary["reason"]
    summary = _prefix_test(fake, tmp_path, block_size=BLOCK_SIZE)
    assert summary["verdict"] == "UNKNOWN" and EXIT_CODES[summary["verdict"]] == 2
    assert named in summary["reason"] and "cannot see cache hits" in summary["reason"]
    assert named in summary["server"]["metrics_error"]
    assert summary["hit_rate"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["verdict"] == "UNKNOWN"


def test_without_metrics_cached_tokens_still_give_the_hit_rate(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.metrics_mode = "missing"
    summary = _prefix_test(fake, tmp_path, block_size=BLOCK_SIZE)
    assert summary["hit_rate_source"] == "cached_tokens" and summary["hit_rate"] > 0.9


@pytest.mark.parametrize(("fault", "error"), [("status", "HTTP 500"), ("malformed_json", "malformed response")])
def test_every_request_failing_gives_unknown_naming_the_error(
    fake: FakeOpenAIServer, tmp_path: Path, fault: str, error: str
) -> None:
    fake.fault = fault
    summary = _prefix_test(fake, tmp_path)
    assert summary["verdict"] == "UNKNOWN" and summary["reason_id"] == "phases_complete"
    assert "requests failed" in summary["reason"] and error in summary["reason"]
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert rows and all(not r["ok"] and r["error"].startswith(error) for r in rows)


def test_a_cut_stream_stops_the_run_with_its_records_on_disk(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.fault = "cut"
    returned = _prefix_test(fake, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == returned["verdict"] == "UNKNOWN" and summary["partial"] is True
    assert summary["exit_code"] == 2 and "could not reach the server" in summary["reason"]
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert rows and all(r["error"].startswith("connection failed") for r in rows)
    assert rows[0]["attempts"] == 3  # the default two retries, each counted once


def test_connections_cut_in_part_of_a_phase_stop_the_run_as_unreachable(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    """A server dying mid-phase: some requests finished, the rest were cut. Not a lossy phase."""
    seen: list[str] = []

    def second_prompt(prompt: str) -> bool:  # cold sent the first; the second is one group's two agents
        if prompt not in seen:
            seen.append(prompt)
        return seen.index(prompt) == 1

    fake.fault, fake.fault_only = "cut", second_prompt
    _prefix_test(fake, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "UNKNOWN" and summary["partial"] is True and summary["exit_code"] == 2
    assert "2 of 3 requests of the warm phase could not reach the server" in summary["reason"], summary["reason"]
    rows = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    warm = [r for r in rows if r["phase"] == "warm"]
    assert [r["ok"] for r in rows if r["phase"] == "cold"] == [True]
    assert sorted(r["ok"] for r in warm) == [False, False, True]
    assert all(r["error"].startswith("connection failed") for r in warm if not r["ok"])


# ----- model output ---------------------------------------------------------------------


def _word(prompt: str) -> str:
    return echo_reply(prompt).removeprefix(" Echo: ")


# (name, reply from the prompt's word, outcome, action cut to the Text space)
MODEL_OUTPUTS: list[tuple[str, Callable[[str], str], str, bool]] = [
    ("correct", lambda w: f" Echo: {w}", "correct", False),
    ("end-of-turn marker", lambda w: f" Echo: {w}<end_of_turn>", "correct", False),
    ("empty", lambda w: "", "format_error", False),
    ("whitespace only", lambda w: " \t  \u00a0 ", "format_error", False),
    ("10,000 characters", lambda w: "x" * 10_000, "format_error", True),
    ("right word then 10,000 characters", lambda w: f" Echo: {w}" + "!" * 10_000, "wrong_word", True),
    ("replacement characters", lambda w: " Echo: \ufffd\ufffd", "wrong_word", False),
    ("control characters", lambda w: f" Echo: {w}\x00\x1b[2J\x07", "wrong_word", False),
    ("another language", lambda w: " 回声：苹果", "format_error", False),
    ("another language's word", lambda w: " Echo: pomme", "wrong_word", False),
    ("Echo: repeated", lambda w: f" Echo: Echo: Echo: {w}", "wrong_word", False),
    ("emoji, 2,000 of them", lambda w: " Echo: " + "\U0001f600" * 2000, "wrong_word", True),
]


@pytest.mark.parametrize(("name", "reply", "outcome", "cut"), MODEL_OUTPUTS, ids=[m[0] for m in MODEL_OUTPUTS])
def test_model_output_is_graded_and_stays_in_the_text_space(
    fake: FakeOpenAIServer, name: str, reply: Callable[[str], str], outcome: str, cut: bool
) -> None:
    fake.reply = lambda prompt: reply(_word(prompt))

    async def go() -> Any:
        async with LLMClient(ClientConfig(base_url=fake.base_url, model=MODEL)) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=8))
            env = ParallelTimingWrapper(EchoPrefixParallelEnv(batch_size=2, group_size=2, max_turns=2))
            steps = await worker.run_episode(env, seed=0)
            gym_envs = [TimingWrapper(gymnasium.make("EchoPrefix-v0", max_turns=2)) for _ in range(2)]
            gym_step = await worker.run_gym(gym_envs, seed=0)
            return env, steps, gym_envs, gym_step

    env, steps, gym_envs, gym_step = asyncio.run(go())
    reward = {"correct": 1.0, "wrong_word": 0.0, "format_error": -1.0}[outcome]
    assert len(steps) == (1 if outcome == "correct" else 2)  # a wrong answer gets its second turn
    for step in steps:
        assert not step.failures
        for agent, obs in step.observations.items():
            assert env.observation_space(agent).contains(obs), (name, len(obs))
            info = step.infos[agent]
            assert (step.rewards[agent], info["outcome"]) == (reward, outcome)
            assert info["action_truncated"] is cut
            assert info["timing"]["e2e_s"] is not None
    for i, e in enumerate(gym_envs):
        key = str(i)
        assert e.observation_space.contains(gym_step.observations[key])
        assert (gym_step.rewards[key], gym_step.infos[key]["action_truncated"]) == (reward, cut)
    # The second turn's prompt (the first reply shown back) went out in the Text space too.
    assert fake.completions_received == 4 * len(steps) + 2


# ----- misuse of the worker -----------------------------------------------------------


def test_token_prompts_need_a_tokenizer(fake: FakeOpenAIServer) -> None:
    async def go() -> None:
        async with LLMClient(ClientConfig(base_url=fake.base_url, model=MODEL)) as client:
            RolloutWorker(client, SamplingConfig(prompt_format="tokens"))

    with pytest.raises(ConfigError, match="tokenizer"):
        asyncio.run(go())


def test_chat_api_needs_the_messages_in_info(fake: FakeOpenAIServer) -> None:
    async def go() -> None:
        async with LLMClient(ClientConfig(base_url=fake.base_url, model=MODEL)) as client:
            worker = RolloutWorker(client, SamplingConfig(api="chat"))
            env = EchoPrefixParallelEnv(batch_size=1, group_size=2)
            observations, _ = env.reset(seed=0)
            await worker.step(env, observations, {})  # infos without "messages"

    with pytest.raises(ConfigError, match="messages"):
        asyncio.run(go())
    assert fake.completions_received == 0


# ----- a crash in the cache-off baseline --------------------------------------------------


def test_a_crash_in_the_cache_off_baseline_gives_unknown_not_the_cache_on_pass(
    fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare_without_cache: the baseline's stream is cut mid-run; the cache-on PASS must not stand alone."""
    import echo_env.cachetest.judge as judge
    from echo_env.cachetest.results import Decision

    real_decide = judge.decide

    def cache_on_passes(evidence: Any, rules: Any) -> Decision:
        # The stand-in has no TTFT gain to show; a finished run here stands for a healthy server's PASS.
        decided = real_decide(evidence, rules)
        if evidence.run_error is None and evidence.server.base_url == fake.base_url:
            return Decision("PASS", "prefix caching works (stand-in)", "pass", decided.checks)
        return decided

    monkeypatch.setattr(judge, "decide", cache_on_passes)
    with FakeOpenAIServer() as baseline:
        baseline.fault = "cut"  # every request of the baseline fails: ServerUnreachableError mid-run
        returned = _prefix_test(fake, tmp_path, baseline_url=baseline.base_url, compare_without_cache=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for s in (returned, summary):
        assert (s["verdict"], s["exit_code"], s["partial"]) == ("UNKNOWN", 2, True), s["reason"]
        assert s["reason_id"] == "run_finished"
        assert "cache-off baseline" in s["reason"] and "could not reach the server" in s["reason"]
        # The server that went missing is named by its own key, not as base_url.
        assert f"baseline_url={baseline.base_url}" in s["reason"], s["reason"]
        assert "cache-on run alone says PASS" in s["reason"]
        # The cache-on run's own evidence and verdict stay in the summary.
        on, off = s["runs"]
        assert (on["label"], on["verdict"]) == ("cache_on", "PASS")
        assert (off["label"], off["verdict"]) == ("cache_off", "UNKNOWN")
        assert s["hit_rate"] is not None
