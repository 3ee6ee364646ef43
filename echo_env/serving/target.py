"""The server a command talks to: the user's URL, or the embedded vLLM engine started for the run.

Every command (``test``, ``rollout``, the benchmarks) names its server with the same
:class:`ServerTarget` keys and opens it with :func:`open_target`, which starts the
embedded engine only when no ``base_url`` is given and always stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from echo_env.errors import ConfigError


@dataclass(frozen=True)
class ServerTarget:
    """Which server to use and how to reach it (``key=value`` on every command line)."""

    base_url: str | None = None
    """Your server's OpenAI API root; unset starts the embedded vLLM engine."""
    model_name: str | None = None
    """Served model name (your server), or the model the embedded engine serves."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token for your server (never written anywhere); unset reads ``OPENAI_API_KEY``."""
    metrics_url: str | None = None
    """Prometheus endpoint; default ``<server>/metrics``; ``none`` runs without counters."""
    block_size: int | None = None
    """Cache unit in tokens when the server does not say (vLLM CPU 128, GPU 16; llama.cpp 1)."""
    timeout_s: float = 600.0
    """Per-request limit (a burst of uncached prompts on a CPU takes minutes)."""
    max_concurrency: int = 1024
    """Requests in flight at once."""

    def __post_init__(self) -> None:
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"base_url={self.base_url!r} is not an http(s) URL: e.g. base_url=http://127.0.0.1:8000/v1"
            )
        if self.metrics_url not in (None, "none") and not str(self.metrics_url).startswith(("http://", "https://")):
            raise ConfigError(
                f"metrics_url={self.metrics_url!r} is not an http(s) URL: e.g. metrics_url=http://127.0.0.1:8000/metrics"
                " (or metrics_url=none)"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}: e.g. timeout_s=600")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {self.max_concurrency}")

    @property
    def resolved_api_key(self) -> str | None:
        """The key in effect: the configured one, else ``OPENAI_API_KEY``."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or None


@dataclass(frozen=True)
class OpenServer:
    """A server ready for requests."""

    base_url: str
    """Its OpenAI API root."""
    model: str | None
    """The model to ask for (None: the first it serves)."""
    embedded: bool
    """Whether this process started it (and will stop it)."""
    tokenizer_source: str | None = None
    """Where a local tokenizer of its model is (the embedded model's folder)."""


@contextlib.contextmanager
def open_target(
    target: ServerTarget,
    *,
    caching: bool = True,
    baseline_url: str | None = None,
    dev_mode: bool = False,
    announce: bool = True,
) -> Iterator[OpenServer]:
    """The user's server, or an embedded vLLM engine for the length of the ``with`` block.

    Args:
        target: The server keys.
        caching: For the embedded engine: prefix caching on or off. For your own server,
            False means the cache-off baseline at ``baseline_url``.
        baseline_url: Your second server, started without prefix caching.
        dev_mode: Embedded engine only: enable ``POST /reset_prefix_cache``.
        announce: Print a line to stderr before an engine starts (it takes a minute).

    Raises:
        ConfigError: ``caching=False`` on your own server without ``baseline_url``.
        EngineError, ModelError: The embedded engine could not start.
    """
    if target.base_url is not None:
        if caching:
            yield OpenServer(target.base_url, target.model_name, embedded=False)
            return
        if baseline_url is None:
            raise ConfigError(
                "comparing without cache on your own server needs baseline_url= (a second server started with "
                "--no-enable-prefix-caching)"
            )
        yield OpenServer(baseline_url, target.model_name, embedded=False)
        return
    from echo_env.serving.engine import EmbeddedEngine, EngineConfig

    if announce:
        state = "on" if caching else "off"
        print(
            f"starting the embedded vLLM engine, prefix caching {state} (about a minute on a CPU)...", file=sys.stderr
        )
    with EmbeddedEngine(EngineConfig(model=target.model_name, prefix_caching=caching, dev_mode=dev_mode)) as engine:
        yield OpenServer(
            engine.base_url, engine.served_model_name, embedded=True, tokenizer_source=target.model_name or "default"
        )
