"""The vLLM project's router in front of an embedded fleet: its policies, command line and readiness.

:class:`~echo_env.launch.fleet.EmbeddedFleet` starts the router with :func:`router_command`
after :func:`check_router_installed`, and polls :func:`router_ready` until every replica is
healthy behind it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from echo_env.errors import EchoEnvError, EngineError
from echo_env.launch.process import HOST, ServerProcess
from echo_env.wire import http

__all__ = [
    "POLICIES",
    "ROUTER_INSTALL_HINT",
    "RouterProcess",
    "check_router_installed",
    "router_command",
    "router_ready",
]

POLICIES = ("round_robin", "random", "cache_aware", "consistent_hash", "power_of_two", "sticky_least_loaded")
"""The router policies a fleet accepts (vllm-router 0.1.17 also has ``kv_aware``, which needs KV-event sources)."""

ROUTER_INSTALL_HINT = "pip install vllm-router==0.1.17 (or pip install 'echo-prefix-env[fleet]')"
"""How to install the router."""


def check_router_installed() -> None:
    """Make sure ``vllm-router`` can be started from this Python.

    Raises:
        EngineError: It is missing, naming how to install it.
    """
    try:
        found = importlib.util.find_spec("vllm_router") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EngineError(f"vllm-router is not installed in {sys.executable}: {ROUTER_INSTALL_HINT}")


def router_command(
    port: int, worker_urls: Sequence[str], policy: str, prometheus_port: int, extra: Sequence[str] = ()
) -> list[str]:
    """The router's command line (this Python running ``vllm_router.launch_router``).

    Args:
        port: Its serving port on 127.0.0.1.
        worker_urls: The replicas' roots (``http://127.0.0.1:PORT``).
        policy: One of :data:`POLICIES`.
        prometheus_port: Where its own metrics go (on 127.0.0.1).
        extra: More arguments, appended last.

    Returns:
        The argument list.
    """
    return [
        sys.executable, "-m", "vllm_router.launch_router",
        "--host", HOST, "--port", str(port),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--prometheus-host", HOST, "--prometheus-port", str(prometheus_port),
        *extra,
    ]  # fmt: skip


@dataclass
class RouterProcess:
    """The router process and where it listens."""

    process: ServerProcess
    port: int
    prometheus_port: int
    policy: str


def router_ready(url: str, workers: int) -> bool:
    """Whether the router at ``url`` (its readiness path) answers 200 with at least ``workers`` healthy workers."""
    try:
        response = http.get(url, timeout_s=http.HEALTH_TIMEOUT_S, follow_redirects=True)
        if response.status_code != 200:
            return False
        body = json.loads(response.content or b"{}")
    except (EchoEnvError, ValueError):
        return False
    healthy = body.get("healthy_workers") if isinstance(body, dict) else None
    return healthy is None or int(healthy) >= workers
