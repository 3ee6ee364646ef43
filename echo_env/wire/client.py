"""One async client for any OpenAI-compatible server, recording every request's timing.

Requests are streamed with ``stream_options.include_usage`` so that time to first token
is measured the way ``vllm bench serve`` does (arrival of the first streamed chunk with
text, minus send time). Every request, finished or failed, becomes a
:class:`RequestRecord`; nothing is dropped.

Generation requests go over aiohttp with the server-sent events parsed here
(``transport="sse"``, the default): the ``openai`` SDK's streaming path costs 3-9 ms of
CPU per streamed request (more with more in flight), which in a burst of hundreds of
requests on one event loop delays every request's clock; this path costs under 1 ms
(``benchmarks/client_overhead.py`` measures both). ``/v1/models`` goes over the same
pool (the SDK's first call alone costs ~60 ms of CPU). ``transport="openai"`` sends
generation through the SDK instead.

What is kept of each streamed chunk is decided once per request: token ids and logprobs
only when the caller wants them (by default, when it asked the server for them), gaps
between tokens unless the caller says it has no use for them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import openai
from yarl import URL

from echo_env.errors import ConfigError, ServerResponseError, ServerUnreachableError
from echo_env.wire.sse import SSEDecoder

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

Api = Literal["completions", "chat"]
Transport = Literal["sse", "openai"]
Prompt = str | Sequence[int] | Sequence[dict[str, str]]
"""A text prompt, a list of token ids, or chat messages."""

_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_ids = itertools.count()
# File descriptors kept free for everything else a process opens (logs, tokenizer files,
# the metrics reader) when sizing the connection pool against RLIMIT_NOFILE.
_FD_RESERVE = 128


def usable_concurrency(wanted: int) -> int:
    """How many connections this process can hold open at once, up to ``wanted``.

    Each in-flight request holds one socket. Many systems default to a soft limit of
    1024 open files, below a large ``max_concurrency``; past it, connects fail with
    EMFILE, which looks exactly like an unreachable server. So the soft limit is raised
    toward the hard one (as vLLM does for its server), and if that is still too low the
    concurrency is capped, with a warning naming the fix.

    Args:
        wanted: The configured ``max_concurrency``.

    Returns:
        ``wanted``, or less when the open-file limit cannot hold that many sockets.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return wanted
    need = wanted + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    capped = max(1, soft - _FD_RESERVE)
    log.warning(
        "max_concurrency=%d needs ~%d open files but the limit is %d: using %d; raise it with `ulimit -n %d`",
        wanted,
        need,
        soft,
        capped,
        need,
    )
    return capped


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how to talk to it."""

    base_url: str
    """The server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str | None = None
    """Served model name; None asks the server (``/v1/models``) and takes the first."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as a bearer token; None reads ``OPENAI_API_KEY`` (else a placeholder). Kept out
    of ``repr`` so a logged or printed config never shows it."""
    timeout_s: float = 120.0
    """Limit on one attempt of one request, from send to the last token."""
    max_retries: int = 2
    """Retries after a connection error, a timeout before any token, 429 or 5xx."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry, with jitter."""
    max_concurrency: int = 256
    """Requests in flight at once; the rest wait (their wait is ``queue_s``)."""
    transport: Transport = "sse"
    """How generation requests are sent: ``sse`` (aiohttp, events parsed here; fast) or
    ``openai`` (the ``openai`` SDK's streaming client; 6-14x the CPU per request, measured)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url={self.base_url!r} is not an http(s) URL: e.g. http://127.0.0.1:8000/v1")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be zero or more, got {self.max_retries}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.transport not in ("sse", "openai"):
            raise ConfigError(f"transport must be sse or openai, got {self.transport!r}")

    def resolved_api_key(self) -> str:
        """The key to send: the configured one, ``OPENAI_API_KEY``, or a placeholder."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"


@dataclass
class Output:
    """One generated sequence of a request (a request has several with ``n`` or a list prompt)."""

    index: int
    """The choice index the server gave it."""
    text: str = ""
    """The generated text."""
    ttft_s: float | None = None
    """Seconds from send to this sequence's first text."""
    e2e_s: float | None = None
    """Seconds from send to this sequence's last chunk."""
    chunks: int = 0
    """Streamed chunks that carried text (close to the token count on vLLM)."""
    finish_reason: str | None = None
    """Why generation stopped (``stop``, ``length``...)."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between this sequence's successive text chunks."""
    token_ids: list[int] | None = None
    """Generated token ids, when the server sends them (vLLM's ``return_token_ids``)."""
    logprobs: list[float | None] | None = None
    """Logprob of each generated token, when asked for (``logprobs`` on completions)."""
    prompt_token_ids: list[int] | None = None
    """The prompt as the server tokenized it, when it sends it (vLLM's ``return_token_ids``)."""


