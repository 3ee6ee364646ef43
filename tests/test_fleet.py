"""The fleet parts without a server: ceilings, per-replica evidence, router detection, the routing verdict.

The ceilings are checked on a hand-counted workload (4-token blocks), the scatter model
against a seeded simulation of random placements, and every branch of the routing
verdict is a table row built from evidence made by hand.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from echo_env.cachetest.fleet_checks import FLEET_CHECKS, FleetRules, decide_fleet
from echo_env.errors import ConfigError, EngineError
from echo_env.measure.fleet import (
    FleetCeilings,
    FleetEvidence,
    ReplicaFigures,
    affinity_placement,
    counters_jump,
    expected_scatter_hit_tokens,
    fleet_ceilings,
    placement_hit_tokens,
    probe_router,
    replica_figures,
    round_robin_placement,
    router_worker_requests,
    scrapes_alternate,
    worker_urls_from,
)
from echo_env.measure.tokens import plan_tokens
from echo_env.serving.fleet import (
    POLICIES,
    SESSION_HEADER,
    EmbeddedFleet,
    FleetConfig,
    kv_events_config,
    router_command,
    split_cpus,
)
from echo_env.serving.metrics import CacheCounters, CounterDelta, parse_prometheus

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


# ----- the routing verdict ------------------------------------------------------------------------

CEIL = FleetCeilings(
    replicas=2, block_size=128, prompt_tokens=10_000, one_server=0.85, affinity=0.80, scatter=0.55, round_robin=0.56
)
FLAT = replace(CEIL, affinity=0.79, scatter=0.785, round_robin=0.79)


def ev(rate_a: float = 0.80, rate_b: float = 0.80, req_a: int = 64, req_b: int = 64, **kw: Any) -> FleetEvidence:
    base: dict[str, Any] = {
        "replicas": (rep("http://a", 1000, 1000 * rate_a, req_a), rep("http://b", 1000, 1000 * rate_b, req_b)),
        "ceilings": CEIL,
        "requests_sent": req_a + req_b,
        "policy": "round_robin",
    }
    base.update(kw)
    return FleetEvidence(**base)


ROWS: list[tuple[str, FleetEvidence, str, str, str]] = [
    # (row id, evidence, verdict, reason_id, words in the reason)
    ("through router, alternating", ev(metrics_source="router", router_alternates=True, replicas=(),
     replica_urls_hint=("http://a", "http://b")), "UNKNOWN", "read_per_replica",
     "meaningless; replica_urls=http://a,http://b"),
    ("through router, not probed", ev(metrics_source="router", replicas=()), "UNKNOWN", "read_per_replica",
     "replica_urls="),
    ("no replica read", ev(replicas=()), "UNKNOWN", "replica_counters", "replica_urls="),
    ("a replica unreadable", ev(replicas=(rep("http://a", 1, 1, 1), ReplicaFigures("http://b", None,
     "http://b/metrics could not be read"))), "UNKNOWN", "replica_counters", "http://b/metrics could not be read"),
    ("a replica restarted", ev(replicas=(rep("http://a", 1, 1, 1), ReplicaFigures("http://b",
     CounterDelta("vllm", reset=True), "http://b restarted"))), "UNKNOWN", "replica_counters", "restarted"),
    ("other traffic", ev(requests_sent=100), "UNKNOWN", "requests_accounted", "other traffic"),
    ("a replica not listed", ev(requests_sent=200), "UNKNOWN", "requests_accounted", "only 128 of 200"),
    ("no ceilings", ev(ceilings=None), "UNKNOWN", "fleet_ceilings_known", "tokenized"),
    ("nothing queried", ev(replicas=(rep("http://a", 0, 0, 64), rep("http://b", 0, 0, 64))), "UNKNOWN",
     "fleet_not_above_ceiling", "no prefix-cache queries"),
    ("above the ceiling", ev(rate_a=0.95, rate_b=0.95), "UNKNOWN", "fleet_not_above_ceiling", "above the most"),
    ("one replica takes 94%", ev(req_a=120, req_b=8), "FAIL", "load_balanced", "94% of requests; max_share=0.8"),
    ("groups together", ev(rate_a=0.78, rate_b=0.76), "PASS", "fleet_pass", "keeps groups together; 0.77 of 0.80"),
    ("scatters", ev(rate_a=0.57, rate_b=0.55), "FAIL", "scatter", "scatters groups; predicts 0.550; X-Session-ID"),
    ("between", ev(rate_a=0.69, rate_b=0.69), "UNKNOWN", "scatter", "between the scatter model"),
    ("flat workload", ev(rate_a=0.79, rate_b=0.79, ceilings=FLAT), "PASS", "fleet_pass",
     "cannot tell routing policies apart"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "evidence", "verdict", "reason_id", "words"), ROWS, ids=[r[0] for r in ROWS])
def test_routing_verdict(row: str, evidence: FleetEvidence, verdict: str, reason_id: str, words: str) -> None:
    d = decide_fleet(evidence)
    assert (d.verdict, d.reason_id) == (verdict, reason_id), d.reason
    for w in words.split("; "):
        assert w in d.reason
    assert [c.name for c in d.checks] == [name for name, _, _ in FLEET_CHECKS]
    decided_at = [c.name for c in d.checks].index(reason_id) if reason_id != "fleet_pass" else len(d.checks)
    assert all(c.outcome == "skip" for c in d.checks[decided_at + 1 :])


def test_flat_workload_notes_that_routing_cannot_matter() -> None:
    d = decide_fleet(ev(rate_a=0.79, rate_b=0.79, ceilings=FLAT))
    note = next(c for c in d.checks if c.name == "workload_discriminates")
    assert note.outcome == "unknown" and "scores the same" in note.detail


def test_one_replica_skips_the_balance_check() -> None:
    e = FleetEvidence((rep("http://a", 1000, 780, 10),), replace(CEIL, replicas=1), 10)
    d = decide_fleet(e)
    assert d.verdict == "PASS"
    assert next(c for c in d.checks if c.name == "load_balanced").outcome == "skip"


def test_rules_change_the_thresholds() -> None:
    assert decide_fleet(ev(req_a=120, req_b=8), FleetRules(max_share=0.95)).verdict != "FAIL"
    assert decide_fleet(ev(rate_a=0.69, rate_b=0.69), FleetRules(affinity_fraction=0.85)).verdict == "PASS"


@pytest.mark.parametrize("kwargs", [{"affinity_fraction": 0.0}, {"max_share": 1.5}, {"min_gap": -1}])
def test_bad_rules_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        FleetRules(**kwargs)


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
    import echo_env.serving.fleet as fleet_mod

    monkeypatch.setattr(fleet_mod, "mem_available_gib", lambda: 4.0)
    monkeypatch.setattr(fleet_mod, "check_router_installed", lambda: None)
    with pytest.raises(EngineError, match=r"need about 11 GiB.*4\.0 GiB is available.*check_memory=false"):
        EmbeddedFleet(FleetConfig()).start()


def test_restart_router_refuses_an_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="policy"):
        EmbeddedFleet(FleetConfig()).restart_router("fastest")


# ----- KV events ----------------------------------------------------------------------------------

msgspec = pytest.importorskip("msgspec")


def stored(hashes: list[int], parent: int | None, tokens: list[int], size: int = B) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": size, "lora_id": None, "medium": "CPU"}  # fmt: skip


def frames(seq: int, *events: dict[str, Any]) -> list[bytes]:
    return [b"kv", seq.to_bytes(8, "big"), msgspec.msgpack.encode([1700000000.0, list(events)])]


def test_decode_message_reads_vllms_three_frames() -> None:
    from echo_env.measure.kv_events import decode_message

    msg = decode_message(frames(7, stored([11], None, SHARED[:4])))
    assert (msg.seq, msg.timestamp, msg.events[0]["type"]) == (7, 1700000000.0, "BlockStored")
    with pytest.raises(EngineError, match="3 frames"):
        decode_message([b"kv"])
    with pytest.raises(EngineError, match="timestamp"):
        decode_message([b"kv", b"\0" * 8, msgspec.msgpack.encode({"x": 1})])


def test_replica_blocks_follow_store_remove_and_clear() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, decode_message

    state = ReplicaBlocks()
    state.apply(decode_message(frames(1, stored([11, 12], None, SHARED))))
    state.apply(decode_message(frames(2, stored([13], 12, prompt(0)[8:12]))))
    assert (state.stored, len(state.blocks)) == (3, 3)
    state.apply(decode_message(frames(5, {"type": "BlockRemoved", "block_hashes": [13], "medium": "CPU"})))
    assert (state.removed, state.gaps, len(state.blocks)) == (1, 2, 2)
    state.apply(decode_message(frames(6, {"type": "AllBlocksCleared"})))
    assert (state.cleared, state.blocks) == (1, {})


def test_census_finds_the_prefix_holders_and_the_duplicated_blocks() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, block_census, decode_message

    a, b = ReplicaBlocks(), ReplicaBlocks()
    # Both replicas store the shared 2 blocks (under different hashes) and one group block each.
    a.apply(decode_message(frames(1, stored([11, 12, 13], None, prompt(0)[:12]))))
    b.apply(decode_message(frames(1, stored([21, 22, 23], None, prompt(1)[:12]))))
    census = block_census({"http://a": a, "http://b": b}, shared_prefix=SHARED, block_size=B)
    assert census.prefix_holders == ("http://a", "http://b")
    assert (census.blocks, census.duplicated, census.distinct, census.shared_prefix_blocks) == ((3, 3), 2, 4, 2)
    assert census.duplicated_share == pytest.approx(0.5)
    only_b = block_census({"http://a": ReplicaBlocks(), "http://b": b}, shared_prefix=SHARED, block_size=B)
    assert only_b.prefix_holders == ("http://b",) and only_b.duplicated == 0


def test_a_block_whose_chain_was_not_seen_is_left_out() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, decode_message

    state = ReplicaBlocks()
    state.apply(decode_message(frames(1, stored([13], 12, prompt(0)[8:12]))))  # parent 12 stored before we listened
    assert state.content_keys() == set()


def test_subscriber_reads_a_publisher_over_ipc(tmp_path: Any) -> None:
    zmq = pytest.importorskip("zmq")
    from echo_env.measure.kv_events import KVEventSubscriber

    endpoint = f"ipc://{tmp_path}/replica-0.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)

    async def run() -> KVEventSubscriber:
        async with KVEventSubscriber({"http://a": endpoint}) as sub:
            for seq in range(1, 4):
                pub.send_multipart(frames(seq, stored([seq], seq - 1 or None, [seq] * B)))
                await asyncio.sleep(0.05)
        return sub

    try:
        sub = asyncio.run(run())
    finally:
        pub.close(linger=0)
        ctx.term()
    state = sub.states["http://a"]
    assert (state.messages, state.stored, state.gaps, sub.errors) == (3, 3, 0, [])
    assert sub.census().blocks == (3,)


def test_fleet_evidence_summary_carries_the_derived_figures() -> None:
    e = FleetEvidence((rep("http://a", 1000, 900, 10), rep("http://b", 3000, 900, 30)), CEIL, 40, policy="random")
    out = json.loads(json.dumps(e.to_json()))
    assert out["fleet_hit_rate"] == pytest.approx(0.45)
    assert out["request_shares"] == pytest.approx([0.25, 0.75])
    assert out["ceilings"]["affinity"] == 0.80 and out["replicas"][1]["requests"] == 30


def test_replicas_enable_the_render_endpoint_cache_aware_needs() -> None:
    assert "--enable-scale-out" in FleetConfig().engine_config().extra_args
    assert "--enable-scale-out" not in FleetConfig(scale_out=False).engine_config().extra_args
