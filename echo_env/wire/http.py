"""The one place where this package's HTTP is set up: auth headers, timeouts, error translation.

Two libraries, each where it is measured to fit:

- **httpx for the control plane**: server facts, tokenization, vLLM's control endpoints,
  the router probe, ``/metrics``, the Prometheus API, readiness polls of launched servers.
  Few calls, some sync and some async; httpx does both with one API. :func:`get`,
  :func:`get_json`, :func:`answers_ok` (sync) and :class:`AsyncHttp` / :class:`Http`
  (pooled) are the only ways the package makes these calls.
- **aiohttp for generation** (:mod:`echo_env.wire.client`): hundreds of streamed requests
  on one event loop, where client CPU per request shifts every request's clock. Measured
  (``benchmarks/README.md``, section 3, 64-1024 in flight): 0.46-0.59 ms of client CPU per
  streamed request over aiohttp with the client's own SSE parser, 5.3-13.5 ms over httpx
  (the ``openai`` SDK), 3.5-3.8 ms for the SDK on aiohttp. :func:`generation_session`,
  :func:`bearer` and :func:`unreachable_server` are what the client takes from here.

Every failure to reach a server becomes one of the project's errors
(:mod:`echo_env.errors`) with a message that names the fix; the wording per caller is a
:class:`Failures`. No User-Agent is set: each library's default is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from echo_env.errors import ConfigError, EchoEnvError, ServerResponseError, ServerUnreachableError

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = [
    "CONTROL_TIMEOUT_S",
    "HEALTH_TIMEOUT_S",
    "MODELS_TIMEOUT_S",
    "PROBE_TIMEOUT_S",
    "ROUTER_TIMEOUT_S",
    "SCRAPE_TIMEOUT_S",
    "TOKENIZE_TIMEOUT_S",
    "AsyncHttp",
    "Failures",
    "Http",
    "Proxy",
    "Response",
    "Transport",
    "answers_ok",
    "bearer",
    "generation_session",
    "get",
    "get_json",
    "server_root",
    "unreachable_server",
]


def server_root(base_url: str) -> str:
    """The server's root URL: ``http://host:port/v1`` -> ``http://host:port``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


PROBE_TIMEOUT_S = 10.0
"""Asking a server what it is (kind detection, detokenizing a message)."""
TOKENIZE_TIMEOUT_S = 30.0
"""Tokenizing the prompts on the server (many requests share one pool)."""
CONTROL_TIMEOUT_S = 300.0
"""vLLM's control endpoints: a weight reload reads the whole checkpoint."""
SCRAPE_TIMEOUT_S = 10.0
"""Reading ``/metrics`` or the Prometheus API."""
ROUTER_TIMEOUT_S = 5.0
"""Asking a server whether it is a router."""
HEALTH_TIMEOUT_S = 2.0
"""One readiness poll of a server being launched (polled again until its own deadline)."""
MODELS_TIMEOUT_S = 60.0
"""The generation client's ``/v1/models`` call, at most (less when the client's timeout is less)."""

Response = httpx.Response
"""An answer (status_code, text, content, headers, json())."""
Transport = httpx.BaseTransport
"""A stand-in for the network (tests pass ``httpx.MockTransport``)."""
Proxy = tuple["URL | None", "aiohttp.BasicAuth | None"]
"""A proxy URL and its login for aiohttp, or ``(None, None)``."""


