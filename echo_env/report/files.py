"""What a run leaves on disk, written so a crash keeps what was measured and no secret is written.

:class:`RunWriter` owns a prefix-cache test's ``out_dir``: request records are appended
to ``requests.jsonl`` as each phase ends, ``summary.json`` is replaced atomically as
often as the runner likes, and :meth:`RunWriter.finish` adds ``phases.csv``, the plots and ``report.html``.
Every figure comes from one :class:`~echo_env.cachetest.results.TestResult`.

:func:`write_json_file` and :func:`write_records` are the same writers for every other
command (rollout, training, benchmarks), so every file the package writes goes through
:func:`~echo_env.report.redact.redact`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from echo_env.cachetest.results import ServerRun, TestResult
from echo_env.errors import ConfigError
from echo_env.measure.figures import PhaseFigures
from echo_env.report.html import REPORT_FILE, render_html
from echo_env.report.plots import draw_plots
from echo_env.report.redact import redact

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
"""The run's summary (``TestResult.to_json()``), rewritten atomically as the run goes."""
RECORDS_FILE = "requests.jsonl"
"""One JSON object per request, appended as each phase ends."""
PHASES_FILE = "phases.csv"
"""One row per phase and repeat of every server, then its rows pooled over repeats."""

_ROW_KEYS = tuple(PhaseFigures(name="").to_json())
PHASE_COLUMNS: tuple[str, ...] = (
    *_ROW_KEYS[: _ROW_KEYS.index("repeat") + 1],
    "pooled",
    *_ROW_KEYS[_ROW_KEYS.index("repeat") + 1 :],
)
"""Columns of ``phases.csv``: :meth:`PhaseFigures.to_json`'s keys, and ``pooled`` after ``repeat``."""


