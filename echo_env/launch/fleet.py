"""An embedded fleet: several vLLM replicas behind the vLLM project's router, on one machine.

Users who outgrow one server run several replicas behind a router; the prefix cache then
pays only when requests that share a prefix land on the replica that holds it.
:class:`EmbeddedFleet` builds that setup from real parts so it can be measured: N
:class:`~echo_env.launch.engine.EmbeddedEngine` replicas, started one after another
(two starting at once fight over the cores and the memory peak of loading), each with its
OpenMP threads bound to its own cores, then PyPI ``vllm-router`` in front of them. Every
process listens on 127.0.0.1 only, runs in its own process group, and is stopped on
:meth:`EmbeddedFleet.stop`, on leaving a ``with`` block (Ctrl-C included) and at exit.

The router can be restarted with another policy in about a second while the replicas
stay up (:meth:`EmbeddedFleet.restart_router`), so comparing policies costs one fleet
start, not one per policy.

Read each replica's own ``/metrics`` (:attr:`EmbeddedFleet.replica_metrics_urls`): the
router proxies ``GET /metrics`` to one replica per call, so counter deltas taken through
it are meaningless. The router's own counters are on its Prometheus port
(:attr:`EmbeddedFleet.router_metrics_url`). The router's policies, command line and
readiness check are :mod:`echo_env.launch.fleet_router`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from echo_env.errors import ConfigError, EngineError
from echo_env.launch.engine import EmbeddedEngine, EngineConfig, is_cpu_only
from echo_env.launch.fleet_router import (
    POLICIES,
    ROUTER_INSTALL_HINT,
    RouterProcess,
    check_router_installed,
    router_command,
    router_ready,
)
from echo_env.launch.model import default_cache_dir
from echo_env.launch.process import HOST, ServerProcess, cpu_list, find_free_port, log_path

REPLICA_BASE_GIB = 4.5
"""Memory of one CPU replica besides its KV cache, GiB, with some headroom (measured with Gemma 3 270M: two
replicas at 1 GiB KV each took 9.8 GiB resident and lowered MemAvailable by 9.1 GiB)."""

_ROUTER_POLL_S = 0.2


@dataclass(frozen=True)
class FleetConfig:
    """How to run the replicas and the router."""

    replicas: int = 2
    """How many vLLM replicas."""
    router: str = "round_robin"
    """The router's policy, one of :data:`POLICIES`."""
    kv_cache_gib: int = 1
    """KV cache per replica, GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    model: str | None = None
    """``None`` (Gemma 3 270M), a model folder or a hub id; every replica serves it."""
    kv_events: bool = False
    """Make each replica publish KV-cache events on its own ``ipc://`` endpoint (see ``kv_event_endpoints``)."""
    prefix_caching: bool = True
    """Whether the replicas cache prefixes."""
    dev_mode: bool = False
    """Run the replicas with ``VLLM_SERVER_DEV_MODE=1`` (``POST /reset_prefix_cache``)."""
    max_model_len: int = 2048
    """Longest prompt plus completion, tokens."""
    served_model_name: str | None = None
    """The name clients send; ``None``: ``echo-gemma3-270m`` or the model string."""
    cache_dir: Path | None = None
    """Where the model, logs and caches go; ``None`` means the package's cache folder."""
    cpu_binds: tuple[str, ...] | None = None
    """``VLLM_CPU_OMP_THREADS_BIND`` per replica (``("0", "1")``); ``None`` splits this process's cores evenly."""
    scale_out: bool = True
    """Start the replicas with ``--enable-scale-out``: vllm-router's ``cache_aware`` tokenizes each request
    through a replica's ``POST /v1/completions/render``, which vLLM 0.32 answers 403 without it (and the
    router then spreads requests as round_robin would)."""
    extra_args: tuple[str, ...] = ()
    """More ``vllm`` arguments for every replica."""
    router_args: tuple[str, ...] = ()
    """More ``vllm-router`` arguments (``--cache-threshold 0.5``...)."""
    startup_timeout_s: float = 300.0
    """How long each replica may take to answer ``/health``."""
    router_timeout_s: float = 60.0
    """How long the router may take to report itself ready."""
    check_memory: bool = True
    """Refuse to start when ``MemAvailable`` is below what the replicas need (:attr:`memory_needed_gib`)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas}: give at least 1 (2 fit on a 24 GB, 2-core machine)")
        if self.router not in POLICIES:
            raise ConfigError(f"router={self.router!r} is not a vllm-router policy: use one of {', '.join(POLICIES)}")
        if self.kv_cache_gib < 1:
            raise ConfigError(f"kv_cache_gib={self.kv_cache_gib}: give a whole number of GiB, at least 1")
        for key in ("startup_timeout_s", "router_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive")
        for key in ("extra_args", "router_args"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise ConfigError(f"{key} must be separate arguments, such as ('--seed', '0'), not one string")
            if not isinstance(value, tuple):
                object.__setattr__(self, key, tuple(value))
        if self.cpu_binds is not None:
            if isinstance(self.cpu_binds, str):
                raise ConfigError("cpu_binds needs one entry per replica, such as ('0', '1'), not one string")
            binds = tuple(str(b) for b in self.cpu_binds)
            if len(binds) != self.replicas:
                raise ConfigError(f"cpu_binds has {len(binds)} entries for {self.replicas} replicas: give one each")
            object.__setattr__(self, "cpu_binds", binds)
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    @property
    def memory_needed_gib(self) -> float:
        """Roughly what the replicas take together, GiB."""
        return self.replicas * (REPLICA_BASE_GIB + self.kv_cache_gib)

    def engine_config(self) -> EngineConfig:
        """The configuration every replica shares (each picks its own free port)."""
        return EngineConfig(
            model=self.model,
            prefix_caching=self.prefix_caching,
            max_model_len=self.max_model_len,
            kv_cache_gib=self.kv_cache_gib,
            startup_timeout_s=self.startup_timeout_s,
            cache_dir=self.cache_dir,
            served_model_name=self.served_model_name,
            extra_args=(*(("--enable-scale-out",) if self.scale_out else ()), *self.extra_args),
            dev_mode=self.dev_mode,
        )


class ReplicaEngine(EmbeddedEngine):
    """An :class:`EmbeddedEngine` with extra environment variables (its own CPU binding, mostly)."""

    def __init__(self, config: EngineConfig, env: Mapping[str, str]) -> None:
        """Prepare, without starting anything.

        Args:
            config: How to run the server.
            env: Variables set last, over what the engine sets itself.
        """
        super().__init__(config)
        self.extra_env = dict(env)
        """What this replica's environment adds or overrides."""

    def _environment(self, model: str) -> dict[str, str]:
        env = super()._environment(model)
        env.update(self.extra_env)
        return env


