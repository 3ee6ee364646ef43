"""SGLang: a radix-tree cache reusing pages (``--page-size``, default 1 token), ``sglang:`` counters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from echo_env.wire.counters import CacheCounters, read_counters
from echo_env.wire.kinds import CacheGranularity, Prompt, ServerProps
from echo_env.wire.kinds.vllm import VllmKind
from echo_env.wire.metrics_text import Sample


class SglangKind:
    """The SGLang server (``python -m sglang.launch_server``)."""

    name = "sglang"

    def tokenize_request(self, model: str, prompt: Prompt) -> tuple[str, dict[str, Any]] | None:
        if not isinstance(prompt, str):
            return None  # its /tokenize takes text only; chat prompts go to the local tokenizer
        return "/tokenize", {"model": model, "prompt": prompt, "add_special_tokens": True}

    # SGLang's /tokenize and /detokenize follow vLLM's shapes.
    parse_tokenize = VllmKind.parse_tokenize
    detokenize_request = VllmKind.detokenize_request

    def parse_detokenize(self, body: Any) -> str:
        if isinstance(body, dict):
            for key in ("text", "prompt"):
                if isinstance(body.get(key), str):
                    return str(body[key])
        raise ValueError(f"no text in the /detokenize answer: {str(body)[:120]!r}")

    def read_counters(self, samples: Sequence[Sample], model_name: str | None) -> CacheCounters:
        return read_counters(samples, model_name)

    def granularity(self, props: ServerProps) -> CacheGranularity | None:
        if props.page_size:
            return CacheGranularity(props.page_size, "SGLang /get_server_info page_size")
        return None

    def caching_disabled_fix(self) -> str:
        return "start SGLang without --disable-radix-cache"

    def no_counters_fix(self) -> str:
        return "start SGLang with --enable-metrics (counters) or --enable-cache-report (cached_tokens in responses)"
