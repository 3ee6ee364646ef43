"""The ``echo-prefix`` command: ``test``, ``rollout``, ``serve`` and ``train``.

Arguments are ``key=value`` pairs, as in the recipe (``echo-prefix test batch_size=32``).
Errors a user can meet print one line naming the fix and exit with status 2;
``debug=true`` shows the traceback too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
class ServeCommand:
    """Settings of ``echo-prefix serve``."""

    model_name: str | None = None
    """Model to serve: unset for Gemma 3 270M, a folder, or a hub id."""
    prefix_caching: bool = True
    """Serve with prefix caching on or off."""
    port: int | None = None
    """Port on 127.0.0.1 (unset: a free one; a fleet always picks free ports)."""
    kv_cache_gib: int | None = None
    """KV cache size on CPU, GiB (unset: 2 for one engine, 1 per replica of a fleet)."""
    max_model_len: int = 2048
    """Longest prompt plus completion."""
    dev_mode: bool = False
    """Enable POST /reset_prefix_cache."""
    replicas: int = 1
    """vLLM replicas; 2 or more start them one after another behind vllm-router."""
    router: str | None = None
    """The fleet router's policy (round_robin, random, cache_aware, consistent_hash, power_of_two...)."""
    debug: bool = False
    """Tracebacks on errors."""

    def __post_init__(self) -> None:
        # The same checks (and messages) as every command's server keys.
        from echo_env.launch.target import ServerTarget

        ServerTarget(replicas=self.replicas, router=self.router)
        if self.replicas > 1 and self.port is not None:
            raise ConfigError("port= is the single engine's: a fleet picks free ports for its router and replicas")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if debug:
        # Third-party chatter drowns the per-step timing lines.
        for noisy in ("httpx", "httpcore", "openai", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _emit(text: str, *, err: bool = False) -> None:
    """Print ``text`` on stdout (``err``: stderr); a reader that went away ends the output, not the command.

    ``echo-prefix test ... | head`` or a closed pager must still exit with the verdict's status.
    """
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        _drop(stream)


def _drop(stream: Any) -> None:
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


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def cmd_test(args: Sequence[str]) -> int:
    """``echo-prefix test``: the prefix-cache test; exit 0 PASS, 1 FAIL, 2 UNKNOWN."""
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.commands.test import run_prefix_test
    from echo_env.report.console import format_console

    config = parse_overrides(PrefixTestConfig, args)
    _setup_logging(config.debug)
    result = run_prefix_test(config, show_progress=True)
    _emit(format_console(result))
    if result.error:
        # The report above is the record; stderr says why the run stopped, for scripts and logs.
        _emit(f"echo-prefix test: error: {result.error}; partial results are in {result.out_dir}", err=True)
    return result.exit_code


def cmd_rollout(args: Sequence[str]) -> int:
    """``echo-prefix rollout``: run episodes and print a summary table."""
    from echo_env.commands.rollout import RolloutConfig, run_rollout

    config = parse_overrides(RolloutConfig, args)
    _setup_logging(config.debug)
    summary = run_rollout(config)
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={_fmt(v, 1000, 1)}ms" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"{key:>24}  {value}")
    _emit("\n".join(lines))
    return 0


def cmd_serve(args: Sequence[str]) -> int:
    """``echo-prefix serve``: the embedded engine in the foreground."""
    from echo_env.launch.engine import EngineConfig, serve_forever

    config = parse_overrides(ServeCommand, args)
    _setup_logging(config.debug)
    if config.replicas > 1:
        return _serve_fleet(config)
    fields = asdict(config)
    for key in ("debug", "replicas", "router"):
        fields.pop(key)
    fields["model"] = fields.pop("model_name")
    fields["kv_cache_gib"] = 2 if config.kv_cache_gib is None else config.kv_cache_gib
    return serve_forever(EngineConfig(**fields))


def _serve_fleet(config: ServeCommand) -> int:
    """``echo-prefix serve replicas=N``: the fleet in the foreground, its addresses printed, until Ctrl-C."""
    import time

    from echo_env.launch.fleet import EmbeddedFleet, FleetConfig

    fleet = EmbeddedFleet(
        FleetConfig(
            replicas=config.replicas, router=config.router or "round_robin",
            kv_cache_gib=1 if config.kv_cache_gib is None else config.kv_cache_gib,
            model=config.model_name, prefix_caching=config.prefix_caching, dev_mode=config.dev_mode,
            max_model_len=config.max_model_len,
        )
    )  # fmt: skip
    print(f"starting {config.replicas} vLLM replicas one after another, then vllm-router...", file=sys.stderr)
    try:
        with fleet:
            print(f"serving {fleet.served_model_name} at {fleet.base_url} (vllm-router, {fleet.policy})", flush=True)
            for i, (url, metrics) in enumerate(zip(fleet.replica_urls, fleet.replica_metrics_urls, strict=True)):
                print(f"replica {i + 1}: {url}  metrics: {metrics}", flush=True)
            print(f"router metrics: {fleet.router_metrics_url}  log: {fleet.router_log_path}", flush=True)
            urls = ",".join(fleet.replica_urls)
            print(f"test it: echo-prefix test base_url={fleet.base_url} replica_urls={urls}", flush=True)
            print("press Ctrl-C to stop", flush=True)
            while fleet.is_running():
                time.sleep(1.0)
            print("a replica or the router stopped on its own; stopping the rest", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0


def cmd_train(args: Sequence[str]) -> int:
    """``echo-prefix train``: GRPO with TRL (needs the ``trl`` extra)."""
    try:
        from echo_env.train import main as train_main
    except ImportError as exc:
        raise ConfigError(f"train needs TRL: pip install 'echo-prefix-env[trl]' ({exc})") from exc
    return int(train_main(list(args)))


def cmd_report(args: Sequence[str]) -> int:
    """``echo-prefix report DIR``: rebuild a run's report.html and print its console summary; exit as the run did."""
    from echo_env.report.console import format_console
    from echo_env.report.html import load_summary, write_html
    from echo_env.report.summary_load import result_from_summary

    dirs = [a.removeprefix("dir=") for a in args if a.startswith("dir=") or "=" not in a]
    if len(dirs) != 1:
        raise ConfigError("report takes one folder: echo-prefix report DIR (the out_dir of an `echo-prefix test` run)")
    summary = load_summary(dirs[0])
    page = write_html(dirs[0], summary)
    _emit(format_console(result_from_summary(summary)))
    _emit(f"report  {page}")
    return int(summary.get("exit_code", 2))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], type[Any] | None]] = {
    "test": (cmd_test, None),
    "report": (cmd_report, None),
    "rollout": (cmd_rollout, None),
    "serve": (cmd_serve, ServeCommand),
    "train": (cmd_train, None),
}


