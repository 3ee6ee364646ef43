"""The test through a fleet, its replicas' counters read through a real Prometheus (``prometheus_url=``).

Two stand-in servers play the replicas (their ``/metrics`` count what they served); the
Prometheus is real (Debian's package, fetched once; the tests skip without it unless
``ECHO_ENV_REQUIRE_PROMETHEUS=1``). Each test checks that the deltas read through
Prometheus are the ones each stand-in's own page shows. No engine is started.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_servers import MODEL, FakeOpenAIServer

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.commands.test import run_prefix_test
from echo_env.config import build
from echo_env.errors import EngineError
from echo_env.launch.prometheus_server import EmbeddedPrometheus, prometheus_binary
from echo_env.measure.replicas import FleetCounterProbe, ReplicaProbe, fleet_evidence
from echo_env.report.console import format_console
from echo_env.wire.metrics import CacheCounters, delta


@pytest.fixture(scope="module", autouse=True)
def _prometheus_available() -> None:
    try:
        prometheus_binary()
    except EngineError as exc:
        if os.environ.get("ECHO_ENV_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"ECHO_ENV_REQUIRE_PROMETHEUS=1 but Prometheus is unavailable: {exc}")
        pytest.skip(f"Prometheus unavailable ({exc}); `make prometheus` fetches it")


@pytest.fixture
def replicas() -> Iterator[tuple[FakeOpenAIServer, FakeOpenAIServer]]:
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        yield a, b


def _complete(server: FakeOpenAIServer, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True}
    response = httpx.post(f"{server.base_url}/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text


def _deltas(before: list[CacheCounters | None], after: list[CacheCounters | None]) -> list[tuple[float | None, ...]]:
    out = []
    for b, a in zip(before, after, strict=True):
        assert b is not None and a is not None
        d = delta(b, a)
        out.append((d.queries, d.hits, d.requests))
    return out


def test_replica_reads_through_prometheus_equal_each_replicas_own_page(
    replicas: tuple[FakeOpenAIServer, FakeOpenAIServer],
) -> None:
    a, b = replicas
    urls = [a.root_url, b.root_url]
    direct = ReplicaProbe(urls, model_name=MODEL)
    with EmbeddedPrometheus(urls, scrape_interval_s=1) as prom:
        probe = ReplicaProbe(urls, model_name=MODEL, prometheus_url=prom.url)
        assert probe.source == "prometheus" and direct.source == "replicas"
        shared = "You are an echo bot. Repeat the word you are given, exactly. " * 2
        for word in ("apple", "pear", "plum"):
            _complete(a, shared + word)
        _complete(b, shared + "fig")

        async def phase() -> tuple[list[Any], ...]:
            before, own_before = await probe.counters(), await direct.counters()
            for word in ("apple", "kiwi", "lime"):
                _complete(a, shared + word)
            _complete(b, shared + "fig")
            after, own_after = await probe.counters(), await direct.counters()
            return before, after, own_before, own_after

        before, after, own_before, own_after = asyncio.run(phase())
        through_prometheus = _deltas(before, after)
        # What each stand-in counted, on its own page: a served 3 requests, b 1.
        assert through_prometheus == _deltas(own_before, own_after)
        assert [r for _, _, r in through_prometheus] == [3, 1]
        assert all(h is not None and q is not None and 0 < h < q for q, h, _ in through_prometheus)

        evidence = fleet_evidence(urls, before, after, requests_sent=4, metrics_source=probe.source)
        assert evidence.metrics_source == "prometheus" and evidence.replica_requests == (3, 1)
        assert evidence.to_json()["metrics_source"] == "prometheus"
        fleet = asyncio.run(FleetCounterProbe(probe).snapshot())
        assert fleet is not None and fleet.counters.requests == 8

        # A replica Prometheus does not scrape: no counters, a note and the error say why.
        with FakeOpenAIServer() as c:
            stray = ReplicaProbe([a.root_url, c.root_url], model_name=MODEL, prometheus_url=prom.url)
            assert asyncio.run(stray.counters()) == [None, None]
            assert "is not among its targets" in stray.errors[c.root_url]
            lost = fleet_evidence(stray.urls, [None, None], [None, None], requests_sent=0, metrics_source="prometheus")
            assert lost.replicas[1].note == f"{c.root_url}: its counters could not be read through Prometheus"


def test_echo_prefix_test_reads_each_replica_through_an_embedded_prometheus(
    replicas: tuple[FakeOpenAIServer, FakeOpenAIServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The "router" is replica a itself (every request lands there); prometheus_url=embedded
    # starts a Prometheus scraping both replicas for the length of the test.
    a, b = replicas
    direct = ReplicaProbe([a.root_url, b.root_url], model_name=MODEL)
    own: list[list[CacheCounters | None]] = []
    snapshot = FleetCounterProbe.snapshot

    # Each replica's own page, read right after every Prometheus read around a phase (nothing
    # is sent in between): what the stand-ins counted. The warm burst's are the third and fourth.
    async def spy(self: FleetCounterProbe) -> Any:
        snap = await snapshot(self)
        own.append(await direct.counters())
        return snap

    monkeypatch.setattr(FleetCounterProbe, "snapshot", spy)
    config = build(
        PrefixTestConfig, base_url=a.base_url, replica_urls=(a.root_url, b.root_url), prometheus_url="embedded",
        batch_size=2, group_size=3, ttft_burst=2, min_repeats=2, max_repeats=2, out_dir=str(tmp_path), timeout_s=10,
    )  # fmt: skip
    result = run_prefix_test(config, show_progress=False)
    run = result.main
    assert run is not None and run.fleet is not None, result.to_json()["error"]
    evidence = run.fleet.evidence
    assert evidence.metrics_source == "prometheus"
    assert evidence.replica_requests == (5, 0) and evidence.requests_sent == 5
    assert all(r.note is None for r in evidence.replicas)
    read = [(r.counters.queries, r.counters.hits, r.counters.requests) for r in evidence.replicas if r.counters]
    assert read == _deltas(own[2], own[3])
    # Every phase was measured on the replicas' summed counters, read through Prometheus.
    warm = next(p for p in run.pooled if p.name == "warm")
    assert warm.counters is not None and warm.counters.requests == 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fleet"]["metrics_source"] == "prometheus"
    assert "2 replicas, each read through Prometheus" in format_console(result, ascii_only=True)
