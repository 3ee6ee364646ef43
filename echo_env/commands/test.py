"""``echo-prefix test``: the prefix-cache test with its files written, and wandb if asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.results import TestResult
from echo_env.cachetest.runner import ResultSink, run_phases_and_judge
from echo_env.commands.common import default_out_dir, emit, setup_logging
from echo_env.report.console import format_console
from echo_env.report.files import RunWriter

log = logging.getLogger(__name__)

Config = PrefixTestConfig
"""The command's settings (``echo-prefix test --help`` lists them)."""


def command(config: PrefixTestConfig) -> int:
    """``echo-prefix test``: run, print the report; exit 0 PASS, 1 FAIL, 2 UNKNOWN."""
    setup_logging(config.debug)
    result = run_prefix_test(config, show_progress=True)
    emit(format_console(result))
    if result.error:
        # The report above is the record; stderr says why the run stopped, for scripts and logs.
        emit(f"echo-prefix test: error: {result.error}; partial results are in {result.out_dir}", err=True)
    return result.exit_code


def run_prefix_test(config: PrefixTestConfig, *, show_progress: bool = True) -> TestResult:
    """Run the whole test and write its results in ``out_dir``; the typed result is returned.

    Whatever happens, ``summary.json`` and the records measured so far are on disk; an
    error mid-run gives verdict UNKNOWN with ``partial: true``.

    Args:
        config: The test's settings.
        show_progress: Print a line to stderr as each phase ends (a CPU server takes a while).
    """
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir()
    writer: ResultSink = RunWriter(out_dir)
    if show_progress:
        writer = _Progress(writer)
    result = run_phases_and_judge(config, writer, out_dir=str(out_dir))
    _log_wandb(config, result)
    return result


class _Progress:
    """A sink that also says on stderr what each phase measured, as it ends."""

    def __init__(self, inner: ResultSink) -> None:
        self.inner = inner
        self._rows: list[Mapping[str, Any]] = []

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        self._rows = list(rows)
        return self.inner.append_records(self._rows)

    def write_summary(self, result: TestResult) -> Any:
        if self._rows:
            first = self._rows[0]
            failed = sum(1 for r in self._rows if not r.get("ok"))
            where = f" #{first['repeat']}" if first.get("repeat") is not None else ""
            tail = f", {failed} failed" if failed else ""
            emit(f"  {first['server']} {first['phase']}{where}: {len(self._rows)} requests{tail}", err=True)
        return self.inner.write_summary(result)

    def finish(self, result: TestResult) -> Any:
        return self.inner.finish(result)


def _log_wandb(config: PrefixTestConfig, result: TestResult) -> None:
    if not config.wandb_project:
        return
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        log.warning("wandb_project is set but wandb is not installed: pip install wandb")
        return
    run = wandb.init(project=config.wandb_project, name=config.wandb_name, config=result.config)
    flat: dict[str, Any] = {"verdict": result.verdict}
    main = result.main
    if main is not None:
        for p in main.pooled:
            flat[f"time/ttft_p50_{p.name}"] = p.ttft.p50
            flat[f"throughput/{p.name}_rps"] = p.throughput_rps
            flat[f"hit_rate/{p.name}"] = p.hit.value
    run.log(flat)
    run.finish()
