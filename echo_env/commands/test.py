"""``echo-prefix test``: open the server(s), run the prefix-cache test on them, write its files (and wandb if asked).

The command owns the servers: it opens the one under test (the embedded engine, a fleet, or
yours), hands it to the runner, closes it, then does the same for the cache-off baseline
when asked for.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.record import PrefixTestRun, ResultSink
from echo_env.cachetest.results import TestResult
from echo_env.cachetest.runner import measure_server
from echo_env.commands.common import default_out_dir, emit, setup_logging
from echo_env.errors import ServerUnreachableError
from echo_env.interrupts import run_main
from echo_env.launch.target import open_target
from echo_env.report.console import format_console
from echo_env.report.files import RunWriter
from echo_env.report.wandb_log import WandbLog

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
    return run_test(config, writer, out_dir=str(out_dir))


def run_test(config: PrefixTestConfig, sink: ResultSink, out_dir: str | None = None) -> TestResult:
    """Open each server the test needs, measure it, close it; the typed result (``sink`` fed as it goes).

    The server under test first, then the cache-off baseline if asked for. Whatever happens, the
    sink (and wandb, with ``wandb_project``) has the records measured so far and a summary; an
    error mid-run gives verdict UNKNOWN with ``partial: true`` (:class:`~echo_env.cachetest.record.PrefixTestRun`).
    """
    servers = [("cache_on", True)]
    if config.compare_without_cache or config.baseline_url:
        servers.append(("cache_off", False))
    run_id = uuid.uuid4().hex[:8]
    if config.wandb_project:
        sink = WandbLog(sink, config.wandb_project, config.wandb_name)
    with PrefixTestRun(config, sink, out_dir) as run:
        for label, caching in servers:
            # weight_update's reload, pause and reset are served in vLLM's dev mode only.
            dev_mode = caching and config.weight_update is not None
            with open_target(
                config.server, caching=caching, baseline_url=config.baseline_url, dev_mode=dev_mode
            ) as server:
                state = run.server(label)
                try:
                    run_main(lambda: measure_server(config, server, state, run_id, run))  # noqa: B023 - run at once
                except ServerUnreachableError as exc:
                    if caching or config.baseline_url is None:
                        raise
                    # The client's message names base_url; here the server that went missing is the baseline.
                    raise ServerUnreachableError(
                        f"the cache-off baseline at baseline_url={config.baseline_url} does not answer ({exc}): "
                        "start it (the same model, --no-enable-prefix-caching) or drop baseline_url"
                    ) from exc
    return run.result


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