@dataclass
class RequestRecord:
    """Everything measured about one request; ``ok`` False means it finally failed."""

    request_id: str
    """Unique within the process."""
    api: Api
    """Which endpoint served it."""
    num_prompts: int
    """Prompts in the request (more than one in ``batched`` mode)."""
    n: int
    """Completions asked per prompt."""
    tag: str = ""
    """The caller's label (agent id, group, phase)."""
    sent_at: float = 0.0
    """Unix time of the (last) attempt's send."""
    queue_s: float = 0.0
    """Wait for a concurrency slot before the first attempt."""
    ttft_s: float | None = None
    """Seconds to the first text of any sequence."""
    e2e_s: float | None = None
    """Seconds from send to the end of the stream."""
    prompt_tokens: int | None = None
    """From the server's usage (summed over prompts)."""
    completion_tokens: int | None = None
    """From the server's usage."""
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``; None when the server did not say."""
    outputs: list[Output] = field(default_factory=list)
    """The generated sequences, by choice index."""
    attempts: int = 0
    """How many times it was sent."""
    ok: bool = False
    """True when the stream ended normally."""
    error: str | None = None
    """Why it failed (after the last attempt)."""
    status: int | None = None
    """HTTP status of the failure, when there was one."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for the per-request JSONL records)."""
        return asdict(self)

    @property
    def itl_s(self) -> list[float]:
        """All inter-token gaps of all sequences."""
        return [gap for out in self.outputs for gap in out.itl_s]


