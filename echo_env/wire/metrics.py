"""The server's own account of its prefix cache, read from its Prometheus ``/metrics``.

Client-side timings show that cached requests are faster; the server's counters show
why. Each engine names them its own way, and this module maps them onto one record,
:class:`CacheCounters`:

- ``"vllm"``: ``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``
  (vLLM >= 0.9), plus ``vllm:prompt_tokens_cached_total`` and the rest;
- ``"vllm-legacy"``: ``vllm:gpu_prefix_cache_queries_total`` and ``..._hits_total``
  (deprecated in vLLM 0.9, gone by 0.32);
- ``"sglang"``: ``sglang:prompt_tokens_total`` and ``sglang:cached_tokens_total``, read
  as queries and hits, which is what they mean;
- ``"none"``: none of these (the other fields may still be read).

Counters only ever grow while a server runs, so a run's figures are the difference of
two snapshots (:func:`delta`), never the server's own sliding-window log line. A server
restarted between the snapshots resets its counters; :func:`delta` detects that and
reports nothing rather than a wrong or negative number.

Pure functions parse the text (:mod:`echo_env.wire.metrics_text`) and interpret it
(:mod:`echo_env.wire.counters`); both are re-exported here. :func:`fetch_metrics` and
:class:`MetricsReader`, this module's own, are the only I/O (over :mod:`echo_env.wire.http`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from echo_env.errors import MetricsError
from echo_env.wire import http
from echo_env.wire.counters import (
    COUNTER_FIELDS,
    METRIC_BASES,
    Buckets,
    CacheConfig,
    CacheCounters,
    CounterDelta,
    LabelFilter,
    delta,
    histogram_quantile,
    model_names,
    read_cache_config,
    read_counters,
)
from echo_env.wire.metrics_text import METRICS_FIX, Sample, check_prometheus_text, not_prometheus, parse_prometheus

__all__ = [
    "COUNTER_FIELDS",
    "METRIC_BASES",
    "Buckets",
    "CacheConfig",
    "CacheCounters",
    "CounterDelta",
    "LabelFilter",
    "MetricsReader",
    "Sample",
    "Snapshot",
    "check_prometheus_text",
    "delta",
    "fetch_metrics",
    "histogram_quantile",
    "model_names",
    "parse_prometheus",
    "read_cache_config",
    "read_counters",
]


_ACCEPT = {"Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"}
_SCRAPE_FAILURES = http.Failures(
    refused="Could not connect to {url}: is the server running? metrics_url={url} should be the "
    "server's own host and port followed by /metrics.",
    timeout="{url} did not answer within {timeout_s} s: the server may be overloaded or still starting; "
    "retry, or raise the metrics timeout.",
    bad_url="metrics_url={url!r} is not a valid http(s) URL ({error}); pass e.g. http://127.0.0.1:8000/metrics",
    other="Reading {url} failed ({error_type}: {error}); check metrics_url.",
    error=MetricsError,
    bad_url_error=MetricsError,
)


def fetch_metrics(url: str, timeout_s: float = http.SCRAPE_TIMEOUT_S, api_key: str | None = None) -> str:
    """GET the server's Prometheus page and return its text.

    Args:
        url: The metrics URL, e.g. ``http://127.0.0.1:8000/metrics``.
        timeout_s: Seconds to wait for the server.
        api_key: Sent as ``Authorization: Bearer ...`` if given (for servers or proxies
            that protect ``/metrics``).

    Returns:
        The page's text, checked to look like Prometheus text.

    Raises:
        MetricsError: The URL is invalid, nothing answers, the server answers with an
            error status, or the page is not Prometheus text; the message names the fix.
    """
    # vLLM mounts /metrics as a sub-app, which some versions answer with a 307 to /metrics/.
    response = http.get(
        url, api_key=api_key, headers=_ACCEPT, timeout_s=timeout_s, follow_redirects=True, failures=_SCRAPE_FAILURES
    )
    status = response.status_code
    if status == 404:
        raise MetricsError(
            f"{url} answered 404: this server exposes no /metrics there; pass metrics_url=... with the right "
            "address (vLLM: http://HOST:PORT/metrics at the root, not under /v1; SGLang: start it with "
            "--enable-metrics), or metrics_url=none to run without server counters."
        )
    if status in (401, 403):
        raise MetricsError(
            f"{url} answered {status}: /metrics needs credentials here; pass api_key=... (the key the "
            "server or its proxy expects)."
        )
    if status >= 400:
        err = MetricsError(f"{url} answered HTTP {status}: {response.text[:200]!r}; check that the server is healthy.")
        err.status = status  # type: ignore[attr-defined]  # a server kind may know what this status means
        raise err
    text = response.text
    content_type = response.headers.get("content-type", "")
    if "html" in content_type.lower():
        raise not_prometheus(url, f"it is an HTML page (Content-Type {content_type})", METRICS_FIX)
    check_prometheus_text(text, url)
    return text


@dataclass(frozen=True)
class Snapshot:
    """The server's counters and cache configuration at one moment."""

    counters: CacheCounters
    """The cumulative counters."""
    cache_config: CacheConfig
    """The cache configuration the server reports."""
    taken_at: float
    """Wall-clock time the page was read, Unix seconds."""


class MetricsReader:
    """Reads one server's ``/metrics`` page on demand.

    Args:
        url: The metrics URL, e.g. ``http://127.0.0.1:8000/metrics``.
        model_name: Count only this model's series (see :func:`read_counters`).
        api_key: Bearer token for servers or proxies that protect ``/metrics``.
        timeout_s: Seconds to wait for each read.
    """

    def __init__(
        self,
        url: str,
        model_name: str | None = None,
        api_key: str | None = None,
        timeout_s: float = http.SCRAPE_TIMEOUT_S,
        kind: Any = None,
    ) -> None:
        self.url = url
        self.kind = kind
        """A server-kind adapter whose ``read_counters`` knows its metric names (None: vLLM/SGLang names)."""
        self.model_name = model_name
        self.api_key = api_key
        self.timeout_s = timeout_s

    def samples(self) -> list[Sample]:
        """Fetch and parse the page.

        Raises:
            MetricsError: As :func:`fetch_metrics` and :func:`parse_prometheus`.
        """
        return parse_prometheus(fetch_metrics(self.url, self.timeout_s, self.api_key), origin=self.url)

    def snapshot(self) -> Snapshot:
        """Fetch the page and read its counters and cache configuration.

        Raises:
            MetricsError: As :func:`fetch_metrics`, :func:`parse_prometheus` and
                :func:`read_counters`.
        """
        taken_at = time.time()
        samples = self.samples()
        return Snapshot(
            counters=(self.kind.read_counters if self.kind is not None else read_counters)(samples, self.model_name),
            cache_config=read_cache_config(samples),
            taken_at=taken_at,
        )
