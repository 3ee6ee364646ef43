"""The wire's one HTTP module: auth headers, error translation, the generation session's settings.

Offline: every server here is a socket or ``http.server`` on 127.0.0.1 in this process.
"""

from __future__ import annotations

import ast
import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from echo_env.errors import ConfigError, MetricsError, ServerResponseError, ServerUnreachableError
from echo_env.wire import http

PACKAGE = Path(__file__).resolve().parents[2] / "echo_env"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections (through its backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
        path = self.path.split("?")[0]
        if path == "/moved":
            self.send_response(307)
            self.send_header("Location", "/json")
            self.end_headers()
            return
        status, body = {"/json": (200, b'{"ok": true}'), "/text": (200, b"plain")}.get(path, (404, b"nope"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A local server that answers /json, /text, /moved (-> /json) and 404, recording each request's headers."""
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_refused_connection_is_server_unreachable_naming_the_fix() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/metrics"
    with pytest.raises(ServerUnreachableError, match=r"Could not connect to .*is the server running\?"):
        http.get(url)


def test_server_that_never_answers_is_a_timeout_naming_the_limit(silent_server: str) -> None:
    with pytest.raises(ServerUnreachableError, match=r"did not answer within 0\.3 s.*retry"):
        http.get(silent_server + "/metrics", timeout_s=0.3)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/metrics", "127.0.0.1:8000/metrics", "http://[::1/metrics"])
def test_bad_url_is_a_config_error_with_an_example(url: str) -> None:
    with pytest.raises(ConfigError, match=r"is not a valid http\(s\) URL.*e\.g\. http://127\.0\.0\.1:8000"):
        http.get(url)


def test_a_callers_wording_and_exception_type_are_used() -> None:
    failures = http.Failures(refused="metrics at {url} are off: pass metrics_url=none", error=MetricsError)
    url = f"http://127.0.0.1:{_closed_port()}/metrics"
    with pytest.raises(
        MetricsError, match=r"^metrics at http://127\.0\.0\.1:\d+/metrics are off: pass metrics_url=none$"
    ):
        http.get(url, failures=failures)


def test_bearer_token_is_sent_only_when_there_is_a_key(recorder: tuple[str, list[dict[str, str]]]) -> None:
    root, seen = recorder
    assert http.get(root + "/text", api_key="sk-test").text == "plain"
    http.get(root + "/text")
    assert seen[0]["authorization"] == "Bearer sk-test"
    assert "authorization" not in seen[1]


def test_get_json_follows_redirects_only_when_asked(recorder: tuple[str, list[dict[str, str]]]) -> None:
    root, _ = recorder
    assert http.get_json(root + "/moved", follow_redirects=True) == {"ok": True}
    with pytest.raises(ServerResponseError, match="answered HTTP 307"):
        http.get_json(root + "/moved")
    with pytest.raises(ServerResponseError, match="did not answer with JSON"):
        http.get_json(root + "/text")


def test_answers_ok_is_a_readiness_poll_that_never_raises(recorder: tuple[str, list[dict[str, str]]]) -> None:
    root, _ = recorder
    assert http.answers_ok(root + "/moved")
    assert not http.answers_ok(root + "/missing")
    assert not http.answers_ok(f"http://127.0.0.1:{_closed_port()}/health")
    assert not http.answers_ok("not a url")


def test_async_client_sends_the_key_and_translates_failures(recorder: tuple[str, list[dict[str, str]]]) -> None:
    root, seen = recorder

    async def main() -> int:
        async with http.AsyncHttp(api_key="sk-async", headers={"X-Extra": "1"}) as client:
            status = (await client.get(root + "/json")).status_code
        async with http.AsyncHttp(timeout_s=1.0) as client:
            with pytest.raises(ServerUnreachableError, match="Could not connect"):
                await client.post(f"http://127.0.0.1:{_closed_port()}/pause", json={})
        return status

    assert asyncio.run(main()) == 200
    assert seen[0]["authorization"] == "Bearer sk-async" and seen[0]["x-extra"] == "1"


def test_sync_pool_sends_the_key_and_translates_failures(recorder: tuple[str, list[dict[str, str]]]) -> None:
    root, seen = recorder
    with http.Http(api_key="sk-pool") as client:
        assert json.loads(client.request("GET", root + "/json", params={"q": "1"}).text) == {"ok": True}
        with pytest.raises(ConfigError, match="not a valid"):
            client.request("GET", "gopher://127.0.0.1/")
    assert seen[0]["authorization"] == "Bearer sk-pool" and seen[0]["path"] == "/json?q=1"


def test_generation_session_reads_the_proxy_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    async def main() -> tuple[str | None, str | None, int]:
        far, far_proxy = http.generation_session("http://server.example:8000/v1", 7)
        near, near_proxy = http.generation_session("http://127.0.0.1:8000/v1", 7)
        limit = far.connector.limit if far.connector is not None else -1
        await far.close()
        await near.close()
        return str(far_proxy[0]) if far_proxy[0] else None, str(near_proxy[0]) if near_proxy[0] else None, limit

    far, near, limit = asyncio.run(main())
    assert far == "http://proxy.example:3128"
    assert near is None
    assert limit == 7


def test_unreachable_generation_server_names_the_fix() -> None:
    error = http.unreachable_server("http://127.0.0.1:9/v1", ConnectionRefusedError("refused"))
    assert isinstance(error, ServerUnreachableError)
    assert "no server answers at base_url=http://127.0.0.1:9/v1 (refused): start one" in str(error)


def test_only_the_wire_http_client_and_stream_modules_import_an_http_library() -> None:
    libraries = {"httpx", "httpx2", "aiohttp", "requests", "urllib.request", "urllib.error", "urllib3"}
    # http.py: every request but generation; client.py and stream.py: generation (pool, then one response).
    allowed = {PACKAGE / "wire" / "http.py", PACKAGE / "wire" / "client.py", PACKAGE / "wire" / "stream.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            hits = {n for n in names if n in libraries or n.split(".")[0] in libraries}
            if hits and path not in allowed:
                offenders.append(f"{path.relative_to(PACKAGE)}: {sorted(hits)}")
    assert offenders == []