def bearer(api_key: str | None) -> dict[str, str]:
    """The auth header for ``api_key`` (none when there is no key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass(frozen=True)
class Failures:
    """What a caller says when a request cannot be made, each message naming the fix.

    Templates may hold ``{url}`` (the URL asked), ``{timeout_s}``, ``{error}`` and
    ``{error_type}`` (what the library said); they are filled by plain replacement, so a
    caller may build them with f-strings holding its own values.
    """

    refused: str = "Could not connect to {url}: is the server running? Check the host and port."
    """Nothing listens there (or the host name does not resolve)."""
    timeout: str = "{url} did not answer within {timeout_s} s: the server may be overloaded or still starting; retry."
    """It did not answer in time."""
    bad_url: str = "{url!r} is not a valid http(s) URL ({error}): give e.g. http://127.0.0.1:8000"
    """The URL cannot be asked at all."""
    other: str = "Asking {url} failed ({error_type}: {error}); check that the server is healthy."
    """Any other transport failure (the connection dropped, a protocol error)."""
    error: type[EchoEnvError] = ServerUnreachableError
    """The exception raised for a server that cannot be reached."""
    bad_url_error: type[EchoEnvError] = ConfigError
    """The exception raised for a URL that cannot be asked."""


DEFAULT_FAILURES = Failures()


def _translate(exc: Exception, url: str, timeout_s: float | None, failures: Failures) -> EchoEnvError:
    """The project's error for an httpx failure, worded by ``failures``."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        template, kind = failures.bad_url, failures.bad_url_error
    elif isinstance(exc, httpx.TimeoutException):
        template, kind = failures.timeout, failures.error
    elif isinstance(exc, httpx.ConnectError):
        template, kind = failures.refused, failures.error
    else:
        template, kind = failures.other, failures.error
    fields = {
        "{url!r}": repr(url),
        "{url}": url,
        "{timeout_s}": "?" if timeout_s is None else f"{timeout_s:g}",
        "{error_type}": type(exc).__name__,
        "{error}": str(exc) or type(exc).__name__,
    }
    message = template
    for key, value in fields.items():
        message = message.replace(key, value)
    return kind(message)


_ERRORS = (httpx.HTTPError, httpx.InvalidURL)


def get(
    url: str,
    *,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    follow_redirects: bool = False,
    failures: Failures = DEFAULT_FAILURES,
) -> Response:
    """GET ``url`` once, whatever the status.

    Args:
        url: The full URL.
        api_key: Sent as a bearer token when given.
        headers: More headers.
        params: Query parameters.
        timeout_s: Seconds to wait for the server.
        follow_redirects: Follow 3xx answers.
        failures: How to word a failure.

    Raises:
        EchoEnvError: The URL is invalid (``failures.bad_url_error``), or nothing answers
            in time (``failures.error``); the message names the fix.
    """
    sent = {**bearer(api_key), **(headers or {})}
    try:
        return httpx.get(url, headers=sent, params=params, timeout=timeout_s, follow_redirects=follow_redirects)
    except _ERRORS as exc:
        raise _translate(exc, url, timeout_s, failures) from None


def get_json(
    url: str,
    *,
    api_key: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    follow_redirects: bool = False,
    failures: Failures = DEFAULT_FAILURES,
) -> Any:
    """GET ``url`` and return its JSON body.

    Raises:
        EchoEnvError: As :func:`get`.
        ServerResponseError: The answer is not HTTP 200 with a JSON body.
    """
    response = get(url, api_key=api_key, timeout_s=timeout_s, follow_redirects=follow_redirects, failures=failures)
    if response.status_code != 200:
        raise ServerResponseError(f"{url} answered HTTP {response.status_code}: {response.text[:200]!r}")
    try:
        return response.json()
    except ValueError:
        raise ServerResponseError(f"{url} did not answer with JSON: {response.text[:80]!r}") from None


def answers_ok(url: str, *, timeout_s: float = HEALTH_TIMEOUT_S, follow_redirects: bool = True) -> bool:
    """Whether a GET of ``url`` answers 200 within ``timeout_s`` (a readiness poll; never raises)."""
    try:
        return get(url, timeout_s=timeout_s, follow_redirects=follow_redirects).status_code == 200
    except EchoEnvError:
        return False


