"""The test's record as it runs: each server's measurements judged after every phase, kept by a sink.

:class:`PrefixTestRun` is what the command holds around the servers' measurements: it starts each
server's record (:class:`~echo_env.cachetest.judge.Measured`), hears from the runner as each phase
ends (its records and a partial summary go to the sink), and on leaving judges what was measured
and finishes the sink whatever happened.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.judge import Measured, judge, on_vs_off
from echo_env.cachetest.results import TestResult
from echo_env.errors import EchoEnvError
from echo_env.measure.figures import PhaseFigures
from echo_env.wire.client import RequestRecord

log = logging.getLogger(__name__)


class ResultSink(Protocol):
    """Where a run's records and summary go as it runs (the report's ``RunWriter``, or nothing)."""

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Keep one phase's request records."""
        ...

    def write_summary(self, result: TestResult) -> Any:
        """Keep the summary so far (called after every phase)."""
        ...

    def finish(self, result: TestResult) -> Any:
        """Keep the final summary and whatever is derived from it."""
        ...


class NullSink:
    """A sink that keeps nothing (for callers that only want the returned result: benchmarks)."""

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        return 0

    def write_summary(self, result: TestResult) -> None:
        return None

    def finish(self, result: TestResult) -> None:
        return None


def _record_rows(figures: PhaseFigures, records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        row = record.to_json()
        row.update({"phase": figures.name, "server": figures.server, "repeat": figures.repeat})
        row["text"] = " | ".join(out["text"] for out in row.pop("outputs"))
        rows.append(row)
    return rows


class PrefixTestRun:
    """The test's record as it runs: each open server measured, the result judged and kept after every phase.

    Use it as a context manager around the servers' measurements: on leaving, the sink gets the
    final summary whatever happened. An error mid-run (in the cache-off baseline too) is kept
    as the result's error, giving verdict UNKNOWN with ``partial: true``; a Ctrl-C is raised again
    once the sink is finished, and so is an error that struck before anything was measured (its
    message is the one line a user needs).

    Args:
        config: The test's settings.
        sink: Where records and summaries go.
        out_dir: The results folder, as the summary names it.
    """

    def __init__(self, config: PrefixTestConfig, sink: ResultSink, out_dir: str | None = None) -> None:
        self.config = config
        self.sink = sink
        self.started = dt.datetime.now(dt.UTC)
        self.result = TestResult(
            config=config.public(), rules=config.rules, started_at=self.started.isoformat(), out_dir=out_dir
        )
        self.states: list[Measured] = []

    def server(self, label: str) -> Measured:
        """Start the record of one server's run (``cache_on`` or ``cache_off``), its server open and answering."""
        state = Measured(label)
        self.states.append(state)
        return state

    def phase_done(self, figures: PhaseFigures, records: Sequence[RequestRecord]) -> None:
        """Keep one phase's records and a partial summary."""
        self.sink.append_records(_record_rows(figures, records))
        self._judge()
        self.result.partial = True
        self.sink.write_summary(self.result)

    def _judge(self, error: str | None = None) -> None:
        rules, repeats, fleet = self.config.rules, self.config.max_repeats, self.config.fleet
        runs = [judge(s, rules, repeats, error if s is self.states[-1] else None, fleet) for s in self.states]
        self.result.runs = [r for r in runs if r is not None]
        on = self.states[0] if self.states else None
        if on is not None and on.decided_at is not None:
            self.result.time_to_verdict_s = on.decided_at - on.opened_at
        if len(self.result.runs) == 2:
            self.result.on_vs_off = on_vs_off(self.result.runs[0], self.result.runs[1])

    def __enter__(self) -> PrefixTestRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        result = self.result
        swallow = False
        if exc is None:
            self._judge()
            result.partial = False
        elif isinstance(exc, KeyboardInterrupt):
            result.error = "interrupted (Ctrl-C)"
        elif isinstance(exc, Exception):  # the verdict on a crash is UNKNOWN, written down
            result.error = str(exc) if isinstance(exc, EchoEnvError) else f"{type(exc).__name__}: {exc}"
            log.debug("the run stopped", exc_info=exc)
            # Nothing measured: the error itself is the message (one line, exit 2).
            swallow = any(s.facts is not None for s in self.states)
        if result.error is not None:
            self._judge(result.error)
            result.partial = True
        finished = dt.datetime.now(dt.UTC)
        result.finished_at = finished.isoformat()
        result.duration_s = (finished - self.started).total_seconds()
        self.sink.finish(result)
        return swallow
