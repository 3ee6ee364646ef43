"""Asking a server whether it is a router, and for its replicas (``GET /workers``, ``GET /list_workers``)."""

from __future__ import annotations

from collections.abc import Mapping

from echo_env.errors import EchoEnvError
from echo_env.wire import http
from echo_env.wire.http import server_root


def worker_urls_from(body: object) -> list[str] | None:
    """Replica URLs from a router's ``GET /workers`` or ``GET /list_workers`` answer (None: not a worker list).

    vllm-router answers ``/workers`` with ``{"workers": [{"url": ...}, ...]}`` and
    ``/list_workers`` with ``{"urls": [...]}``; SGLang's router answers the latter too.
    The URLs come back sorted and without repeats: vllm-router lists its workers in its
    hash map's order, which changes from one start to the next.
    """
    if not isinstance(body, Mapping):
        return None
    urls = body.get("urls")
    if isinstance(urls, list) and all(isinstance(u, str) for u in urls):
        return sorted(set(urls))
    workers = body.get("workers")
    if isinstance(workers, list):
        found = [w.get("url") for w in workers if isinstance(w, Mapping)]
        if found and all(isinstance(u, str) for u in found):
            return sorted({str(u) for u in found})
    return None


async def probe_router(root: str, timeout_s: float = http.ROUTER_TIMEOUT_S) -> list[str] | None:
    """Ask a server whether it is a router, and for its replicas.

    Tries ``GET /workers`` then ``GET /list_workers`` on the server's root.

    Args:
        root: The server root (``http://host:port``; a trailing ``/v1`` is dropped).
        timeout_s: Seconds to wait for each answer.

    Returns:
        The replica URLs when the target is a router; None when neither path answers
        with a worker list (a plain vLLM or SGLang server answers 404).
    """
    base = server_root(root)
    async with http.AsyncHttp(timeout_s=timeout_s) as client:
        for path in ("/workers", "/list_workers"):
            try:
                response = await client.get(base + path)
            except EchoEnvError:
                continue
            if response.status_code != 200:
                continue
            try:
                urls = worker_urls_from(response.json())
            except ValueError:
                continue
            if urls is not None:
                return urls
    return None
