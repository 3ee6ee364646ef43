"""The ``echo-prefix`` command: ``test``, ``rollout``, ``serve`` and ``train``.

Arguments are ``key=value`` pairs, as in the recipe (``echo-prefix test batch_size=32``).
Errors a user can meet print one line naming the fix and exit with status 2;
``debug=true`` shows the traceback too.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from echo_env.commands.common import drop_stream, emit
from echo_env.config import describe, parse_overrides
from echo_env.errors import ConfigError, EchoEnvError
from echo_env.interrupts import sigterm_as_interrupt

log = logging.getLogger("echo_env")

USAGE = """usage: echo-prefix COMMAND [key=value ...]

commands:
  test      is prefix caching working, and what does it save? (the main job)
  report    rebuild a test run's report.html (and print its summary): echo-prefix report DIR
  rollout   run the echo env against a server and print reward and latency figures
  serve     start the embedded vLLM engine (replicas=2: a fleet behind vllm-router) until Ctrl-C
  train     GRPO on the echo task with TRL (see `echo-prefix train --help`)

With no base_url, test and rollout start the embedded vLLM engine themselves.
`echo-prefix COMMAND --help` lists the keys of a command.
"""


@dataclass(frozen=True)
class Command:
    """One ``echo-prefix`` command: the module that holds its ``Config`` and ``command(config) -> int``."""

    module: str
    """Where the command lives (imported only when it runs: the engine and TRL load slowly)."""
    needs: str = ""
    """What to install when the module does not import (empty: nothing beyond the core)."""
    positional: str | None = None
    """The key a bare argument (no ``=``) fills, as ``echo-prefix report DIR`` (None: every argument is key=value)."""

    def load(self) -> ModuleType:
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            if not self.needs:
                raise
            raise ConfigError(f"this command needs {self.needs} ({exc})") from exc


COMMANDS: dict[str, Command] = {
    "test": Command("echo_env.commands.test"),
    "report": Command("echo_env.commands.report", positional="dir"),
    "rollout": Command("echo_env.commands.rollout"),
    "serve": Command("echo_env.commands.serve"),
    "train": Command("echo_env.commands.train", needs="TRL: pip install 'echo-prefix-env[trl]'"),
}
"""The command line is this table: each command's settings come from its module's ``Config``."""


def run_command(name: str, args: Sequence[str]) -> int:
    """Parse ``key=value`` arguments into the command's config and run it; its exit status."""
    spec = COMMANDS[name]
    module = spec.load()
    if spec.positional is not None:
        args = [a if "=" in a else f"{spec.positional}={a}" for a in args]
    return int(module.command(parse_overrides(module.Config, args)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``echo-prefix`` and ``python -m echo_env``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        emit(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        emit(f"echo-prefix: unknown command {name!r}: use one of {', '.join(COMMANDS)}", err=True)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        emit(f"usage: echo-prefix {name} [key=value ...]\n\nkeys:\n{describe(COMMANDS[name].load().Config)}")
        return 0
    debug = any(a.replace(" ", "").lower() in ("debug=true", "debug=1", "--debug") for a in rest)
    rest = [a for a in rest if a != "--debug"] + (["debug=true"] if "--debug" in rest else [])
    try:
        # SIGTERM (kill, timeout, a cancelled CI job) ends the command the Ctrl-C way.
        with sigterm_as_interrupt():
            return run_command(name, rest)
    except EchoEnvError as exc:
        if debug:
            raise
        emit(f"echo-prefix {name}: error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        emit(f"echo-prefix {name}: interrupted; partial results (if any) are on disk", err=True)
        return 2
    except BrokenPipeError:
        # A write that does not go through emit() met a reader that went away: the command
        # stopped before its end, which is no verdict, so it exits as UNKNOWN does (never 0).
        drop_stream(sys.stdout)
        emit(f"echo-prefix {name}: stopped: the reader of its output went away", err=True)
        return 2
    except Exception as exc:  # a crash is no verdict: exit as UNKNOWN does, never as FAIL
        if debug:
            raise
        emit(
            f"echo-prefix {name}: internal error: {type(exc).__name__}: {exc} (debug=true shows the traceback)",
            err=True,
        )
        return 2