# --------------------------------------------------------------------------------------
# Plain JSON values, redacted
# --------------------------------------------------------------------------------------


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values, so any command's results can be written.

    NaN and infinities become None (strict JSON has no NaN; a percentile of nothing is
    unknown), tuples and sets lists, dataclasses dicts, paths strings, times ISO text,
    numpy scalars and arrays Python numbers and lists; anything else its ``str``.

    Args:
        obj: Any value.

    Returns:
        The value built from None, bool, int, float, str, list and dict only.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(key): plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [plain(item) for item in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    # numpy, without importing it: arrays have tolist, scalars item.
    for name in ("tolist", "item"):
        method = getattr(obj, name, None)
        if callable(method):
            try:
                return plain(method())
            except (TypeError, ValueError):
                pass
    return str(obj)


def _dumps(obj: Any, **kwargs: Any) -> str:
    # Plain values first, so a secret inside a dataclass (a client config) is seen too.
    return json.dumps(redact(plain(obj)), ensure_ascii=False, allow_nan=False, **kwargs)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="" writes the text as given: the csv module has chosen its line ends.
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_file(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically, secrets redacted (any command's results).

    Args:
        path: The file; its folder is created when missing.
        obj: Anything :func:`plain` turns into JSON (dicts, dataclasses, numpy numbers...).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, _dumps(obj, indent=2) + "\n")
    return path


def write_records(path: Path | str, rows: Iterable[Mapping[str, Any]], *, append: bool = False) -> int:
    """Write rows as JSON lines, secrets redacted, flushed before returning.

    Args:
        path: The ``.jsonl`` file; its folder is created when missing.
        rows: One mapping per line (request records, training steps...).
        append: Add to the file instead of replacing it.

    Returns:
        How many rows were written.
    """
    path = Path(path)
    lines = [_dumps(row) + "\n" for row in rows]
    if not lines and append:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write per batch, flushed, so a crash loses at most the batch in flight.
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
    return len(lines)


# --------------------------------------------------------------------------------------
# phases.csv
# --------------------------------------------------------------------------------------


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def phase_rows(runs: Iterable[ServerRun]) -> list[dict[str, Any]]:
    """Every server's phases, repeat by repeat, then pooled over repeats (``repeat`` None, ``pooled`` true).

    Args:
        runs: The test's server runs.

    Returns:
        One plain dict per row, keys in :data:`PHASE_COLUMNS`.
    """
    rows = []
    for run in runs:
        for figures, pooled in [*((p, False) for p in run.phases), *((p, True) for p in run.pooled)]:
            row = figures.to_json()
            row["pooled"] = pooled
            rows.append(row)
    return rows


def write_phases_csv(path: Path | str, runs: Iterable[ServerRun]) -> Path:
    """Write ``phases.csv`` (header only when nothing was measured), atomically, secrets redacted.

    Args:
        path: The file.
        runs: The test's server runs.

    Returns:
        The path written.
    """
    path = Path(path)
    rows = [redact(plain(row)) for row in phase_rows(runs)]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=PHASE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in PHASE_COLUMNS})
    _atomic_write_text(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------
# The run's folder
# --------------------------------------------------------------------------------------


class RunWriter:
    """Everything a prefix-cache test leaves in its ``out_dir``.

    One writer per run: records go to ``requests.jsonl`` as each phase ends
    (:meth:`append_records`), the summary replaces ``summary.json`` as often as wanted
    (:meth:`write_summary`), and :meth:`finish` adds ``phases.csv`` and the plots.

    Example:
        >>> writer = RunWriter("runs/2025-01-01")             # doctest: +SKIP
        >>> writer.append_records(r.to_json() for r in records)  # doctest: +SKIP
        >>> writer.finish(result)                              # doctest: +SKIP
        >>> print(format_console(result))                      # doctest: +SKIP
    """

    def __init__(self, out_dir: Path | str) -> None:
        """Create ``out_dir`` (and parents) and start an empty ``requests.jsonl``.

        Args:
            out_dir: The run's folder. A ``requests.jsonl`` already there is emptied, so
                a reused folder never mixes two runs' records.

        Raises:
            ConfigError: The folder cannot be created or written.
        """
        self.out_dir = Path(out_dir)
        """The run's folder."""
        self.records_path = self.out_dir / RECORDS_FILE
        """``requests.jsonl``."""
        self.summary_path = self.out_dir / SUMMARY_FILE
        """``summary.json``."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.records_path.write_text("", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot write the results to out_dir={self.out_dir} ({exc.strerror or exc}): "
                "pass out_dir= a folder you can write"
            ) from exc
        self._records_written = 0

    @property
    def records_written(self) -> int:
        """How many records :meth:`append_records` has written so far."""
        return self._records_written

    def append_records(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Append request records to ``requests.jsonl`` and flush them to disk now.

        Args:
            rows: Request records (``RequestRecord.to_json()`` with the phase, server and
                repeat); secrets are redacted, NaN becomes null.

        Returns:
            How many records were written.
        """
        count = write_records(self.records_path, rows, append=True)
        self._records_written += count
        return count

    def write_summary(self, result: TestResult) -> Path:
        """Replace ``summary.json`` atomically with ``result.to_json()``, secrets redacted.

        Safe to call many times during a run, partial results included: a reader (or a
        crash) sees the previous summary or this one, never a half-written file.

        Args:
            result: The test's result so far.

        Returns:
            The path of ``summary.json``.
        """
        start = time.perf_counter()
        _atomic_write_text(self.summary_path, _dumps(result.to_json(), indent=2) + "\n")
        log.debug("time/report/write_summary: %.4f s", time.perf_counter() - start)
        return self.summary_path

    def finish(self, result: TestResult) -> list[Path]:
        """Write the final ``summary.json``, ``phases.csv`` and the plots; list them in ``result``.

        The summary and the CSV come first, so a plot that fails (or a missing
        matplotlib) loses nothing else: the reason is added to ``result.notes``, which
        the console and ``summary.json`` show. ``result.files`` is set to the files
        written (``requests.jsonl`` included) and ``result.out_dir`` to this folder when
        it is unset; ``summary.json`` is then rewritten with both.

        Args:
            result: The test's result, finished or partial.

        Returns:
            The paths written.
        """
        start = time.perf_counter()
        if result.out_dir is None:
            result.out_dir = str(self.out_dir)
        self.write_summary(result)  # a crash while drawing still leaves the figures
        phases_path = write_phases_csv(self.out_dir / PHASES_FILE, result.runs)
        log.debug("time/report/csv: %.4f s", time.perf_counter() - start)
        plots, notes = draw_plots(self.out_dir, result)
        html_path = self.out_dir / REPORT_FILE
        written = [self.summary_path, self.records_path, phases_path, *plots, html_path]
        result.files = [str(p) for p in written]
        for note in notes:
            if note not in result.notes:  # finish may run twice (a retry after a crash)
                result.notes.append(note)
        self.write_summary(result)
        # The page is made from the summary just written, as `echo-prefix report DIR` makes it.
        write_html(self.out_dir, result.to_json())
        log.debug("time/report/finish: %.4f s", time.perf_counter() - start)
        return written


def write_html(out_dir: Path | str, summary: Mapping[str, Any]) -> Path:
    """Write ``report.html`` into ``out_dir`` (atomically) and return its path.

    Args:
        out_dir: The run's folder.
        summary: ``TestResult.to_json()``.

    Returns:
        The page's path.
    """
    path = Path(out_dir) / REPORT_FILE
    _atomic_write_text(path, render_html(summary))
    return path
