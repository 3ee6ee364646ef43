"""Servers run as child processes: started, waited for, and stopped with everything they spawned.

Every server this package runs (the vLLM engine, ``llama-server``, the fleet's router,
Prometheus) goes through :class:`ServerProcess`: the child gets its own session, so
Ctrl-C in the terminal reaches only this program and the whole process group can be
signalled at once (vLLM's API server spawns an EngineCore that must not outlive it);
its stdout and stderr go to one log file under ``<cache>/logs``, headed by the command
line; :meth:`ServerProcess.wait_ready` polls a readiness check but fails as soon as the
child exits; :meth:`ServerProcess.stop` sends SIGTERM to the group, then SIGKILL to what
is left; and interpreter exit stops a child nobody stopped (``atexit``).

:class:`ChildServer` adds what the single-server wrappers share on top: a port on
127.0.0.1 (picked again when another process took it first), the URLs, and a start that
takes the half-started server down on any failure, Ctrl-C (or SIGTERM under
:func:`~echo_env.interrupts.sigterm_as_interrupt`) included.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from echo_env.errors import EngineError
from echo_env.wire import http

HOST = "127.0.0.1"
"""The only address the servers listen on: they have no authentication, so never 0.0.0.0."""

STOP_TIMEOUT_S = 20.0
"""How long a stop waits after SIGTERM before it sends SIGKILL."""

LOG_TAIL_LINES = 30
"""How many of a log's last lines an error message quotes."""

_PORT_RETRIES = 3


def find_free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (another process may still take it later).

    Args:
        host: The address the port must be free on.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_dir(path: Path) -> Path:
    """Create a folder of the cache if needed.

    Raises:
        EngineError: It cannot be created, naming the fix.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create {path}: {exc}; set ECHO_ENV_CACHE to a writable folder") from exc
    return path


def log_path(cache_dir: Path, name: str) -> Path:
    """``<cache_dir>/logs/<name>``, creating the folder.

    Raises:
        EngineError: The folder cannot be created.
    """
    return ensure_dir(cache_dir / "logs") / name


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (empty when it cannot be read)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


def http_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 within 2 s (redirects followed)."""
    return http.answers_ok(url, timeout_s=http.HEALTH_TIMEOUT_S)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from ``/proc``.

    Args:
        pgid: The process group id.

    Returns:
        Their pids; empty when ``/proc`` is unavailable and the group is gone.
    """
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a child's whole process group, SIGKILL what is left after ``timeout_s``.

    Args:
        proc: A child started with ``start_new_session=True`` (its pid is its group id).
        timeout_s: How long to wait after SIGTERM.
    """
    pgid = proc.pid
    try:
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or it stays a zombie member of the group
            # Zombies answer kill(0) too, so ask /proc for processes that are really running.
            if not group_members(pgid):
                break
            time.sleep(0.05)
        else:
            _signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        # Ctrl-C during the wait must not leave the server behind.
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ServerProcess:
    """One server child in its own process group, its output in one log file."""

    def __init__(
        self,
        cmd: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        """Start the child; interpreter exit stops it unless :meth:`stop` did first.

        Args:
            cmd: The command line.
            log: The log file (overwritten), headed by ``$ <command line>``.
            env: The child's whole environment (None: this process's).
            stop_timeout_s: How long :meth:`stop` waits after SIGTERM before SIGKILL.

        Raises:
            OSError: The log cannot be written or the command cannot be run; callers
                wrap it in an error that names their fix.
        """
        self.log_path = log
        """Where the child's stdout and stderr go."""
        with log.open("wb") as handle:
            handle.write(("$ " + " ".join(cmd) + "\n").encode())
            handle.flush()
            # Own session: Ctrl-C in the terminal reaches only us, and stop() can signal
            # the server together with every process it spawns.
            self.proc = subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, start_new_session=True,
            )  # fmt: skip
        self._stop_timeout_s = stop_timeout_s
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        """The child's process id, also its process group id."""
        return self.proc.pid

    def is_running(self) -> bool:
        """Whether the child is alive."""
        return self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the child's log."""
        return read_tail(self.log_path, lines)

    def wait_ready(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        poll_s: float,
        failed: Callable[[int | None], BaseException],
    ) -> None:
        """Poll ``ready`` until it says yes, failing fast when the child exits.

        Args:
            ready: The readiness check (an HTTP GET, usually).
            timeout_s: How long to wait.
            poll_s: Seconds between checks.
            failed: Builds the error to raise from the child's exit status, or from
                ``None`` when ``timeout_s`` passed first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise failed(code)
            if ready():
                return
            if time.monotonic() > deadline:
                raise failed(None)
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop the child's whole process group (see :func:`stop_group`). Safe to call twice."""
        atexit.unregister(self.stop)
        stop_group(self.proc, self._stop_timeout_s)


