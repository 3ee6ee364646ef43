"""llama.cpp's ``llama-server``: per-slot, per-token prompt cache, ``llamacpp:`` counters.

What this adapter relies on, measured on llama-server built from llama-cpp-python 0.3.36's
vendored llama.cpp (Gemma 3 270M Q4_K_M, ``-np 4 -c 16384 --metrics``):

- ``POST /tokenize`` reads ``{"content": text}``; a body with ``prompt`` instead gets
  ``200 {"tokens": []}``. With ``"add_special": true`` the ids are exactly those a
  ``/v1/completions`` request with that prompt uses, ``<bos>`` included (its length equals
  ``usage.prompt_tokens``); without it, ``<bos>`` is missing.
- ``POST /apply-template`` turns chat messages into the prompt text the chat endpoint
  tokenizes; that text through ``/tokenize`` (``add_special``) gave exactly
  ``usage.prompt_tokens`` of the chat request (45 and 45). Two requests are more than the
  one-request tokenize shape of :class:`~echo_env.wire.kinds.ServerKind` expresses, so
  :meth:`LlamaCppKind.tokenize_request` returns None for chat and
  :func:`apply_template_request` gives the first step. The default GGUF has no chat
  template: llama-server falls back to ChatML (``<|im_start|>user``), not Gemma's turns.
- ``POST /detokenize`` takes ``{"tokens": [...]}`` and answers ``{"content": text}``.
- ``/metrics`` exists only with ``--metrics`` (else ``501``). ``llamacpp:prompt_tokens_total``
  counts prompt tokens COMPUTED (cached ones excluded, as its HELP text says) and
  ``llamacpp:prompt_tokens_cached_total`` the tokens reused from a slot's cache, so every
  prompt token is in exactly one of them and queries are their sum. Measured: a 500-token
  prompt sent twice to a fresh server moved them by +500 computed / +0 cached, then by
  +5 / +495; a burst of eight 503-token prompts after a cold one, +1537 / +2487 (three
  requests missed); the same burst again, +40 / +3984. The page has no labels (one
  model), no request counter and no TTFT histogram; its source writes values with the
  C++ stream default of six significant digits (``1.23457e+06``), so past a million
  tokens counter deltas are rounded.
- Hits: ``usage.prompt_tokens_details.cached_tokens`` equals ``timings.cache_n`` and the
  counter delta. At most ``P - 1`` (the last token is computed again for its logits),
  and without ``--swa-full`` a few tokens less: Gemma 3's sliding-window cache can only be
  rolled back to a checkpoint (a repeated 500-token prompt hit 495; with ``--swa-full``
  499). Each slot caches only its own last request: with ``-np 4``, a burst after one
  cold request missed in the 3 empty slots and hit in the rest; a burst of 3 (2x2 agents)
  hit in 1 of 3. A request takes the idle slot whose prompt shares the largest fraction
  with it (over ``--slot-prompt-similarity``, 0.1), else the least recently used one, so a
  burst's first wave misses ``min(burst, slots) - 1`` times
  (:func:`echo_env.measure.tokens.slot_cold_requests`).
- ``/props`` has ``total_slots``, ``build_info``, ``model_path``, ``endpoint_metrics`` and
  ``default_generation_settings``; it does not say whether ``--no-cache-prompt`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from echo_env.wire.counters import CacheCounters
from echo_env.wire.kinds import CacheGranularity, Prompt, ServerProps
from echo_env.wire.metrics_text import Sample

PROMPT_TOKENS = "llamacpp:prompt_tokens_total"
"""Prompt tokens computed (cache hits excluded)."""
CACHED_TOKENS = "llamacpp:prompt_tokens_cached_total"
"""Prompt tokens reused from a slot's cache."""

METRICS_FLAG_HINT = (
    "llama-server answers 501 on /metrics when started without --metrics: restart it with --metrics "
    "(or pass metrics_url=none to run without server counters)"
)
"""What a 501 from llama-server's ``/metrics`` means, and the fix."""

_PROPS_KEYS = ("total_slots", "default_generation_settings", "build_info", "model_path")


def detect_llamacpp(props_json: Any) -> bool:
    """Whether a ``GET /props`` answer comes from llama.cpp's server.

    Args:
        props_json: The decoded JSON body of ``/props``.

    Returns:
        True when it holds ``total_slots`` and one other key only llama-server writes
        (``default_generation_settings``, ``build_info``, ``model_path``).
    """
    if not isinstance(props_json, Mapping) or not isinstance(props_json.get("total_slots"), int):
        return False
    return any(key in props_json for key in _PROPS_KEYS[1:])