def split_cpus(cpus: Sequence[int], parts: int) -> list[str]:
    """Each replica's ``VLLM_CPU_OMP_THREADS_BIND``: the cores split into contiguous, even shares.

    With fewer cores than replicas, replicas share cores round-robin (slow, but it runs).

    Args:
        cpus: The cores this process may use, e.g. ``sorted(os.sched_getaffinity(0))``.
        parts: How many replicas.

    Returns:
        One core list per replica, in the form ``"0-1"`` or ``"2,5"``.
    """
    if not cpus:
        raise ConfigError("no CPU cores to bind: give cpu_binds= explicitly")
    ordered = sorted(cpus)
    if parts > len(ordered):
        return [str(ordered[i % len(ordered)]) for i in range(parts)]
    out: list[str] = []
    base, extra = divmod(len(ordered), parts)
    start = 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(cpu_list(ordered[start : start + size]))
        start += size
    return out


def mem_available_gib() -> float | None:
    """``MemAvailable`` from ``/proc/meminfo``, GiB (None where there is no such file)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return None


def kv_events_config(endpoint: str) -> str:
    """The ``--kv-events-config`` JSON that makes a replica publish (bind) on ``endpoint``."""
    return json.dumps(
        {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": "kv"},
        separators=(",", ":"),
    )


@dataclass
class FleetTimings:
    """How long the fleet took to come up, seconds."""

    replicas_s: list[float] = field(default_factory=list)
    """Each replica's start, in start order."""
    router_s: list[float] = field(default_factory=list)
    """Each router start (the first, then one per restart)."""


