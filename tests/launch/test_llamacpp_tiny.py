"""A fast-prefill server: llama-server on a tiny random-weight model, where caching buys no TTFT.

The model (:mod:`echo_env.launch.tiny_gguf`) has Gemma 3's real tokenizer and random
weights of a tiny shape (one Qwen3 block, 64 wide). Random weights compute exactly as
trained ones of that shape, so the cache hits, the TTFT and the verdict are real; the
answers mean nothing (the echo rewards are noise). Its prefill of ~525 tokens costs about
what one token does, as a sub-1B model's does on a big GPU: the cache hits every shared
token and TTFT cannot show it. The test must then PASS on the hit evidence and say why,
never FAIL or call the machine noisy.

Marked ``llamacpp`` (needs the ``llama-server`` binary and the default model's GGUF, whose
tokenizer is copied). One server, ``-np 4``, for the module; each test is one short run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.results import TestResult
from echo_env.commands.test import run_prefix_test
from echo_env.launch.llamacpp_server import EmbeddedLlamaServer, LlamaServerConfig
from echo_env.launch.target import ServerTarget
from echo_env.launch.tiny_gguf import tiny_gguf

pytestmark = pytest.mark.llamacpp

SLOTS = 4


@pytest.fixture(scope="module")
def tiny_llama() -> Iterator[EmbeddedLlamaServer]:
    """llama-server with prompt caching on, serving the tiny random-weight model (``-np 4``)."""
    config = LlamaServerConfig(model=str(tiny_gguf()), parallel=SLOTS, served_model_name="tiny-random")
    with EmbeddedLlamaServer(config) as server:
        yield server


def run(server: EmbeddedLlamaServer, out_dir: Path, **settings: object) -> TestResult:
    config = PrefixTestConfig(
        server=ServerTarget(base_url=server.base_url, model_name=server.served_model_name),
        out_dir=str(out_dir),
        **settings,  # type: ignore[arg-type]
    )
    return run_prefix_test(config, show_progress=False)


def check(result: TestResult, name: str) -> str:
    return next(c.outcome for c in result.decision.checks if c.name == name)


def test_fast_prefill_passes_on_the_hits_and_says_why(tiny_llama: EmbeddedLlamaServer, tmp_path: Path) -> None:
    """``echo-prefix test batch_size=4 group_size=4`` against the tiny model: PASS, never FAIL or UNKNOWN."""
    result = run(tiny_llama, tmp_path, batch_size=4, group_size=4)
    decision = result.decision
    main = result.main
    assert main is not None and main.evidence.ttft is not None
    prefill = main.evidence.ttft.prefill
    assert prefill is not None, "the prefill cost was not measured"
    print(
        f"\ntiny model: {decision.verdict} {decision.reason_id} in {result.time_to_verdict_s} s: {decision.reason}"
        f"\nprefill {prefill.prefill_per_token_s * 1e6:.1f} us/token, control {prefill.control_ttft_s * 1e3:.1f} ms "
        f"@ {prefill.control_prompt_tokens:.0f} tokens, short {prefill.short_ttft_s * 1e3:.1f} ms "
        f"@ {prefill.short_prompt_tokens:.0f}; expected {prefill.expected_gain:.3f}x"
    )
    assert decision.verdict == "PASS", decision.reason
    if decision.reason_id == "pass_prefill_cheap":
        assert "TTFT cannot show caching here" in decision.reason
        assert f"expected from the hit rate and the prefill cost: {prefill.expected_gain:.2f}x" in decision.reason
    assert "quieter machine" not in decision.reason
    assert check(result, "sources_agree") == "pass"  # the PASS rests on two agreeing sources of hits
    assert check(result, "hits_reach_ceiling") == "pass"
    assert (tmp_path / "summary.json").read_text().count('"expected_gain"') >= 1


def test_two_by_two_agents_stay_within_the_slot_ceiling(tiny_llama: EmbeddedLlamaServer, tmp_path: Path) -> None:
    """2x2 agents on 4 slots: a warm burst of 3 takes 3 slots, one of them the cold request's; 1 of 3 hits."""
    result = run(tiny_llama, tmp_path, batch_size=2, group_size=2, ttft_burst=4, max_repeats=3)
    main = result.main
    assert main is not None and main.evidence.warm is not None
    hit = main.evidence.warm.hit
    print(f"\n2x2 on -np 4: warm hit rate {hit.value} of a {hit.ceiling} ceiling; {result.decision.reason}")
    assert check(result, "not_above_ceiling") == "pass", result.decision.reason
    assert check(result, "hits_reach_ceiling") == "pass", result.decision.reason
    assert hit.ceiling is not None and 0.3 < hit.ceiling < 0.34
    # Three small repeats decide the hit checks; the TTFT check may still want more repeats.
    assert result.decision.reason_id not in ("not_above_ceiling", "hits_reach_ceiling", "hits_nonzero")