class ChildServer:
    """What the single-server wrappers share: a port, its URLs, start with retries, stop.

    A subclass sets the names and the poll interval below, and implements ``start``
    (resolving what it needs, then calling :meth:`_start_on_port` with a launch that sets
    ``_child`` and ``_log_path``), ``_startup_timeout_s`` and ``_startup_error``.

    Use it as a context manager or call ``start`` and :meth:`stop`; leaving the ``with``
    block for any reason stops the server, and so does interpreter exit.
    """

    _name = "the server"
    """How messages about this object name it ("the engine")."""
    _process_name = "the server"
    """How start-up errors name the process ("the vLLM server")."""
    _health_poll_s = 0.5
    """Seconds between ``/health`` checks during start-up."""

    def __init__(self) -> None:
        self._child: ServerProcess | None = None
        self._port: int | None = None
        self._log_path: Path | None = None

    # ----- addresses -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (known once started)."""
        if self._port is None:
            raise EngineError(f"{self._name} has not been started: call start() or use it in a `with` block")
        return self._port

    @property
    def server_url(self) -> str:
        """``http://127.0.0.1:PORT``: the server root (``/health``, ``/metrics``)."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: what an OpenAI client takes as ``base_url``."""
        return f"{self.server_url}/v1"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"{self.server_url}/metrics"

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr log."""
        if self._log_path is None:
            raise EngineError(f"{self._name} has not been started: call start() or use it in a `with` block")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), or ``None`` when not running."""
        return self._child.pid if self._child is not None else None

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._child is not None and self._child.is_running()

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it is healthy; subclasses say how."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and every process it started. Safe to call more than once.

        SIGTERM goes to the whole process group; whatever is still alive after
        :data:`STOP_TIMEOUT_S` gets SIGKILL.
        """
        child, self._child = self._child, None
        if child is not None:
            child.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- for subclasses --------------------------------------------------------

    def _check_not_running(self) -> None:
        if self._child is not None:
            raise EngineError(f"{self._name} is already running (pid {self._child.pid}): stop() it first")

    def _start_on_port(self, fixed_port: int | None, launch: Callable[[int], None]) -> None:
        """Launch on ``fixed_port`` or a free one, and wait until healthy.

        A port found free can be taken by someone else before the server binds it; only
        a port picked here is worth picking again. A restart keeps its address when it
        can, so clients holding ``base_url`` still work.
        """
        attempts_left = 1 if fixed_port is not None else _PORT_RETRIES
        previous_port = self._port
        while True:
            attempts_left -= 1
            if fixed_port is not None:
                port = fixed_port
            elif previous_port is not None:
                port, previous_port = previous_port, None
            else:
                port = find_free_port()
            try:
                launch(port)
                self._wait_healthy()
                return
            except EngineError:
                lost_port_race = "address already in use" in self._log_tail().lower()
                self.stop()
                if not (lost_port_race and attempts_left > 0):
                    raise
            except BaseException:
                # Ctrl-C during the minute-long start: __exit__ will not run, so stop here.
                self.stop()
                raise

    def _wait_healthy(self) -> None:
        assert self._child is not None
        health = f"{self.server_url}/health"
        timeout_s = self._startup_timeout_s

        def failed(code: int | None) -> EngineError:
            if code is not None:
                return self._startup_error(f"{self._process_name} exited during start-up (exit status {code})", code)
            return self._startup_error(f"{self._process_name} did not answer {health} within {timeout_s:.0f} s", None)

        self._child.wait_ready(lambda: http_ok(health), timeout_s, self._health_poll_s, failed)

    @property
    def _startup_timeout_s(self) -> float:
        raise NotImplementedError

    def _startup_error(self, what: str, exit_code: int | None) -> EngineError:
        """The error for a failed start: ``what`` happened, then the likely fix and the log's tail."""
        raise NotImplementedError

    def _log_tail(self) -> str:
        return read_tail(self._log_path) if self._log_path is not None else ""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting for whoever holds it now.

    Args:
        path: The lock file (created if missing).
        what: What the holder is doing, for the message shown while waiting ("preparing the model").
    """
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"echo_env: waiting for another process to finish {what} ({path})", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cpu_list(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: the form VLLM_CPU_OMP_THREADS_BIND takes."""
    ranges: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], -2]:
        if cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = cpu
    return ",".join(ranges)
