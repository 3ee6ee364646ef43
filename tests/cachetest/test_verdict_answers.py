"""Every reason of the answer checks (output equivalence, weight update, isolation), from evidence built by hand.

Each row starts from the healthy evidence of ``test_verdict.good()`` plus answer checks
that pass, and changes what a real situation changes; it asserts the verdict, the exit
code, the check that decided and the words a user acts on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from test_verdict import good

from echo_env.cachetest.answer_evidence import (
    Answer,
    IsolationEvidence,
    OutputsEvidence,
    WeightUpdateEvidence,
    first_divergence,
)
from echo_env.cachetest.results import EXIT_CODES, Evidence
from echo_env.cachetest.verdict import CHECKS, decide

TOKENS = (235, 1010, 573, 2134, 108, 108, 5, 9)
LOGPROBS = (-1.141, -1.772, -2.61, -0.2, -0.05, -0.9, -1.3, -0.4)
# Measured on the CPU engine in bf16: the same prompt from the cache moved these by up to 0.07.
CACHED_LOGPROBS = (-1.157, -1.705, -2.56, -0.21, -0.05, -0.91, -1.3, -0.41)


def answer(
    label: str, cached: int | None = 0, ttft: float = 0.9, tokens: tuple[int, ...] = TOKENS, **kw: object
) -> Answer:
    lps = kw.pop("logprobs", LOGPROBS)
    text = kw.pop("text", " ".join(map(str, tokens)))
    return Answer(label, tokens, lps, text, cached, ttft, **kw)  # type: ignore[arg-type]


def outputs(**changes: object) -> OutputsEvidence:
    base = OutputsEvidence(
        "cache_salt", answer("fresh"), answer("cached", 384, 0.5, logprobs=CACHED_LOGPROBS), answer("fresh_again")
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


NEW = (9, 9, 108, 7, 7, 7, 1, 2)


def update(**changes: object) -> WeightUpdateEvidence:
    """Caches dropped by the update (pause, reload, resume): the answer after it is the fresh one."""
    base = WeightUpdateEvidence(
        "pause_reload_resume", answer("before_update", 384, 0.5), answer("after_update", 0, 0.95, NEW),
        answer("fresh_new_weights", 0, 0.9, NEW, salt="s"), "cache_salt", "default", "default", 2.5,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def isolation(**changes: object) -> IsolationEvidence:
    base = IsolationEvidence(
        True, answer("a", 0, 0.86), answer("a2", 384, 0.48), answer("b", 0, 1.08), answer("n", 0, 0.89),
        answer("n2", 384, 0.54),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def checked() -> Evidence:
    return dataclasses.replace(good(), outputs=outputs(), weight_update=update(), isolation=isolation())


Change = Callable[[Evidence], Evidence]


def out(**c: object) -> Change:
    return lambda e: dataclasses.replace(e, outputs=outputs(**c))


def upd(**c: object) -> Change:
    return lambda e: dataclasses.replace(e, weight_update=update(**c))


def iso(**c: object) -> Change:
    return lambda e: dataclasses.replace(e, isolation=isolation(**c))


ROWS: list[tuple[str, Change, str, str, str]] = [
    ("every answer check passes", lambda e: e, "PASS", "pass", "prefix caching works"),
    (
        "answer checks not asked for",
        lambda e: dataclasses.replace(e, outputs=None, weight_update=None, isolation=None),
        "PASS",
        "pass",
        "works",
    ),
    (
        "cached answer parts from the fresh one",
        out(cached=answer("cached", 384, tokens=(235, 1010, 573, 99, 1, 1, 1, 1))),
        "FAIL",
        "outputs_equal",
        "generated token 3: 2134 (fresh) vs 99 (cached)",
    ),
    (
        "same tokens, logprobs beyond the allowance",
        out(cached=answer("cached", 384, logprobs=(-1.141, -3.2, -2.61, -0.2, -0.05, -0.9, -1.3, -0.4))),
        "FAIL",
        "outputs_equal",
        "logprobs -1.772 vs -3.200",
    ),
    (
        "a server without salts and different texts",
        out(
            method="first_send",
            fresh=answer("fresh", tokens=(), text="a b"),
            cached=answer("cached", 384, tokens=(), text="a c"),
            fresh_again=None,
        ),
        "FAIL",
        "outputs_equal",
        "no noise floor",
    ),
    (
        "a request of the check failed",
        out(error="the cached request failed: HTTP 500"),
        "UNKNOWN",
        "outputs_equal",
        "HTTP 500",
    ),
    ("the fresh computation hit", out(fresh=answer("fresh", 384)), "UNKNOWN", "outputs_equal", "fresh computation hit"),
    ("the second send did not hit", out(cached=answer("cached", 0)), "UNKNOWN", "outputs_equal", "not served from"),
    (
        "stale KV after reload",
        upd(method="reload", after=answer("after_update", 384, 0.5)),
        "FAIL",
        "weight_update",
        "stale KV: after weight_update=reload (weight version default -> default) the prompt hit 384",
    ),
    (
        "caches dropped, yet answers differ from fresh",
        upd(after=answer("after_update", 0, tokens=TOKENS)),
        "FAIL",
        "weight_update",
        "answers after the update differ from a fresh computation",
    ),
    ("the update failed", upd(error="POST /pause is not served (HTTP 404)"), "UNKNOWN", "weight_update", "HTTP 404"),
    (
        "an update that changed nothing",
        upd(method="true", after=answer("after_update", 384), fresh=answer("fresh_new_weights", 0)),
        "UNKNOWN",
        "weight_update",
        "changed no answer",
    ),
    (
        "a dropped salt",
        iso(salt_b=answer("b", 384, 0.5)),
        "FAIL",
        "isolation",
        "cache_salt is ignored: a request with another salt",
    ),
    (
        "a salted tenant serves the unsalted",
        iso(no_salt_first=answer("n", 384)),
        "FAIL",
        "isolation",
        "with no salt hit",
    ),
    ("a salt that never hits", iso(again_salt_a=answer("a2", 0)), "FAIL", "isolation", "same cache_salt do not share"),
    (
        "a server without salts",
        iso(salted=False, skipped="a llamacpp server takes no cache_salt"),
        "UNKNOWN",
        "isolation",
        "takes no cache_salt",
    ),
    ("no cached_tokens", iso(salt_b=answer("b", None)), "UNKNOWN", "isolation", "--enable-prompt-tokens-details"),
]


@pytest.mark.parametrize(("case", "change", "verdict", "reason_id", "words"), ROWS, ids=[r[0] for r in ROWS])
def test_every_answer_reason(case: str, change: Change, verdict: str, reason_id: str, words: str) -> None:
    decision = decide(change(checked()))
    assert (decision.verdict, decision.reason_id) == (verdict, reason_id), decision.reason
    assert words in decision.reason
    assert decision.exit_code == EXIT_CODES[verdict]
    decisive = [c for c in decision.checks if c.name == reason_id]
    assert reason_id == "pass" or decisive[0].outcome in ("fail", "unknown")


def test_every_answer_check_has_a_row() -> None:
    assert {"outputs_equal", "weight_update", "isolation"} <= {r[3] for r in ROWS}
    assert [n for n, _, _ in CHECKS][-4:] == ["outputs_equal", "weight_update", "isolation", "ttft_gain"]


def test_passing_checks_show_their_figures() -> None:
    checks = {c.name: c for c in decide(checked()).checks}
    assert "within 0.067" in checks["outputs_equal"].detail and "noise floor 0.000" in checks["outputs_equal"].detail
    assert "caches dropped" in checks["weight_update"].detail and "384 -> 0" in checks["weight_update"].detail
    assert "350 ms lower" in checks["isolation"].detail and "1.65x" in checks["isolation"].detail


def test_a_noisy_server_widens_the_allowance_to_three_floors() -> None:
    noisy = answer("fresh_again", logprobs=(-1.141, -1.672, -2.61, -0.2, -0.05, -0.9, -1.3, -0.4))  # floor 0.1
    far = answer("cached", 384, logprobs=(-1.141, -2.042, -2.61, -0.2, -0.05, -0.9, -1.3, -0.4))  # 0.27 off
    decision = decide(dataclasses.replace(checked(), outputs=outputs(fresh_again=noisy, cached=far)))
    assert decision.verdict == "PASS", decision.reason
    assert outputs(fresh_again=noisy).noise_floor == pytest.approx(0.1)


def test_first_divergence_reads_tokens_past_either_end() -> None:
    short = answer("short", tokens=TOKENS[:3], logprobs=LOGPROBS[:3])
    d = first_divergence(answer("full"), short, 0.25)
    assert d is not None and (d.position, d.token_a, d.token_b, d.kind) == (3, 2134, None, "token")
    assert first_divergence(answer("a"), answer("b"), 0.25) is None


def test_the_answer_checks_reach_summary_json_and_the_console() -> None:
    from echo_env.cachetest.results import ServerRun, TestResult
    from echo_env.report.console import format_console

    evidence = dataclasses.replace(checked(), weight_update=update(method="reload", after=answer("after", 384, 0.5)))
    run = ServerRun("cache_on", evidence, decide(evidence), phases=(), pooled=())
    result = TestResult(config={}, runs=[run])
    summary = result.to_json()
    assert (summary["verdict"], summary["reason_id"], summary["exit_code"]) == ("FAIL", "weight_update", 1)
    row = summary["runs"][0]
    assert row["outputs"]["noise_floor"] == 0.0 and row["outputs"]["divergence"] == pytest.approx(0.067)
    assert row["weight_update"]["after"]["cached_tokens"] == 384 and row["weight_update"]["weights_changed"]
    assert row["isolation"]["side_channel_ms"] == pytest.approx(350.0)
    text = format_console(result, ascii_only=True)
    assert "weights reload: version default -> default, cached tokens 384 -> 384" in text
    assert "side channel (no salt) 350 ms, 1.65x" in text


def test_answer_keys_are_checked_where_they_are_given() -> None:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.config import build
    from echo_env.errors import ConfigError
    from echo_env.launch.target import ServerTarget

    with pytest.raises(ConfigError, match="needs weights_path="):
        PrefixTestConfig(server=ServerTarget(base_url="http://127.0.0.1:8000/v1"), weight_update="reload")
    with pytest.raises(ConfigError, match="weight_update is empty"):
        PrefixTestConfig(weight_update=" ")
    with pytest.raises(ConfigError, match="logprob_tolerance"):
        build(PrefixTestConfig, logprob_tolerance=0)
    assert build(PrefixTestConfig, logprob_tolerance=0.5).rules.logprob_tolerance == 0.5
    assert PrefixTestConfig(weight_update="./my-update.sh").weight_update == "./my-update.sh"


def test_a_server_that_ignores_the_salt_and_serves_no_control_endpoints() -> None:
    """The fake vLLM server caches by prompt alone, without dev-mode endpoints: isolation FAILs, the update UNKNOWN."""
    import asyncio

    from fake_servers import MODEL, FakeOpenAIServer

    from echo_env.cachetest.answer_run import measure_isolation, measure_outputs, measure_weight_update
    from echo_env.wire.client import ClientConfig, LLMClient
    from echo_env.wire.control import VllmControl

    prompt = "[echo-prefix run answers] " + "the same long shared text " * 40

    async def go(url: str, root: str) -> tuple[OutputsEvidence, IsolationEvidence, WeightUpdateEvidence]:
        async with LLMClient(ClientConfig(base_url=url, model=MODEL)) as client:
            o = await measure_outputs(client, prompt + "1", salted=True)
            i = await measure_isolation(client, prompt + "2", "vllm")
            w = await measure_weight_update(client, VllmControl(root), prompt + "3", "reload", "/nowhere", True)
        return o, i, w

    with FakeOpenAIServer() as fake:
        o, i, w = asyncio.run(go(fake.base_url, fake.root_url))
    assert judged_id(outputs=o) == ("PASS", "pass") and o.noise_floor is None  # its "fresh" salt hit: no floor
    assert judged_id(isolation=i) == ("FAIL", "isolation")
    assert judged_id(weight_update=w) == ("UNKNOWN", "weight_update") and "VLLM_SERVER_DEV_MODE" in (w.error or "")


def judged_id(**changes: object) -> tuple[str, str]:
    d = decide(dataclasses.replace(checked(), **changes))  # type: ignore[arg-type]
    return d.verdict, d.reason_id


def test_the_runner_measures_the_asked_checks_after_the_phases(tmp_path: object) -> None:
    """The whole test against the fake server, with the answer checks asked for: their evidence decides."""
    from fake_servers import FakeOpenAIServer

    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.record import NullSink
    from echo_env.commands.test import run_test
    from echo_env.launch.target import ServerTarget

    with FakeOpenAIServer() as fake:
        config = PrefixTestConfig(
            server=ServerTarget(base_url=fake.base_url, timeout_s=5),
            batch_size=2, group_size=2, ttft_burst=2, max_repeats=3, check_outputs=True, isolation=True,
        )  # fmt: skip
        result = run_test(config, NullSink())
        sent = fake.paths["POST /v1/completions"]
    assert (result.verdict, result.decision.reason_id, result.exit_code) == ("FAIL", "isolation", 1), (
        result.decision.reason
    )
    main = result.main
    assert main is not None and main.evidence.outputs is not None and main.evidence.weight_update is None
    checks = {c.name: c.outcome for c in result.decision.checks}
    assert checks["outputs_equal"] == "pass" and checks["weight_update"] == "skip"
    assert sent == sum(p.requests for p in main.phases) + 3 + 5  # the phases', then 3 answers, 5 tenants'
