"""Each replica's own counters, read around a phase: the only counters a fleet's figures may come from.

Behind a router, ``GET /metrics`` on the router's address is answered by one replica per
call (vllm-router, measured), so a delta taken there subtracts one replica's counters
from another's. :class:`ReplicaProbe` reads every replica's own page instead (or, with
``prometheus_url``, every replica's series through a Prometheus server that scrapes them);
:func:`sum_counters` adds them up into the fleet's counters, and
:class:`FleetCounterProbe` hands that sum to :func:`~echo_env.measure.phase.measure_phase`
in place of one server's, so every phase of a test through a router is measured on the
whole fleet. :func:`fleet_evidence` turns the reads around one phase into the
:class:`~echo_env.measure.fleet.FleetEvidence` the routing verdict reads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

from echo_env.errors import MetricsError
from echo_env.measure.fleet import FleetCeilings, FleetEvidence, MetricsSource, fleet_ceilings, replica_figures
from echo_env.measure.phase import CounterProbe
from echo_env.measure.placement import placement_bound
from echo_env.measure.tokens import TokenIds
from echo_env.wire.metrics import COUNTER_FIELDS, CacheCounters, MetricsReader, Snapshot
from echo_env.wire.prometheus import PrometheusReader

log = logging.getLogger(__name__)


def sum_counters(parts: Sequence[CacheCounters]) -> CacheCounters:
    """The fleet's counters: every replica's summed, field by field.

    A field is None when any replica lacks it (a partial sum would pass for the whole
    fleet). ``started_at`` is the sum of the replicas' start times, so it changes when
    any one replica restarts and :func:`~echo_env.wire.metrics.delta` sees the reset.
    The TTFT histograms add up per bound when every replica has the same bounds.

    Args:
        parts: One snapshot's counters per replica, in a fixed order.

    Returns:
        The summed counters (``source`` of the first replica; ``none`` for no replica).
    """
    if not parts:
        return CacheCounters(source="none")
    values: dict[str, float | None] = {}
    for name in (*COUNTER_FIELDS, "started_at"):
        got = [getattr(p, name) for p in parts]
        values[name] = math.fsum(got) if all(v is not None for v in got) else None
    buckets = None
    bounds = {tuple(le for le, _ in p.ttft_buckets) if p.ttft_buckets else None for p in parts}
    if len(bounds) == 1 and None not in bounds:
        per = [dict(p.ttft_buckets or ()) for p in parts]
        buckets = tuple((le, math.fsum(d[le] for d in per)) for le, _ in parts[0].ttft_buckets or ())
    return CacheCounters(source=parts[0].source, ttft_buckets=buckets, **values)


class ReplicaProbe:
    """Reads every replica's counters: its own ``/metrics`` (a worker thread each, all at once), or Prometheus.

    Through Prometheus (``prometheus_url``), one read asks for every replica's series,
    split by ``instance``, and waits for a scrape of each that started after the call
    (:meth:`~echo_env.wire.prometheus.PrometheusReader.snapshots`): up to one scrape
    interval per read, so no read misses the end of a phase.

    Args:
        replica_urls: Each replica's root (``http://HOST:PORT``).
        model_name: Count only this model's series.
        api_key: Bearer token for the replicas' pages behind a proxy (not sent to Prometheus).
        kind: The server-kind adapter that knows the metric names (None: vLLM/SGLang names).
        prometheus_url: A Prometheus root that scrapes every replica (None: read each
            replica's own ``/metrics``).
    """

    def __init__(
        self,
        replica_urls: Sequence[str],
        model_name: str | None = None,
        api_key: str | None = None,
        kind: Any = None,
        prometheus_url: str | None = None,
    ) -> None:
        self.urls = tuple(replica_urls)
        """The replicas' roots, in the order every read returns them."""
        self.readers = [
            MetricsReader(f"{u}/metrics", model_name=model_name, api_key=api_key, kind=kind) for u in self.urls
        ]
        self.prometheus = (
            PrometheusReader(prometheus_url, kind=kind, model_name=model_name) if prometheus_url is not None else None
        )
        """The Prometheus reader, when counters are read through Prometheus."""
        self.errors: dict[str, str] = {}
        """The last read's failure per replica URL (empty: every replica answered)."""

    @property
    def source(self) -> MetricsSource:
        """Where the counters come from: ``prometheus`` or the replicas' own pages (``replicas``)."""
        return "prometheus" if self.prometheus is not None else "replicas"

    async def read(self) -> list[Snapshot | None]:
        """Every replica's snapshot now (None for a replica that could not be read; see :attr:`errors`)."""
        if self.prometheus is not None:
            return await self._read_prometheus(self.prometheus)
        got = await asyncio.gather(*(asyncio.to_thread(r.snapshot) for r in self.readers), return_exceptions=True)
        out: list[Snapshot | None] = []
        self.errors = {}
        for url, snap in zip(self.urls, got, strict=True):
            if isinstance(snap, MetricsError):
                self.errors[url] = str(snap)
                out.append(None)
            elif isinstance(snap, BaseException):
                raise snap
            else:
                out.append(snap)
        return out

    async def _read_prometheus(self, reader: PrometheusReader) -> list[Snapshot | None]:
        # One query answers for every replica, so one failure (a replica down, no fresh scrape) fails them all.
        try:
            snaps = await asyncio.to_thread(reader.snapshots, self.urls)
        except MetricsError as exc:
            self.errors = dict.fromkeys(self.urls, str(exc))
            return [None] * len(self.urls)
        self.errors = {}
        return [snaps[u] for u in self.urls]

    async def counters(self) -> list[CacheCounters | None]:
        """Every replica's counters now (None where a replica could not be read)."""
        return [s.counters if s is not None else None for s in await self.read()]


class FleetCounterProbe(CounterProbe):
    """A :class:`~echo_env.measure.phase.CounterProbe` that reads the fleet: every replica's counters, summed.

    A phase measured through it has the fleet's hit rate; when one replica cannot be read
    the snapshot is None (a sum without it would pass for the fleet's), with the reason kept.
    """

    def __init__(self, replicas: ReplicaProbe) -> None:
        super().__init__(None, None)
        self.replicas = replicas
        """The per-replica reader."""

    async def snapshot(self) -> Snapshot | None:
        snaps = await self.replicas.read()
        if any(s is None for s in snaps):
            url, why = next(iter(self.replicas.errors.items()), ("a replica", "unreadable"))
            if self.error != why:
                log.warning("replica metrics unavailable: %s", why)
            self.error = f"replica {url}: {why}"
            return None
        present = [s for s in snaps if s is not None]
        if not present:
            self.error = "no replica to read"
            return None
        return Snapshot(sum_counters([s.counters for s in present]), present[0].cache_config, time.time())


def phase_ceilings_of(
    history: Sequence[TokenIds],
    history_groups: Sequence[Hashable],
    prompts: Sequence[TokenIds],
    groups: Sequence[Hashable],
    block_size: int,
    replicas: int,
) -> FleetCeilings:
    """The fleet ceilings of one phase sent after ``history`` (the earlier phases' prompts, in send order).

    Every model places request ``i`` from what came before it only, so the hits of the
    history alone are the same with or without the phase after it: the phase's hits are
    the whole sequence's minus the history's, over the phase's own prompt tokens. The
    census for the ceiling that follows each replica's request count
    (:func:`~echo_env.measure.placement.placement_bound`) is the phase's, the history
    credited where it holds the phase's blocks.

    Args:
        history: Prompts sent before the phase (their blocks may already be cached).
        history_groups: Their groups.
        prompts: The phase's prompts, in send order.
        groups: Their groups.
        block_size: The cache block size in tokens.
        replicas: How many replicas.

    Returns:
        The phase's ceilings (``prompt_tokens`` is the phase's).
    """
    whole = fleet_ceilings([*history, *prompts], [*history_groups, *groups], block_size, replicas)
    if not history:
        return whole
    bound = placement_bound(history, prompts, block_size)
    before = fleet_ceilings(history, history_groups, block_size, replicas)
    own = sum(len(p) for p in prompts)
    hist = before.prompt_tokens

    def rate(name: str) -> float:
        hits = getattr(whole, name) * whole.prompt_tokens - getattr(before, name) * hist
        return max(0.0, hits) / own if own else 0.0

    return replace(
        whole,
        prompt_tokens=own,
        one_server=rate("one_server"),
        affinity=rate("affinity"),
        scatter=rate("scatter"),
        round_robin=rate("round_robin"),
        placement=bound,
    )


def fleet_evidence(
    replica_urls: Sequence[str],
    before: Sequence[CacheCounters | None],
    after: Sequence[CacheCounters | None],
    *,
    requests_sent: int,
    ceilings: FleetCeilings | None = None,
    policy: str | None = None,
    metrics_source: MetricsSource = "replicas",
) -> FleetEvidence:
    """A phase's fleet evidence from every replica's counters before and after it.

    Args:
        replica_urls: The replicas' roots, in the order of ``before`` and ``after``.
        before: Each replica's counters before the phase (None: not read).
        after: Each replica's counters after it.
        requests_sent: Requests of the phase that finished.
        ceilings: The phase's :class:`~echo_env.measure.fleet.FleetCeilings` (None: not tokenized).
        policy: The router's policy, when known.
        metrics_source: Where the counters were read (:attr:`ReplicaProbe.source`).
    """
    figures = tuple(replica_figures(u, b, a) for u, b, a in zip(replica_urls, before, after, strict=True))
    if metrics_source == "prometheus":
        figures = tuple(
            replace(f, note=f"{f.url}: its counters could not be read through Prometheus") if f.counters is None else f
            for f in figures
        )
    return FleetEvidence(
        replicas=figures, ceilings=ceilings, requests_sent=requests_sent, policy=policy, metrics_source=metrics_source
    )
