"""A small, deliberately misbehaving OpenAI-compatible server for tests.

This is a stand-in, not an inference engine: it "generates" whatever :attr:`reply`
returns, instantly. It exists for what the real vLLM engine cannot be made to do on
demand (malformed JSON, a stream cut half-way, empty choices, 429/500/503, a ``/metrics``
page that is missing, empty or not Prometheus text, counters that reset) and for load
tests far beyond what a CPU engine serves in CI time.

It speaks just enough HTTP/1.1 (keep-alive, ``Content-Length`` request bodies, chunked
server-sent events) for the ``openai`` client and ``httpx``. Endpoints:

- ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions`` (streamed);
- ``GET /metrics``: vLLM-named prefix-cache counters, from a toy prefix cache over
  character "tokens" in blocks of :data:`BLOCK_SIZE`;
- ``POST /tokenize``, ``/detokenize``: one token per character (so the prefix-cache
  test can plan without a local tokenizer);
- ``GET /stats``: what the server saw, as JSON (for a server in another process).

Use it in-process (``with FakeOpenAIServer() as server:``; its knobs are plain
attributes read on every request) or as a process of its own for load tests
(``python tests/fake_servers.py`` prints ``PORT <n>`` and serves until killed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

MODEL = "fake-model"
"""The one model the stand-in serves."""

BLOCK_SIZE = 16
"""Block size of the toy prefix cache, in characters (= tokens here)."""

FAULTS = ("none", "malformed_json", "cut", "empty_choices", "status", "stall", "raw_bytes")
"""What :attr:`FakeOpenAIServer.fault` may be set to."""

METRICS_MODES = ("ok", "missing", "empty", "html", "garbage")
"""What :attr:`FakeOpenAIServer.metrics_mode` may be set to."""

_WORD_RE = re.compile(r"Please echo the following word: (\S+)\s*(?:\nAssistant:)?\s*\Z")


def echo_reply(prompt: str) -> str:
    """The right answer to the last request in ``prompt`` (``" Echo: <word>"``)."""
    match = _WORD_RE.search(prompt)
    return f" Echo: {match.group(1)}" if match else " Echo: something"


class _HttpError(Exception):
    pass


class FakeOpenAIServer:
    """An OpenAI-compatible stand-in on 127.0.0.1, in a background thread.

    Args:
        port: TCP port; 0 picks a free one.
    """

    def __init__(self, port: int = 0) -> None:
        self.requested_port = port
        # ----- knobs (tests set these; read on every request) -----
        self.reply: Callable[[str], str] = echo_reply
        """Maps a prompt (chat: the last user message) to the generated text."""
        self.raw_reply: bytes | None = None
        """With fault ``raw_bytes``: spliced into the JSON as is (e.g. invalid UTF-8)."""
        self.fault: str = "none"
        """One of :data:`FAULTS`, applied to completion requests."""
        self.fault_status: int = 500
        """HTTP status sent by fault ``status``."""
        self.fault_count: int | None = None
        """How many completion requests get the fault before it stops (None: all)."""
        self.fault_only: Callable[[str], bool] | None = None
        """When set, only requests whose whole prompt it accepts get the fault (each retry asks again)."""
        self.stall_s: float = 30.0
        """How long fault ``stall`` holds a request before answering."""
        self.chunk_delay_s: float = 0.0
        """Pause between streamed chunks (keeps requests in flight longer)."""
        self.report_cached_tokens: bool = True
        """Whether usage carries ``prompt_tokens_details.cached_tokens``."""
        self.metrics_mode: str = "ok"
        """One of :data:`METRICS_MODES`."""
        self.html_only: bool = False
        """Answer everything with an HTML page, as a web app mistaken for base_url would."""
        self.router_workers: list[str] | None = None
        """When set, answer ``GET /workers`` with these URLs, as vllm-router does (the server plays a router)."""
        # ----- what the server saw -----
        self.paths: Counter[str] = Counter()
        """Requests per ``METHOD /path``."""
        self.authorizations: set[str] = set()
        """Every ``Authorization`` header value received."""
        self.unauthenticated: Counter[str] = Counter()
        """Requests per ``METHOD /path`` that came without an ``Authorization`` header."""
        self.completions_received = 0
        """Completion requests received (each retry counts)."""
        self.streams_open = 0
        """Completion requests being answered right now."""
        self.peak_streams = 0
        """The most completion requests answered at once."""
        self.connections_open = 0
        """TCP connections open right now."""
        self.connections_total = 0
        """TCP connections accepted since start (far above requests / keep-alive: no reuse)."""
        self.peak_connections = 0
        """The most TCP connections open at once."""
        # ----- toy prefix cache and its counters -----
        self._seen_blocks: set[int] = set()
        self._queries = 0
        self._hits = 0
        self._prompt_tokens = 0
        self._created = time.time()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ----- lifecycle -----------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    def start(self) -> FakeOpenAIServer:
        """Start serving in a background thread; returns once the port is bound."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.requested_port, backlog=4096)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            loop.run_forever()
            # Stopping: cancel whatever still runs (stalled requests), then close.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake server did not start")
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        def close() -> None:
            server.close()
            loop.stop()

        loop.call_soon_threadsafe(close)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart_counters(self) -> None:
        """What a server restart does to /metrics: counters back to zero, a new ``_created``."""
        with self._lock:
            self._queries = self._hits = self._prompt_tokens = 0
            self._seen_blocks.clear()
            self._created = time.time() + 1.0  # distinct even within one clock tick

    def stats(self) -> dict[str, Any]:
        """What the server saw (also served as ``GET /stats``)."""
        return {
            "paths": dict(self.paths),
            "completions_received": self.completions_received,
            "peak_streams": self.peak_streams,
            "peak_connections": self.peak_connections,
            "connections_total": self.connections_total,
            "authorizations": sorted(self.authorizations),
        }

    # ----- HTTP ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_open += 1
        self.connections_total += 1
        self.peak_connections = max(self.peak_connections, self.connections_open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                path = path.split("?", 1)[0]
                self.paths[f"{method} {path}"] += 1
                if "authorization" in headers:
                    self.authorizations.add(headers["authorization"])
                else:
                    self.unauthenticated[f"{method} {path}"] += 1
                keep = await self._route(method, path, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, _HttpError):
            return
        except asyncio.CancelledError:
            return  # the server is stopping: a stalled request just ends
        finally:
            self.connections_open -= 1
            writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str = "application/json"
    ) -> bool:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}.get(
            status, "Error"
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        return True

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if self.html_only:
            return await self._send(writer, 200, b"<!doctype html><html><body>Welcome</body></html>", "text/html")
        if method == "GET" and path == "/v1/models":
            data = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}
            return await self._send(writer, 200, json.dumps(data).encode())
        if method == "GET" and path == "/stats":
            return await self._send(writer, 200, json.dumps(self.stats()).encode())
        if method == "GET" and path == "/workers" and self.router_workers is not None:
            data = {"workers": [{"url": u, "model_id": MODEL} for u in self.router_workers]}
            return await self._send(writer, 200, json.dumps(data).encode())
        if method == "GET" and path in ("/metrics", "/metrics/"):
            return await self._metrics(writer)
        if method == "POST" and path == "/tokenize":
            request = json.loads(body)
            text = request.get("prompt")
            if text is None:
                text = "".join(m.get("content", "") for m in request.get("messages", []))
            tokens = [ord(c) for c in text]
            data = {"tokens": tokens, "count": len(tokens), "max_model_len": 1 << 20}
            return await self._send(writer, 200, json.dumps(data).encode())
        if method == "POST" and path == "/detokenize":
            text = "".join(map(chr, json.loads(body).get("tokens", [])))
            return await self._send(writer, 200, json.dumps({"prompt": text}).encode())
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            return await self._completion(path.endswith("chat/completions"), json.loads(body), writer)
        return await self._send(writer, 404, b'{"detail": "Not Found"}')

    async def _metrics(self, writer: asyncio.StreamWriter) -> bool:
        mode = self.metrics_mode
        if mode == "missing":
            return await self._send(writer, 404, b'{"detail": "Not Found"}')
        if mode == "empty":
            return await self._send(writer, 200, b"", "text/plain")
        if mode == "html":
            return await self._send(writer, 200, b"<!doctype html><html><body>Grafana</body></html>", "text/html")
        if mode == "garbage":
            return await self._send(writer, 200, b"this is not prometheus { at all\n", "text/plain")
        labels = f'engine="0",model_name="{MODEL}"'
        with self._lock:
            q, h, p, created = self._queries, self._hits, self._prompt_tokens, self._created
        text = (
            "# TYPE vllm:prefix_cache_queries counter\n"
            f"vllm:prefix_cache_queries_total{{{labels}}} {float(q)}\n"
            f"vllm:prefix_cache_queries_created{{{labels}}} {created}\n"
            "# TYPE vllm:prefix_cache_hits counter\n"
            f"vllm:prefix_cache_hits_total{{{labels}}} {float(h)}\n"
            f"vllm:prefix_cache_hits_created{{{labels}}} {created}\n"
            f"vllm:prompt_tokens_total{{{labels}}} {float(p)}\n"
            f'vllm:request_success_total{{finished_reason="stop",{labels}}} {float(self.completions_received)}\n'
            f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",enable_prefix_caching="True",engine="0"}} 1.0\n'
            f"vllm:num_requests_running{{{labels}}} {float(self.streams_open)}\n"
        )
        return await self._send(writer, 200, text.encode(), "text/plain; version=0.0.4")

    def _cache(self, prompt: str) -> int:
        """Look ``prompt`` up in the toy prefix cache and add it; return the hit tokens."""
        with self._lock:
            key, hit, hitting = 0, 0, True
            usable = (len(prompt) - 1) // BLOCK_SIZE  # the last token is always computed
            for i in range(len(prompt) // BLOCK_SIZE):
                key = hash((key, prompt[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]))
                if hitting and i < usable and key in self._seen_blocks:
                    hit += BLOCK_SIZE
                else:
                    hitting = False
                self._seen_blocks.add(key)
            self._queries += len(prompt)
            self._hits += hit
            self._prompt_tokens += len(prompt)
        return hit

    def _take_fault(self) -> str:
        if self.fault == "none":
            return "none"
        if self.fault_count is None:
            return self.fault
        if self.fault_count > 0:
            self.fault_count -= 1
            return self.fault
        return "none"

    async def _completion(self, chat: bool, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        self.completions_received += 1
        self.streams_open += 1
        self.peak_streams = max(self.peak_streams, self.streams_open)
        try:
            return await self._answer(chat, request, writer)
        finally:
            self.streams_open -= 1

    async def _answer(self, chat: bool, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if chat:
            messages = request["messages"]
            prompts = [next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")]
            whole = ["".join(m["content"] for m in messages)]
        else:
            raw = request["prompt"]
            if isinstance(raw, str):
                prompts = [raw]
            elif raw and isinstance(raw[0], int):
                prompts = ["".join(map(chr, raw))]
            elif raw and isinstance(raw[0], list):
                prompts = ["".join(map(chr, ids)) for ids in raw]
            else:
                prompts = list(raw)
            whole = prompts
        fault = "none" if self.fault_only is not None and not self.fault_only("".join(whole)) else self._take_fault()
        if fault == "status":
            body = json.dumps({"error": {"message": f"fake fault {self.fault_status}", "code": self.fault_status}})
            return await self._send(writer, self.fault_status, body.encode())
        if fault == "stall":
            await asyncio.sleep(self.stall_s)
        n = int(request.get("n") or 1)
        cached = sum(self._cache(p) for p in whole)
        prompt_tokens = sum(len(p) for p in whole)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            chunk = {"id": "cmpl-fake", "object": kind, "created": 0, "model": MODEL, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": index, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

        async def send(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)

        if fault == "malformed_json":
            await send(b'data: {"id": "cmpl-fake", "choices": [{"index": 0, "text": "Ech\n\n')
        elif fault == "cut":
            await send(event([choice(0, " Echo:", None)]))
            # Drop the connection without the chunked terminator, as a dying server does.
            writer.transport.abort()
            raise _HttpError("cut")
        elif fault == "raw_bytes":
            head = event([choice(0, "@@RAW@@", None)])
            await send(head.replace(b"@@RAW@@", self.raw_reply or b"\xff\xfe"))
        elif fault != "empty_choices":
            for index in range(len(prompts) * n):
                text = self.reply(prompts[index // n])
                await send(event([choice(index, text, None)]))
                await send(event([choice(index, "", "stop")]))
        completion = len(prompts) * n
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached} if self.report_cached_tokens else None,
        }
        await send(event([], usage))
        await send(b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground (for load tests that want the server in another process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(port=args.port).start()
    print(f"PORT {server.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
