"""The client's handling of servers that are absent or are not OpenAI-compatible (no engine needed)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from echo_env.client import ClientConfig, LLMClient
from echo_env.errors import ConfigError, ServerResponseError, ServerUnreachableError
from echo_env.worker import RolloutWorker, SamplingConfig


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
    from echo_env.engine import find_free_port

    url = f"http://127.0.0.1:{find_free_port()}/v1"

    async def go() -> Any:
        async with LLMClient(ClientConfig(base_url=url, model="m", max_retries=1, backoff_s=0.05)) as client:
            worker = RolloutWorker(client, SamplingConfig(max_tokens=4))
            return await worker.complete({"a": "hi"})

    start = time.perf_counter()
    with pytest.raises(ServerUnreachableError):
        _run(go())
    assert time.perf_counter() - start < 30


def test_html_page_is_not_an_openai_server() -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>hello</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"

        async def go() -> Any:
            async with LLMClient(ClientConfig(base_url=url, max_retries=0)) as client:
                return await client.model()

        with pytest.raises(ServerResponseError):
            _run(go())
    finally:
        server.shutdown()
