"""The server a command talks to: the user's URL, or the embedded vLLM engine (or fleet) started for the run.

Every command (``test``, ``rollout``, the benchmarks) names its server with the same
:class:`ServerTarget` keys and opens it with :func:`open_target`, which starts the
embedded engine only when no ``base_url`` is given (``replicas=2`` and up: a fleet of
engines behind vllm-router) and always stops what it started.

A fleet is named by its router (``base_url``) and its replicas' roots (``replica_urls``):
the router answers requests, each replica's own ``/metrics`` answers for that replica
(through the router, ``GET /metrics`` reaches one replica per call). With
``prometheus_url`` the replicas' counters are read through a Prometheus server that
scrapes them instead; ``prometheus_url=embedded`` starts one for the run.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from echo_env.errors import ConfigError
from echo_env.launch.fleet import POLICIES as ROUTER_POLICIES
from echo_env.wire.client_config import ClientConfig

PROMETHEUS_EMBEDDED = "embedded"
"""The ``prometheus_url`` value that starts a Prometheus scraping the replicas for the run."""


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
    replicas: int = 1
    """Embedded vLLM replicas; 2 or more start a fleet behind vllm-router (about 5.5 GB each)."""
    router: str | None = None
    """The embedded fleet's vllm-router policy (round_robin, cache_aware, consistent_hash...; default round_robin)."""
    replica_urls: tuple[str, ...] = ()
    """Your fleet's replicas (their roots, ``http://HOST:PORT``), read one by one; base_url is the router."""
    prometheus_url: str | None = None
    """A Prometheus scraping the fleet's replicas (its root, ``http://HOST:9090``): their counters are read
    through its API, split by instance, instead of from each replica's /metrics; ``embedded`` starts one
    (Debian's ``prometheus``, fetched once) scraping the replicas every second, for the length of the run."""

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
        self._check_fleet()

    def _check_fleet(self) -> None:
        if isinstance(self.replica_urls, str):
            object.__setattr__(self, "replica_urls", (self.replica_urls,))
        urls = tuple(replica_root(u) for u in self.replica_urls)
        object.__setattr__(self, "replica_urls", urls)
        if self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas}: give at least 1 (replicas=2 starts a fleet of two)")
        if self.router is not None:
            check_policy(self.router)
            if self.base_url is not None:
                raise ConfigError(
                    f"router={self.router} picks the policy of the embedded fleet's router: your router at base_url "
                    "keeps its own policy; drop router="
                )
            if self.replicas < 2:
                raise ConfigError(f"router={self.router} needs a fleet: add replicas=2 (or more)")
        if self.replicas > 1 and self.base_url is not None:
            raise ConfigError(
                f"replicas={self.replicas} starts an embedded fleet, but base_url is set: for your own fleet give "
                "base_url=ROUTER/v1 replica_urls=http://REPLICA1:PORT,http://REPLICA2:PORT and drop replicas="
            )
        if urls and self.base_url is None:
            raise ConfigError(
                "replica_urls= names your fleet's replicas: set base_url= to its router too "
                "(base_url=http://ROUTER:PORT/v1), or drop replica_urls= and use replicas=2 for an embedded fleet"
            )
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"replica_urls has {url!r}, not an http(s) URL: give each replica's root, e.g. "
                    "replica_urls=http://10.0.0.1:8000,http://10.0.0.2:8000"
                )
        if len(set(urls)) != len(urls):
            raise ConfigError(f"replica_urls lists a replica twice ({', '.join(urls)}): give each once")
        if urls and self.metrics_url not in (None, "none"):
            raise ConfigError(
                "metrics_url= is one server's page, but replica_urls= reads each replica's own /metrics: drop "
                "metrics_url="
            )
        self._check_prometheus()

    def _check_prometheus(self) -> None:
        url = self.prometheus_url
        if url is None:
            return
        example = "e.g. prometheus_url=http://127.0.0.1:9090"
        if url != PROMETHEUS_EMBEDDED and not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"prometheus_url={url!r} is not an http(s) URL: give the Prometheus server's root, {example} "
                f"(or prometheus_url={PROMETHEUS_EMBEDDED} to start one scraping the replicas)"
            )
        if not self.is_fleet:
            raise ConfigError(
                "prometheus_url= reads each replica's counters through Prometheus, so it needs the replicas: "
                "give base_url=http://ROUTER:PORT/v1 replica_urls=http://REPLICA1:PORT,http://REPLICA2:PORT "
                "(the instances Prometheus scrapes), or replicas=2 for an embedded fleet"
            )
        if self.metrics_url is not None:
            raise ConfigError(
                f"metrics_url={self.metrics_url} and prometheus_url= both say where counters come from: "
                "drop metrics_url= (prometheus_url= reads every replica's counters)"
            )
        if self.base_url is None and url != PROMETHEUS_EMBEDDED:
            raise ConfigError(
                f"prometheus_url={url} cannot scrape the embedded fleet: its replicas get free ports at start; "
                f"use prometheus_url={PROMETHEUS_EMBEDDED}"
            )

    @property
    def is_fleet(self) -> bool:
        """Whether the target is a fleet: an embedded one (replicas >= 2) or yours (replica_urls)."""
        return self.replicas > 1 or bool(self.replica_urls)

    @property
    def policy(self) -> str:
        """The embedded fleet's router policy (round_robin unless router= says otherwise)."""
        return self.router or "round_robin"

    @property
    def resolved_api_key(self) -> str | None:
        """The key in effect: the configured one, else ``OPENAI_API_KEY``."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or None

    def client_config(self, base_url: str, model: str | None) -> ClientConfig:
        """The LLM client's settings for the server at ``base_url``, opened from this target."""
        return ClientConfig(
            base_url=base_url,
            model=model,
            api_key=self.resolved_api_key,
            timeout_s=self.timeout_s,
            max_concurrency=self.max_concurrency,
        )


