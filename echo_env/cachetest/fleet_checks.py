"""The routing verdict: pure checks over :class:`~echo_env.measure.fleet.FleetEvidence`.

Behind a router the prefix cache pays only when requests that share a prefix land on
the replica that holds it. These checks judge that from each replica's own counters
against the workload's fleet ceilings, in the same form as the single-server checks of
:mod:`echo_env.cachetest.verdict` (both run on :mod:`echo_env.cachetest.steps`): each
returns a :class:`~echo_env.cachetest.steps.Step` (outcome, detail, and the verdict and
reason when it decides), the first decisive one gives the verdict, and every branch is a
table row in ``tests/test_fleet.py``.

The order, and why:

1. counters were read from each replica (a router's ``/metrics`` answers for one replica
   per call, so deltas through it mean nothing);
2. every replica's counters are usable;
3. the replicas' request counts account for the requests sent (else other traffic, or a
   replica missing from the list);
4. the ceilings are known;
5. the fleet hit rate is not above the single-server ceiling;
6. the load is balanced (a cache-aware router can send everything to one replica: a
   high hit rate with one busy replica is no win);
7. the workload can tell routing policies apart (a note: when groups share nothing beyond
   the system prompt, affinity and scatter give the same hit rate);
8. routing keeps groups together (the fleet hit rate reaches the affinity ceiling);
9. otherwise: the router scatters groups (FAIL when the hit rate is nearer the scatter
   model than the affinity ceiling), or the evidence sits between the two (UNKNOWN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from echo_env.cachetest.results import Decision
from echo_env.cachetest.steps import Step, failed, note, passed, run_checks, unknown
from echo_env.errors import ConfigError
from echo_env.measure.fleet import FleetEvidence


@dataclass(frozen=True)
class FleetRules:
    """The thresholds of the routing verdict; each is meant as a ``key=value`` of the command line."""

    affinity_fraction: float = 0.9
    """PASS needs the fleet hit rate at or above this share of the affinity ceiling."""
    max_share: float = 0.8
    """FAIL when one replica serves more than this share of the requests (with two or more replicas)."""
    count_tolerance: float = 0.05
    """The replicas' request counts may differ from the requests sent by this share."""
    ceiling_tolerance: float = 0.02
    """A fleet hit rate this far above the single-server ceiling still counts as at it."""
    min_gap: float = 0.02
    """Below this gap between affinity and scatter, the workload cannot tell routing policies apart."""

    def __post_init__(self) -> None:
        for key in ("affinity_fraction", "max_share"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{key}={value} must be in (0, 1], e.g. {key}={getattr(FleetRules, key)}")
        for key in ("count_tolerance", "ceiling_tolerance", "min_gap"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be zero or more, got {getattr(self, key)}")


FleetCheckFn = Callable[[FleetEvidence, FleetRules], Step]


def _urls_hint(e: FleetEvidence) -> str:
    urls = e.replica_urls_hint or tuple(r.url for r in e.replicas)
    if urls:
        return "replica_urls=" + ",".join(urls)
    return "replica_urls=http://HOST:PORT,http://HOST:PORT (the router's GET /workers lists them)"


def _share_list(e: FleetEvidence) -> str:
    counts = e.replica_requests or ()
    shares = e.request_shares or ()
    return ", ".join(f"{r.url}: {c} ({s:.0%})" for r, c, s in zip(e.replicas, counts, shares))


# ----- the checks, in order ----------------------------------------------------------------


def check_read_per_replica(e: FleetEvidence, r: FleetRules) -> Step:
    """Counter deltas through a router are meaningless: each replica's own counters must be read.

    From its own ``/metrics``, or through Prometheus split by instance: either is one replica's.
    """
    if e.metrics_source == "replicas":
        return passed(f"{len(e.replicas)} replicas' own /metrics read")
    if e.metrics_source == "prometheus":
        return passed(f"{len(e.replicas)} replicas' own counters read through Prometheus")
    if e.router_alternates:
        return unknown(
            "two scrapes of the router's /metrics came from different replicas",
            "counter deltas through a router are meaningless: its /metrics answers for one replica per call; "
            f"pass {_urls_hint(e)} to read each replica's own counters",
        )
    return unknown(
        "counters were read only through the router's address",
        f"counters read through a router cover one replica at best; pass {_urls_hint(e)} to read each replica's own",
    )


def check_replica_counters(e: FleetEvidence, r: FleetRules) -> Step:
    """Every replica's hits, queries and request count are known."""
    if not e.replicas:
        return unknown("no replica was read", f"no per-replica counters: pass {_urls_hint(e)}")
    missing = [x for x in e.replicas if not x.usable]
    if missing:
        why = "; ".join(x.note or f"{x.url}: counters incomplete" for x in missing)
        return unknown(
            why,
            f"per-replica counters are missing ({why}): check {_urls_hint(e)} and that each serves /metrics",
        )
    return passed(f"hits, queries and requests read from all {len(e.replicas)} replicas")


def check_requests_accounted(e: FleetEvidence, r: FleetRules) -> Step:
    """The replicas' request counts add up to the requests sent through the router."""
    counts = e.replica_requests
    assert counts is not None  # replica_counters decided otherwise
    counted = sum(counts)
    detail = f"replicas counted {counted} requests ({_share_list(e)}); {e.requests_sent} were sent"
    if counted > e.requests_sent * (1 + r.count_tolerance) + 1:
        return unknown(
            detail,
            f"the replicas counted {counted} requests but {e.requests_sent} were sent: other traffic reached them, "
            "so their counters do not describe this run; run on replicas nobody else uses",
        )
    if counted < e.requests_sent * (1 - r.count_tolerance) - 1:
        return unknown(
            detail,
            f"the replicas counted only {counted} of {e.requests_sent} requests: the router sends to replicas not "
            f"read here; list them all ({_urls_hint(e)})",
        )
    return passed(detail)


def check_ceilings_known(e: FleetEvidence, r: FleetRules) -> Step:
    """The workload's fleet ceilings are known."""
    c = e.ceilings
    if c is None:
        return unknown(
            "the prompts were not tokenized",
            "no fleet ceilings: the prompts could not be tokenized as the replicas see them",
        )
    return passed(
        f"{c.replicas} replicas, {c.block_size}-token blocks: one server {c.one_server:.3f}, affinity "
        f"{c.affinity:.3f}, round robin {c.round_robin:.3f}, scatter {c.scatter:.3f}"
    )


def check_not_above_ceiling(e: FleetEvidence, r: FleetRules) -> Step:
    """The fleet cannot beat one server holding everything."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None
    if rate is None:
        return unknown("no query counted", "the replicas counted no prefix-cache queries: nothing was measured")
    detail = f"fleet hit rate {rate:.3f} vs single-server ceiling {c.one_server:.3f}"
    if rate > c.one_server + r.ceiling_tolerance:
        return unknown(
            detail,
            f"the fleet hit rate {rate:.3f} is above the most one server could reach ({c.one_server:.3f}): other "
            "traffic in the counters, or a wrong block size",
        )
    return passed(detail)


def check_load_balanced(e: FleetEvidence, r: FleetRules) -> Step:
    """No replica serves more than ``max_share`` of the requests."""
    share = e.max_share
    if len(e.replicas) < 2 or share is None:
        return Step("skip", "one replica: nothing to balance")
    detail = f"request shares: {_share_list(e)}"
    if share > r.max_share:
        return failed(
            detail,
            f"one replica served {share:.0%} of requests (max_share={r.max_share:g}): the router sends nearly "
            "everything to one replica, so the others idle; a cache-aware router does this when every prompt "
            "shares a long prefix; use consistent_hash with a session key per group, or round_robin",
        )
    return passed(detail)


def check_workload_discriminates(e: FleetEvidence, r: FleetRules) -> Step:
    """Whether this workload can tell routing policies apart at all (a note, never decisive)."""
    c = e.ceilings
    assert c is not None
    if c.discriminates < r.min_gap:
        return note(
            f"affinity {c.affinity:.3f} vs scatter {c.scatter:.3f}: groups share nothing cacheable beyond the common "
            "prefix, so any routing that reaches every replica scores the same",
        )
    return passed(f"affinity {c.affinity:.3f} vs scatter {c.scatter:.3f}: routing can move the hit rate")


def check_groups_together(e: FleetEvidence, r: FleetRules) -> Step:
    """The fleet hit rate reaches ``affinity_fraction`` of the affinity ceiling (never decisive: the last check is)."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    share = rate / c.affinity if c.affinity else 1.0
    detail = f"fleet hit rate {rate:.3f} of {c.affinity:.3f} affinity ceiling ({share:.0%})"
    if rate >= r.affinity_fraction * c.affinity:
        return passed(detail)
    return Step("fail", detail)


def check_scatter(e: FleetEvidence, r: FleetRules) -> Step:
    """Below the affinity ceiling: nearer the scatter model (FAIL) or between the two (UNKNOWN)."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    if rate >= r.affinity_fraction * c.affinity:
        return Step("skip", "groups stay together")
    detail = (
        f"fleet hit rate {rate:.3f}, the scatter model predicts {c.scatter:.3f}, affinity would give {c.affinity:.3f}"
    )
    if abs(rate - c.scatter) <= abs(c.affinity - rate):
        return failed(
            detail,
            f"the router scatters groups: fleet hit rate {rate:.3f}, the scatter model predicts {c.scatter:.3f}, "
            f"affinity would give {c.affinity:.3f}; route on a session key per group (consistent_hash with the "
            "X-Session-ID header) so a group's requests reach the replica that holds its prefix",
        )
    return unknown(
        detail,
        f"the fleet hit rate {rate:.3f} is between the scatter model ({c.scatter:.3f}) and the affinity ceiling "
        f"({c.affinity:.3f}, needs {r.affinity_fraction:.0%} of it): groups stay together only partly, or the "
        "caches evict; rerun with more requests per group",
    )


FLEET_CHECKS: tuple[tuple[str, str, FleetCheckFn], ...] = (
    ("read_per_replica", "counters read from each replica, not through the router", check_read_per_replica),
    ("replica_counters", "every replica's counters are usable", check_replica_counters),
    ("requests_accounted", "the replicas' requests add up to those sent", check_requests_accounted),
    ("fleet_ceilings_known", "the fleet ceilings are known", check_ceilings_known),
    ("fleet_not_above_ceiling", "fleet hit rate within the single-server ceiling", check_not_above_ceiling),
    ("load_balanced", "no replica takes nearly all requests", check_load_balanced),
    ("workload_discriminates", "the workload can tell routing apart", check_workload_discriminates),
    ("groups_together", "routing keeps groups together", check_groups_together),
    ("scatter", "the router does not scatter groups", check_scatter),
)
"""Every routing check: (id, title, function), in the order they decide."""


def decide_fleet(evidence: FleetEvidence, rules: FleetRules | None = None) -> Decision:
    """The routing verdict from a fleet's evidence.

    Args:
        evidence: What each replica counted, and the workload's ceilings.
        rules: The thresholds (defaults: :class:`FleetRules`).

    Returns:
        The verdict, the reason from the first check that decides, and every check.
    """
    rules = rules or FleetRules()
    checks, decided = run_checks(FLEET_CHECKS, evidence, rules)
    if decided is None:
        c, rate = evidence.ceilings, evidence.fleet_hit_rate
        assert c is not None and rate is not None
        share = rate / c.affinity if c.affinity else 1.0
        tail = (
            "; this workload cannot tell routing policies apart (groups share nothing beyond the common prefix)"
            if c.discriminates < rules.min_gap
            else ""
        )
        decided = (
            "PASS",
            f"routing keeps groups together: fleet hit rate {rate:.2f} of {c.affinity:.2f} affinity ceiling "
            f"({share:.0%}){tail}",
            "fleet_pass",
        )
    assert decided is not None
    verdict, reason, reason_id = decided
    return Decision(verdict, reason, reason_id, checks)