class _Failed(Exception):
    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


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
        self._proxy: tuple[URL | None, aiohttp.BasicAuth | None] = (None, None)  # read with the session
        self._url = config.base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {config.resolved_api_key()}"}
        self._headers = {**self._auth, "Accept": "text/event-stream"}
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
            timeout = aiohttp.ClientTimeout(total=min(self.config.timeout_s, 60.0))
            session = self._aiohttp()
            proxy, proxy_auth = self._proxy
            async with session.get(
                self._url + "/models", headers=self._auth, timeout=timeout, proxy=proxy, proxy_auth=proxy_auth
            ) as resp:
                status, body = resp.status, await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ServerUnreachableError(
                f"no server answers at base_url={url} ({reason}): start one, or leave base_url unset to use the "
                "embedded engine"
            ) from exc
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
                f"{url}/models did not answer like an OpenAI-compatible server ({_short(body, 80)!r}): check base_url"
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
        want = _Wants(tokens=want_tokens, itl=want_itl, headers=headers)
        queued = time.perf_counter()
        async with self._sem:
            record.queue_s = time.perf_counter() - queued
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await self._attempts(record, api, kwargs, want)
            finally:
                self.in_flight -= 1
        return record

    async def _attempts(self, record: RequestRecord, api: Api, kwargs: dict[str, Any], want: _Wants) -> None:
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
            except _Failed as exc:
                record.error, record.status = str(exc), exc.status
                retry = exc.retryable
            except TimeoutError:
                got_text = any(out.chunks for out in record.outputs)
                record.error = f"timed out after {cfg.timeout_s:g} s" + (" mid-stream" if got_text else "")
                record.status = None
                # Once text has streamed, a retry would time a different request.
                retry = not got_text
            except Exception as exc:  # a request is recorded as failed, never lost
                record.error, record.status = f"unexpected error: {type(exc).__name__}: {_short(str(exc))}", None
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

    async def _stream(self, record: RequestRecord, api: Api, kwargs: dict[str, Any], want: _Wants) -> None:
        record.sent_at = time.time()
        stream = _Stream(record, api, want, time.perf_counter())
        try:
            if self.config.transport == "openai":
                await self._stream_openai(stream, api, kwargs, want.headers)
            else:
                await self._stream_sse(stream, api, kwargs, want.headers)
        finally:
            stream.settle()
        stream.finish()

    def _aiohttp(self) -> aiohttp.ClientSession:
        if self._session is None:
            # One connection per slot, kept alive between requests; timeouts are ours
            # (asyncio.timeout around each attempt), so aiohttp's are off.
            # ssl=False for http:// (no TLS context to build, 25 ms); https:// verifies as usual.
            tls = self._url.startswith("https://")
            connector = aiohttp.TCPConnector(
                limit=self.max_concurrency, limit_per_host=0, keepalive_timeout=60, ssl=tls
            )
            # The proxy settings (HTTP(S)_PROXY, NO_PROXY) are read once here, not by
            # trust_env=True, which reads them and ~/.netrc again on a thread for every
            # request: two thread hops that cost 0.73 against 0.45 ms of CPU per streamed
            # request (benchmarks/client_overhead.py's stand-in). A netrc login would also
            # clash with the Authorization header sent here and fail every request.
            try:
                self._proxy = aiohttp.helpers.get_env_proxy_for_url(URL(self._url))
            except LookupError:
                self._proxy = (None, None)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _stream_sse(
        self, stream: _Stream, api: Api, kwargs: dict[str, Any], headers: Mapping[str, str] | None
    ) -> None:
        body = {k: v for k, v in kwargs.items() if k != "extra_body"}
        body.update(kwargs.get("extra_body") or {})
        url = self._url + ("/completions" if api == "completions" else "/chat/completions")
        session = self._aiohttp()
        proxy, proxy_auth = self._proxy
        sent = {**self._headers, **headers} if headers else self._headers
        try:
            async with session.post(url, json=body, headers=sent, proxy=proxy, proxy_auth=proxy_auth) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    status = resp.status
                    message = _error_message(text) or resp.reason or ""
                    raise _Failed(
                        f"HTTP {status}: {_short(message)}", retryable=status in _RETRYABLE_STATUS, status=status
                    )
                decoder = SSEDecoder()
                on_event = stream.on_event
                done = False
                # Read to the end even after [DONE], so the connection goes back to the pool.
                async for data in resp.content.iter_any():
                    for event in decoder.feed(data):
                        if event == "[DONE]":
                            done = True
                        elif not done:
                            on_event(event)
                for event in decoder.close():
                    if event == "[DONE]":
                        done = True
                    elif not done:
                        on_event(event)
        except UnicodeDecodeError as exc:
            raise _Failed(f"malformed response: not UTF-8 ({exc})", retryable=False) from None
        except aiohttp.ClientError as exc:
            raise _Failed(f"connection failed: {_short(str(exc) or type(exc).__name__)}", retryable=True) from None

    async def _stream_openai(
        self, stream: _Stream, api: Api, kwargs: dict[str, Any], headers: Mapping[str, str] | None
    ) -> None:
        assert self._openai is not None, "made in __init__ for transport='openai'"
        if headers:
            kwargs = {**kwargs, "extra_headers": dict(headers)}
        try:
            if api == "completions":
                chunks = await self._openai.completions.create(**kwargs)
            else:
                chunks = await self._openai.chat.completions.create(**kwargs)
            async for chunk in chunks:
                stream.on_chunk(chunk.model_dump())
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status in _RETRYABLE_STATUS
            raise _Failed(f"HTTP {status}: {_short(exc.message)}", retryable=retryable, status=status) from None
        except openai.APIConnectionError as exc:
            raise _Failed(f"connection failed: {_short(str(exc.__cause__ or exc))}", retryable=True) from None
        except (openai.APIError, ValueError, KeyError, AttributeError) as exc:
            raise _Failed(f"malformed response: {_short(str(exc))}", retryable=False) from None


def _error_message(text: str) -> str | None:
    """The ``message`` of an OpenAI-style (or vLLM-style) error body, else None."""
    try:
        body = json.loads(text)
    except ValueError:
        return _short(text) if text.strip() else None
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error) if isinstance(error, str) else None


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


@dataclass(frozen=True)
class _Wants:
    """What one request keeps of its stream and sends besides its body, decided when it is sent."""

    tokens: bool
    """Keep token ids, prompt token ids and logprobs (completions only)."""
    itl: bool
    """Keep the gaps between text chunks."""
    headers: Mapping[str, str] | None
    """Extra HTTP headers for this request."""