class EmbeddedFleet:
    """N vLLM replicas and a vllm-router in front of them, from start until stop.

    Use it as a context manager (``with EmbeddedFleet(FleetConfig()) as fleet:``) or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(self, config: FleetConfig | None = None) -> None:
        """Prepare, without starting anything.

        Args:
            config: How to run the fleet; ``None`` means ``FleetConfig()``.
        """
        self.config = config if config is not None else FleetConfig()
        self.replicas: list[ReplicaEngine] = []
        """The replicas, in start order (filled by :meth:`start`)."""
        self.timings = FleetTimings()
        """Start-up times."""
        self._router: RouterProcess | None = None
        self._router_port: int | None = None
        self._prometheus_port: int | None = None
        self._socket_dir: Path | None = None
        self._kv_endpoints: list[str] = []

    # ----- addresses -------------------------------------------------------------

    @property
    def router_url(self) -> str:
        """``http://127.0.0.1:PORT``: the router's root (``/workers``, ``/list_workers``, ``/health``)."""
        if self._router_port is None:
            raise EngineError("the fleet has not been started: call start() or use it in a `with` block")
        return f"http://{HOST}:{self._router_port}"

    @property
    def base_url(self) -> str:
        """The router's OpenAI API root (``.../v1``): what clients take as ``base_url``."""
        return f"{self.router_url}/v1"

    @property
    def router_metrics_url(self) -> str:
        """The router's own Prometheus page (``vllm_router_processed_requests_total{worker}``...)."""
        if self._prometheus_port is None:
            raise EngineError("the fleet has not been started: call start() or use it in a `with` block")
        return f"http://{HOST}:{self._prometheus_port}/metrics"

    @property
    def replica_urls(self) -> list[str]:
        """Each replica's root (``http://127.0.0.1:PORT``), as the router names its workers."""
        return [r.server_url for r in self.replicas]

    @property
    def replica_metrics_urls(self) -> list[str]:
        """Each replica's own ``/metrics``: the only place per-replica counters can be read."""
        return [r.metrics_url for r in self.replicas]

    @property
    def served_model_name(self) -> str:
        """The name clients send as ``model`` (every replica serves the same)."""
        return self.config.engine_config().resolved_served_model_name

    @property
    def policy(self) -> str:
        """The router's current policy."""
        return self._router.policy if self._router is not None else self.config.router

    @property
    def kv_event_endpoints(self) -> list[str]:
        """Each replica's KV-event endpoint (``ipc://...``; empty unless ``kv_events``)."""
        return list(self._kv_endpoints)

    @property
    def router_log_path(self) -> Path:
        """The router's log."""
        if self._router is None:
            raise EngineError("the router is not running")
        return self._router.process.log_path

    def is_running(self) -> bool:
        """Whether the router and every replica are alive."""
        router_alive = self._router is not None and self._router.process.is_running()
        return router_alive and bool(self.replicas) and all(r.is_running() for r in self.replicas)

    # ----- lifecycle -------------------------------------------------------------

    def start(self) -> EmbeddedFleet:
        """Start the replicas one after another, then the router; wait until it is ready.

        Returns:
            ``self``, serving.

        Raises:
            EngineError: vLLM or vllm-router is missing, memory is short, or a replica
                or the router did not come up; the message names the fix.
            ModelError: The model could not be prepared or found.
        """
        if self.replicas or self._router is not None:
            raise EngineError("the fleet is already running: stop() it first")
        check_router_installed()
        self._check_memory()
        atexit.register(self.stop)
        try:
            self._start_replicas()
            self._router_port = find_free_port()
            self._prometheus_port = find_free_port()
            self._start_router(self.config.router)
        except BaseException:
            # Ctrl-C during the minutes-long start: __exit__ will not run, so stop here.
            self.stop()
            raise
        return self

    def restart_router(self, policy: str, router_args: Sequence[str] | None = None) -> None:
        """Stop the router and start it again with another policy; the replicas stay up.

        The router keeps its ports, so :attr:`base_url` stays valid. The replicas' caches
        keep what earlier phases put there: give each phase its own prefix.

        Args:
            policy: One of :data:`POLICIES`.
            router_args: More router arguments (``None`` keeps the config's).

        Raises:
            ConfigError: ``policy`` is not one of :data:`POLICIES`.
            EngineError: The fleet is not running, or the router did not come back.
        """
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r} is not a vllm-router policy: use one of {', '.join(POLICIES)}")
        if not self.replicas:
            raise EngineError("the fleet has not been started: call start() first")
        self._stop_router()
        if router_args is not None:
            self.config = replace(self.config, router_args=tuple(router_args))
        try:
            self._start_router(policy)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the router, then every replica. Safe to call more than once."""
        atexit.unregister(self.stop)
        try:
            self._stop_router()
        finally:
            replicas, self.replicas = self.replicas, []
            for replica in reversed(replicas):
                replica.stop()
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
            self._kv_endpoints = []

    def __enter__(self) -> EmbeddedFleet:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- internals -------------------------------------------------------------

    def _check_memory(self) -> None:
        if not self.config.check_memory:
            return
        available = mem_available_gib()
        need = self.config.memory_needed_gib
        if available is not None and available < need:
            raise EngineError(
                f"not enough memory for {self.config.replicas} replicas: they need about {need:.0f} GiB "
                f"({REPLICA_BASE_GIB:g} GiB each plus kv_cache_gib={self.config.kv_cache_gib}), and only "
                f"{available:.1f} GiB is available. Stop other engines, lower replicas or kv_cache_gib, or pass "
                "check_memory=false to try anyway"
            )

    def _cpu_binds(self) -> list[str] | None:
        if self.config.cpu_binds is not None:
            return list(self.config.cpu_binds)
        if not is_cpu_only():
            return None
        return split_cpus(sorted(os.sched_getaffinity(0)), self.config.replicas)

    def _start_replicas(self) -> None:
        base = self.config.engine_config()
        binds = self._cpu_binds()
        if self.config.kv_events:
            # A Unix socket path is capped at 107 bytes: keep the sockets in a short folder.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="echo_env-kv-"))
        for i in range(self.config.replicas):
            env = {"VLLM_CPU_OMP_THREADS_BIND": binds[i]} if binds is not None else {}
            cfg = base
            if self.config.kv_events:
                assert self._socket_dir is not None
                endpoint = f"ipc://{self._socket_dir}/replica-{i}.sock"
                self._kv_endpoints.append(endpoint)
                cfg = replace(base, extra_args=(*base.extra_args, "--kv-events-config", kv_events_config(endpoint)))
            replica = ReplicaEngine(cfg, env)
            started = time.perf_counter()
            try:
                replica.start()
            except EngineError as exc:
                first = str(exc).splitlines()[0]
                raise EngineError(
                    f"replica {i + 1} of {self.config.replicas} did not start: {first}\n"
                    + "\n".join(str(exc).splitlines()[1:])
                ) from None
            self.replicas.append(replica)
            self.timings.replicas_s.append(time.perf_counter() - started)

    def _start_router(self, policy: str) -> None:
        assert self._router_port is not None and self._prometheus_port is not None
        log = log_path(self.config.cache_dir or default_cache_dir(), f"router-{self._router_port}.log")
        cmd = router_command(
            self._router_port, self.replica_urls, policy, self._prometheus_port, self.config.router_args
        )
        started = time.perf_counter()
        try:
            process = ServerProcess(cmd, log, {**os.environ, "NO_COLOR": "1"})
        except OSError as exc:
            raise EngineError(f"cannot start vllm-router with {sys.executable}: {exc}") from exc
        self._router = RouterProcess(process, self._router_port, self._prometheus_port, policy)
        readiness = f"http://{HOST}:{self._router_port}/readiness"
        workers = len(self.replicas)
        timeout_s = self.config.router_timeout_s

        def failed(code: int | None) -> EngineError:
            if code is not None:
                return self._router_error(f"vllm-router exited during start-up (exit status {code})")
            return self._router_error(
                f"vllm-router did not report {workers} healthy workers at {readiness} within {timeout_s:.0f} s"
            )

        process.wait_ready(lambda: router_ready(readiness, workers), timeout_s, _ROUTER_POLL_S, failed)
        self.timings.router_s.append(time.perf_counter() - started)

    def _router_error(self, what: str) -> EngineError:
        assert self._router is not None
        router_log = self._router.process.log_path
        tail = self._router.process.tail().rstrip()
        lowered = tail.lower()
        if "address already in use" in lowered:
            fix = "another process took the router's port; start the fleet again"
        elif "no module named" in lowered:
            fix = ROUTER_INSTALL_HINT
        elif "invalid choice" in lowered:
            fix = f"check router_args against `vllm-router --help` (policies: {', '.join(POLICIES)})"
        else:
            fix = "read the router log below"
        self._stop_router()
        return EngineError(f"{what}. Fix: {fix}\nLog: {router_log}\n--- last lines ---\n{tail}")

    def _stop_router(self) -> None:
        router, self._router = self._router, None
        if router is None:
            return
        router.process.stop()
