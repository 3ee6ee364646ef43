"""vLLM's control endpoints: weight reloads, pause and resume, the prefix-cache reset, the weight version.

The wire only: each call is one HTTP request to the server's root, and a refusal is raised
as :class:`~echo_env.errors.ServerResponseError` naming what to turn on. vLLM 0.32 serves
these only with ``VLLM_SERVER_DEV_MODE=1`` (the embedded engine's ``dev_mode``):

- ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``
  reloads the weights in place (it keeps the prefix cache);
- ``POST /pause?mode=abort|wait|keep`` and ``POST /resume`` (the RL API; a pause clears
  the caches after draining);
- ``POST /reset_prefix_cache``;
- ``GET /weight_info``: ``{"weight_version": ...}`` (a reload does not change it).
"""

from __future__ import annotations

from typing import Any

from echo_env.errors import ServerResponseError
from echo_env.wire import http

DEV_MODE_FIX = "start vLLM with VLLM_SERVER_DEV_MODE=1 (the embedded engine: dev_mode)"
"""What turns these endpoints on."""


class VllmControl:
    """The control endpoints of one vLLM server."""

    def __init__(self, root: str, headers: dict[str, str] | None = None) -> None:
        """Args:
        root: The server's root (``http://host:port``, without ``/v1``).
        headers: Sent with every call (the bearer token).
        """
        self.root = root.rstrip("/")
        self.headers = headers or {}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> http.Response:
        where = f"{method} {self.root}{path}"
        failures = http.Failures(
            refused=f"{where} failed: {{error}}: is the server running at {self.root}?",
            timeout=f"{where} did not answer within {{timeout_s}} s: is the server overloaded?",
            bad_url=f"{where} failed: {{error}}: the server root should be e.g. http://127.0.0.1:8000",
            other=f"{where} failed: {{error}}",
        )
        async with http.AsyncHttp(timeout_s=http.CONTROL_TIMEOUT_S, headers=self.headers, failures=failures) as client:
            return await client.request(method, self.root + path, json=body)

    async def _ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = await self._call(method, path, body)
        if resp.status_code == 404:
            raise ServerResponseError(f"{self.root}{path} is not served (HTTP 404): {DEV_MODE_FIX}")
        if resp.status_code != 200:
            raise ServerResponseError(f"{method} {self.root}{path} answered HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError:
            return None

    async def reload_weights(self, weights_path: str) -> None:
        """Reload the weights in place from ``weights_path`` (a folder of safetensors on the server's machine)."""
        await self._ok(
            "POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_path}}
        )

    async def pause(self, mode: str = "abort") -> None:
        """Stop generation (``abort``, ``wait`` or ``keep`` what is in flight)."""
        await self._ok("POST", f"/pause?mode={mode}")

    async def resume(self) -> None:
        """Start generation again after :meth:`pause`."""
        await self._ok("POST", "/resume")

    async def reset_prefix_cache(self) -> None:
        """Drop every cached block."""
        await self._ok("POST", "/reset_prefix_cache")

    async def weight_version(self) -> str | None:
        """The weight version the server reports (None: it does not serve ``/weight_info``)."""
        resp = await self._call("GET", "/weight_info")
        if resp.status_code != 200:
            return None
        try:
            version = resp.json().get("weight_version")
        except (ValueError, AttributeError):
            return None
        return None if version is None else str(version)
