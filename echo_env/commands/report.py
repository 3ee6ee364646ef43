"""``echo-prefix report DIR``: rebuild a test run's report.html and console summary from its summary.json."""

from __future__ import annotations

from dataclasses import dataclass

from echo_env.commands.common import emit
from echo_env.errors import ConfigError


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``echo-prefix report``."""

    dir: str = ""
    """The ``out_dir`` of an ``echo-prefix test`` run (the folder holding its summary.json)."""
    debug: bool = False
    """Tracebacks on errors."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ConfigError(
                "report takes one folder: echo-prefix report DIR (the out_dir of an `echo-prefix test` run)"
            )


Config = ReportConfig
"""The command's settings (``echo-prefix report --help`` lists them)."""


def command(config: ReportConfig) -> int:
    """Write report.html again, print the console summary; exit as the run did (0 PASS, 1 FAIL, 2 UNKNOWN)."""
    from echo_env.report.console import format_console
    from echo_env.report.files import write_html
    from echo_env.report.html import load_summary
    from echo_env.report.summary_load import result_from_summary

    summary = load_summary(config.dir)
    page = write_html(config.dir, summary)
    emit(format_console(result_from_summary(summary)))
    emit(f"report  {page}")
    return int(summary.get("exit_code", 2))
