"""The real fleet: two vLLM replicas behind vllm-router, measured from each replica's own counters.

Marked ``fleet``: the fleet takes about 13 GB and both cores, so on a shared machine run
it under the engine lock (``flock /work/engine.lock pytest -m fleet``). One fleet serves
the whole module; tests that switch the router's policy switch it back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence

import httpx
import pytest

from echo_env.cachetest.fleet_checks import decide_fleet
from echo_env.envs.task import EchoTask
from echo_env.measure.fleet import (
    FleetEvidence,
    fleet_ceilings,
    probe_router,
    replica_figures,
    scrapes_alternate,
)
from echo_env.measure.tokens import shared_prefix_length
from echo_env.serving.client import ClientConfig, LLMClient, RequestRecord
from echo_env.serving.fleet import SESSION_HEADER, EmbeddedFleet, FleetConfig
from echo_env.serving.metrics import CacheCounters, MetricsReader, fetch_metrics, parse_prometheus, read_counters
from echo_env.serving.tokenizer import encode_prompts

pytestmark = pytest.mark.fleet

GROUPS = 4
GROUP_SIZE = 4


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
    from echo_env.serving.model import load_tokenizer

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
    assert asyncio.run(probe_router(fleet.base_url)) == fleet.replica_urls
    assert asyncio.run(probe_router(fleet.replica_urls[0])) is None


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
    from echo_env.serving.kv_events import KVEventSubscriber
    from echo_env.serving.model import load_tokenizer

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
