"""What every plot of the report shares: matplotlib on demand, colours, labels, the verdict's thresholds."""

from __future__ import annotations

import math
from typing import Any

from echo_env.cachetest.results import ServerRun, TestResult
from echo_env.errors import EchoEnvError

PLOTS_INSTALL_HINT = "pip install 'echo-prefix-env[plots]'"
"""How a user gets the plots when matplotlib is missing."""

NA = "n/a"
PHASE_COLORS = {
    "cold": "#4C72B0",
    "warm_single": "#8172B2",
    "warm": "#55A868",
    "ttft_warm": "#64B5CD",
    "control": "#DD8452",
    "ttft_control": "#C44E52",
}
OTHER_COLORS = ("#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
SERVER_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#8172B2")
# Quartiles of a handful of points (the cold phase has one per repeat) would look like
# a measured spread; those phases get their dots and a median tick only.
MIN_BOX_SAMPLES = 5
DPI = 120


class PlotsUnavailable(EchoEnvError, RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


def pyplot() -> Any:
    try:
        import matplotlib

        # Agg draws to files only: no display needed on a server, and no window pops
        # up when the test runs on a laptop.
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailable(f"matplotlib is not installed ({exc}); {PLOTS_INSTALL_HINT}") from exc
    return plt


def server_label(run: ServerRun) -> str:
    """``cache on`` / ``cache off`` (a run's label, in words)."""
    return run.label.replace("_", " ")


def phase_color(name: str, index: int) -> str:
    return PHASE_COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


def ms_label(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def jitter(n: int) -> list[float]:
    # Golden-ratio steps: spread like random jitter, but reruns draw the same picture.
    return [0.32 * ((k * 0.618034) % 1.0 - 0.5) for k in range(n)]


def _rule(result: TestResult, key: str) -> float | None:
    # The verdict's thresholds are settings of the test, so they are in its config.
    value = result.config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def min_effect(result: TestResult) -> float | None:
    """The control/warm TTFT ratio the verdict asks for (None: not recorded)."""
    return _rule(result, "min_effect")


def hit_fraction(result: TestResult) -> float | None:
    """The share of its ceiling the warm hit rate must reach (None: not recorded)."""
    return _rule(result, "hit_fraction")