class _Stream:
    """Folds one request's streamed chunks into its record.

    Runs once per streamed token, so it does only what this request asked for (token
    ids, gaps) and builds each sequence's text once, at the end.
    """

    __slots__ = ("chat", "itl", "last", "outputs", "parts", "record", "start", "tokens")

    def __init__(self, record: RequestRecord, api: Api, want: _Wants, start: float) -> None:
        self.record = record
        self.chat = api == "chat"
        self.tokens = want.tokens
        self.itl = want.itl
        self.start = start
        self.outputs: dict[int, Output] = {}
        self.parts: dict[int, list[str]] = {}
        self.last: dict[int, float] = {}
        record.ttft_s = record.e2e_s = None

    def on_event(self, data: str) -> None:
        """Fold one event's data (a JSON chunk) into the record.

        Raises:
            _Failed: The data is not a JSON object, or it reports a server error.
        """
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise _Failed(f"malformed response: {_short(str(exc))}: {_short(data, 80)}", retryable=False) from None
        if chunk.__class__ is not dict:
            raise _Failed(f"malformed response: an event is not a JSON object: {_short(data, 80)}", retryable=False)
        if "error" in chunk and not chunk.get("choices"):
            # vLLM reports a failure that happens after the 200 header as an event.
            raise _Failed(f"server error mid-stream: {_short(_error_message(data) or data)}", retryable=False)
        self.on_chunk(chunk)

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        """Fold one parsed chunk into the record.

        Raises:
            _Failed: The chunk is not shaped like an OpenAI streaming chunk.
        """
        now = time.perf_counter() - self.start
        record = self.record
        try:
            for choice in chunk.get("choices") or ():
                index = choice["index"]
                out = self.outputs.get(index)
                if out is None:
                    out = self._new_output(index)
                if self.chat:
                    delta = choice.get("delta")
                    text = delta.get("content") if delta else None
                else:
                    text = choice.get("text")
                if text:
                    if not isinstance(text, str):
                        raise TypeError(f"text is a {type(text).__name__}")
                    if out.ttft_s is None:
                        out.ttft_s = now
                        if record.ttft_s is None:
                            record.ttft_s = now
                    elif self.itl:
                        out.itl_s.append(now - self.last[index])
                    self.last[index] = now
                    self.parts[index].append(text)
                    out.chunks += 1
                if self.tokens:
                    _collect_tokens(out, choice)
                    if self.chat and chunk.get("prompt_token_ids") and not out.prompt_token_ids:
                        out.prompt_token_ids = list(chunk["prompt_token_ids"])  # chat: on the chunk, not the choice
                reason = choice.get("finish_reason")
                if reason is not None:
                    out.finish_reason = reason
                    out.e2e_s = now
            usage = chunk.get("usage")
            if usage:
                details = usage.get("prompt_tokens_details") or {}
                record.prompt_tokens = usage.get("prompt_tokens")
                record.completion_tokens = usage.get("completion_tokens")
                record.cached_tokens = details.get("cached_tokens")
        except (KeyError, TypeError, AttributeError) as exc:
            raise _Failed(f"malformed response: bad chunk ({type(exc).__name__}: {exc})", retryable=False) from None

    def _new_output(self, index: int) -> Output:
        out = self.outputs[index] = Output(index=index)
        self.parts[index] = []
        self.record.outputs = [self.outputs[i] for i in sorted(self.outputs)]
        return out

    def settle(self) -> None:
        """Join each sequence's text; runs however the stream ended, so a failed record keeps its partial text."""
        for index, parts in self.parts.items():
            self.outputs[index].text = "".join(parts)

    def finish(self) -> None:
        """Close the record of a stream that ended normally.

        Raises:
            _Failed: The stream carried fewer or more sequences than the request asked for.
        """
        record = self.record
        record.e2e_s = time.perf_counter() - self.start
        record.outputs = [self.outputs[i] for i in sorted(self.outputs)]
        expected = record.num_prompts * record.n
        if len(record.outputs) != expected:
            raise _Failed(f"expected {expected} choices, the stream carried {len(record.outputs)}", retryable=False)
        for out in record.outputs:
            if out.e2e_s is None:
                out.e2e_s = record.e2e_s


def _collect_tokens(out: Output, choice: dict[str, Any]) -> None:
    """Append a streamed chunk's token ids and logprobs to its sequence.

    Trainers need exactly the sampled tokens and their logprobs, not re-tokenized text;
    vLLM sends them per chunk (``token_ids``/``prompt_token_ids`` with its
    ``return_token_ids`` extension).
    """
    prompt_ids = choice.get("prompt_token_ids")
    if prompt_ids:
        out.prompt_token_ids = list(prompt_ids)
    ids = choice.get("token_ids")
    if ids is not None:
        out.token_ids = out.token_ids or []
        out.token_ids.extend(ids)
    logprobs = choice.get("logprobs")
    token_logprobs = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if token_logprobs is not None:
        out.logprobs = out.logprobs or []
        out.logprobs.extend(token_logprobs)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


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


def unreachable(record: RequestRecord) -> bool:
    """Whether a failed request failed because the server could not be reached.

    A timeout alone does not count: a busy server is slow, not gone.
    """
    return not record.ok and record.error is not None and record.error.startswith("connection failed")
