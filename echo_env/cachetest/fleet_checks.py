"""The routing verdict: pure checks over :class:`~echo_env.measure.fleet.FleetEvidence`.

Behind a router the prefix cache pays only when requests that share a prefix land on
the replica that holds it. These checks judge that from each replica's own counters
against the ceiling of the placement that happened (each replica's request count, see
:class:`~echo_env.measure.placement.PlacementBound`) and the workload's routing models
(affinity, round robin, scatter), in the same form as the single-server checks of
:mod:`echo_env.cachetest.verdict` (both run on :mod:`echo_env.cachetest.steps`): each
returns a :class:`~echo_env.cachetest.steps.Step`, the first decisive one gives the
verdict, and every branch is a table row in ``tests/cachetest/test_fleet_verdict.py``.

The order, and why:

1. counters were read from each replica (a router's ``/metrics`` answers for one replica
   per call, so deltas through it mean nothing);
2. every replica's counters are usable;
3. the replicas' request counts account for the requests sent (else other traffic, or a
   replica missing from the list);
4. the ceilings are known;
5. the fleet hit rate is not above the placement ceiling (no run with these request
   counts can beat it);
6. the load is balanced (a cache-aware router can send everything to one replica: a
   high hit rate with one busy replica is no win);
7. the workload can tell routing policies apart (a note; see :attr:`FleetRules.min_gap`);
8. routing keeps groups together: the fleet hit rate reaches ``affinity_fraction`` of the
   placement ceiling (never decisive: PASS comes after the last check);
9. below every routing model (scatter, round robin): the caches lose blocks, whatever the
   routing (FAIL, eviction, not routing);
10. on a workload that tells routing apart: nearer the scatter model than the affinity
    model (FAIL, the router scatters groups) or between the two (UNKNOWN);
11. on a workload that cannot tell routing apart, short of the placement ceiling but
    above the routing models: nothing says what lost the hits (UNKNOWN).

A fleet that reaches its placement ceiling PASSes: ``fleet_pass`` when the workload tells
routing apart, ``fleet_pass_flat`` when it cannot, with the reason saying that the router
was not put to the test (an UNKNOWN there would turn every fleet run of a workload whose
groups share only the system prompt into exit 2, although the fleet hit all it could).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from echo_env.cachetest.results import Decision, Verdict
from echo_env.cachetest.steps import Step, failed, note, passed, run_checks, unknown
from echo_env.errors import ConfigError
from echo_env.measure.fleet import FleetCeilings, FleetEvidence


@dataclass(frozen=True)
class FleetRules:
    """The thresholds of the routing verdict; each is meant as a ``key=value`` of the command line."""

    affinity_fraction: float = 0.9
    """PASS needs the fleet hit rate at or above this share of the placement ceiling; below this share of
    every routing model (scatter, round robin) the caches lose blocks."""
    max_share: float = 0.8
    """FAIL when one replica serves more than this share of the requests (with two or more replicas)."""
    count_tolerance: float = 0.05
    """The replicas' request counts may differ from the requests sent by this share."""
    ceiling_tolerance: float = 0.02
    """A fleet hit rate this far above the placement ceiling still counts as at it."""
    min_gap: float = 0.05
    """The margin by which a workload must separate routing policies before the router can be blamed.

    The workload discriminates when the affinity model is at least ``min_gap`` (absolute hit
    rate) above the scatter model AND the scatter model lies under the PASS line
    (``affinity_fraction`` of the affinity model). Otherwise a router that scatters groups
    would PASS too, or land within about one request's worth of prompt tokens of a router
    that keeps them (0.05 is one request in 20 of a burst whose prompts are nearly all
    cacheable), which a late block or two of eviction also explains.
    """

    def __post_init__(self) -> None:
        for key in ("affinity_fraction", "max_share"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{key}={value} must be in (0, 1], e.g. {key}={getattr(FleetRules, key)}")
        for key in ("count_tolerance", "ceiling_tolerance", "min_gap"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be zero or more, got {getattr(self, key)}")

    def discriminates(self, c: FleetCeilings) -> bool:
        """Whether the workload's routing models are far enough apart to blame a router (:attr:`min_gap`)."""
        return c.affinity - c.scatter >= self.min_gap and c.scatter < self.affinity_fraction * c.affinity


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
    return unknown(
        "counters were read only through the router's address",
        "counter deltas through a router are meaningless: its /metrics answers for one replica per call; "
        f"pass {_urls_hint(e)} to read each replica's own counters",
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
    p = e.placement_ceiling
    placement = "n/a" if p is None else f"{p:.3f}"
    return passed(
        f"{c.replicas} replicas, {c.block_size}-token blocks: placement ceiling {placement}, one server "
        f"{c.one_server:.3f}; models: affinity {c.affinity:.3f}, round robin {c.round_robin:.3f}, scatter "
        f"{c.scatter:.3f}"
    )


def _target(e: FleetEvidence) -> tuple[float, str]:
    """The ceiling a fleet hit rate is held to, and its name: the placement ceiling, else the affinity model."""
    c, p = e.ceilings, e.placement_ceiling
    assert c is not None
    if p is not None:
        return p, "placement ceiling"
    return c.affinity, "affinity model"


def check_not_above_ceiling(e: FleetEvidence, r: FleetRules) -> Step:
    """The fleet cannot beat the most its placement allows (nor one server holding everything)."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None
    if rate is None:
        return unknown("no query counted", "the replicas counted no prefix-cache queries: nothing was measured")
    p = e.placement_ceiling
    ceiling, name = (p, "placement ceiling") if p is not None else (c.one_server, "single-server ceiling")
    detail = f"fleet hit rate {rate:.3f} vs {name} {ceiling:.3f} (one server {c.one_server:.3f})"
    if rate > ceiling + r.ceiling_tolerance:
        return unknown(
            detail,
            f"the fleet hit rate {rate:.3f} is above the most its placement allows ({name} {ceiling:.3f}, from each "
            "replica's request count): other traffic in the counters, or a wrong block size (block_size=)",
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
    models = f"affinity model {c.affinity:.3f} vs scatter model {c.scatter:.3f}"
    if not r.discriminates(c):
        return note(
            f"{models} (min_gap={r.min_gap:g}, PASS line {r.affinity_fraction * c.affinity:.3f}): groups share too "
            "little beyond the common prefix, so any routing that reaches every replica scores about the same",
        )
    return passed(f"{models}: routing can move the hit rate")


def _together(e: FleetEvidence, r: FleetRules) -> bool:
    rate = e.fleet_hit_rate
    assert rate is not None
    return rate >= r.affinity_fraction * _target(e)[0]


def check_groups_together(e: FleetEvidence, r: FleetRules) -> Step:
    """The fleet hit rate reaches ``affinity_fraction`` of the placement ceiling (never decisive: PASS comes last)."""
    rate = e.fleet_hit_rate
    assert rate is not None
    target, name = _target(e)
    share = rate / target if target else 1.0
    detail = f"fleet hit rate {rate:.3f} of {target:.3f} {name} ({share:.0%}, needs {r.affinity_fraction:.0%})"
    return passed(detail) if _together(e, r) else Step("fail", detail)


def _lowest_model(c: FleetCeilings) -> tuple[float, str]:
    return min((c.scatter, "scatter model"), (c.round_robin, "round-robin model"))


def check_caches_keep_blocks(e: FleetEvidence, r: FleetRules) -> Step:
    """Below ``affinity_fraction`` of every routing model: the caches lose blocks, whatever the routing."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    if _together(e, r):
        return Step("skip", "groups stay together")
    low, name = _lowest_model(c)
    detail = f"fleet hit rate {rate:.3f}, the lowest routing model ({name}) {low:.3f}"
    if rate < r.affinity_fraction * low:
        target, tname = _target(e)
        return failed(
            detail,
            f"the fleet hit rate {rate:.3f} is below every routing model (the {name} gives {low:.3f}, the "
            f"{tname} {target:.3f}): even routing at random would hit more, so the replicas' caches lose blocks "
            "(too small for the workload, or evicting); give each replica more KV cache, or send fewer requests "
            "at once; routing is not the cause",
        )
    return passed(detail)


def check_scatter(e: FleetEvidence, r: FleetRules) -> Step:
    """On a workload that tells routing apart: nearer the scatter model (FAIL) or between the models (UNKNOWN)."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    if _together(e, r):
        return Step("skip", "groups stay together")
    if not r.discriminates(c):
        return Step("skip", "the workload cannot tell routing apart")
    target, name = _target(e)
    detail = (
        f"fleet hit rate {rate:.3f}, the scatter model predicts {c.scatter:.3f}, the affinity model "
        f"{c.affinity:.3f}, the {name} {target:.3f}"
    )
    if abs(rate - c.scatter) <= abs(c.affinity - rate):
        return failed(
            detail,
            f"the router scatters groups: fleet hit rate {rate:.3f}, the scatter model predicts {c.scatter:.3f}, "
            f"keeping each group on one replica would give {c.affinity:.3f}; route on a session key per group "
            "(consistent_hash with the X-Session-ID header) so a group's requests reach the replica that holds "
            "its prefix",
        )
    return unknown(
        detail,
        f"the fleet hit rate {rate:.3f} is between the scatter model ({c.scatter:.3f}) and the affinity model "
        f"({c.affinity:.3f}; PASS needs {r.affinity_fraction:.0%} of the {name} {target:.3f}): groups stay "
        "together only partly, or the caches evict; rerun with more requests per group",
    )


def check_flat_shortfall(e: FleetEvidence, r: FleetRules) -> Step:
    """On a workload that cannot tell routing apart: short of the placement ceiling, yet above the models."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    if _together(e, r) or r.discriminates(c):  # on a discriminating workload the scatter check decides
        return Step("skip", "groups stay together" if _together(e, r) else "judged by the scatter check")
    target, name = _target(e)
    detail = f"fleet hit rate {rate:.3f} of {target:.3f} {name}; affinity {c.affinity:.3f}, scatter {c.scatter:.3f}"
    return unknown(
        detail,
        f"the fleet hit rate {rate:.3f} is under {r.affinity_fraction:.0%} of its {name} ({target:.3f}) but this "
        f"workload cannot tell routing policies apart (affinity model {c.affinity:.3f}, scatter model "
        f"{c.scatter:.3f}, min_gap={r.min_gap:g}), so the router is not to blame and nothing here says what lost "
        "the hits (a little eviction, requests of one burst missing each other's blocks); to judge routing, use a "
        "workload whose groups share more than the system prompt (multi-turn episodes)",
    )


FLEET_CHECKS: tuple[tuple[str, str, FleetCheckFn], ...] = (
    ("read_per_replica", "counters read from each replica, not through the router", check_read_per_replica),
    ("replica_counters", "every replica's counters are usable", check_replica_counters),
    ("requests_accounted", "the replicas' requests add up to those sent", check_requests_accounted),
    ("fleet_ceilings_known", "the fleet ceilings are known", check_ceilings_known),
    ("fleet_not_above_ceiling", "fleet hit rate within the placement ceiling", check_not_above_ceiling),
    ("load_balanced", "no replica takes nearly all requests", check_load_balanced),
    ("workload_discriminates", "the workload can tell routing apart", check_workload_discriminates),
    ("groups_together", "routing keeps groups together", check_groups_together),
    ("fleet_evicting", "the hit rate is not below every routing model", check_caches_keep_blocks),
    ("scatter", "the router does not scatter groups", check_scatter),
    ("flat_shortfall", "a shortfall on a workload routing cannot move", check_flat_shortfall),
)
"""Every routing check: (id, title, function), in the order they decide."""

PASS_REASONS = ("fleet_pass", "fleet_pass_flat")
"""The reason ids of a routing PASS: on a workload that tells routing apart, and on one that cannot."""


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
    verdict, reason, reason_id = decided if decided is not None else _passed(evidence, rules)
    return Decision(verdict, reason, reason_id, checks)


def _passed(e: FleetEvidence, rules: FleetRules) -> tuple[Verdict, str, str]:
    """The PASS sentence, once every check has passed: the fleet reached its placement ceiling."""
    c, rate = e.ceilings, e.fleet_hit_rate
    assert c is not None and rate is not None
    target, name = _target(e)
    share = rate / target if target else 1.0
    head = f"fleet hit rate {rate:.2f} of {target:.2f} {name} ({share:.0%})"
    if rules.discriminates(c):
        return "PASS", f"routing keeps groups together: {head}", "fleet_pass"
    return (
        "PASS",
        f"the fleet reaches its placement: {head}; this workload cannot tell routing policies apart (affinity "
        f"model {c.affinity:.2f}, scatter model {c.scatter:.2f}), so whether the router keeps groups together "
        "was not put to the test",
        "fleet_pass_flat",
    )
