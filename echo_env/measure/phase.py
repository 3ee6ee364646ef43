"""One measured phase: snapshot the server's counters, send, snapshot again, take the difference, pool.

This is the one measuring primitive: the prefix-cache test, the benchmarks and the TRL
adapter all call :func:`measure_phase`, so a phase's figures are always made the same way.
Counter pages are read in a worker thread, never inside the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from echo_env.errors import MetricsError
from echo_env.measure.figures import PhaseFigures, phase_figures
from echo_env.measure.tokens import TokenPlan
from echo_env.wire.client import RequestRecord
from echo_env.wire.info import ServerFacts
from echo_env.wire.metrics import CounterDelta, MetricsReader, Snapshot, delta

log = logging.getLogger(__name__)


class CounterProbe:
    """Reads one server's counters on demand; quiet (None, with the reason kept) when it cannot.

    Args:
        reader: The server's metrics reader (None: the server has no usable metrics).
        unavailable: Why there is no reader, when there is none.
    """

    def __init__(self, reader: MetricsReader | None, unavailable: str | None = None) -> None:
        self.reader = reader
        self.error: str | None = unavailable if reader is None else None
        """Why the last read failed (or why there is no reader)."""

    @classmethod
    def of_server(cls, facts: ServerFacts) -> CounterProbe:
        """The probe of one server's own ``/metrics``; metrics that failed when its facts were read stay off."""
        return cls(facts.metrics, facts.metrics_error or "metrics_url=none")

    async def snapshot(self) -> Snapshot | None:
        """The counters now, or None (the reason goes to :attr:`error`)."""
        if self.reader is None:
            return None
        try:
            return await asyncio.to_thread(self.reader.snapshot)
        except MetricsError as exc:
            if self.error != str(exc):  # once per distinct failure, not once per phase
                log.warning("metrics unavailable: %s", exc)
            self.error = str(exc)
            return None


def counter_delta(before: Snapshot | None, after: Snapshot | None) -> CounterDelta | None:
    """What the server counted between two snapshots (None if either is missing)."""
    if before is None or after is None:
        return None
    return delta(before.counters, after.counters)


@dataclass(frozen=True)
class MeasuredPhase:
    """A phase's figures and the records behind them."""

    figures: PhaseFigures
    """The pooled figures."""
    records: list[RequestRecord]
    """Every request of the phase."""


async def measure_phase(
    name: str,
    send: Callable[[], Awaitable[Sequence[RequestRecord]]],
    *,
    probe: CounterProbe | None = None,
    plan: TokenPlan | None = None,
    server: str = "cache_on",
    repeat: int | None = None,
    rewards: Callable[[Sequence[RequestRecord]], Sequence[float]] | None = None,
) -> MeasuredPhase:
    """Run one phase and measure it.

    Args:
        name: The phase's name.
        send: Sends the phase's requests and returns their records (failed ones included).
        probe: The server's counters (None: none read).
        plan: The phase's token plan, for its ceiling.
        server: Which server it runs on.
        repeat: Which repeat.
        rewards: Grades the phase's agents from its records (for ``mean_reward``).

    Returns:
        The figures and records.
    """
    before = await probe.snapshot() if probe else None
    start = time.perf_counter()
    records = list(await send())
    wall = time.perf_counter() - start
    after = await probe.snapshot() if probe else None
    figures = phase_figures(
        name,
        records,
        wall,
        server=server,
        repeat=repeat,
        counters=counter_delta(before, after),
        counters_note=probe.error if probe else "no metrics",
        plan=plan,
        rewards=rewards(records) if rewards else (),
    )
    log.debug("time/phase/%s: %.3f s, %d requests", name, wall, len(records))
    return MeasuredPhase(figures, records)
