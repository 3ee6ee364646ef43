"""What the server under test is and says about itself, and its prompts tokenized as it sees them.

:func:`read_server_facts` detects the server's kind from what it exposes and asks the
kind's adapter everything else: the cache granularity, whether caching is on, how to
tokenize. Every answer may be "unknown"; tokenization falls back to a local
``transformers`` tokenizer, and a tokenization that cannot be right (no ids for a 2 KB
prompt) is an error to fall back from, never evidence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from echo_env.errors import EchoEnvError, MetricsError
from echo_env.wire import http
from echo_env.wire.http import server_root
from echo_env.wire.kinds import CacheGranularity, Prompt, ServerKind, ServerProps, plausible_tokenization
from echo_env.wire.kinds.openai import OpenAIKind
from echo_env.wire.kinds.sglang import SglangKind
from echo_env.wire.kinds.vllm import VllmKind
from echo_env.wire.metrics import MetricsReader, Snapshot
from echo_env.wire.router import probe_router
from echo_env.wire.tokenizer import Tokenizer, encode_prompts, load_local_tokenizer

log = logging.getLogger(__name__)


def _llamacpp() -> Any:
    from echo_env.wire.kinds import llamacpp

    return llamacpp


@dataclass
class ServerFacts:
    """What is known about the server under test."""

    base_url: str
    """The OpenAI API root."""
    metrics_url: str | None
    """Where its Prometheus counters are (None: not used)."""
    model: str
    """The served model name the requests use."""
    kind: ServerKind = field(default_factory=OpenAIKind)
    """The adapter of its kind."""
    props: ServerProps = field(default_factory=ServerProps)
    """What it said about itself."""
    granularity: CacheGranularity | None = None
    """How finely its cache reuses prompts (None: unknown)."""
    embedded: bool = False
    """Whether this package started the server."""
    tokenized_by: str | None = None
    """``server`` or ``local``, once prompts were tokenized."""
    tokenize_error: str | None = None
    """Why the server's tokenization was not used, when it was not."""
    metrics_error: str | None = None
    """Why the metrics could not be read, if they could not."""
    metrics: MetricsReader | None = field(default=None, repr=False)
    """The reader of its counters, with its kind's metric names (None: metrics off or unreadable when first asked)."""
    router_workers: tuple[str, ...] | None = None
    """The replicas this server routes to, when it answered as a router (``GET /workers``); None: not a router,
    or not asked (a server this package started, or metrics off: its counters are not read anyway)."""
    api_key: str | None = field(default=None, repr=False)
    """Sent to the server; never written out (nor shown by ``repr``)."""
    tokenizer_source: str | None = None
    """Folder or hub id of a local tokenizer for the model (default: ``model``)."""
    tokenizer_loader: Callable[[str], Tokenizer] = field(default=load_local_tokenizer, repr=False)
    """Loads :attr:`tokenizer_source`; whoever started the server may pass one that prepares its model first."""

    @property
    def root(self) -> str:
        """The server's root URL."""
        return server_root(self.base_url)

    @property
    def block_size(self) -> int | None:
        """The cache's reuse unit in tokens (None: unknown)."""
        return self.granularity.unit_tokens if self.granularity else None

    @property
    def caching_enabled(self) -> bool | None:
        """Whether the server says caching is on."""
        return self.props.prefix_caching_enabled

    def to_json(self) -> dict[str, Any]:
        """The facts for the report (no API key)."""
        return {
            "base_url": self.base_url,
            "metrics_url": self.metrics_url,
            "kind": self.kind.name,
            "version": self.props.version,
            "model": self.model,
            "prefix_caching_enabled": self.caching_enabled,
            "block_size": self.block_size,
            "block_size_source": self.granularity.source if self.granularity else None,
            "slots": self.props.slots,
            "embedded": self.embedded,
            "metrics_error": self.metrics_error,
            "router_workers": list(self.router_workers) if self.router_workers is not None else None,
            "tokenized_by": self.tokenized_by,
            "tokenize_error": self.tokenize_error,
        }

    def headers(self) -> dict[str, str]:
        """Request headers (the bearer token when there is one)."""
        return http.bearer(self.api_key)

    def tokenizer(self) -> Tokenizer:
        """A local tokenizer for the served model (the embedded model, a folder or a hub id)."""
        return self.tokenizer_loader(self.tokenizer_source or self.model)

    async def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text, for messages (best effort: the server, a local tokenizer, the ids)."""
        request = self.kind.detokenize_request(self.model, ids)
        if request is not None:
            try:
                async with http.AsyncHttp(timeout_s=http.PROBE_TIMEOUT_S, api_key=self.api_key) as client:
                    resp = await client.post(self.root + request[0], json=request[1])
                if resp.status_code == 200:
                    return self.kind.parse_detokenize(resp.json())
            except (EchoEnvError, ValueError):
                pass
        try:
            return str(self.tokenizer().decode(list(ids)))  # type: ignore[attr-defined]
        except Exception:
            return " ".join(map(str, ids))


async def _get_json(client: http.AsyncHttp, url: str) -> Any | None:
    try:
        resp = await client.get(url)
        return resp.json() if resp.status_code == 200 else None
    except (EchoEnvError, ValueError):
        return None


async def detect_kind(root: str, headers: dict[str, str]) -> tuple[ServerKind, ServerProps]:
    """Tell vLLM, SGLang and llama.cpp apart by the endpoints only each of them has.

    Args:
        root: The server root (no ``/v1``).
        headers: Request headers (auth).

    Returns:
        The kind's adapter, and what the server said (version, slots, page size).
    """
    async with http.AsyncHttp(timeout_s=http.PROBE_TIMEOUT_S, headers=headers) as client:
        sglang, props, version = await asyncio.gather(
            _get_json(client, f"{root}/get_server_info"),
            _get_json(client, f"{root}/props"),
            _get_json(client, f"{root}/version"),
        )
    if isinstance(sglang, dict):
        enabled = sglang.get("disable_radix_cache")
        return SglangKind(), ServerProps(
            version=str(sglang.get("version")) if sglang.get("version") else None,
            prefix_caching_enabled=None if enabled is None else not bool(enabled),
            page_size=int(sglang["page_size"]) if isinstance(sglang.get("page_size"), int) else 1,
            raw={"get_server_info": sglang},
        )
    if isinstance(props, dict):
        llamacpp = _llamacpp()
        if llamacpp.detect_llamacpp(props):
            return llamacpp.LlamaCppKind(), llamacpp.read_props(props)
    if isinstance(version, dict) and "version" in version:
        return VllmKind(), ServerProps(version=str(version["version"]), raw={"version": version})
    return OpenAIKind(), ServerProps()


async def read_server_facts(
    base_url: str,
    model: str,
    metrics_url: str | None,
    *,
    embedded: bool = False,
    api_key: str | None = None,
    block_size: int | None = None,
) -> ServerFacts:
    """Detect the server's kind and read its cache configuration.

    Args:
        base_url: The OpenAI API root.
        model: The served model name.
        metrics_url: Prometheus endpoint; None means ``<root>/metrics``; ``"none"`` skips it.
        embedded: Whether this package started the server (it is then not asked whether it is a router).
        api_key: Bearer token.
        block_size: The cache unit in tokens when the server does not say (``block_size=``).
    """
    root = server_root(base_url)
    url = None if metrics_url == "none" else (metrics_url or f"{root}/metrics")
    facts = ServerFacts(base_url=base_url, metrics_url=url, model=model, embedded=embedded, api_key=api_key)
    facts.kind, facts.props = await detect_kind(root, facts.headers())
    if url is not None:
        # The first page is read with vLLM/SGLang names: its series may be what tells the kind.
        reader = MetricsReader(url, model_name=model, api_key=api_key)
        try:
            _merge_snapshot(facts, await asyncio.to_thread(reader.snapshot))
            reader.kind = facts.kind
            facts.metrics = reader
        except MetricsError as exc:
            facts.metrics_error = _metrics_message(facts.kind, exc)
            log.warning("%s", facts.metrics_error)
    facts.granularity = facts.kind.granularity(facts.props)
    if facts.granularity is None and block_size is not None:
        facts.granularity = CacheGranularity(block_size, "block_size= key")
    if url is not None and not embedded:  # a router's /metrics answers for one replica per call
        workers = await probe_router(root)
        facts.router_workers = tuple(workers) if workers is not None else None
    return facts


def _merge_snapshot(facts: ServerFacts, snap: Snapshot) -> None:
    """What the first metrics page says about the kind and its cache configuration."""
    source = snap.counters.source
    if facts.kind.name == "openai":
        # A server known only by its counter names (e.g. behind a proxy that hides /version).
        if source.startswith("vllm"):
            facts.kind = VllmKind()
        elif source == "sglang":
            facts.kind = SglangKind()
    if snap.cache_config.labels:
        facts.props.cache_config = snap.cache_config
        if snap.cache_config.prefix_caching_enabled is not None:
            facts.props.prefix_caching_enabled = snap.cache_config.prefix_caching_enabled


def _metrics_message(kind: ServerKind, exc: MetricsError) -> str:
    status = getattr(exc, "status", None)
    if status is not None and kind.name == "llamacpp":
        hint = _llamacpp().metrics_status_hint(int(status))
        if hint:
            return str(hint)
    return str(exc)


@dataclass(frozen=True)
class Tokenized:
    """Prompts as token ids, and who tokenized them."""

    ids: list[list[int]]
    """One list per prompt, in order."""
    by: str
    """``server`` or ``local``."""


def _text_chars(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.get("content", "")) for m in prompt)


async def _server_tokenize(facts: ServerFacts, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Raises ValueError (with the reason) when the server cannot tokenize every prompt plausibly."""
    sem = asyncio.Semaphore(32)

    async def one(client: http.AsyncHttp, prompt: Prompt) -> list[int]:
        request = facts.kind.tokenize_request(facts.model, prompt)
        if request is None:
            raise ValueError(f"the {facts.kind.name} server offers no tokenization for this prompt form")
        async with sem:
            resp = await client.post(facts.root + request[0], json=request[1])
        if resp.status_code != 200:
            raise ValueError(f"{request[0]} answered HTTP {resp.status_code}")
        ids = facts.kind.parse_tokenize(resp.json())
        if not plausible_tokenization(_text_chars(prompt), ids):
            raise ValueError(f"{request[0]} gave {len(ids)} tokens for {_text_chars(prompt)} characters")
        return ids

    try:
        async with http.AsyncHttp(timeout_s=http.TOKENIZE_TIMEOUT_S, api_key=facts.api_key) as client:
            return list(await asyncio.gather(*(one(client, p) for p in prompts)))
    except EchoEnvError as exc:
        raise ValueError(f"tokenize request failed: {exc}") from None


