"""What every command shares: logging set-up, number formatting and the results folder's name."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_ROOT = Path("echo_prefix_results")
"""Where a command writes its results when no ``out_dir`` is given (under the current folder)."""


def setup_logging(debug: bool, *, hush: Iterable[str] = (), debug_level: int = logging.DEBUG) -> None:
    """Log to stderr: warnings only, or ``debug_level`` and up with ``debug=true``.

    HTTP libraries stay at WARNING even in debug mode: their chatter drowns the per-step timing lines.

    Args:
        debug: The command's ``debug`` key.
        hush: Third-party loggers held at ERROR unless ``debug`` (they announce defaults at WARNING).
        debug_level: The level ``debug=true`` turns on.
    """
    logging.basicConfig(
        level=debug_level if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("httpx", "httpcore", "openai", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not debug:
        for name in hush:
            logging.getLogger(name).setLevel(logging.ERROR)


def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """A number for a console table, ``n/a`` when it is missing."""
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def default_out_dir(prefix: str = "") -> Path:
    """``echo_prefix_results/<prefix><UTC time>-<short id>``: a fresh folder name for one run."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return RESULTS_ROOT / f"{prefix}{stamp}-{uuid.uuid4().hex[:6]}"


def emit(text: str, *, err: bool = False) -> None:
    """Print ``text`` on stdout (``err``: stderr); a reader that went away ends the output, not the command.

    ``echo-prefix test ... | head`` or a closed pager must still exit with the verdict's status.
    """
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        drop_stream(stream)


def drop_stream(stream: Any) -> None:
    """Send whatever else goes to ``stream`` nowhere, so the flush at exit does not fail on the closed pipe too.

    As the Python docs advise for SIGPIPE (the ``signal`` module's note): point the
    descriptor at devnull rather than leave Python to exit with status 120.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's stand-in): replace the object
        setattr(sys, "stderr" if stream is sys.stderr else "stdout", open(os.devnull, "w"))  # noqa: SIM115
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
