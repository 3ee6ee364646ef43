"""The fleet parts without a server: ceilings, per-replica evidence, router detection, the fleet's configuration.

The ceilings are checked on a hand-counted workload (4-token blocks), the scatter model
against a seeded simulation of random placements, and the placement ceiling against
every random placement on 2, 3, 4 and 16 replicas. The routing verdict's table is
``tests/cachetest/test_fleet_verdict.py``; the KV-event readers (msgspec) ``tests/measure/test_fleet_kv_events.py``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from echo_env.errors import ConfigError, EngineError
from echo_env.launch.fleet import (
    POLICIES,
    EmbeddedFleet,
    FleetConfig,
    kv_events_config,
    router_command,
    split_cpus,
)
from echo_env.measure.fleet import (
    FleetEvidence,
    ReplicaFigures,
    affinity_placement,
    counters_jump,
    expected_scatter_hit_tokens,
    fleet_ceilings,
    placement_hit_tokens,
    replica_figures,
    round_robin_placement,
    router_worker_requests,
    scrapes_alternate,
)
from echo_env.measure.placement import assigned_hit_tokens, placement_bound, replica_hits
from echo_env.measure.tokens import plan_tokens
from echo_env.rollout.worker import SESSION_HEADER
from echo_env.wire.metrics import CacheCounters, CounterDelta, parse_prometheus
from echo_env.wire.router import probe_router, worker_urls_from

# ----- a workload counted by hand ------------------------------------------------------------
# Blocks of 4 tokens. Every prompt: 8 shared tokens (2 blocks), 8 tokens of its group's own
# text (2 blocks), a 3-token tail. 19 tokens, of which 4 * floor(18 / 4) = 16 can hit.

B = 4
SHARED = [1, 2, 3, 4, 5, 6, 7, 8]


def prompt(group: int) -> list[int]:
    own = [100 + 10 * group + i for i in range(8)]
    return SHARED + own + [900 + group, 901, 902]


PROMPTS = [prompt(0), prompt(0), prompt(1), prompt(1)]
GROUPS = [0, 0, 1, 1]
TOTAL = 4 * 19


def test_one_server_ceiling_is_plan_tokens() -> None:
    c = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    # p0 cold, p1 all 16, p2 the shared 8, p3 all 16.
    assert c.one_server == pytest.approx(40 / TOTAL)
    assert c.one_server == pytest.approx(plan_tokens(PROMPTS, B).hit_rate_ceiling)


def test_affinity_pays_the_shared_prefix_once_per_replica() -> None:
    c = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    # Group 0 on replica 0, group 1 on replica 1: each first prompt is cold, the second hits 16.
    assert c.affinity == pytest.approx(32 / TOTAL)
    assert affinity_placement(["b", "a", "b", "c"], 2) == [0, 1, 0, 0]


def test_round_robin_splits_each_group_in_send_order() -> None:
    c = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    # Replica 0 gets p0 (g0), p2 (g1): p2 hits the shared 8; replica 1 likewise.
    assert c.round_robin == pytest.approx(16 / TOTAL)
    assert round_robin_placement(5, 2) == [0, 1, 0, 1, 0]


def test_scatter_is_the_exact_expectation() -> None:
    # p1: 4 blocks held by 1 earlier prompt -> 4 * 1/2; p2: 2 shared blocks held by 2 -> 2 * 3/4;
    # p3: 2 shared held by 3 -> 2 * 7/8, 2 group blocks held by 1 -> 2 * 1/2. In blocks: 2 + 1.5 + 2.75.
    assert expected_scatter_hit_tokens(PROMPTS, 2, B) == pytest.approx(4 * 6.25)
    c = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    assert c.scatter == pytest.approx(25 / TOTAL)
    assert c.discriminates == pytest.approx((32 - 25) / TOTAL)


def test_scatter_matches_a_simulation_of_random_placements() -> None:
    prompts = [prompt(g) for g in (0, 1, 0, 2, 1, 0, 2, 2, 1, 0)]
    rng = np.random.default_rng(0)
    trials = [placement_hit_tokens(prompts, list(rng.integers(0, 3, len(prompts))), B) for _ in range(4000)]
    exact = expected_scatter_hit_tokens(prompts, 3, B)
    # 4000 trials: the standard error is about 0.2 token here.
    assert float(np.mean(trials)) == pytest.approx(exact, abs=1.0)


def test_one_replica_makes_every_ceiling_the_single_server_one() -> None:
    c = fleet_ceilings(PROMPTS, GROUPS, B, replicas=1)
    assert c.affinity == c.scatter == c.round_robin == c.one_server


def test_groups_that_share_only_the_common_prefix_cannot_tell_routing_apart() -> None:
    # Group text inside the last, never-cached block: only the shared blocks can hit.
    prompts = [[*SHARED, 50 + g, 51, 52] for g in (0, 0, 1, 1)]
    c = fleet_ceilings(prompts, [0, 0, 1, 1], B, replicas=2)
    assert c.affinity == pytest.approx(c.round_robin)
    assert c.affinity - c.scatter < 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": [0, 0, 1]}, "group"),
        ({"block_size": 0}, "block_size"),
        ({"replicas": 0}, "replicas"),
    ],
)
def test_bad_ceiling_inputs_name_the_problem(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"prompts": PROMPTS, "groups": GROUPS, "block_size": B, "replicas": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        fleet_ceilings(**args)


def test_empty_workload_has_zero_ceilings() -> None:
    c = fleet_ceilings([], [], B, replicas=2)
    assert (c.one_server, c.affinity, c.scatter, c.round_robin) == (0.0, 0.0, 0.0, 0.0)


# ----- the ceiling of the placement that happened ------------------------------------------------


def test_placement_bound_with_one_replica_is_the_one_server_ceiling() -> None:
    bound = placement_bound(PROMPTS[:1], PROMPTS[1:], B)
    assert bound.hit_tokens([3]) == plan_tokens(PROMPTS[1:], B, warm=PROMPTS[:1]).max_hit_tokens
    assert bound.hit_tokens([0, 3, 0]) == bound.hit_tokens([3])  # an idle replica pays nothing
    assert bound.hit_tokens([0, 0]) == 0 and bound.hit_rate([]) == 0.0


def test_placement_bound_pays_the_shared_prefix_once_per_busy_replica() -> None:
    # p1 (group 0) after the cold p0; p2, p3 (group 1). Two busy replicas: the best is group 0 with
    # p0's replica, group 1 on the other, which pays the shared 2 blocks once: 16 + (0 + 16) tokens.
    bound = placement_bound(PROMPTS[:1], PROMPTS[1:], B)
    assert bound.hit_tokens([1, 2]) == 32
    assert bound.hit_tokens([1, 2]) == assigned_hit_tokens(PROMPTS[:1], [0], PROMPTS[1:], [0, 1, 1], B)
    # Three busy replicas: group 1 is split, so its own 2 blocks are paid twice as well.
    assert bound.hit_tokens([1, 1, 1]) == 16
    with pytest.raises(ConfigError, match="zero or more"):
        bound.hit_tokens([-1, 4])


def test_no_placement_beats_the_bound_of_its_own_request_counts() -> None:
    prompts = [prompt(g) for g in (0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 3, 3)]
    rng = np.random.default_rng(1)
    for replicas in (2, 3, 4, 16):
        for _ in range(200):
            placement = [int(x) for x in rng.integers(0, replicas, len(prompts))]
            per = replica_hits(prompts[:1], placement[:1], prompts[1:], placement[1:], B)
            counts = [per.get(r, (0, 0, 0))[0] for r in range(replicas)]
            hits = sum(h for _, _, h in per.values())
            assert hits <= placement_bound(prompts[:1], prompts[1:], B).hit_tokens(counts)


def test_replica_hits_count_each_replicas_phase_after_its_earlier_prompts() -> None:
    per = replica_hits(PROMPTS[:1], [1], PROMPTS[1:], [1, 0, 0], B)
    assert per == {1: (1, 19, 16), 0: (2, 38, 16)}
    with pytest.raises(ConfigError, match="one replica per prompt"):
        replica_hits(PROMPTS[:1], [], PROMPTS[1:], [0, 0, 0], B)


def test_the_cache_ceiling_says_why_it_is_unknown() -> None:
    ceilings = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    known = FleetEvidence((rep("http://a", 38, 16, 2), rep("http://b", 38, 16, 2)), ceilings, 4).cache_ceiling()
    assert (known.value, known.replicas, known.used) == (pytest.approx(32 / TOTAL), 2, 2)
    assert "2 of 2 replicas" in known.described
    router = FleetEvidence((), ceilings, 4, metrics_source="router", replica_urls_hint=("http://a", "http://b"))
    unknown = router.cache_ceiling()
    assert (unknown.value, unknown.replicas) == (None, 2) and "request counts were not read" in unknown.described
    untokenized = FleetEvidence((rep("http://a", 38, 16, 2),), None, 2).cache_ceiling()
    assert untokenized.value is None and untokenized.why_unknown == "the prompts were not tokenized"


# ----- per-replica evidence ---------------------------------------------------------------------


def counters(queries: float, hits: float, requests: float, started_at: float | None = 100.0) -> CacheCounters:
    return CacheCounters(source="vllm", queries=queries, hits=hits, requests=requests, started_at=started_at)


def test_replica_figures_from_two_snapshots() -> None:
    r = replica_figures("http://a", counters(100, 50, 2), counters(1100, 850, 6))
    assert (r.requests, r.hit_rate, r.usable, r.note) == (4, 0.8, True, None)


def test_replica_figures_say_why_counters_are_unusable() -> None:
    assert "could not be read" in (replica_figures("http://a", None, counters(1, 1, 1)).note or "")
    restarted = replica_figures("http://a", counters(100, 50, 2), counters(10, 5, 1, started_at=200.0))
    assert "restarted" in (restarted.note or "") and not restarted.usable
    no_requests = replica_figures("http://a", counters(1, 1, 1), CacheCounters("vllm", queries=2, hits=1))
    assert "request counter" in (no_requests.note or "")


def rep(url: str, queries: float, hits: float, requests: float) -> ReplicaFigures:
    return ReplicaFigures(url, CounterDelta(source="vllm", reset=False, queries=queries, hits=hits, requests=requests))


def test_fleet_hit_rate_weights_replicas_by_tokens() -> None:
    e = FleetEvidence((rep("http://a", 1000, 900, 10), rep("http://b", 3000, 900, 30)), None, 40)
    assert e.fleet_hit_rate == pytest.approx(1800 / 4000)
    assert e.replica_requests == (10, 30)
    assert e.request_shares == pytest.approx((0.25, 0.75))
    assert e.max_share == pytest.approx(0.75)


def test_fleet_figures_are_unknown_when_a_replica_is_missing() -> None:
    e = FleetEvidence((rep("http://a", 1000, 900, 10), ReplicaFigures("http://b", None, "down")), None, 20)
    assert e.fleet_hit_rate is None and e.request_shares is None


# ----- telling a router from a server --------------------------------------------------------------


def test_a_counter_going_down_means_another_server_answered() -> None:
    assert counters_jump(counters(500, 300, 5), counters(400, 390, 4))
    assert not counters_jump(counters(500, 300, 5), counters(500, 300, 5))


def test_a_changed_created_time_means_another_server_answered() -> None:
    # Replica B has more traffic, so nothing went down; only its _created time differs.
    assert counters_jump(counters(500, 300, 5, started_at=100.0), counters(900, 700, 9, started_at=160.0))


def test_alternating_scrapes_are_detected_in_a_series() -> None:
    a, b = counters(500, 300, 5, started_at=100.0), counters(900, 700, 9, started_at=160.0)
    assert scrapes_alternate([a, b, a])
    assert not scrapes_alternate([a, a, a])
    assert not scrapes_alternate([a])


ROUTER_PAGE = """\
# TYPE vllm_router_processed_requests_total counter
vllm_router_processed_requests_total{worker="http://127.0.0.1:1"} 120
vllm_router_processed_requests_total{worker="http://127.0.0.1:2"} 119
vllm_router_worker_health{worker="http://127.0.0.1:1"} 1
"""


def test_router_worker_requests_reads_the_routers_own_counter() -> None:
    got = router_worker_requests(parse_prometheus(ROUTER_PAGE))
    assert got == {"http://127.0.0.1:1": 120.0, "http://127.0.0.1:2": 119.0}


@pytest.mark.parametrize(
    ("body", "urls"),
    [
        ({"urls": ["http://a", "http://b"]}, ["http://a", "http://b"]),
        ({"urls": ["http://b", "http://a", "http://b"]}, ["http://a", "http://b"]),
        ({"workers": [{"url": "http://b"}, {"url": "http://a"}]}, ["http://a", "http://b"]),
        ({"workers": [{"url": "http://a", "is_healthy": True}], "total": 1}, ["http://a"]),
        ({"detail": "Not Found"}, None),
        (["http://a"], None),
        ({"workers": [{"name": "x"}]}, None),
    ],
)
def test_worker_urls_from_router_answers(body: object, urls: list[str] | None) -> None:
    assert worker_urls_from(body) == urls


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, object]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, {"detail": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def json_server() -> Iterator[tuple[str, dict[str, tuple[int, object]]]]:
    routes: dict[str, tuple[int, object]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


def test_probe_router_lists_a_routers_replicas(json_server: tuple[str, dict[str, tuple[int, object]]]) -> None:
    url, routes = json_server
    routes["/list_workers"] = (200, {"urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]})
    assert asyncio.run(probe_router(url + "/v1")) == ["http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_probe_router_says_none_for_a_plain_server(json_server: tuple[str, dict[str, tuple[int, object]]]) -> None:
    url, _ = json_server
    assert asyncio.run(probe_router(url)) is None


def test_probe_router_says_none_when_nothing_answers() -> None:
    assert asyncio.run(probe_router("http://127.0.0.1:9", timeout_s=1.0)) is None


# ----- the fleet's configuration (no process started) -------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"replicas": 0}, "replicas"),
        ({"router": "least_loaded"}, "round_robin, random, cache_aware"),
        ({"kv_cache_gib": 0}, "kv_cache_gib"),
        ({"cpu_binds": ("0",)}, "one each"),
        ({"cpu_binds": "0,1"}, "one entry per replica"),
        ({"router_args": "--cache-threshold 0.5"}, "separate arguments"),
    ],
)
def test_bad_fleet_config_names_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FleetConfig(**kwargs)


def test_every_policy_is_accepted() -> None:
    for policy in POLICIES:
        assert FleetConfig(router=policy).router == policy


def test_two_replicas_need_about_11_gib() -> None:
    assert FleetConfig().memory_needed_gib == pytest.approx(11.0)


@pytest.mark.parametrize(
    ("cpus", "parts", "binds"),
    [
        ([0, 1], 2, ["0", "1"]),
        ([0, 1, 2, 3], 2, ["0-1", "2-3"]),
        ([0, 1, 2], 2, ["0-1", "2"]),
        ([0], 2, ["0", "0"]),
        ([3, 1, 2, 0], 1, ["0-3"]),
    ],
)
def test_split_cpus_gives_each_replica_its_own_cores(cpus: list[int], parts: int, binds: list[str]) -> None:
    assert split_cpus(cpus, parts) == binds


def test_router_command_binds_everything_to_localhost() -> None:
    cmd = router_command(8000, ["http://127.0.0.1:1", "http://127.0.0.1:2"], "consistent_hash", 29000)
    text = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8000" in text
    assert "--worker-urls http://127.0.0.1:1 http://127.0.0.1:2" in text
    assert "--policy consistent_hash" in text
    assert "--prometheus-host 127.0.0.1 --prometheus-port 29000" in text


def test_kv_events_config_binds_an_ipc_endpoint() -> None:
    cfg = json.loads(kv_events_config("ipc:///tmp/x/replica-0.sock"))
    assert cfg == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/x/replica-0.sock",
                   "topic": "kv"}  # fmt: skip


def test_session_header_is_the_one_vllm_router_reads_first() -> None:
    assert SESSION_HEADER.lower() == "x-session-id"


def test_fleet_addresses_before_start_say_how_to_start() -> None:
    fleet = EmbeddedFleet(FleetConfig())
    with pytest.raises(EngineError, match="start"):
        _ = fleet.base_url
    assert fleet.replica_urls == [] and fleet.policy == "round_robin"
    fleet.stop()  # nothing started: a no-op


def test_not_enough_memory_is_refused_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import echo_env.launch.fleet as fleet_mod

    monkeypatch.setattr(fleet_mod, "mem_available_gib", lambda: 4.0)
    monkeypatch.setattr(fleet_mod, "check_router_installed", lambda: None)
    with pytest.raises(EngineError, match=r"need about 11 GiB.*4\.0 GiB is available.*check_memory=false"):
        EmbeddedFleet(FleetConfig()).start()


def test_restart_router_refuses_an_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="policy"):
        EmbeddedFleet(FleetConfig()).restart_router("fastest")


def test_fleet_evidence_summary_carries_the_derived_figures() -> None:
    ceilings = fleet_ceilings(PROMPTS, GROUPS, B, replicas=2)
    e = FleetEvidence((rep("http://a", 38, 16, 2), rep("http://b", 38, 16, 2)), ceilings, 4, policy="random")
    out = json.loads(json.dumps(e.to_json()))
    assert out["fleet_hit_rate"] == pytest.approx(32 / 76)
    assert out["request_shares"] == pytest.approx([0.5, 0.5])
    # Two requests each: at best each replica holds one group, so the placement ceiling is affinity's.
    assert out["placement_ceiling"] == pytest.approx(32 / TOTAL) == pytest.approx(ceilings.affinity)
    assert out["replicas"][1]["requests"] == 2 and "router_alternates" not in out


def test_replicas_enable_the_render_endpoint_cache_aware_needs() -> None:
    assert "--enable-scale-out" in FleetConfig().engine_config().extra_args
    assert "--enable-scale-out" not in FleetConfig(scale_out=False).engine_config().extra_args
