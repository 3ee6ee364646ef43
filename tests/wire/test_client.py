"""The client: servers that are absent or not OpenAI-compatible, the event-stream parser, and what
a request keeps and sends (token ids, gaps, headers, proxy settings). No engine needed."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_env.errors import ConfigError, ServerResponseError, ServerUnreachableError
from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient, RequestRecord
from echo_env.wire.sse import SSEDecoder


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
    from echo_env.launch.engine import find_free_port

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
def _serve(
    method: str, content_type: str, body: bytes, status: int = 200, seen: list[dict[str, str]] | None = None
) -> Iterator[str]:
    """A local HTTP server answering every ``method`` request with ``body``; yields its /v1 URL.

    With ``seen``, each request's path and headers (names lower-cased) are appended to it.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if seen is not None:
                seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
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


# ----- what a request keeps and sends ---------------------------------------------------------


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _token(text: str, token_id: int, logprob: float, finish: str | None = None, **more: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "token_ids": [token_id], "logprobs": {"token_logprobs": [logprob]}}
    return {"choices": [{**choice, "finish_reason": finish, **more}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "prompt_tokens_details": None}}
STREAM = _sse(
    _token(" Echo", 10, -0.1, prompt_token_ids=[1, 2, 3]),
    _token(":", 11, -0.2),
    _token(" apple", 12, -0.3, "stop"),
    USAGE,
)
"""A vLLM-style completions stream with ``return_token_ids`` and ``logprobs`` on."""


def _generate(url: str, transport: str = "sse", prompt: Any = "hi", **kwargs: Any) -> RequestRecord:
    async def go() -> RequestRecord:
        config = ClientConfig(base_url=url, model="m", max_retries=0, transport=transport)  # type: ignore[arg-type]
        async with LLMClient(config) as client:
            return await client.generate(prompt, **kwargs)

    return asyncio.run(go())


def test_token_ids_and_logprobs_are_kept_when_the_request_asks_for_them() -> None:
    with _serve("POST", "text/event-stream", STREAM) as url:
        asked = _generate(url, logprobs=1)
        by_extra = _generate(url, extra_body={"return_token_ids": True})
        forced = _generate(url, want_tokens=True)
        plain = _generate(url)
        refused = _generate(url, logprobs=1, want_tokens=False)
    for record in (asked, by_extra, forced):
        out = record.outputs[0]
        assert record.ok and out.text == " Echo: apple"
        assert out.token_ids == [10, 11, 12] and out.logprobs == [-0.1, -0.2, -0.3]
        assert out.prompt_token_ids == [1, 2, 3]
    for record in (plain, refused):
        out = record.outputs[0]
        assert record.ok and out.text == " Echo: apple" and out.chunks == 3
        assert out.token_ids is None and out.logprobs is None and out.prompt_token_ids is None


def test_gaps_between_tokens_are_kept_unless_no_one_wants_them() -> None:
    with _serve("POST", "text/event-stream", STREAM) as url:
        with_itl = _generate(url)
        without = _generate(url, want_itl=False)
    assert len(with_itl.outputs[0].itl_s) == 2 and all(gap >= 0 for gap in with_itl.itl_s)
    assert without.outputs[0].itl_s == [] and without.itl_s == []
    for record in (with_itl, without):  # what the prefix-cache test needs is there either way
        assert record.ok and record.ttft_s is not None and record.e2e_s is not None
        assert record.outputs[0].finish_reason == "stop"
        assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (3, 3, None)


def test_chat_deltas_are_joined_into_the_text() -> None:
    deltas = [{"role": "assistant", "content": ""}, {"content": " Echo"}, {}, {"content": ": apple"}]
    body = _sse(*({"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas), USAGE)
    with _serve("POST", "text/event-stream", body) as url:
        record = _generate(url, prompt=[{"role": "user", "content": "hi"}], api="chat")
    assert record.ok and record.outputs[0].text == " Echo: apple" and record.outputs[0].chunks == 2


def test_a_text_that_is_not_a_string_is_a_malformed_response() -> None:
    body = _sse({"choices": [{"index": 0, "text": 42, "finish_reason": None}]}, USAGE)
    with _serve("POST", "text/event-stream", body) as url:
        record = _generate(url)
    assert not record.ok and record.error is not None and record.error.startswith("malformed response: bad chunk")


@pytest.mark.parametrize("transport", ["sse", "openai"])
def test_extra_headers_go_with_their_request_only(transport: str) -> None:
    seen: list[dict[str, str]] = []
    with _serve("POST", "text/event-stream", STREAM, seen=seen) as url:
        first = _generate(url, transport, headers={"X-Session-ID": "agent-7"})
        second = _generate(url, transport)
    assert first.ok and second.ok, (first.error, second.error)
    assert [r.get("x-session-id") for r in seen] == ["agent-7", None]
    assert all(r["authorization"] == "Bearer EMPTY" for r in seen)  # the client's own headers stay


def test_proxy_settings_from_the_environment_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HTTP_PROXY`` is read once per client; requests go through the proxy, as ``trust_env`` did."""
    seen: list[dict[str, str]] = []
    with _serve("POST", "text/event-stream", STREAM, seen=seen) as proxy:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.removesuffix("/v1"))
        monkeypatch.setenv("http_proxy", proxy.removesuffix("/v1"))
        record = _generate("http://llm.invalid:8000/v1")
    assert record.ok, record.error
    assert [r["path"] for r in seen] == ["http://llm.invalid:8000/v1/completions"]


def test_a_netrc_entry_for_the_server_does_not_break_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sends its own Authorization header; a ~/.netrc login for the host must not clash with it."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    seen: list[dict[str, str]] = []
    with _serve("POST", "text/event-stream", STREAM, seen=seen) as url:
        record = _generate(url)
    assert record.ok, record.error
    assert seen[0]["authorization"] == "Bearer EMPTY"
