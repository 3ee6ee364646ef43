"""A STAND-IN server: a minimal streaming OpenAI-compatible endpoint that answers instantly.

This is not an inference engine and measures nothing about one. It exists only to
isolate the cost of the *client*: it answers every ``/v1/completions`` or
``/v1/chat/completions`` request at once with ``max_tokens`` streamed chunks (16 in the
benchmarks), a usage chunk and ``[DONE]``, framed as vLLM frames them (HTTP/1.1
keep-alive, chunked transfer encoding, one SSE event per token).

The events are streamed as a real server streams them: one token per event, each event
written on its own turn of the server's event loop, so every request in flight gets its
next token in the same turn, like a decode step that takes no time. A client therefore
reads the tokens of a request in many small pieces, as it would from vLLM, not as one
block (``--all-at-once`` writes each answer whole, to see what that flatters). Answers
are prebuilt and cached per (endpoint, token count), so the server spends microseconds
per request and the client under test is the bottleneck.

Run: ``python benchmarks/standin_server.py --port 0``; it prints ``READY <port>`` once
listening. ``GET /v1/models``, ``GET /health`` and ``GET /version`` answer too, so the
package's client and ``vllm bench serve`` accept it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
from collections import deque

MODEL = "standin-echo"
"""The one model the stand-in lists."""

_MAX_TOKENS = re.compile(rb'"max_(?:completion_)?tokens"\s*:\s*(\d+)')
_STREAM_FALSE = re.compile(rb'"stream"\s*:\s*false')
_WORDS = (" Echo", ":", " apple", " banana", " cherry", " river", " stone", " cloud")


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict[str, object]) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _stream_body(chat: bool, tokens: int, prompt_tokens: int) -> tuple[bytes, ...]:
    """The response as the pieces a server writes in turn: headers, one event per token, usage, ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    parts = []
    for i in range(tokens):
        text = _WORDS[i % len(_WORDS)]
        finish = "length" if i == tokens - 1 else None
        if chat:
            choice: dict[str, object] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        parts.append(_event({"id": "cmpl-standin", "object": kind, "created": 0, "model": MODEL, "choices": [choice]}))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    parts.append(
        _event({"id": "cmpl-standin", "object": kind, "created": 0, "model": MODEL, "choices": [], "usage": usage})
    )
    parts.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
    )
    return (head, *parts)


def _json_response(obj: object, status: bytes = b"200 OK") -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: keep-alive\r\n\r\n%s" % (len(body), body)
    )


def _plain_completion(chat: bool, tokens: int, prompt_tokens: int) -> bytes:
    text = "".join(_WORDS[i % len(_WORDS)] for i in range(tokens))
    choice: dict[str, object] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    )
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    kind = "chat.completion" if chat else "text_completion"
    return _json_response(
        {"id": "cmpl-standin", "object": kind, "created": 0, "model": MODEL, "choices": [choice], "usage": usage}
    )


_MODELS = _json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "standin"}]})
_OK = _json_response({"status": "ok"})
_VERSION = _json_response({"version": "standin"})
_NOT_FOUND = _json_response({"error": "not found"}, b"404 Not Found")
_cache: dict[tuple[bool, bool, int, int], tuple[bytes, ...]] = {}
ALL_AT_ONCE = False
"""Write each answer whole (``--all-at-once``) instead of one event per loop turn."""


def answer(method: bytes, path: bytes, body: bytes) -> tuple[bytes, ...]:
    """The HTTP response to one request, as the pieces written in turn (prebuilt and cached)."""
    if method == b"POST" and path.startswith(b"/v1/") and path.endswith(b"completions"):
        chat = b"chat" in path
        m = _MAX_TOKENS.search(body)
        tokens = max(1, int(m.group(1))) if m else 16
        stream = _STREAM_FALSE.search(body) is None
        # A rough prompt size for the usage chunk: clients only pass it through.
        key = (chat, stream, tokens, len(body) // 4)
        resp = _cache.get(key)
        if resp is None:
            resp = _stream_body(chat, tokens, key[3]) if stream else (_plain_completion(chat, tokens, key[3]),)
            if ALL_AT_ONCE:
                resp = (b"".join(resp),)
            _cache[key] = resp
        return resp
    if path.startswith(b"/v1/models"):
        return (_MODELS,)
    if path in (b"/health", b"/ping"):
        return (_OK,)
    if path == b"/version":
        return (_VERSION,)
    return (_NOT_FOUND,)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are parsed by hand for speed.

    Responses go out one piece per event-loop turn (``_pump``), in order.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.pending: deque[bytes] = deque()
        self.loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pending.clear()

    def _pump(self) -> None:
        if self.transport.is_closing():
            self.pending.clear()
            return
        self.transport.write(self.pending.popleft())
        if self.pending:
            self.loop.call_soon(self._pump)

    def _send(self, parts: tuple[bytes, ...]) -> None:
        idle = not self.pending
        self.pending.extend(parts)
        if idle:
            self._pump()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at >= 0:
                line_end = lower.find(b"\r\n", at)
                length = int(lower[at + 15 : line_end if line_end >= 0 else None].strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            request_line = head.split(b"\r\n", 1)[0].split(b" ")
            method, path = request_line[0], request_line[1] if len(request_line) > 1 else b"/"
            self._send(answer(method, path.split(b"?", 1)[0], body))


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` (0: any free port) until killed; print ``READY <port>``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    server = await loop.create_server(Connection, sock=sock, backlog=4096)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse ``--port`` and serve (with uvloop when installed: the stand-in must not be the bottleneck)."""
    parser = argparse.ArgumentParser(description="stand-in OpenAI-compatible server (isolates client cost)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--all-at-once", action="store_true", help="write each answer whole, not an event per turn")
    args = parser.parse_args()
    global ALL_AT_ONCE
    ALL_AT_ONCE = args.all_at_once
    try:
        import uvloop

        uvloop.run(serve(args.port))
    except ImportError:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
