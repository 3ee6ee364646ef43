"""The prefix-cache test against the real embedded vLLM engine, with caching on and off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.commands.test import run_prefix_test
from echo_env.config import build

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine_off() -> Iterator[Any]:
    """A second embedded engine, with prefix caching off."""
    from echo_env.launch.engine import EmbeddedEngine, EngineConfig

    with EmbeddedEngine(EngineConfig(prefix_caching=False)) as server:
        yield server


def _pooled(result: Any, name: str, run: int = 0) -> Any:
    return next(p for p in result.runs[run].pooled if p.name == name)


def test_default_workload_passes_near_the_ceiling(engine: Any, tmp_path: Path) -> None:
    config = build(PrefixTestConfig, base_url=engine.base_url, out_dir=str(tmp_path))
    result = run_prefix_test(config, show_progress=False)
    assert result.verdict == "PASS", result.decision.reason
    assert result.exit_code == 0 and not result.partial
    warm = _pooled(result, "warm")
    assert warm.hit.source == "counters"
    assert warm.hit.ceiling >= 0.95
    assert warm.hit.value >= 0.97 * warm.hit.ceiling
    assert abs(warm.hit.value - warm.hit.reported) < 0.02  # the two sources agree on a real server
    assert warm.requests == 16 * 8 - 1 and warm.failed == 0
    assert _pooled(result, "ttft_control").hit.value < 0.05
    assert _pooled(result, "warm_single").hit.value >= 0.9
    ttft = result.runs[0].evidence.ttft
    assert ttft is not None and ttft.decision == "above" and len(ttft.ratios) >= 3
    # The repeats alternate which burst goes first.
    assert ttft.orders[:2] == ("warm", "control")
    assert result.time_to_verdict_s is not None and result.time_to_verdict_s > 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["verdict"] == "PASS" and written["exit_code"] == 0
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == sum(p.requests for p in result.runs[0].phases)
    for name in ("phases.csv", "ttft_by_phase.png", "hit_rate.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_caching_disabled_server_fails_with_that_reason(engine_off: Any, tmp_path: Path) -> None:
    config = build(
        PrefixTestConfig, base_url=engine_off.base_url, batch_size=4, group_size=4, max_repeats=3, ttft_burst=4,
        out_dir=str(tmp_path),
    )  # fmt: skip
    result = run_prefix_test(config, show_progress=False)
    assert result.verdict == "FAIL" and result.exit_code == 1
    assert result.decision.reason_id == "caching_enabled"
    assert "--enable-prefix-caching" in result.decision.reason
    assert result.runs[0].evidence.server.caching_enabled is False


def test_cache_on_vs_off_with_a_baseline_server(engine: Any, engine_off: Any, tmp_path: Path) -> None:
    config = build(
        PrefixTestConfig,
        base_url=engine.base_url,
        baseline_url=engine_off.base_url,
        batch_size=4,
        group_size=4,
        ttft_burst=4,
        max_repeats=4,
        out_dir=str(tmp_path),
    )
    result = run_prefix_test(config, show_progress=False)
    assert result.verdict == "PASS", result.decision.reason
    _, off = result.runs
    assert off.label == "cache_off" and off.decision.verdict == "FAIL"
    # With caching off vLLM counts no lookups at all: the rate is 0 or unknown, never a hit.
    assert not _pooled(result, "warm", run=1).hit.value
    ratios = {c.name: c.ratio for c in result.on_vs_off}
    assert ratios["cache on vs off: warm burst req/s"] > 1.0
    assert ratios["cache on vs off: warm burst TTFT p50"] > 1.0


def test_a_token_that_varies_before_the_prefix_is_found(engine: Any, tmp_path: Path) -> None:
    config = build(
        PrefixTestConfig,
        base_url=engine.base_url,
        batch_size=2,
        group_size=2,
        vary_before_prefix=True,
        ttft_burst=4,
        max_repeats=3,
        out_dir=str(tmp_path),
    )
    result = run_prefix_test(config, show_progress=False)
    assert result.verdict == "FAIL" and result.decision.reason_id == "prefix_shared"
    diff = result.runs[0].evidence.prefix.first_difference
    assert diff is not None and diff.position < 16
    assert f"first differ at token {diff.position}" in result.decision.reason


def test_prompt_format_tokens_plans_the_ids_it_sends(engine: Any, tmp_path: Path) -> None:
    config = build(
        PrefixTestConfig, base_url=engine.base_url, batch_size=4, group_size=2, prompt_format="tokens",
        ttft_burst=4, out_dir=str(tmp_path),
    )  # fmt: skip
    result = run_prefix_test(config, show_progress=False)
    assert result.runs[0].evidence.prefix.tokenized_by == "local"
    warm = _pooled(result, "warm")
    # The plan counts exactly the ids sent: the server's prompt tokens match it.
    assert warm.planned_prompt_tokens == warm.prompt_tokens
    assert result.verdict == "PASS", result.decision.reason
