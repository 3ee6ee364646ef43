"""vLLM: ``/tokenize`` and ``/detokenize`` at the root, block-granular cache, ``vllm:`` counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from echo_env.wire.counters import CacheCounters, read_counters
from echo_env.wire.kinds import CacheGranularity, Prompt, ServerProps
from echo_env.wire.metrics_text import Sample


class VllmKind:
    """The vLLM OpenAI-compatible server (``vllm serve`` / ``vllm.entrypoints.openai.api_server``)."""

    name = "vllm"

    def tokenize_request(self, model: str, prompt: Prompt) -> tuple[str, dict[str, Any]] | None:
        if isinstance(prompt, str):
            return "/tokenize", {"model": model, "prompt": prompt}
        return "/tokenize", {"model": model, "messages": list(prompt), "add_generation_prompt": True}

    def parse_tokenize(self, body: Any) -> list[int]:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"no token ids in the /tokenize answer: {str(body)[:120]!r}")
        return [int(t) for t in tokens]

    def detokenize_request(self, model: str, ids: Sequence[int]) -> tuple[str, dict[str, Any]] | None:
        return "/detokenize", {"model": model, "tokens": list(ids)}

    def parse_detokenize(self, body: Any) -> str:
        if isinstance(body, dict) and isinstance(body.get("prompt"), str):
            return str(body["prompt"])
        raise ValueError(f"no text in the /detokenize answer: {str(body)[:120]!r}")

    def read_counters(self, samples: Sequence[Sample], model_name: str | None) -> CacheCounters:
        return read_counters(samples, model_name)

    def granularity(self, props: ServerProps) -> CacheGranularity | None:
        cfg = props.cache_config
        if cfg is None:
            return None
        if cfg.hit_alignment_tokens:
            # Hybrid models (sliding-window or Mamba layers) hit in larger steps than a block.
            return CacheGranularity(cfg.hit_alignment_tokens, "vllm:cache_config_info cache_hit_alignment_tokens")
        if cfg.block_size:
            return CacheGranularity(cfg.block_size, "vllm:cache_config_info block_size")
        return None

    def caching_disabled_fix(self) -> str:
        return "start vLLM with --enable-prefix-caching"

    def no_counters_fix(self) -> str:
        return (
            "expose vLLM's /metrics (or pass metrics_url=), or start vLLM with --enable-prompt-tokens-details so "
            "responses carry cached_tokens"
        )
