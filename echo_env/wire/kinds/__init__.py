"""Server kinds: what differs between vLLM, SGLang and llama.cpp, each in one adapter.

Each kind knows its own request shapes for tokenizing and detokenizing, the names of
its prefix-cache counters on ``/metrics``, how finely its cache reuses a prefix (vLLM:
blocks, SGLang: pages, llama.cpp: single tokens within a slot), and the flags that turn
caching or metrics on. Nothing outside this package branches on the server's name.

:func:`detect` asks the server what it is, from what it exposes (``/version``,
``/props``, ``/get_server_info``, the metric names), and returns the adapter together
with the facts it read (:class:`ServerProps`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from echo_env.wire.counters import CacheConfig, CacheCounters
from echo_env.wire.metrics_text import Sample

Prompt = str | Sequence[Mapping[str, str]]
"""A completion prompt (text) or chat messages."""

MIN_PLAUSIBLE_CHARS_PER_TOKEN = 0.5
"""Fewer characters per token than this (or none at all) means the tokenization is broken."""
MAX_PLAUSIBLE_CHARS_PER_TOKEN = 12.0
"""More characters per token than this means the server ignored most of the text."""


@dataclass(frozen=True)
class CacheGranularity:
    """How finely a server's prefix cache can reuse a prompt."""

    unit_tokens: int
    """Hits are whole multiples of this many tokens (vLLM block or hit alignment, SGLang page, 1 for llama.cpp)."""
    source: str
    """Where the figure comes from, for the report (``vllm:cache_config_info block_size``, ``block_size= key``)."""
    slots: int | None = None
    """llama.cpp: parallel slots, each with a cache of its own; None for one cache shared by all requests."""


@dataclass
class ServerProps:
    """What a server said about itself when asked."""

    version: str | None = None
    """The server's version, where it says."""
    prefix_caching_enabled: bool | None = None
    """Whether the server says caching is on (None: it does not say)."""
    cache_config: CacheConfig | None = None
    """vLLM's ``vllm:cache_config_info`` labels, when the metrics page has them."""
    page_size: int | None = None
    """SGLang's ``page_size`` from ``/get_server_info``."""
    slots: int | None = None
    """llama.cpp's ``total_slots`` from ``/props``."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Anything else read, by endpoint, for the report and for debugging."""


class ServerKind(Protocol):
    """The adapter of one kind of server. Implementations are stateless."""

    name: str
    """``vllm``, ``sglang``, ``llamacpp`` or ``openai`` (anything else OpenAI-compatible)."""

    def tokenize_request(self, model: str, prompt: Prompt) -> tuple[str, dict[str, Any]] | None:
        """The path (from the root) and JSON body that tokenize ``prompt`` as a request would; None: not offered."""
        ...

    def parse_tokenize(self, body: Any) -> list[int]:
        """The token ids in a tokenize answer. Raises ValueError when the answer has none."""
        ...

    def detokenize_request(self, model: str, ids: Sequence[int]) -> tuple[str, dict[str, Any]] | None:
        """The path and body that turn ``ids`` back into text; None: not offered."""
        ...

    def parse_detokenize(self, body: Any) -> str:
        """The text in a detokenize answer. Raises ValueError when there is none."""
        ...

    def read_counters(self, samples: Sequence[Sample], model_name: str | None) -> CacheCounters:
        """The prefix-cache counters on a parsed ``/metrics`` page (``source`` "none" when absent)."""
        ...

    def granularity(self, props: ServerProps) -> CacheGranularity | None:
        """The cache's reuse granularity from what the server said; None when it does not say."""
        ...

    def caching_disabled_fix(self) -> str:
        """How to turn prefix caching on, for a FAIL that says it is off."""
        ...

    def no_counters_fix(self) -> str:
        """How to make the server expose hit counters or per-request cached tokens."""
        ...


def plausible_tokenization(text_chars: int, ids: Sequence[int]) -> bool:
    """Whether ``ids`` can be the tokenization of ``text_chars`` characters of text.

    An empty list for a 2 KB prompt (llama.cpp answering a body it does not read) or a
    handful of ids is an error to fall back from, never evidence about the prefix.
    """
    if not ids:
        return False
    ratio = text_chars / len(ids)
    return MIN_PLAUSIBLE_CHARS_PER_TOKEN <= ratio <= MAX_PLAUSIBLE_CHARS_PER_TOKEN
