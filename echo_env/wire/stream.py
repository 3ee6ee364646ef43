"""Reading one streamed generation into its :class:`~echo_env.wire.records.RequestRecord`.

:class:`Stream` sends one attempt (over aiohttp with the server-sent events parsed here,
or through the openai SDK) and folds every chunk into the record as it arrives.

What is kept of each streamed chunk is decided once per request (:class:`Wants`): token ids
and logprobs only when the caller wants them, gaps between tokens unless the caller says it
has no use for them. Runs once per streamed token, so it does only that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai

from echo_env.wire.http import Proxy
from echo_env.wire.records import Api, Output, RequestRecord
from echo_env.wire.sse import SSEDecoder

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses worth another attempt."""


class Failed(Exception):
    """One attempt failed; ``retryable`` says whether another may succeed."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


def error_message(text: str) -> str | None:
    """The ``message`` of an OpenAI-style (or vLLM-style) error body, else None."""
    try:
        body = json.loads(text)
    except ValueError:
        return short(text) if text.strip() else None
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error) if isinstance(error, str) else None


@dataclass(frozen=True)
class Wants:
    """What one request keeps of its stream and sends besides its body, decided when it is sent."""

    tokens: bool
    """Keep token ids, prompt token ids and logprobs (completions only)."""
    itl: bool
    """Keep the gaps between text chunks."""
    headers: Mapping[str, str] | None
    """Extra HTTP headers for this request."""


class Stream:
    """Folds one request's streamed chunks into its record.

    Runs once per streamed token, so it does only what this request asked for (token
    ids, gaps) and builds each sequence's text once, at the end.
    """

    __slots__ = ("chat", "itl", "last", "outputs", "parts", "record", "start", "tokens")

    def __init__(self, record: RequestRecord, api: Api, want: Wants, start: float) -> None:
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
            Failed: The data is not a JSON object, or it reports a server error.
        """
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise Failed(f"malformed response: {short(str(exc))}: {short(data, 80)}", retryable=False) from None
        if chunk.__class__ is not dict:
            raise Failed(f"malformed response: an event is not a JSON object: {short(data, 80)}", retryable=False)
        if "error" in chunk and not chunk.get("choices"):
            # vLLM reports a failure that happens after the 200 header as an event.
            raise Failed(f"server error mid-stream: {short(error_message(data) or data)}", retryable=False)
        self.on_chunk(chunk)

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        """Fold one parsed chunk into the record.

        Raises:
            Failed: The chunk is not shaped like an OpenAI streaming chunk.
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
                    collect_tokens(out, choice)
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
            raise Failed(f"malformed response: bad chunk ({type(exc).__name__}: {exc})", retryable=False) from None

    async def read_sse(
        self,
        session: aiohttp.ClientSession,
        url: str,
        kwargs: dict[str, Any],
        headers: dict[str, str],
        extra_headers: Mapping[str, str] | None,
        proxy: Proxy,
    ) -> None:
        """Send the request over aiohttp and fold its server-sent events.

        Raises:
            Failed: The server refused the request, the connection broke, or the body was not UTF-8.
        """
        body = {k: v for k, v in kwargs.items() if k != "extra_body"}
        body.update(kwargs.get("extra_body") or {})
        sent = {**headers, **extra_headers} if extra_headers else headers
        proxy_url, proxy_auth = proxy
        try:
            async with session.post(url, json=body, headers=sent, proxy=proxy_url, proxy_auth=proxy_auth) as resp:
                if resp.status != 200:
                    text = await resp.text(errors="replace")
                    status = resp.status
                    message = error_message(text) or resp.reason or ""
                    raise Failed(
                        f"HTTP {status}: {short(message)}", retryable=status in RETRYABLE_STATUS, status=status
                    )
                decoder = SSEDecoder()
                done = False

                def fold(events: list[str]) -> None:
                    nonlocal done
                    for event in events:
                        if event == "[DONE]":
                            done = True
                        elif not done:
                            self.on_event(event)

                # Read to the end even after [DONE], so the connection goes back to the pool.
                async for data in resp.content.iter_any():
                    fold(decoder.feed(data))
                fold(decoder.close())
        except UnicodeDecodeError as exc:
            raise Failed(f"malformed response: not UTF-8 ({exc})", retryable=False) from None
        except aiohttp.ClientError as exc:
            raise Failed(f"connection failed: {short(str(exc) or type(exc).__name__)}", retryable=True) from None

    async def read_openai(
        self, sdk: openai.AsyncOpenAI, kwargs: dict[str, Any], extra_headers: Mapping[str, str] | None
    ) -> None:
        """Send the request through the openai SDK and fold its chunks.

        Raises:
            Failed: The server refused the request, the connection broke, or a chunk was malformed.
        """
        if extra_headers:
            kwargs = {**kwargs, "extra_headers": dict(extra_headers)}
        try:
            if self.chat:
                chunks = await sdk.chat.completions.create(**kwargs)
            else:
                chunks = await sdk.completions.create(**kwargs)
            async for chunk in chunks:
                self.on_chunk(chunk.model_dump())
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status in RETRYABLE_STATUS
            raise Failed(f"HTTP {status}: {short(exc.message)}", retryable=retryable, status=status) from None
        except openai.APIConnectionError as exc:
            raise Failed(f"connection failed: {short(str(exc.__cause__ or exc))}", retryable=True) from None
        except (openai.APIError, ValueError, KeyError, AttributeError) as exc:
            raise Failed(f"malformed response: {short(str(exc))}", retryable=False) from None

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
            Failed: The stream carried fewer or more sequences than the request asked for.
        """
        record = self.record
        record.e2e_s = time.perf_counter() - self.start
        record.outputs = [self.outputs[i] for i in sorted(self.outputs)]
        expected = record.num_prompts * record.n
        if len(record.outputs) != expected:
            raise Failed(f"expected {expected} choices, the stream carried {len(record.outputs)}", retryable=False)
        for out in record.outputs:
            if out.e2e_s is None:
                out.e2e_s = record.e2e_s


def collect_tokens(out: Output, choice: dict[str, Any]) -> None:
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


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