async def tokenize_prompts(
    facts: ServerFacts, prompts: Sequence[Prompt], *, local_only: bool = False
) -> Tokenized | None:
    """Token ids of each prompt as the server builds them; identical prompts are tokenized once.

    Asks the server first (unless ``local_only``: prompts sent as local token ids), then a
    local tokenizer of the model. The reason the server's answer was not used is kept in
    ``facts.tokenize_error``.

    Returns:
        The ids and who made them, or None when neither way works.
    """
    keys = [p if isinstance(p, str) else repr(p) for p in prompts]
    unique: dict[str, Prompt] = {}
    for key, prompt in zip(keys, prompts, strict=True):
        unique.setdefault(key, prompt)
    values = list(unique.values())
    ids: list[list[int]] | None = None
    by = "local"
    if not local_only:
        try:
            ids, by = await _server_tokenize(facts, values), "server"
        except ValueError as exc:
            facts.tokenize_error = str(exc)
            log.info("server tokenization not used: %s", exc)
    if ids is None:
        try:
            ids = encode_prompts(facts.tokenizer(), values)  # type: ignore[arg-type]
        except Exception as exc:
            facts.tokenize_error = (facts.tokenize_error or "") + f"; no local tokenizer: {exc}"
            log.warning("cannot tokenize the prompts: %s", facts.tokenize_error)
            return None
    facts.tokenized_by = by
    by_key = dict(zip(unique, ids, strict=True))
    return Tokenized([by_key[k] for k in keys], by)