@dataclass(frozen=True)
class OpenServer:
    """A server ready for requests."""

    base_url: str
    """Its OpenAI API root."""
    model: str | None
    """The model to ask for (None: the first it serves)."""
    embedded: bool
    """Whether this process started it (and will stop it)."""
    client: ClientConfig
    """The LLM client's settings for it: its URL and model with the target's key, timeout and concurrency."""
    tokenizer_source: str | None = None
    """Where a local tokenizer of its model is (the embedded model's folder)."""
    replica_urls: tuple[str, ...] = ()
    """A fleet's replicas (their roots); empty for one server."""
    policy: str | None = None
    """The router's policy, when known (the embedded fleet's)."""
    prometheus_url: str | None = None
    """A Prometheus scraping the replicas, to read their counters through (None: their own /metrics)."""


def check_policy(policy: str) -> None:
    """Raise a :class:`ConfigError` naming the closest policy when ``policy`` is not vllm-router's."""
    if policy in ROUTER_POLICIES:
        return
    close = difflib.get_close_matches(policy, ROUTER_POLICIES, n=1)
    hint = f" (did you mean router={close[0]}?)" if close else ""
    raise ConfigError(f"router={policy!r} is not a vllm-router policy{hint}: use one of {', '.join(ROUTER_POLICIES)}")


def replica_root(url: str) -> str:
    """A replica's root as routers name it: ``http://h:p/v1/`` -> ``http://h:p``."""
    return url.strip().rstrip("/").removesuffix("/v1").removesuffix("/metrics")


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
        EngineError, ModelError: The embedded engine (or the embedded Prometheus) could not start.
    """
    if target.replicas > 1:  # an embedded fleet (ServerTarget refuses replicas with base_url)
        with _open_fleet(target, caching=caching, dev_mode=dev_mode, announce=announce) as server:
            yield server
        return
    if target.base_url is not None:
        if caching:
            with _prometheus_for(target.prometheus_url, target.replica_urls, announce) as prometheus_url:
                yield OpenServer(
                    target.base_url, target.model_name, embedded=False,
                    client=target.client_config(target.base_url, target.model_name),
                    replica_urls=target.replica_urls, prometheus_url=prometheus_url,
                )  # fmt: skip
            return
        if baseline_url is None:
            raise ConfigError(
                "comparing without cache on your own server needs baseline_url= (a second server started with "
                "--no-enable-prefix-caching)"
            )
        client = target.client_config(baseline_url, target.model_name)
        yield OpenServer(baseline_url, target.model_name, embedded=False, client=client)
        return
    from echo_env.launch.engine import EmbeddedEngine, EngineConfig

    if announce:
        state = "on" if caching else "off"
        print(
            f"starting the embedded vLLM engine, prefix caching {state} (about a minute on a CPU)...", file=sys.stderr
        )
    with EmbeddedEngine(EngineConfig(model=target.model_name, prefix_caching=caching, dev_mode=dev_mode)) as engine:
        yield OpenServer(
            engine.base_url, engine.served_model_name, embedded=True,
            client=target.client_config(engine.base_url, engine.served_model_name),
            tokenizer_source=target.model_name or "default",
        )  # fmt: skip


@contextlib.contextmanager
def _open_fleet(target: ServerTarget, *, caching: bool, dev_mode: bool, announce: bool) -> Iterator[OpenServer]:
    """An embedded fleet (``replicas`` engines behind vllm-router) for the length of the ``with`` block."""
    from echo_env.launch.fleet import EmbeddedFleet, FleetConfig

    config = FleetConfig(
        replicas=target.replicas, router=target.policy, model=target.model_name, prefix_caching=caching,
        dev_mode=dev_mode,
    )  # fmt: skip
    if announce:
        state = "on" if caching else "off"
        print(
            f"starting {target.replicas} vLLM replicas (one after another, prefix caching {state}) and vllm-router "
            f"({target.policy}); about a minute per replica on a CPU...",
            file=sys.stderr,
        )
    with EmbeddedFleet(config) as fleet, _prometheus_for(target.prometheus_url, fleet.replica_urls, announce) as prom:
        yield OpenServer(
            fleet.base_url, fleet.served_model_name, embedded=True,
            client=target.client_config(fleet.base_url, fleet.served_model_name),
            tokenizer_source=target.model_name or "default", replica_urls=tuple(fleet.replica_urls),
            policy=fleet.policy, prometheus_url=prom,
        )  # fmt: skip


@contextlib.contextmanager
def _prometheus_for(prometheus_url: str | None, replica_urls: Sequence[str], announce: bool) -> Iterator[str | None]:
    """The Prometheus to read the replicas through: the user's, or one started here (``embedded``), or None."""
    if prometheus_url != PROMETHEUS_EMBEDDED:
        yield prometheus_url
        return
    from echo_env.launch.prometheus_server import EmbeddedPrometheus

    if announce:
        print(f"starting Prometheus, scraping {len(replica_urls)} replicas every second...", file=sys.stderr)
    with EmbeddedPrometheus(replica_urls, scrape_interval_s=1.0) as prometheus:
        yield prometheus.url
