"""One async client for any OpenAI-compatible server, recording every request's timing.

Requests are streamed with ``stream_options.include_usage`` so that time to first token
is measured the way ``vllm bench serve`` does (arrival of the first streamed chunk with
text, minus send time). Every request, finished or failed, becomes a
:class:`~echo_env.wire.records.RequestRecord`; nothing is dropped.

Generation requests go over aiohttp with the server-sent events parsed as they arrive
(``transport="sse"``, the default): the ``openai`` SDK's streaming path costs 3-9 ms of
CPU per streamed request (more with more in flight), which in a burst of hundreds of
requests on one event loop delays every request's clock; this path costs under 1 ms
(``benchmarks/client_overhead.py`` measures both). ``/v1/models`` goes over the same
pool (the SDK's first call alone costs ~60 ms of CPU). ``transport="openai"`` sends
generation through the SDK instead. This module holds the pool, the concurrency slots,
the retries and the request's fields; one attempt's send and read, by either transport, is
:class:`~echo_env.wire.stream.Stream`'s. The session's settings (pool, proxy, auth) come
from :mod:`echo_env.wire.http`; the config from :mod:`echo_env.wire.client_config`, the
records from :mod:`echo_env.wire.records`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import openai

from echo_env.errors import ConfigError, ServerResponseError
from echo_env.wire import http
from echo_env.wire.client_config import ClientConfig, Transport, usable_concurrency
from echo_env.wire.records import Api, Output, Prompt, RequestRecord, unreachable
from echo_env.wire.sse import SSEDecoder
from echo_env.wire.stream import Failed, Stream, Wants, short

__all__ = [
    "Api",
    "ClientConfig",
    "LLMClient",
    "Output",
    "Prompt",
    "RequestRecord",
    "SSEDecoder",
    "Transport",
    "unreachable",
    "usable_concurrency",
]

try:  # openai >= 3 ships its own fork of httpx
    import httpx2 as _httpx  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older openai
    import httpx as _httpx  # type: ignore[no-redef]

log = logging.getLogger(__name__)

_ids = itertools.count()


class LLMClient:
    """Async client for ``/v1/completions`` and ``/v1/chat/completions``.

    Use it as ``async with LLMClient(config) as client:`` so its connections close.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.max_concurrency = usable_concurrency(config.max_concurrency)
        """The concurrency in effect: ``config.max_concurrency`` unless open files are too few."""
        self._openai: openai.AsyncOpenAI | None = None
        if config.transport == "openai":
            limits = _httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._openai = openai.AsyncOpenAI(
                base_url=config.base_url,
                api_key=config.resolved_api_key(),
                timeout=config.timeout_s,
                max_retries=0,  # retries are ours, so each attempt is counted in the record
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=config.timeout_s),
            )
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the event loop
        self._proxy: http.Proxy = (None, None)  # read with the session
        self._url = config.base_url.rstrip("/")
        self._auth = http.bearer(config.resolved_api_key())
        self._headers = {**self._auth, "Accept": "text/event-stream"}
        self._urls: dict[Api, str] = {
            "completions": self._url + "/completions",
            "chat": self._url + "/chat/completions",
        }
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._model: str | None = config.model
        self._model_checked = False
        self.in_flight = 0
        """Requests being sent right now."""
        self.peak_in_flight = 0
        """The most requests that were ever in flight together."""

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pools."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._openai is not None:
            await self._openai.close()

    async def served_models(self) -> list[str]:
        """The model names the server lists on ``/v1/models``.

        Raises:
            ServerUnreachableError: Nothing answers at ``base_url``.
            ServerResponseError: Something answers, but not as an OpenAI-compatible server.
        """
        url = self.config.base_url
        # Over the client's own aiohttp pool: the openai SDK's first call costs ~60 ms of CPU
        # (measured), a tenth of a 1024-request step against a fast server.
        try:
            timeout = aiohttp.ClientTimeout(total=min(self.config.timeout_s, http.MODELS_TIMEOUT_S))
            session = self._aiohttp()
            proxy, proxy_auth = self._proxy
            async with session.get(
                self._url + "/models", headers=self._auth, timeout=timeout, proxy=proxy, proxy_auth=proxy_auth
            ) as resp:
                status, body = resp.status, await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise http.unreachable_server(url, exc) from exc
        if status in (401, 403):
            raise ServerResponseError(
                f"{url}/models answered HTTP {status}: the server wants an API key; set api_key= or OPENAI_API_KEY"
            )
        if status != 200:
            raise ServerResponseError(
                f"{url}/models answered HTTP {status}: is base_url the OpenAI API root (ending in /v1)?"
            )
        try:
            page = json.loads(body)
            names = [str(m["id"]) for m in page["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerResponseError(
                f"{url}/models did not answer like an OpenAI-compatible server ({short(body, 80)!r}): check base_url"
            ) from exc
        if not names:
            raise ServerResponseError(f"{url}/models lists no model: is this an OpenAI-compatible inference server?")
        return names

    async def model(self) -> str:
        """The model to ask for: the configured one (checked against the server) or the first served.

        The server is asked once per client. The worker calls this before every batch, and
        a second ``/v1/models`` call would fail at once on a stalled server, before the
        requests' own timeouts and retries had their say.
        """
        if self._model_checked and self._model is not None:
            return self._model
        served = await self.served_models()
        if self._model is None:
            self._model = served[0]
        elif self._model not in served:
            raise ConfigError(
                f"model_name={self._model!r} is not served at {self.config.base_url}; it serves {served}: "
                f"set model_name={served[0]}"
            )
        self._model_checked = True
        return self._model

    async def generate(
        self,
        prompt: Prompt | Sequence[str] | Sequence[Sequence[int]],
        *,
        api: Api = "completions",
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        extra_body: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        tag: str = "",
        want_tokens: bool | None = None,
        want_itl: bool = True,
    ) -> RequestRecord:
        """Send one streamed request and record it; never raises for a failed request.

        Args:
            prompt: For ``completions``: a string, token ids, or a list of either
                (several prompts in one request). For ``chat``: a list of messages.
            api: ``completions`` or ``chat``.
            n: Completions per prompt (one prefill shared by all).
            max_tokens: Generation limit per sequence.
            temperature: Sampling temperature.
            top_p: Nucleus sampling.
            stop: Stop strings.
            seed: Sampling seed.
            logprobs: Sampled-token logprobs to return (completions only).
            extra_body: Extra fields for the server (e.g. vLLM's ``cache_salt``).
            headers: Extra HTTP headers for this request only (e.g. ``X-Session-ID`` for a
                router that keeps a session on one replica).
            tag: A label kept in the record.
            want_tokens: Keep the generated token ids, prompt token ids and logprobs the
                server streams. None: when this request asks for them
                (``logprobs``, or ``return_token_ids`` in ``extra_body``).
            want_itl: Keep the gaps between successive text chunks (``Output.itl_s``).
                False spares a little CPU per chunk when no one reads them.

        Returns:
            The record; check ``ok`` and ``error``.
        """
        num_prompts = _count_prompts(prompt, api)
        record = RequestRecord(request_id=f"req-{next(_ids)}", api=api, num_prompts=num_prompts, n=n, tag=tag)
        model = self._model or await self.model()
        kwargs = _request_kwargs(
            model, prompt, api, n, max_tokens, temperature, top_p, stop, seed, logprobs, extra_body
        )
        if want_tokens is None:
            want_tokens = logprobs is not None or bool(extra_body and extra_body.get("return_token_ids"))
        await self._send(record, api, kwargs, Wants(tokens=want_tokens, itl=want_itl, headers=headers))
        return record

    async def _send(self, record: RequestRecord, api: Api, kwargs: dict[str, Any], want: Wants) -> None:
        """Wait for a concurrency slot, then make the attempts."""
        queued = time.perf_counter()
        async with self._sem:
            record.queue_s = time.perf_counter() - queued
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await self._attempts(record, api, kwargs, want)
            finally:
                self.in_flight -= 1

    async def _attempts(self, record: RequestRecord, api: Api, kwargs: dict[str, Any], want: Wants) -> None:
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            record.attempts = attempt + 1
            # A retry starts from nothing: figures of a failed attempt must not survive it.
            record.outputs = []
            record.prompt_tokens = record.completion_tokens = record.cached_tokens = None
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    await self._stream(record, api, kwargs, want)
                record.ok, record.error, record.status = True, None, None
                return
            except Failed as exc:
                record.error, record.status = str(exc), exc.status
                retry = exc.retryable
            except TimeoutError:
                got_text = any(out.chunks for out in record.outputs)
                record.error = f"timed out after {cfg.timeout_s:g} s" + (" mid-stream" if got_text else "")
                record.status = None
                # Once text has streamed, a retry would time a different request.
                retry = not got_text
            except Exception as exc:  # a request is recorded as failed, never lost
                record.error, record.status = f"unexpected error: {type(exc).__name__}: {short(str(exc))}", None
                log.debug("%s failed unexpectedly", record.request_id, exc_info=True)
                retry = False
            if not retry or attempt == cfg.max_retries:
                break
            delay = cfg.backoff_s * (2**attempt) * (0.5 + random.random())
            log.debug(
                "%s attempt %d failed (%s); retrying in %.2f s", record.request_id, attempt + 1, record.error, delay
            )
            await asyncio.sleep(delay)
        record.ok = False

    async def _stream(self, record: RequestRecord, api: Api, kwargs: dict[str, Any], want: Wants) -> None:
        """One attempt: send, then read the stream into the record (``wire.stream`` does the reading)."""
        sdk = self._openai
        session = self._aiohttp() if sdk is None else None  # made before the clock starts
        record.sent_at = time.time()
        stream = Stream(record, api, want, time.perf_counter())
        try:
            if session is not None:
                await stream.read_sse(session, self._urls[api], kwargs, self._headers, want.headers, self._proxy)
            elif sdk is not None:
                await stream.read_openai(sdk, kwargs, want.headers)
        finally:
            stream.settle()
        stream.finish()

    def _aiohttp(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session, self._proxy = http.generation_session(self._url, self.max_concurrency)
        return self._session


def _request_kwargs(
    model: str,
    prompt: Any,
    api: Api,
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str] | None,
    seed: int | None,
    logprobs: int | None,
    extra_body: dict[str, Any] | None,
) -> dict[str, Any]:
    """One request's fields as the openai SDK takes them (server-specific ones under ``extra_body``)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "n": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if stop:
        kwargs["stop"] = list(stop)
    if seed is not None:
        kwargs["seed"] = seed
    if extra_body:
        kwargs["extra_body"] = extra_body
    if api == "completions":
        kwargs["prompt"] = prompt
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
    else:
        kwargs["messages"] = list(prompt)
    return kwargs


def _count_prompts(prompt: Any, api: Api) -> int:
    if api == "chat":
        if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], dict):
            raise ConfigError("api=chat needs a list of chat messages: use api=completions for text prompts")
        return 1
    if isinstance(prompt, str):
        return 1
    if not prompt:
        raise ConfigError("the prompt is empty: give text, token ids, or a list of them")
    first = prompt[0]
    if isinstance(first, int):
        return 1
    if isinstance(first, dict):
        raise ConfigError("chat messages need api=chat")
    return len(prompt)
