"""The test through a fleet, without a server: the keys, the joined verdict, the summary and the console.

The fleet keys are checked before anything starts; the routing verdict joins the cache
verdict by table rows; a hand-made result shows what ``summary.json`` and the console
carry; and two stand-in servers, one of them playing the router, run the whole test
with each replica read on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fake_servers import FakeOpenAIServer
from fleet_evidence import fleet_result

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.cachetest.fleet_run import join_decisions, warm_ceilings
from echo_env.cachetest.results import Check, Decision, Evidence, FleetResult, ServerEvidence, ServerRun, TestResult
from echo_env.cli import main
from echo_env.commands.rollout import RolloutConfig
from echo_env.commands.serve import ServeConfig
from echo_env.commands.test import run_prefix_test
from echo_env.config import build, parse_overrides
from echo_env.errors import ConfigError
from echo_env.launch.target import ServerTarget
from echo_env.measure.fleet import fleet_ceilings
from echo_env.measure.replicas import phase_ceilings_of, sum_counters
from echo_env.report.console import format_console
from echo_env.wire.metrics import CacheCounters, delta

# ----- keys --------------------------------------------------------------------------------

_MINE = ("base_url=http://r:1/v1", "replica_urls=http://a:1,http://b:2")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["replica_urls=http://a:1,http://b:2"], "set base_url= to its router"),
        (["router=round_robin"], "add replicas=2"),
        (["replicas=2", "router=cache_awre"], "did you mean router=cache_aware?"),
        (["base_url=http://r:1/v1", "replicas=2"], "replica_urls=http://REPLICA1"),
        (["base_url=http://r:1/v1", "router=random"], "drop router="),
        (["base_url=http://r:1/v1", "replica_urls=a:1,b:2"], "not an http(s) URL"),
        (["base_url=http://r:1/v1", "replica_urls=http://a:1,http://a:1/v1"], "lists a replica twice"),
        (["base_url=http://r:1/v1", "replica_urls=http://a:1", "metrics_url=http://a:1/metrics"], "drop metrics_url"),
        (["replicas=0"], "at least 1"),
        (["base_url=http://r:1/v1", "prometheus_url=http://p:9090"], "so it needs the replicas: give base_url="),
        (["prometheus_url=embedded"], "or replicas=2 for an embedded fleet"),
        ([*_MINE, "prometheus_url=p:9090"], "not an http(s) URL: give the Prometheus server's root"),
        (["replicas=2", "prometheus_url=embedded", "metrics_url=http://a:1/metrics"], "both say where counters"),
        (["replicas=2", "prometheus_url=http://p:9090"], "use prometheus_url=embedded"),
        (["replicas=2", "max_share=1.5"], "max_share=1.5 must be in (0, 1]"),
    ],
)
def test_bad_fleet_keys_name_the_fix(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_overrides(PrefixTestConfig, args)
    assert needle in str(err.value)


def test_fleet_keys_are_shared_by_test_rollout_and_serve() -> None:
    config = parse_overrides(PrefixTestConfig, ["base_url=http://r:1/v1", "replica_urls=http://a:1/v1/,http://b:2"])
    assert config.server.replica_urls == ("http://a:1", "http://b:2") and config.server.is_fleet
    rollout = parse_overrides(RolloutConfig, ["replicas=2", "router=consistent_hash"])
    assert rollout.server.is_fleet and rollout.server.policy == "consistent_hash"
    assert ServerTarget(replicas=2).policy == "round_robin"
    assert parse_overrides(PrefixTestConfig, ["replicas=2", "prometheus_url=embedded"]).server.prometheus_url
    mine = parse_overrides(PrefixTestConfig, [*_MINE, "prometheus_url=http://p:9090"])
    assert mine.server.prometheus_url == "http://p:9090"
    assert not ServerTarget().is_fleet
    with pytest.raises(ConfigError, match="port= is the single engine's"):
        parse_overrides(ServeConfig, ["replicas=2", "port=8000"])
    with pytest.raises(ConfigError, match="did you mean router=power_of_two"):
        parse_overrides(ServeConfig, ["replicas=2", "router=power_of_too"])


def test_serve_with_a_bad_router_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "replicas=2", "router=sticky"]) == 2
    assert "sticky_least_loaded" in capsys.readouterr().err


# ----- the joined verdict --------------------------------------------------------------------


def _decision(verdict: str, reason_id: str) -> Decision:
    return Decision(verdict, f"{reason_id} reason", reason_id, (Check(reason_id, reason_id, "pass", ""),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cache", "routing", "verdict", "reason_id", "reason_starts"),
    [
        ("PASS", "PASS", "PASS", "pass", "pass reason; fleet_pass reason"),
        ("PASS", "FAIL", "FAIL", "scatter", "routing: scatter reason"),
        ("PASS", "UNKNOWN", "UNKNOWN", "read_per_replica", "routing: read_per_replica reason"),
        ("UNKNOWN", "FAIL", "FAIL", "scatter", "routing: scatter reason"),
        ("FAIL", "UNKNOWN", "FAIL", "hits_nonzero", "hits_nonzero reason"),
        ("FAIL", "FAIL", "FAIL", "hits_nonzero", "hits_nonzero reason"),
        ("UNKNOWN", "PASS", "UNKNOWN", "ttft_gain", "ttft_gain reason"),
        ("UNKNOWN", "UNKNOWN", "UNKNOWN", "ttft_gain", "ttft_gain reason"),
    ],
)
def test_routing_joins_the_cache_verdict(
    cache: str, routing: str, verdict: str, reason_id: str, reason_starts: str
) -> None:
    cache_id = {"PASS": "pass", "FAIL": "hits_nonzero", "UNKNOWN": "ttft_gain"}[cache]
    routing_id = {"PASS": "fleet_pass", "FAIL": "scatter", "UNKNOWN": "read_per_replica"}[routing]
    joined = join_decisions(_decision(cache, cache_id), _decision(routing, routing_id))
    assert (joined.verdict, joined.reason_id) == (verdict, reason_id)
    assert joined.reason.startswith(reason_starts)
    assert [c.name for c in joined.checks] == [cache_id, routing_id]


# ----- ceilings of the warm burst and summed counters --------------------------------------


def test_a_phase_ceiling_counts_what_earlier_phases_left_cached() -> None:
    shared = list(range(8))
    prompts = [[*shared, 100 + g, 200 + g, 300 + g, 9] for g in (0, 0, 1, 1)]
    groups = [0, 0, 1, 1]
    whole = fleet_ceilings(prompts, groups, 4, 2)
    phase = phase_ceilings_of(prompts[:1], groups[:1], prompts[1:], groups[1:], 4, 2)
    own = sum(len(p) for p in prompts[1:])
    assert phase.prompt_tokens == own
    # The cold prompt hits nothing in every model, so the phase has all of the whole's hits.
    for name in ("one_server", "affinity", "scatter", "round_robin"):
        assert getattr(phase, name) * own == pytest.approx(getattr(whole, name) * whole.prompt_tokens)
    assert phase_ceilings_of([], [], prompts, groups, 4, 2) == whole


def test_warm_ceilings_need_every_prompt_tokenized_and_a_block_size() -> None:
    ids = {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 6]}
    assert warm_ceilings(ids, ["a"], ["a", "b"], None, 2) is None
    assert warm_ceilings(ids, ["a"], ["a", "c"], 4, 2) is None
    c = warm_ceilings(ids, ["a"], ["a", "b"], 4, 2)
    assert c is not None and c.prompt_tokens == 10


def test_summed_counters_add_replicas_and_see_one_restart() -> None:
    a = CacheCounters("vllm", queries=100, hits=50, requests=2, started_at=1.0)
    b = CacheCounters("vllm", queries=300, hits=240, requests=6, started_at=2.0)
    total = sum_counters([a, b])
    assert (total.queries, total.hits, total.requests) == (400, 290, 8)
    assert sum_counters([a, CacheCounters("vllm", queries=1)]).hits is None
    restarted = sum_counters([a, CacheCounters("vllm", queries=1, hits=0, requests=0, started_at=9.0)])
    assert delta(total, restarted).reset


# ----- summary.json and the console ----------------------------------------------------------


def _result(fleet: FleetResult) -> TestResult:
    server = ServerEvidence(
        "vllm", "http://127.0.0.1:8000/v1", "m", None, True, "vllm:cache_config_info", 128, "block_size", None,
        None, None, "--enable-prefix-caching", "--metrics",
    )  # fmt: skip
    cache = Decision("PASS", "prefix caching works", "pass", (Check("caching_enabled", "caching on", "pass", ""),))
    run = ServerRun(
        "cache_on", Evidence(server, None, None, None, None, None), join_decisions(cache, fleet.decision), (), (),
        fleet=fleet,
    )  # fmt: skip
    return TestResult(config={}, runs=[run])


def test_summary_and_console_carry_each_replica_and_the_routing_verdict() -> None:
    result = _result(fleet_result(((8, 3600, 2880), (7, 3400, 2720))))
    summary = result.to_json()
    # Affinity 0.80 vs scatter 0.78: a workload that cannot tell routing apart passes with that said.
    assert summary["verdict"] == "PASS" and "the fleet reaches its placement" in summary["reason"]
    fleet = summary["fleet"]
    assert fleet["verdict"] == "PASS" and fleet["replica_requests"] == [8, 7]
    assert fleet["ceilings"]["affinity"] == 0.80 and fleet["fleet_hit_rate"] == pytest.approx(0.8)
    assert [r["url"] for r in fleet["replicas"]] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert summary["runs"][0]["fleet"]["reason_id"] == "fleet_pass_flat"
    text = format_console(result, ascii_only=True)
    assert "fleet   router round_robin" in text and "routing PASS" in text
    assert "affinity 0.80" in text and "scatter 0.78" in text
    assert "http://127.0.0.1:8001     8    53%      0.80" in text
    assert "\nrouting\n" in text


def test_counters_read_through_prometheus_say_so() -> None:
    fleet = fleet_result(((8, 3600, 2880), (7, 3400, 2720)))
    evidence = replace(fleet.evidence, metrics_source="prometheus")
    result = _result(FleetResult(evidence, decide_fleet(evidence)))
    assert result.to_json()["fleet"]["metrics_source"] == "prometheus"
    assert result.verdict == "PASS"
    text = format_console(result, ascii_only=True)
    assert "2 replicas, each read through Prometheus" in text and "own /metrics" not in text
    check = next(c for c in result.decision.checks if c.name == "read_per_replica")
    assert "through Prometheus" in check.detail


def test_one_busy_replica_fails_the_whole_test() -> None:
    result = _result(fleet_result(((15, 6800, 5440), (0, 0, 0))))
    assert result.verdict == "FAIL" and result.exit_code == 1
    assert result.decision.reason.startswith("routing: one replica served 100% of requests")
    text = format_console(result, ascii_only=True)
    assert text.startswith("FAIL  routing: one replica served 100%")


# ----- the whole test, a stand-in server playing the router -----------------------------------


@pytest.fixture
def replicas() -> Iterator[tuple[FakeOpenAIServer, FakeOpenAIServer]]:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        yield a, b


def test_a_router_that_sends_everything_to_one_replica_fails(
    replicas: tuple[FakeOpenAIServer, FakeOpenAIServer], tmp_path: Path
) -> None:
    # The "router" is replica a itself: every request lands there, b idles.
    a, b = replicas
    config = build(
        PrefixTestConfig, base_url=a.base_url, replica_urls=(a.root_url, b.root_url), batch_size=2, group_size=3,
        ttft_burst=2, out_dir=str(tmp_path), timeout_s=10,
    )  # fmt: skip
    result = run_prefix_test(config, show_progress=False)
    run = result.main
    assert run is not None and run.fleet is not None
    evidence = run.fleet.evidence
    assert evidence.metrics_source == "replicas"
    assert evidence.replica_requests == (5, 0) and evidence.requests_sent == 5
    assert evidence.ceilings is not None
    assert result.verdict == "FAIL" and run.fleet.decision.reason_id == "load_balanced"
    # Every phase was measured on the replicas' summed counters.
    warm = next(p for p in run.pooled if p.name == "warm")
    assert warm.counters is not None and warm.counters.requests == 5
    assert (tmp_path / "summary.json").exists()


def test_one_server_without_replicas_keeps_its_verdict(tmp_path: Path) -> None:
    with FakeOpenAIServer() as server:
        config = build(
            PrefixTestConfig, base_url=server.base_url, batch_size=2, group_size=2, ttft_burst=2,
            out_dir=str(tmp_path), timeout_s=10,
        )  # fmt: skip
        result = run_prefix_test(config, show_progress=False)
    assert result.main is not None and result.main.fleet is None
    assert result.to_json()["fleet"] is None
    assert "fleet   " not in format_console(result, ascii_only=True)


def test_a_router_given_without_its_replicas_is_not_read_and_the_verdict_names_them(tmp_path: Path) -> None:
    # The stand-in answers GET /workers as vllm-router does; its own counters must not be used.
    with FakeOpenAIServer() as server:
        server.router_workers = ["http://10.0.0.2:8000", "http://10.0.0.1:8000"]
        config = build(
            PrefixTestConfig, base_url=server.base_url, batch_size=2, group_size=2, ttft_burst=2,
            out_dir=str(tmp_path), timeout_s=10,
        )  # fmt: skip
        result = run_prefix_test(config, show_progress=False)
    run = result.main
    assert run is not None and run.fleet is not None
    assert run.fleet.evidence.metrics_source == "router"
    assert result.verdict == "UNKNOWN" and result.exit_code == 2
    assert "replica_urls=http://10.0.0.1:8000,http://10.0.0.2:8000" in result.decision.reason
    # No phase was measured on the router's counters.
    assert all(p.counters is None for p in run.pooled)
