"""The prefix-cache test against the real embedded vLLM engine, with caching on and off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from echo_env.cachetest.runner import PrefixTestConfig, run_prefix_test

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine_off() -> Iterator[Any]:
    """A second embedded engine, with prefix caching off."""
    from echo_env.serving.engine import EmbeddedEngine, EngineConfig

    with EmbeddedEngine(EngineConfig(prefix_caching=False)) as server:
        yield server


def test_default_workload_passes_near_the_ceiling(engine: Any, tmp_path: Path) -> None:
    config = PrefixTestConfig(base_url=engine.base_url, repeats=2, out_dir=str(tmp_path))
    summary = run_prefix_test(config, show_progress=False)
    assert summary["verdict"] == "PASS", summary["reason"]
    assert summary["hit_rate_source"] == "metrics"
    assert summary["hit_rate_ceiling"] >= 0.95
    assert summary["hit_rate"] >= 0.97 * summary["hit_rate_ceiling"]
    assert summary["speedup_ttft"]["low"] > 1.0
    by_phase = summary["by_phase"]["cache_on"]
    assert by_phase["warm"]["requests"] == 2 * (16 * 8 - 1) and by_phase["warm"]["failed"] == 0
    assert by_phase["control"]["hit_rate"] < 0.05
    assert by_phase["warm_single"]["hit_rate"] >= 0.9
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["verdict"] == "PASS"
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 16 * 8
    for name in ("phases.csv", "ttft_by_phase.png", "hit_rate.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_caching_disabled_server_fails_with_that_reason(engine_off: Any, tmp_path: Path) -> None:
    config = PrefixTestConfig(
        base_url=engine_off.base_url, batch_size=4, group_size=4, repeats=1, out_dir=str(tmp_path)
    )
    summary = run_prefix_test(config, show_progress=False)
    assert summary["verdict"] == "FAIL"
    assert "caching disabled" in summary["reason"]
    assert summary["server"]["prefix_caching_enabled"] is False
    assert summary["hit_rate"] == 0.0


def test_cache_on_vs_off_with_a_baseline_server(engine: Any, engine_off: Any, tmp_path: Path) -> None:
    config = PrefixTestConfig(
        base_url=engine.base_url,
        baseline_url=engine_off.base_url,
        batch_size=8,
        group_size=8,
        repeats=1,
        out_dir=str(tmp_path),
    )
    summary = run_prefix_test(config, show_progress=False)
    assert summary["verdict"] == "PASS", summary["reason"]
    off = summary["cache_off"]
    # With caching off vLLM counts no lookups at all: the rate is 0 or unknown, never a hit.
    assert off["verdict"] == "FAIL" and not off["hit_rate"]
    assert off["throughput_ratio_on_vs_off"] > 1.0
    assert off["speedup_ttft_on_vs_off"]["ratio"] > 1.0


def test_a_token_that_varies_before_the_prefix_is_found(engine: Any, tmp_path: Path) -> None:
    config = PrefixTestConfig(
        base_url=engine.base_url,
        batch_size=2,
        group_size=2,
        repeats=1,
        vary_before_prefix=True,
        out_dir=str(tmp_path),
    )
    summary = run_prefix_test(config, show_progress=False)
    assert summary["verdict"] == "FAIL"
    diff = summary["token_plan"]["first_difference"]
    assert diff is not None and diff["position"] < 16
    assert f"first differ at token {diff['position']}" in summary["reason"]
