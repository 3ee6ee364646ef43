"""The real fleet: two vLLM replicas behind vllm-router, measured from each replica's own counters.

Marked ``fleet``: the fleet takes about 13 GB and both cores, so on a shared machine run
it under the engine lock (``flock /work/engine.lock pytest -m fleet``). One fleet serves
the whole module; tests that switch the router's policy switch it back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.envs.task import EchoTask
from echo_env.launch.fleet import EmbeddedFleet, FleetConfig
from echo_env.measure.fleet import (
    FleetEvidence,
    fleet_ceilings,
    replica_figures,
    scrapes_alternate,
)
from echo_env.measure.tokens import shared_prefix_length
from echo_env.rollout.worker import SESSION_HEADER
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord
from echo_env.wire.info import read_server_facts
from echo_env.wire.metrics import CacheCounters, MetricsReader, fetch_metrics, parse_prometheus, read_counters
from echo_env.wire.router import probe_router
from echo_env.wire.tokenizer import encode_prompts

pytestmark = pytest.mark.fleet

GROUPS = 4
GROUP_SIZE = 4


# ----- `echo-prefix test` on an embedded fleet -------------------------------------------------
# This one starts a fleet of its own (`replicas=2 router=...`), so it comes before any test
# that uses the module's `fleet` fixture (pytest runs a file's tests in order and starts a
# module fixture at its first use): two fleets at once would not fit in memory. Round robin
# through `echo-prefix test` runs on the module's fleet below (the external-router form).

SMALL = ("batch_size=4", "group_size=4", "ttft_burst=4", "min_repeats=2", "max_repeats=3", "max_tokens=8")


def _fleet_test(tmp_path: Path, *keys: str) -> dict[str, Any]:
    from echo_env.cli import main

    code = main(["test", *keys, *SMALL, f"out_dir={tmp_path}"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == summary["exit_code"]
    return summary


def _assert_replica_evidence(
    summary: dict[str, Any], policy: str | None, ceilings: bool = True, source: str = "replicas"
) -> dict[str, Any]:
    fleet = summary["fleet"]
    assert fleet is not None, summary["error"]
    assert fleet["policy"] == policy and fleet["metrics_source"] == source
    # Each replica read on its own: both accounted for, summing to the 15 warm requests sent.
    assert len(fleet["replicas"]) == 2 and all(r["note"] is None for r in fleet["replicas"])
    assert sum(fleet["replica_requests"]) == fleet["requests_sent"] == 4 * 4 - 1
    if ceilings:
        assert fleet["ceilings"]["replicas"] == 2 and fleet["ceilings"]["block_size"] == 128
    assert fleet["fleet_hit_rate"] is not None
    assert fleet["verdict"] in ("PASS", "FAIL", "UNKNOWN") and fleet["checks"]
    # The routing verdict joins the test's: a routing FAIL or UNKNOWN is never hidden by a cache PASS.
    if fleet["verdict"] != "PASS":
        assert summary["verdict"] in ("FAIL", "UNKNOWN") and summary["verdict"] != "PASS"
    return fleet


def test_echo_prefix_test_on_two_replicas_consistent_hash(tmp_path: Path) -> None:
    summary = _fleet_test(tmp_path, "replicas=2", "router=consistent_hash")
    fleet = _assert_replica_evidence(summary, "consistent_hash")
    # No session key in the warm burst: the router hashes the body, so a group's identical
    # prompts meet on one replica, and the groups (4 words) spread over both.
    assert fleet["verdict"] in ("PASS", "FAIL"), fleet["reason"]
    if fleet["verdict"] == "FAIL":
        # Only the one way hashing 4 groups can go wrong: all of them on one replica.
        assert fleet["reason_id"] == "load_balanced", fleet["reason"]
    else:
        assert fleet["fleet_hit_rate"] >= 0.9 * fleet["ceilings"]["affinity"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmbeddedFleet]:
    """Two replicas (one core, 1 GiB KV cache each, KV events on) behind a round_robin router, for the module."""
    config = FleetConfig(replicas=2, router="round_robin", kv_cache_gib=1, dev_mode=True, kv_events=True)
    with EmbeddedFleet(config) as f:
        yield f


def snapshots(fleet: EmbeddedFleet) -> list[CacheCounters]:
    return [
        MetricsReader(u, model_name=fleet.served_model_name).snapshot().counters for u in fleet.replica_metrics_urls
    ]


async def send(fleet: EmbeddedFleet, prompts: Sequence[str]) -> list[RequestRecord]:
    config = ClientConfig(base_url=fleet.base_url, model=fleet.served_model_name, timeout_s=600)
    async with LLMClient(config) as client:
        return list(
            await asyncio.gather(*(client.generate(p, max_tokens=4, temperature=0.0, stop=["\n"]) for p in prompts))
        )


def echo_burst() -> tuple[list[str], list[str]]:
    """The echo workload on a new prefix: GROUPS groups of GROUP_SIZE agents, each group in a row."""
    tag = f"[echo-prefix fleet {uuid.uuid4().hex[:8]}]"
    task = EchoTask(run_tag=tag)
    words = task.sample_words(GROUPS, seed=0)
    prompts = [task.transcript(w) for w in words for _ in range(GROUP_SIZE)]
    groups = [f"g{g}" for g in range(GROUPS) for _ in range(GROUP_SIZE)]
    return prompts, groups


def test_round_robin_splits_a_burst_evenly_and_hits_as_its_model_says(fleet: EmbeddedFleet) -> None:
    from echo_env.launch.model import load_tokenizer

    prompts, groups = echo_burst()
    before = snapshots(fleet)
    records = asyncio.run(send(fleet, prompts))
    after = snapshots(fleet)
    assert all(r.ok for r in records), [r.error for r in records if not r.ok][:3]

    ids = encode_prompts(load_tokenizer(None), prompts)
    evidence = FleetEvidence(
        replicas=tuple(replica_figures(u, b, a) for u, b, a in zip(fleet.replica_urls, before, after)),
        ceilings=fleet_ceilings(ids, groups, block_size=128, replicas=2),
        requests_sent=len(records),
        policy="round_robin",
    )
    # Each replica's own counters account for every request, split evenly.
    assert evidence.replica_requests == (8, 8)
    assert evidence.ceilings is not None and evidence.fleet_hit_rate is not None
    # Each replica pays the shared prefix once: the round-robin model, within a few tokens per request.
    assert evidence.fleet_hit_rate == pytest.approx(evidence.ceilings.round_robin, abs=0.05)
    decision = decide_fleet(evidence)
    assert decision.verdict == "PASS", decision.reason


def test_the_routers_metrics_page_alternates_between_replicas(fleet: EmbeddedFleet) -> None:
    through_router = [
        read_counters(parse_prometheus(fetch_metrics(f"{fleet.router_url}/metrics")), fleet.served_model_name)
        for _ in range(4)
    ]
    assert scrapes_alternate(through_router)
    own = [snapshots(fleet)[0] for _ in range(3)]
    assert not scrapes_alternate(own)


def test_probe_router_finds_the_replicas(fleet: EmbeddedFleet) -> None:
    assert asyncio.run(probe_router(fleet.base_url)) == sorted(fleet.replica_urls)
    assert asyncio.run(probe_router(fleet.replica_urls[0])) is None
    # What the test's runner reads: the router is known as one by its facts, a replica is not.
    model = fleet.served_model_name
    assert asyncio.run(read_server_facts(fleet.base_url, model, None)).router_workers == tuple(
        sorted(fleet.replica_urls)
    )
    assert asyncio.run(read_server_facts(f"{fleet.replica_urls[0]}/v1", model, None)).router_workers is None


def test_consistent_hash_keeps_a_session_on_one_replica(fleet: EmbeddedFleet) -> None:
    base_url = fleet.base_url
    fleet.restart_router("consistent_hash")
    try:
        assert fleet.base_url == base_url and fleet.policy == "consistent_hash"
        prompts, _ = echo_burst()
        before = snapshots(fleet)
        # Different prompts, one session key: the key alone decides the replica.
        for p in prompts[::GROUP_SIZE] + prompts[1::GROUP_SIZE]:
            body = {"model": fleet.served_model_name, "prompt": p, "max_tokens": 2, "temperature": 0.0}
            response = httpx.post(
                f"{base_url}/completions", json=body, headers={SESSION_HEADER: "session-1"}, timeout=300
            )
            assert response.status_code == 200, response.text
        after = snapshots(fleet)
        counted = sorted(round((a.requests or 0) - (b.requests or 0)) for b, a in zip(before, after))
        assert counted == [0, 2 * GROUPS]
    finally:
        fleet.restart_router("round_robin")


def test_kv_events_show_every_replica_storing_the_shared_prefix(fleet: EmbeddedFleet) -> None:
    from echo_env.launch.model import load_tokenizer
    from echo_env.measure.kv_events import KVEventSubscriber

    prompts, _ = echo_burst()
    ids = encode_prompts(load_tokenizer(None), prompts)
    prefix = ids[0][: shared_prefix_length(ids)]

    async def run() -> KVEventSubscriber:
        async with KVEventSubscriber(dict(zip(fleet.replica_urls, fleet.kv_event_endpoints))) as sub:
            records = await send(fleet, prompts)
            assert all(r.ok for r in records)
        return sub

    sub = asyncio.run(run())
    census = sub.census(prefix, block_size=128)
    assert sub.errors == []
    # Round robin: both replicas compute and keep the run's shared prefix, so it is stored twice.
    assert census.shared_prefix_blocks >= 3
    assert census.prefix_holders == tuple(fleet.replica_urls)
    assert census.duplicated >= census.shared_prefix_blocks


def test_echo_prefix_test_through_your_own_router_reads_each_replica(fleet: EmbeddedFleet, tmp_path: Path) -> None:
    """The external form: base_url is the router, replica_urls its replicas (the module's fleet, round_robin)."""
    urls = ",".join(fleet.replica_urls)
    summary = _fleet_test(tmp_path, f"base_url={fleet.base_url}", f"replica_urls={urls}")
    # Your router's policy is not known to the test; the ceilings need a tokenizer of the served model,
    # which the test finds only if the router passes /tokenize on.
    fleet_json = _assert_replica_evidence(summary, None, ceilings=False)
    assert [r["url"] for r in fleet_json["replicas"]] == fleet.replica_urls


def test_echo_prefix_test_reads_each_replica_through_prometheus(fleet: EmbeddedFleet, tmp_path: Path) -> None:
    """``prometheus_url=embedded``: a real Prometheus scrapes the module's replicas; the test reads them through it."""
    urls = ",".join(fleet.replica_urls)
    summary = _fleet_test(tmp_path, f"base_url={fleet.base_url}", f"replica_urls={urls}", "prometheus_url=embedded")
    fleet_json = _assert_replica_evidence(summary, None, ceilings=False, source="prometheus")
    assert [r["url"] for r in fleet_json["replicas"]] == fleet.replica_urls
    # The per-replica counts, read through Prometheus, add up to the warm burst's finished requests.
    warm = next(p for p in summary["runs"][0]["phases"] if p["name"] == "warm")
    assert sum(fleet_json["replica_requests"]) == warm["requests"] - warm["failed"] == fleet_json["requests_sent"]
    # Round robin (the module's policy) splits the burst between both replicas (8 / 7).
    assert sorted(fleet_json["replica_requests"]) == [7, 8]
