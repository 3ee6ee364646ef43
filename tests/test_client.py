"""The client's handling of servers that are absent or are not OpenAI-compatible (no engine needed)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_env.serving.client import ClientConfig, LLMClient, SSEDecoder
from echo_env.errors import ConfigError, ServerResponseError, ServerUnreachableError
from echo_env.rollout.worker import RolloutWorker, SamplingConfig


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="http"):
        ClientConfig(base_url="localhost:8000")
    with pytest.raises(ConfigError, match="max_concurrency"):
        ClientConfig(base_url="http://x/v1", max_concurrency=0)
    with pytest.raises(ConfigError, match="batched"):
        SamplingConfig(api="chat", batching="batched")
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingConfig(max_tokens=0)


def test_dead_port_ends_in_project_error_quickly() -> None:
    from echo_env.serving.engine import find_free_port

    url = f"http://127.0.0.1:{find_free_port()}/v1"

    async def go() -> Any:
        async with LLMClient(ClientConfig(base_url=url, model="m", max_retries=1, backoff_s=0.05)) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=4))
            return await worker.complete({"a": "hi"})

    start = time.perf_counter()
    with pytest.raises(ServerUnreachableError):
        _run(go())
    assert time.perf_counter() - start < 30


@contextlib.contextmanager
def _serve(method: str, content_type: str, body: bytes, status: int = 200) -> Iterator[str]:
    """A local HTTP server answering every ``method`` request with ``body``; yields its /v1 URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    setattr(Handler, f"do_{method}", Handler.answer)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_html_page_is_not_an_openai_server() -> None:
    async def go(url: str) -> Any:
        async with LLMClient(ClientConfig(base_url=url, max_retries=0)) as client:
            return await client.model()

    with _serve("GET", "text/html", b"<html><body>hello</body></html>") as url, pytest.raises(ServerResponseError):
        _run(go(url))


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (401, b'{"error": "Unauthorized"}', "set api_key= or OPENAI_API_KEY"),
        (404, b"not found", "is base_url the OpenAI API root (ending in /v1)?"),
        (200, b'{"object": "list", "data": []}', "lists no model"),
        (200, b'{"object": "list"}', "did not answer like an OpenAI-compatible server"),
    ],
)
def test_models_answers_that_are_not_a_model_list_name_the_fix(status: int, body: bytes, needle: str) -> None:
    async def go(url: str) -> Any:
        async with LLMClient(ClientConfig(base_url=url, max_retries=0)) as client:
            return await client.model()

    with (
        _serve("GET", "application/json", body, status) as url,
        pytest.raises(ServerResponseError, match=re.escape(needle)),
    ):
        _run(go(url))


# ----- the event-stream parser -----------------------------------------------------------

EVENTS = ['{"a": 1}', '{"text": "caf\u00e9 \u56de\u58f0"}', "[DONE]"]


def _body(newline: bytes) -> bytes:
    body = b": a comment line\n".replace(b"\n", newline)
    for event in EVENTS:
        body += b"event: message" + newline + b"data: " + event.encode() + newline + newline
    return body


@settings(max_examples=200, deadline=None)
@given(newline=st.sampled_from([b"\n", b"\r\n", b"\r"]), cuts=st.lists(st.integers(min_value=0, max_value=200)))
def test_sse_decoder_gives_the_same_events_however_the_bytes_are_split(newline: bytes, cuts: list[int]) -> None:
    body = _body(newline)
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    assert events + decoder.close() == EVENTS


def test_sse_decoder_joins_data_lines_and_keeps_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data:one\ndata: two\n\ndata: three") == ["one\ntwo"]
    assert decoder.close() == ["three"]
    assert decoder.close() == []


def test_sse_decoder_rejects_data_that_is_not_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_an_error_event_after_the_header_fails_the_request_with_the_servers_message() -> None:
    """vLLM reports a failure that happens mid-stream as an event carrying ``error``."""
    body = b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n'

    async def go(url: str) -> Any:
        async with LLMClient(ClientConfig(base_url=url, model="m", max_retries=2)) as client:
            return await client.generate("hi")

    with _serve("POST", "text/event-stream", body) as url:
        record = _run(go(url))
    assert not record.ok and record.attempts == 1
    assert record.error == "server error mid-stream: engine died"


def test_transport_must_be_known() -> None:
    with pytest.raises(ConfigError, match="transport must be sse or openai"):
        ClientConfig(base_url="http://x/v1", transport="grpc")  # type: ignore[arg-type]
