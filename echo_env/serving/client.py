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
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import openai

from echo_env.errors import ConfigError, ServerResponseError, ServerUnreachableError

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
            async with self._aiohttp().get(self._url + "/models", headers=self._auth, timeout=timeout) as resp:
                status, body = resp.status, await resp.text(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
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
        tag: str = "",
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
            tag: A label kept in the record.

        Returns:
            The record; check ``ok`` and ``error``.
        """
        num_prompts = _count_prompts(prompt, api)
        record = RequestRecord(request_id=f"req-{next(_ids)}", api=api, num_prompts=num_prompts, n=n, tag=tag)
        model = self._model or await self.model()
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
            kwargs["messages"] = list(prompt)  # type: ignore[arg-type]
        queued = time.perf_counter()
        async with self._sem:
            record.queue_s = time.perf_counter() - queued
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                await self._attempts(record, api, kwargs)
            finally:
                self.in_flight -= 1
        return record

    async def _attempts(self, record: RequestRecord, api: Api, kwargs: dict[str, Any]) -> None:
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            record.attempts = attempt + 1
            # A retry starts from nothing: figures of a failed attempt must not survive it.
            record.outputs = []
            record.prompt_tokens = record.completion_tokens = record.cached_tokens = None
            try:
                await _within(self._stream(record, api, kwargs), cfg.timeout_s)
                record.ok, record.error, record.status = True, None, None
                return
            except _Failed as exc:
                record.error, record.status = str(exc), exc.status
                retry = exc.retryable
            except asyncio.TimeoutError:
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

    async def _stream(self, record: RequestRecord, api: Api, kwargs: dict[str, Any]) -> None:
        record.sent_at = time.time()
        stream = _Stream(record, api, time.perf_counter())
        if self.config.transport == "openai":
            await self._stream_openai(stream, api, kwargs)
        else:
            await self._stream_sse(stream, api, kwargs)
        stream.finish()

    def _aiohttp(self) -> aiohttp.ClientSession:
        if self._session is None:
            # One connection per slot, kept alive between requests; timeouts are ours
            # (asyncio.wait_for around each attempt), so aiohttp's are off.
            # ssl=False for http:// (no TLS context to build, 25 ms); https:// verifies as usual.
            tls = self._url.startswith("https://")
            connector = aiohttp.TCPConnector(
                limit=self.max_concurrency, limit_per_host=0, keepalive_timeout=60, ssl=tls
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=True
            )
        return self._session

    async def _stream_sse(self, stream: _Stream, api: Api, kwargs: dict[str, Any]) -> None:
        body = {k: v for k, v in kwargs.items() if k != "extra_body"}
        body.update(kwargs.get("extra_body") or {})
        url = self._url + ("/completions" if api == "completions" else "/chat/completions")
        try:
            async with self._aiohttp().post(url, json=body, headers=self._headers) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    status = resp.status
                    message = _error_message(text) or resp.reason or ""
                    raise _Failed(
                        f"HTTP {status}: {_short(message)}", retryable=status in _RETRYABLE_STATUS, status=status
                    )
                decoder = SSEDecoder()
                done = False
                # Read to the end even after [DONE], so the connection goes back to the pool.
                async for data in resp.content.iter_any():
                    for event in decoder.feed(data):
                        done = done or event == "[DONE]"
                        if not done:
                            stream.on_chunk(_parse_event(event))
                for event in decoder.close():
                    done = done or event == "[DONE]"
                    if not done:
                        stream.on_chunk(_parse_event(event))
        except UnicodeDecodeError as exc:
            raise _Failed(f"malformed response: not UTF-8 ({exc})", retryable=False) from None
        except aiohttp.ClientError as exc:
            raise _Failed(f"connection failed: {_short(str(exc) or type(exc).__name__)}", retryable=True) from None

    async def _stream_openai(self, stream: _Stream, api: Api, kwargs: dict[str, Any]) -> None:
        assert self._openai is not None, "made in __init__ for transport='openai'"
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


async def _within(coro: Any, timeout_s: float) -> None:
    """Await ``coro``, raising ``TimeoutError`` after ``timeout_s`` seconds.

    ``asyncio.timeout`` (Python 3.11+) runs the request in the caller's task;
    ``asyncio.wait_for`` before 3.12 wraps it in a task of its own, one more per request.
    """
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            await coro
    else:  # pragma: no cover - Python 3.10
        await asyncio.wait_for(coro, timeout_s)


class SSEDecoder:
    """Incremental parser of a ``text/event-stream`` body into the ``data`` of each event.

    Follows the event-stream rules that matter for OpenAI-style streams: lines end in
    ``\\n``, ``\\r\\n`` or ``\\r``; an empty line ends an event; ``data:`` lines (one optional
    space after the colon) are joined with ``\\n``; comment lines (``:``) and other fields
    are skipped. Bytes may arrive split anywhere, even inside a line or a UTF-8 character.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add received bytes; return the data of every event they complete.

        Raises:
            ValueError: An event's data is not UTF-8.
        """
        buf = self._buf + chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # maybe the first half of \r\n: decide when more arrives
                self._buf = buf
                return []
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data).decode())
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events

    def close(self) -> list[str]:
        """The event left open when the stream ended without its empty line, if any."""
        events = self.feed(b"\n\n") if self._buf or self._data else []
        self._buf, self._data = b"", []
        return events


def _parse_event(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise _Failed(f"malformed response: {_short(str(exc))}: {_short(data, 80)}", retryable=False) from None
    if not isinstance(chunk, dict):
        raise _Failed(f"malformed response: an event is not a JSON object: {_short(data, 80)}", retryable=False)
    if "error" in chunk and not chunk.get("choices"):
        # vLLM reports a failure that happens after the 200 header as an event.
        raise _Failed(f"server error mid-stream: {_short(_error_message(data) or data)}", retryable=False)
    return chunk


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


class _Stream:
    """Folds one request's streamed chunks (as dicts) into its record."""

    __slots__ = ("api", "last", "outputs", "record", "start")

    def __init__(self, record: RequestRecord, api: Api, start: float) -> None:
        self.record = record
        self.api = api
        self.start = start
        self.outputs: dict[int, Output] = {}
        self.last: dict[int, float] = {}
        record.ttft_s = record.e2e_s = None

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        now = time.perf_counter() - self.start
        record = self.record
        try:
            for choice in chunk.get("choices") or ():
                index = choice["index"]
                if self.api == "completions":
                    text = choice.get("text") or ""
                else:
                    text = (choice.get("delta") or {}).get("content") or ""
                out = self.outputs.get(index)
                if out is None:
                    out = self.outputs[index] = Output(index=index)
                    record.outputs = [self.outputs[i] for i in sorted(self.outputs)]
                if text:
                    if out.ttft_s is None:
                        out.ttft_s = now
                        if record.ttft_s is None:
                            record.ttft_s = now
                    else:
                        out.itl_s.append(now - self.last[index])
                    self.last[index] = now
                    out.text += text
                    out.chunks += 1
                if self.api == "completions":
                    _collect_tokens(out, choice)
                if choice.get("finish_reason") is not None:
                    out.finish_reason = choice["finish_reason"]
                    out.e2e_s = now
            usage = chunk.get("usage")
            if usage:
                details = usage.get("prompt_tokens_details") or {}
                record.prompt_tokens = usage.get("prompt_tokens")
                record.completion_tokens = usage.get("completion_tokens")
                record.cached_tokens = details.get("cached_tokens")
        except (KeyError, TypeError, AttributeError) as exc:
            raise _Failed(f"malformed response: bad chunk ({type(exc).__name__}: {exc})", retryable=False) from None

    def finish(self) -> None:
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


async def check_server(config: ClientConfig) -> tuple[str, list[str]]:
    """Ask the server which models it serves; return the chosen model and the list.

    Raises:
        ServerUnreachableError, ServerResponseError, ConfigError: with the fix.
    """
    async with LLMClient(config) as client:
        model = await client.model()
        return model, await client.served_models()


def failed_records(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The records of requests that finally failed."""
    return [r for r in records if not r.ok]


def unreachable(record: RequestRecord) -> bool:
    """Whether a failed request failed because the server could not be reached.

    A timeout alone does not count: a busy server is slow, not gone.
    """
    return not record.ok and record.error is not None and record.error.startswith("connection failed")