def _config_class(name: str) -> type[Any] | None:
    if name == "test":
        from echo_env.cachetest.config import PrefixTestConfig

        return PrefixTestConfig
    if name == "rollout":
        from echo_env.commands.rollout import RolloutConfig

        return RolloutConfig
    if name == "train":
        from echo_env.train import TrainConfig

        return TrainConfig
    return COMMANDS[name][1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``echo-prefix`` and ``python -m echo_env``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _emit(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _emit(f"echo-prefix: unknown command {name!r}: use one of {', '.join(COMMANDS)}", err=True)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        cls = _config_class(name)
        keys = describe(cls) if cls is not None else "  see the command's documentation"
        _emit(f"usage: echo-prefix {name} [key=value ...]\n\nkeys:\n{keys}")
        return 0
    debug = any(a.replace(" ", "").lower() in ("debug=true", "debug=1", "--debug") for a in rest)
    rest = [a for a in rest if a != "--debug"] + (["debug=true"] if "--debug" in rest else [])
    try:
        # SIGTERM (kill, timeout, a cancelled CI job) ends the command the Ctrl-C way.
        with sigterm_as_interrupt():
            return COMMANDS[name][0](rest)
    except EchoEnvError as exc:
        if debug:
            raise
        _emit(f"echo-prefix {name}: error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        _emit(f"echo-prefix {name}: interrupted; partial results (if any) are on disk", err=True)
        return 2
    except BrokenPipeError:
        # A write this module does not make met a reader that went away: the command stopped
        # before its end, which is no verdict, so it exits as UNKNOWN does (never 0).
        _drop(sys.stdout)
        _emit(f"echo-prefix {name}: stopped: the reader of its output went away", err=True)
        return 2
    except Exception as exc:  # a crash is no verdict: exit as UNKNOWN does, never as FAIL
        if debug:
            raise
        _emit(
            f"echo-prefix {name}: internal error: {type(exc).__name__}: {exc} (debug=true shows the traceback)",
            err=True,
        )
        return 2