class Http:
    """A pooled sync connection for several control-plane calls (the Prometheus reader).

    Use it as ``with Http(...) as http:``; every failure is translated as :func:`get`'s.

    Args:
        timeout_s: Seconds to wait for each answer.
        api_key: Sent as a bearer token with every call.
        failures: How to word a failure.
        transport: A stand-in for the network (tests).
    """

    def __init__(
        self,
        *,
        timeout_s: float = SCRAPE_TIMEOUT_S,
        api_key: str | None = None,
        failures: Failures = DEFAULT_FAILURES,
        transport: Transport | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.failures = failures
        self._client = httpx.Client(timeout=timeout_s, headers=bearer(api_key), transport=transport)

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def request(
        self, method: str, url: str, *, params: dict[str, str] | None = None, data: dict[str, str] | None = None
    ) -> Response:
        """Send one request; ``data`` is form-encoded."""
        try:
            return self._client.request(method, url, params=params, data=data)
        except _ERRORS as exc:
            raise _translate(exc, url, self.timeout_s, self.failures) from None


class AsyncHttp:
    """A pooled async connection for control-plane calls (server facts, tokenizing, control, router).

    Use it as ``async with AsyncHttp(...) as http:``; every failure is translated as :func:`get`'s.

    Args:
        timeout_s: Seconds to wait for each answer.
        api_key: Sent as a bearer token with every call.
        headers: Sent with every call (besides the bearer token).
        failures: How to word a failure.
    """

    def __init__(
        self,
        *,
        timeout_s: float = PROBE_TIMEOUT_S,
        api_key: str | None = None,
        headers: dict[str, str] | None = None,
        failures: Failures = DEFAULT_FAILURES,
    ) -> None:
        self.timeout_s = timeout_s
        self.failures = failures
        self._client = httpx.AsyncClient(timeout=timeout_s, headers={**bearer(api_key), **(headers or {})})

    async def __aenter__(self) -> AsyncHttp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def request(self, method: str, url: str, *, json: Any = None) -> Response:
        """Send one request; ``json`` is the body when given."""
        try:
            return await self._client.request(method, url, json=json)
        except _ERRORS as exc:
            raise _translate(exc, url, self.timeout_s, self.failures) from None

    async def get(self, url: str) -> Response:
        """GET ``url``."""
        return await self.request("GET", url)

    async def post(self, url: str, json: Any = None) -> Response:
        """POST ``json`` to ``url``."""
        return await self.request("POST", url, json=json)


# --------------------------------------------------------------------------------------
# Generation (aiohttp): the settings the client's session is built with
# --------------------------------------------------------------------------------------


def generation_session(base_url: str, limit: int) -> tuple[aiohttp.ClientSession, Proxy]:
    """The generation client's aiohttp session, and the proxy its requests go through.

    One connection per concurrency slot, kept alive between requests. The client times
    each attempt itself (``asyncio.timeout``), so aiohttp's own timeouts are off. TLS is
    off for http:// (no context to build, 25 ms) and verified as usual for https://.

    The proxy (``HTTP(S)_PROXY``, ``NO_PROXY``) is read once here, not by
    ``trust_env=True``, which reads it and ``~/.netrc`` again on a thread for every
    request: two thread hops that cost 0.73 against 0.45 ms of CPU per streamed request
    (``benchmarks/client_overhead.py``'s stand-in). A netrc login would also clash with
    the Authorization header the client sends, and fail every request.

    Must be called inside the event loop that will use the session.
    """
    import aiohttp
    from yarl import URL

    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, keepalive_timeout=60, ssl=base_url.startswith("https://")
    )
    proxy: Proxy
    try:
        proxy = aiohttp.helpers.get_env_proxy_for_url(URL(base_url))
    except LookupError:
        proxy = (None, None)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)), proxy


def unreachable_server(base_url: str, exc: BaseException) -> ServerUnreachableError:
    """The error for a generation server that does not answer at all."""
    reason = str(exc) or type(exc).__name__
    return ServerUnreachableError(
        f"no server answers at base_url={base_url} ({reason}): start one, or leave base_url unset to use the "
        "embedded engine"
    )
