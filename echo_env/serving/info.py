"""What the server says about itself, and its prompts tokenized as it sees them.

vLLM answers ``GET /version``, ``POST /tokenize`` and ``POST /detokenize`` at its root;
other servers may not, so every answer here can be "unknown", and tokenization falls
back to a local ``transformers`` tokenizer of the served model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from echo_env.errors import MetricsError
from echo_env.serving.metrics import MetricsReader
from echo_env.measure.tokens import Tokenizer, encode_prompts

log = logging.getLogger(__name__)


def server_root(base_url: str) -> str:
    """The server's root URL: ``http://host:port/v1`` -> ``http://host:port``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass
class ServerFacts:
    """What is known about the server under test."""

    base_url: str
    """The OpenAI API root."""
    metrics_url: str | None
    """Where its Prometheus counters are (None: not used)."""
    model: str
    """The served model name the requests use."""
    kind: str = "unknown"
    """``vllm``, ``sglang`` or ``unknown``."""
    version: str | None = None
    """The server's version, where it says."""
    prefix_caching_enabled: bool | None = None
    """From ``vllm:cache_config_info`` (None: the server does not say)."""
    block_size: int | None = None
    """Cache block size in tokens (None: unknown)."""
    embedded: bool = False
    """Whether this package started the server."""
    tokenized_by: str | None = None
    """``server`` (its /tokenize) or ``local`` (a transformers tokenizer), once used."""
    metrics_error: str | None = None
    """Why the metrics could not be read, if they could not."""
    api_key: str | None = field(default=None, repr=False)
    """Sent to the server; never written out (nor shown by ``repr``)."""
    tokenizer_source: str | None = None
    """Folder or hub id of a local tokenizer for the model (default: ``model``)."""

    @property
    def root(self) -> str:
        """The server's root URL."""
        return server_root(self.base_url)

    def to_json(self) -> dict[str, Any]:
        """The facts for the report (no API key)."""
        return {
            "base_url": self.base_url,
            "metrics_url": self.metrics_url,
            "kind": self.kind,
            "version": self.version,
            "model": self.model,
            "prefix_caching_enabled": self.prefix_caching_enabled,
            "block_size": self.block_size,
            "embedded": self.embedded,
            "metrics_error": self.metrics_error,
        }

    def tokenizer(self) -> Tokenizer:
        """A local tokenizer for the served model (the embedded model, a folder or a hub id)."""
        return _local_tokenizer(self.tokenizer_source or self.model)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text, for messages (best effort; ids as text if it fails)."""
        try:
            with httpx.Client(timeout=10) as http:
                resp = http.post(
                    f"{self.root}/detokenize", json={"model": self.model, "tokens": list(ids)}, headers=self._headers()
                )
            if resp.status_code == 200:
                return str(resp.json().get("prompt", ""))
        except (httpx.HTTPError, ValueError):
            pass
        try:
            return str(self.tokenizer().decode(list(ids)))  # type: ignore[attr-defined]
        except Exception:
            return " ".join(map(str, ids))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@functools.cache
def _local_tokenizer(model: str) -> Tokenizer:
    from echo_env.serving.model import load_tokenizer

    return load_tokenizer(model)  # type: ignore[no-any-return]


async def read_server_facts(
    base_url: str,
    model: str,
    metrics_url: str | None,
    *,
    embedded: bool = False,
    api_key: str | None = None,
) -> ServerFacts:
    """Ask the server for its version, cache configuration and block size.

    Args:
        base_url: The OpenAI API root.
        model: The served model name.
        metrics_url: Prometheus endpoint; None means ``<root>/metrics``; ``"none"`` skips it.
        embedded: Whether this package started the server.
        api_key: Bearer token.
    """
    root = server_root(base_url)
    url = None if metrics_url == "none" else (metrics_url or f"{root}/metrics")
    facts = ServerFacts(base_url=base_url, metrics_url=url, model=model, embedded=embedded, api_key=api_key)
    headers = facts._headers()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(f"{root}/version", headers=headers)
        if resp.status_code == 200 and "version" in resp.json():
            facts.version = str(resp.json()["version"])
            facts.kind = "vllm"
    except (httpx.HTTPError, ValueError):
        pass
    if url is not None:
        try:
            snap = await asyncio.to_thread(MetricsReader(url, model_name=model, api_key=api_key).snapshot)
            cfg = snap.cache_config
            facts.prefix_caching_enabled = cfg.prefix_caching_enabled
            facts.block_size = cfg.block_size
            source = snap.counters.source
            if source.startswith("vllm"):
                facts.kind = "vllm"
            elif source == "sglang":
                facts.kind = "sglang"
        except MetricsError as exc:
            facts.metrics_error = str(exc)
            log.warning("%s", exc)
    return facts


async def tokenize_prompts(
    facts: ServerFacts, prompts: Sequence[Any], *, api: str = "completions", api_key: str | None = None
) -> list[list[int]] | None:
    """Token ids of each prompt as the server builds them.

    Asks the server's ``/tokenize`` (vLLM) first, then a local tokenizer of the model.
    Identical prompts are tokenized once.

    Returns:
        The ids, or None when neither way works.
    """
    keys = [p if isinstance(p, str) else repr(p) for p in prompts]
    unique: dict[str, Any] = {}
    for key, prompt in zip(keys, prompts):
        unique.setdefault(key, prompt)
    ids = await _server_tokenize(facts, list(unique.values()), api)
    if ids is not None:
        facts.tokenized_by = "server"
    else:
        try:
            ids = encode_prompts(facts.tokenizer(), list(unique.values()))
            facts.tokenized_by = "local"
        except Exception as exc:
            log.warning("cannot tokenize the prompts (no /tokenize on the server, no local tokenizer): %s", exc)
            return None
    by_key = dict(zip(unique, ids))
    return [by_key[k] for k in keys]


async def _server_tokenize(facts: ServerFacts, prompts: Sequence[Any], api: str) -> list[list[int]] | None:
    sem = asyncio.Semaphore(32)

    async def one(http: httpx.AsyncClient, prompt: Any) -> list[int] | None:
        if isinstance(prompt, str):
            body: dict[str, Any] = {"model": facts.model, "prompt": prompt}
        else:
            body = {"model": facts.model, "messages": list(prompt), "add_generation_prompt": True}
        async with sem:
            resp = await http.post(f"{facts.root}/tokenize", json=body, headers=facts._headers())
        if resp.status_code != 200:
            return None
        tokens = resp.json().get("tokens")
        return [int(t) for t in tokens] if isinstance(tokens, list) else None

    try:
        async with httpx.AsyncClient(timeout=30) as http:
            results = await asyncio.gather(*(one(http, p) for p in prompts))
    except (httpx.HTTPError, ValueError):
        return None
    if any(r is None for r in results):
        return None
    return [r for r in results if r is not None]
