"""The console's fleet section: each replica over the warm burst, the fleet ceilings, the routing verdict.

Derived from the :class:`~echo_env.cachetest.results.FleetResult` of a test through a
router, nothing recomputed: one line with the router and the routing verdict, one with
the fleet hit rate against the three ceilings, then a table of the replicas (requests,
share, hit rate, and why a replica's counters are missing when they are).
"""

from __future__ import annotations

from collections.abc import Sequence

from echo_env.cachetest.results import FleetResult

_NA = "n/a"


def _f(value: float | None, digits: int = 2) -> str:
    return _NA if value is None else f"{value:.{digits}f}"


def _head(result: FleetResult) -> str:
    e, d = result.evidence, result.decision
    router = f"router {e.policy}" if e.policy else "router"
    if e.metrics_source == "router":
        read = "counters only through the router (not used)"
    elif e.metrics_source == "prometheus":
        read = f"{len(e.replicas)} replicas, each read through Prometheus"
    else:
        read = f"{len(e.replicas)} replicas, each read on its own /metrics"
    return f"fleet   {router} · {read} · routing {d.verdict}"


def _rates(result: FleetResult) -> str:
    e, c = result.evidence, result.evidence.ceilings
    rate = f"warm burst: fleet hit rate {_f(e.fleet_hit_rate)}"
    if c is None:
        return f"        {rate} · ceilings {_NA} (prompts not tokenized)"
    # Only the placement that happened bounds the rate; the routing figures are models a run can beat.
    return (
        f"        {rate} · ceiling of the placement that happened {_f(e.placement_ceiling)} (one server "
        f"{c.one_server:.2f}) · models: affinity {c.affinity:.2f}, round robin {c.round_robin:.2f}, "
        f"scatter {c.scatter:.2f} ({c.block_size}-token blocks)"
    )


def _replica_table(result: FleetResult) -> list[str]:
    e = result.evidence
    if not e.replicas:
        return []
    shares: Sequence[float | None] = e.request_shares or [None] * len(e.replicas)
    rows = [
        (
            r.url,
            _NA if r.requests is None else str(r.requests),
            _NA if share is None else f"{share:.0%}",
            _f(r.hit_rate),
            r.note or "",
        )
        for r, share in zip(e.replicas, shares, strict=True)
    ]
    header = ("replica", "reqs", "share", "hit rate", "")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]

    def fmt(cells: Sequence[str]) -> str:
        numbers = "  ".join(c.rjust(w) for c, w in zip(cells[1:4], widths[1:], strict=True))
        return f"  {cells[0].ljust(widths[0])}  {numbers}  {cells[4]}".rstrip()

    return [fmt(header), *(fmt(row) for row in rows)]


def fleet_lines(result: FleetResult | None) -> list[str]:
    """The fleet section of the console (empty for one server).

    Args:
        result: The routing result of the cache-on run (None: not a fleet).

    Returns:
        Lines without trailing newlines: the head, the rates, the replicas' table, and the
        routing verdict's reason.
    """
    if result is None:
        return []
    lines = [_head(result), _rates(result), *_replica_table(result)]
    lines.append(f"        routing {result.decision.verdict}: {result.decision.reason}")
    return lines
