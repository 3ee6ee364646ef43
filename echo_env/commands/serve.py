"""``echo-prefix serve``: the embedded vLLM engine, or a fleet of replicas behind vllm-router, until Ctrl-C."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

from echo_env.commands.common import setup_logging
from echo_env.errors import ConfigError
from echo_env.launch.target import ServerTarget


@dataclass(frozen=True)
class ServeConfig:
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
        ServerTarget(replicas=self.replicas, router=self.router)
        if self.replicas > 1 and self.port is not None:
            raise ConfigError("port= is the single engine's: a fleet picks free ports for its router and replicas")


Config = ServeConfig
"""The command's settings (``echo-prefix serve --help`` lists them)."""


def command(config: ServeConfig) -> int:
    """``echo-prefix serve``: the engine (or fleet) in the foreground until Ctrl-C."""
    from echo_env.launch.engine import EngineConfig, serve_forever

    setup_logging(config.debug)
    if config.replicas > 1:
        return _serve_fleet(config)
    fields = asdict(config)
    for key in ("debug", "replicas", "router"):
        fields.pop(key)
    fields["model"] = fields.pop("model_name")
    fields["kv_cache_gib"] = 2 if config.kv_cache_gib is None else config.kv_cache_gib
    return serve_forever(EngineConfig(**fields))


def _serve_fleet(config: ServeConfig) -> int:
    """The fleet in the foreground, its addresses printed, until Ctrl-C."""
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