def read_props(props_json: Mapping[str, Any]) -> ServerProps:
    """What llama-server says about itself in ``/props``.

    Args:
        props_json: The decoded JSON body of ``/props``.

    Returns:
        Slots (``total_slots``), version (``build_info``) and, when the default
        generation settings carry ``cache_prompt``, whether caching is on for requests
        that do not say. The whole answer is kept under ``raw["props"]``.
    """
    slots = props_json.get("total_slots")
    version = props_json.get("build_info")
    settings = props_json.get("default_generation_settings")
    params = settings.get("params") if isinstance(settings, Mapping) else None
    cache_prompt: Any = None
    for where in (params, settings):
        if isinstance(where, Mapping) and isinstance(where.get("cache_prompt"), bool):
            cache_prompt = where["cache_prompt"]
            break
    return ServerProps(
        version=str(version) if version else None,
        prefix_caching_enabled=cache_prompt,
        slots=slots if isinstance(slots, int) and slots > 0 else None,
        raw={"props": dict(props_json)},
    )


def metrics_status_hint(status: int) -> str | None:
    """What an HTTP status from llama-server's ``/metrics`` means, when it means something.

    Args:
        status: The status code of ``GET /metrics``.

    Returns:
        The message naming the fix for 501 (``--metrics`` missing); None otherwise.
    """
    return METRICS_FLAG_HINT if status == 501 else None


def apply_template_request(messages: Sequence[Mapping[str, str]]) -> tuple[str, dict[str, Any]]:
    """The path and body that turn chat messages into the server's prompt text.

    Tokenizing a chat prompt exactly as llama-server does takes two requests: this one,
    then :meth:`LlamaCppKind.tokenize_request` on the returned text.

    Args:
        messages: The chat messages.

    Returns:
        ``("/apply-template", {"messages": [...]})``.
    """
    return "/apply-template", {"messages": [dict(m) for m in messages]}


def parse_apply_template(body: Any) -> str:
    """The prompt text in an ``/apply-template`` answer. Raises ValueError when there is none."""
    if isinstance(body, Mapping) and isinstance(body.get("prompt"), str) and body["prompt"]:
        return str(body["prompt"])
    raise ValueError(f"no prompt in the /apply-template answer: {str(body)[:120]!r}")


def _counter(samples: Sequence[Sample], name: str) -> float | None:
    # Unlabelled, one series each; summed in case a proxy merges several servers' pages.
    values = [s.value for s in samples if s.name == name]
    return sum(values) if values else None


class LlamaCppKind:
    """llama.cpp's ``llama-server``."""

    name = "llamacpp"

    def tokenize_request(self, model: str, prompt: Prompt) -> tuple[str, dict[str, Any]] | None:
        if not isinstance(prompt, str):
            return None  # chat: needs /apply-template first (apply_template_request)
        # add_special adds <bos> as /v1/completions does; parse_special reads "<bos>"
        # written in the text as the special token, also as /v1/completions does.
        return "/tokenize", {"content": prompt, "add_special": True, "parse_special": True}

    def parse_tokenize(self, body: Any) -> list[int]:
        tokens = body.get("tokens") if isinstance(body, Mapping) else None
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"no token ids in the /tokenize answer: {str(body)[:120]!r}")
        ids: list[int] = []
        for token in tokens:
            # with_pieces=true answers [{"id": 2, "piece": "<bos>"}, ...]
            value = token.get("id") if isinstance(token, Mapping) else token
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"a token in the /tokenize answer is not an id: {str(token)[:60]!r}")
            ids.append(value)
        return ids

    def detokenize_request(self, model: str, ids: Sequence[int]) -> tuple[str, dict[str, Any]] | None:
        return "/detokenize", {"tokens": [int(i) for i in ids]}

    def parse_detokenize(self, body: Any) -> str:
        if isinstance(body, Mapping) and isinstance(body.get("content"), str):
            return str(body["content"])
        raise ValueError(f"no text in the /detokenize answer: {str(body)[:120]!r}")

    def read_counters(self, samples: Sequence[Sample], model_name: str | None) -> CacheCounters:
        # One model per server and no labels: model_name selects nothing.
        computed = _counter(samples, PROMPT_TOKENS)
        cached = _counter(samples, CACHED_TOKENS)
        if computed is None or cached is None:
            return CacheCounters(source="none", prompt_tokens=computed, cached_prompt_tokens=cached)
        total = computed + cached
        return CacheCounters(
            source="llamacpp",
            queries=total,
            hits=cached,
            prompt_tokens=total,
            cached_prompt_tokens=cached,
        )

    def granularity(self, props: ServerProps) -> CacheGranularity | None:
        source = "llama.cpp per-token slot cache" + (" (/props total_slots)" if props.slots else "")
        return CacheGranularity(unit_tokens=1, source=source, slots=props.slots)

    def caching_disabled_fix(self) -> str:
        return 'start llama-server without --no-cache-prompt (and do not send "cache_prompt": false in requests)'

    def no_counters_fix(self) -> str:
        return (
            "start llama-server with --metrics (its /metrics answers 501 without it); responses carry "
            "usage.prompt_tokens_details.cached_tokens and timings.cache_n either way"
        )
