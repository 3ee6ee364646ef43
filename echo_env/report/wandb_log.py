"""The test's summary logged to Weights & Biases as the run finishes: a sink beside the files.

``wandb_project=`` wraps the command's sink in :class:`WandbLog`; the run's figures go to
wandb once, from the final :class:`~echo_env.cachetest.results.TestResult` (a partial one too).
wandb is optional: without it the run warns and writes its files as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from echo_env.cachetest.record import ResultSink
from echo_env.cachetest.results import TestResult
from echo_env.report.redact import redact

log = logging.getLogger(__name__)


def wandb_figures(result: TestResult) -> dict[str, Any]:
    """The figures logged: the verdict, and each pooled phase's TTFT p50, throughput and hit rate."""
    flat: dict[str, Any] = {"verdict": result.verdict}
    main = result.main
    if main is not None:
        for p in main.pooled:
            flat[f"time/ttft_p50_{p.name}"] = p.ttft.p50
            flat[f"throughput/{p.name}_rps"] = p.throughput_rps
            flat[f"hit_rate/{p.name}"] = p.hit.value
    return flat


class WandbLog:
    """A sink that passes everything on to ``inner`` and logs the final summary to a wandb project.

    Args:
        inner: The sink that keeps the files.
        project: The wandb project.
        name: The wandb run's name (None: wandb picks one).
    """

    def __init__(self, inner: ResultSink, project: str, name: str | None = None) -> None:
        self.inner = inner
        self.project = project
        self.name = name

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        return self.inner.append_records(rows)

    def write_summary(self, result: TestResult) -> Any:
        return self.inner.write_summary(result)

    def finish(self, result: TestResult) -> Any:
        done = self.inner.finish(result)
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            log.warning("wandb_project is set but wandb is not installed: pip install wandb")
            return done
        # The settings as the files have them: no key, token or URL password leaves the machine.
        run = wandb.init(project=self.project, name=self.name, config=redact(result.config))
        run.log(wandb_figures(result))
        run.finish()
        return done
