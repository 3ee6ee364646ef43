"""How the generation client talks to a server: :class:`ClientConfig`, and how many sockets it may hold."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from echo_env.errors import ConfigError

__all__ = ["ClientConfig", "Transport", "usable_concurrency"]

log = logging.getLogger(__name__)

Transport = Literal["sse", "openai"]
# File descriptors kept free for everything else a process opens (logs, tokenizer files,
# the metrics reader) when sizing the connection pool against RLIMIT_NOFILE.
_FD_RESERVE = 128


def usable_concurrency(wanted: int) -> int:
    """How many connections this process can hold open at once, up to ``wanted``.

    Each in-flight request holds one socket. Many systems default to a soft limit of
    1024 open files, below a large ``max_concurrency``; past it, connects fail with
    EMFILE, which looks exactly like an unreachable server. So the soft limit is raised
    toward the hard one (as vLLM does for its server), and if that is still too low the
    concurrency is capped, with a warning naming the fix.

    Args:
        wanted: The configured ``max_concurrency``.

    Returns:
        ``wanted``, or less when the open-file limit cannot hold that many sockets.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return wanted
    need = wanted + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    capped = max(1, soft - _FD_RESERVE)
    log.warning(
        "max_concurrency=%d needs ~%d open files but the limit is %d: using %d; raise it with `ulimit -n %d`",
        wanted,
        need,
        soft,
        capped,
        need,
    )
    return capped


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how to talk to it."""

    base_url: str
    """The server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str | None = None
    """Served model name; None asks the server (``/v1/models``) and takes the first."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as a bearer token; None reads ``OPENAI_API_KEY`` (else a placeholder). Kept out
    of ``repr`` so a logged or printed config never shows it."""
    timeout_s: float = 120.0
    """Limit on one attempt of one request, from send to the last token."""
    max_retries: int = 2
    """Retries after a connection error, a timeout before any token, 429 or 5xx."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry, with jitter."""
    max_concurrency: int = 256
    """Requests in flight at once; the rest wait (their wait is ``queue_s``)."""
    transport: Transport = "sse"
    """How generation requests are sent: ``sse`` (aiohttp, events parsed here; fast) or
    ``openai`` (the ``openai`` SDK's streaming client; 6-14x the CPU per request, measured)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url={self.base_url!r} is not an http(s) URL: e.g. http://127.0.0.1:8000/v1")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be zero or more, got {self.max_retries}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.transport not in ("sse", "openai"):
            raise ConfigError(f"transport must be sse or openai, got {self.transport!r}")

    def resolved_api_key(self) -> str:
        """The key to send: the configured one, ``OPENAI_API_KEY``, or a placeholder."""
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
