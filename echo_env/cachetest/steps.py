"""What one verdict check returns, and the loop in which the first decisive check decides.

Shared by the single-server verdict (:mod:`echo_env.cachetest.verdict`) and the routing
verdict (:mod:`echo_env.cachetest.fleet_checks`): each check is a pure function from
evidence and rules to a :class:`Step`; :func:`run_checks` runs them in order, stops
deciding at the first one that gives a verdict and shows the later ones as ``skip``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from echo_env.cachetest.results import Check, Outcome, Verdict

E = TypeVar("E")
R = TypeVar("R")


@dataclass(frozen=True)
class Step:
    """What one check found: its outcome, detail, and the verdict it gives when it decides."""

    outcome: Outcome
    """``pass``, ``fail``, ``unknown`` or ``skip``."""
    detail: str
    """The figures behind the outcome."""
    verdict: Verdict | None = None
    """The verdict when this check decides (None: it does not)."""
    reason: str = ""
    """One sentence a user can act on, when it decides."""


def passed(detail: str) -> Step:
    """The check passed; not decisive."""
    return Step("pass", detail)


def failed(detail: str, reason: str) -> Step:
    """The check failed and decides FAIL for ``reason``."""
    return Step("fail", detail, "FAIL", reason)


def unknown(detail: str, reason: str) -> Step:
    """The check cannot tell and decides UNKNOWN for ``reason``."""
    return Step("unknown", detail, "UNKNOWN", reason)


def note(detail: str) -> Step:
    """Not decisive: the check could not be made, and another check carries the consequence."""
    return Step("unknown", detail)


def run_checks(
    checks: Sequence[tuple[str, str, Callable[[E, R], Step]]], evidence: E, rules: R
) -> tuple[tuple[Check, ...], tuple[Verdict, str, str] | None]:
    """Run every check in order; the first one with a verdict decides.

    Args:
        checks: ``(id, title, function)`` in the order they decide.
        evidence: What the checks judge.
        rules: The thresholds they apply.

    Returns:
        Every check (``skip`` after the deciding one), and ``(verdict, reason, id)`` of the
        deciding check, or None when none decided.
    """
    made: list[Check] = []
    decided: tuple[Verdict, str, str] | None = None
    for name, title, fn in checks:
        if decided is not None:
            made.append(Check(name, title, "skip", "decided by an earlier check"))
            continue
        step = fn(evidence, rules)
        made.append(Check(name, title, step.outcome, step.detail))
        if step.verdict is not None:
            decided = (step.verdict, step.reason, name)
    return tuple(made), decided
