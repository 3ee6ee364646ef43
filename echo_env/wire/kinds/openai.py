"""Any other OpenAI-compatible server: vLLM's request shapes tried first, nothing assumed about its cache."""

from __future__ import annotations

from echo_env.wire.kinds import CacheGranularity, ServerProps
from echo_env.wire.kinds.vllm import VllmKind


class OpenAIKind(VllmKind):
    """A server that says nothing about itself beyond the OpenAI API (a proxy, a hosted endpoint).

    Many such servers are vLLM behind a proxy that hides ``/version``, so its tokenize
    shapes are tried; an answer that is missing or implausible falls back to a local
    tokenizer. Its cache granularity is never guessed.
    """

    name = "openai"

    def granularity(self, props: ServerProps) -> CacheGranularity | None:
        return None

    def caching_disabled_fix(self) -> str:
        return "turn on the server's prefix caching"

    def no_counters_fix(self) -> str:
        return "expose Prometheus counters (metrics_url=) or usage.prompt_tokens_details.cached_tokens in responses"
