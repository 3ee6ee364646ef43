"""What a server's Prometheus samples say about its prefix cache, and what it counted between two reads.

Each engine names its counters its own way; :func:`read_counters` maps them onto one
record, :class:`CacheCounters` (the naming schemes are listed in
:mod:`echo_env.wire.metrics`). :func:`read_cache_config` reads vLLM's cache-config info
gauge. Counters only grow while a server runs, so a run's figures are the difference of
two reads (:func:`delta`), which detects a restart in between and then reports nothing.
Pure functions only: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from echo_env.errors import MetricsError
from echo_env.wire.metrics_text import Sample

__all__ = [
    "COUNTER_FIELDS",
    "METRIC_BASES",
    "Buckets",
    "CacheConfig",
    "CacheCounters",
    "CounterDelta",
    "LabelFilter",
    "delta",
    "histogram_quantile",
    "model_names",
    "read_cache_config",
    "read_counters",
]

Buckets = tuple[tuple[float, float], ...]
"""Histogram buckets as ``(upper bound "le", cumulative count)`` pairs, sorted by bound."""

# --------------------------------------------------------------------------------------
# Interpreting the samples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """The ten counts a server's page gives: cumulative in :class:`CacheCounters`, a
    difference in :class:`CounterDelta`. None means the server does not expose it."""

    source: str
    """Which naming scheme the prefix-cache counters came from: "vllm", "vllm-legacy", "sglang" or "none"."""
    queries: float | None = None
    """Prompt tokens looked up in the prefix cache (SGLang: all prompt tokens)."""
    hits: float | None = None
    """Of those, tokens found in the cache (SGLang: cached tokens from every tier)."""
    prompt_tokens: float | None = None
    """Prompt tokens the server processed (``vllm:prompt_tokens_total``)."""
    cached_prompt_tokens: float | None = None
    """Prompt tokens served from any cache, local or external (``vllm:prompt_tokens_cached_total``)."""
    external_queries: float | None = None
    """Tokens looked up in an external KV cache (vLLM KV connectors such as LMCache)."""
    external_hits: float | None = None
    """Of those, tokens found there."""
    requests: float | None = None
    """Finished requests, whatever the finish reason."""
    ttft_sum: float | None = None
    """Sum of time-to-first-token over requests, seconds."""
    ttft_count: float | None = None
    """Number of requests in the time-to-first-token histogram."""


@dataclass(frozen=True)
class CacheCounters(Counts):
    """A server's cumulative prefix-cache and request counters at one moment.

    Every number is summed over the server's engines (data-parallel ranks) and over
    labels such as ``finished_reason`` or ``cache_source``.
    """

    ttft_buckets: Buckets | None = None
    """Time-to-first-token histogram as cumulative ``(le, count)`` pairs, sorted by ``le``."""
    started_at: float | None = None
    """Earliest ``_created`` time of the cache counters (Unix seconds): changes when the server restarts."""


# Candidate names per field, current scheme first. Counters are looked up by their base
# name with "_total" appended (what prometheus_client writes) and then bare, for
# hand-written exporters. During vLLM's deprecation window (0.9-0.10) a server could
# show both the new and the old prefix-cache names; the new ones win.
_PREFIX_SCHEMES: tuple[tuple[str, str, str], ...] = (
    ("vllm", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"),
    ("vllm-legacy", "vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits"),
    ("sglang", "sglang:prompt_tokens", "sglang:cached_tokens"),
)
_PROMPT_TOKENS = ("vllm:prompt_tokens", "sglang:prompt_tokens")
_REQUESTS = ("vllm:request_success", "sglang:num_requests")
_TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
# vLLM splits prompt tokens by source; all but local_compute came from a cache.
_CACHED_SOURCES = frozenset({"local_cache_hit", "external_kv_transfer"})
_CACHED_COUNTERS = ("vllm:prompt_tokens_cached", "vllm:prompt_tokens_by_source", "sglang:cached_tokens")
_EXTERNAL = ("vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits")

METRIC_BASES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [name for _, *names in _PREFIX_SCHEMES for name in names]
        + [*_PROMPT_TOKENS, *_CACHED_COUNTERS, *_EXTERNAL, *_REQUESTS, *_TTFT]
    )
)
"""Base names of every series :func:`read_counters` reads; on a page they carry a suffix
(``_total``, ``_created``, ``_bucket``, ``_sum``, ``_count``) or none. A reader that fetches
series by name (the Prometheus API, :mod:`echo_env.wire.prometheus`) asks for these."""

LabelFilter = Callable[[Mapping[str, str]], bool]


class _Index:
    """Samples grouped by name, restricted to one model."""

    def __init__(self, samples: Iterable[Sample], model_name: str | None) -> None:
        self.by_name: dict[str, list[Sample]] = {}
        for s in samples:
            # Series without a model_name label (process metrics, cache_config_info)
            # belong to every model the server serves.
            if model_name is not None and s.labels.get("model_name", model_name) != model_name:
                continue
            self.by_name.setdefault(s.name, []).append(s)

    def has(self, name: str) -> bool:
        return name in self.by_name

    def total(self, name: str, where: LabelFilter | None = None) -> float | None:
        """Sum of the samples named ``name`` that pass ``where``; None if there are none."""
        matched = [s.value for s in self.by_name.get(name, ()) if where is None or where(s.labels)]
        return math.fsum(matched) if matched else None

    def counter_name(self, base: str) -> str | None:
        for name in (f"{base}_total", base):
            if name in self.by_name:
                return name
        return None

    def counter(self, base: str, where: LabelFilter | None = None) -> float | None:
        name = self.counter_name(base)
        return None if name is None else self.total(name, where)

    def created(self, base: str) -> float | None:
        values = [s.value for s in self.by_name.get(f"{base}_created", ())]
        return min(values) if values else None

    def buckets(self, base: str) -> Buckets | None:
        by_le: dict[float, float] = {}
        for s in self.by_name.get(f"{base}_bucket", ()):
            le = s.labels.get("le")
            if le is None:
                continue
            try:
                bound = float(le)
            except ValueError:
                continue
            # Same bounds on every engine, so cumulative counts add up per bound.
            by_le[bound] = by_le.get(bound, 0.0) + s.value
        return tuple(sorted(by_le.items())) if by_le else None


def _first(bases: Sequence[str], read: Callable[[str], float | None]) -> float | None:
    for base in bases:
        value = read(base)
        if value is not None:
            return value
    return None


def model_names(samples: Iterable[Sample]) -> list[str]:
    """The distinct ``model_name`` label values among ``samples``, sorted."""
    return sorted({s.labels["model_name"] for s in samples if "model_name" in s.labels})


def read_counters(samples: Sequence[Sample], model_name: str | None = None) -> CacheCounters:
    """Read the prefix-cache, prompt-token, request and TTFT counters from a scrape.

    Args:
        samples: The parsed ``/metrics`` page (:func:`parse_prometheus`).
        model_name: Keep only series whose ``model_name`` label is this (series with no
            such label are kept). Needed when one server serves several models.

    Returns:
        The counters, summed over engines; fields the server lacks are None, and
        ``source`` is "none" when no prefix-cache counter is found.

    Raises:
        MetricsError: ``model_name`` is given, the server labels its series with model
            names, and none of them is ``model_name``; the message lists them.
    """
    if model_name is not None:
        served = model_names(samples)
        if served and model_name not in served:
            raise MetricsError(
                f"The server's metrics carry no series for model_name={model_name!r}; it reports "
                f"{', '.join(map(repr, served))}. Pass one of these as model_name (vLLM labels series "
                "with --served-model-name, which defaults to the model path)."
            )
    index = _Index(samples, model_name)

    source, queries, hits, started_at = "none", None, None, None
    for scheme, queries_base, hits_base in _PREFIX_SCHEMES:
        if index.counter_name(queries_base) or index.counter_name(hits_base):
            source = scheme
            queries, hits = index.counter(queries_base), index.counter(hits_base)
            started_at = index.created(queries_base) or index.created(hits_base)
            break

    cached_base, by_source_base, sglang_cached_base = _CACHED_COUNTERS
    cached = index.counter(cached_base)
    if cached is None:
        cached = index.counter(by_source_base, lambda lab: lab.get("source") in _CACHED_SOURCES)
    if cached is None:
        cached = index.counter(sglang_cached_base)

    ttft_base = next((b for b in _TTFT if index.has(f"{b}_count") or index.has(f"{b}_bucket")), None)
    return CacheCounters(
        source=source,
        queries=queries,
        hits=hits,
        prompt_tokens=_first(_PROMPT_TOKENS, index.counter),
        cached_prompt_tokens=cached,
        external_queries=index.counter(_EXTERNAL[0]),
        external_hits=index.counter(_EXTERNAL[1]),
        requests=_first(_REQUESTS, index.counter),
        ttft_sum=index.total(f"{ttft_base}_sum") if ttft_base else None,
        ttft_count=index.total(f"{ttft_base}_count") if ttft_base else None,
        ttft_buckets=index.buckets(ttft_base) if ttft_base else None,
        started_at=started_at,
    )


@dataclass(frozen=True)
class CacheConfig:
    """How the server's cache is set up, from vLLM's ``vllm:cache_config_info``."""

    prefix_caching_enabled: bool | None
    """``enable_prefix_caching``; None if the server does not say."""
    block_size: int | None
    """Tokens per KV block (16 on GPUs, 128 on vLLM's CPU backend); None if unknown."""
    hit_alignment_tokens: int | None = None
    """Granularity of prefix-cache hits when it differs from the block size (hybrid models); None if unset."""
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    """Every label of the info series as the server wrote it, ``engine`` included."""

    @property
    def hit_granularity(self) -> int | None:
        """Tokens a cache hit is a multiple of: the hit alignment if set, else the block size."""
        return self.hit_alignment_tokens or self.block_size


def _as_bool(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    return None  # "None", "unknown", "": the server does not know or does not say


def _as_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None  # "None", "unknown"
    return int(number) if math.isfinite(number) and number > 0 and number == int(number) else None


def read_cache_config(samples: Sequence[Sample]) -> CacheConfig:
    """Read ``vllm:cache_config_info`` (an info gauge whose labels are the cache config).

    vLLM writes one series per engine with the same settings; the first one is used.
    SGLang and other servers have no such series: every field is then None.

    Args:
        samples: The parsed ``/metrics`` page.

    Returns:
        The cache configuration; values written as "None" or "unknown" read as None.
    """
    info = next((s for s in samples if s.name == "vllm:cache_config_info"), None)
    if info is None:
        return CacheConfig(prefix_caching_enabled=None, block_size=None)
    labels = dict(info.labels)
    return CacheConfig(
        prefix_caching_enabled=_as_bool(labels.get("enable_prefix_caching")),
        block_size=_as_int(labels.get("block_size")),
        hit_alignment_tokens=_as_int(labels.get("cache_hit_alignment_tokens")),
        labels=labels,
    )


# --------------------------------------------------------------------------------------
# Differences between two snapshots
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterDelta(Counts):
    """What the server counted between two snapshots (``after - before``).

    A field is None when either snapshot lacks it, or when the server was restarted in
    between (``reset``): a restart zeroes every counter, so no difference across it means
    anything, not even for counters that have since grown past their old value.
    """

    reset: bool = field(kw_only=True)
    """True if the server restarted between the snapshots (a counter went down or ``started_at`` changed)."""
    ttft_buckets: Buckets | None = None
    """Time-to-first-token histogram of just these requests, cumulative ``(le, count)``."""

    @property
    def hit_rate(self) -> float | None:
        """``hits / queries``; None if unknown or nothing was queried."""
        return _ratio(self.hits, self.queries)

    @property
    def cached_fraction(self) -> float | None:
        """``cached_prompt_tokens / prompt_tokens``; None if unknown or no prompt tokens."""
        return _ratio(self.cached_prompt_tokens, self.prompt_tokens)

    @property
    def ttft_mean(self) -> float | None:
        """Server-side mean time to first token of these requests, seconds."""
        return _ratio(self.ttft_sum, self.ttft_count)

    def ttft_quantile(self, q: float) -> float | None:
        """Server-side TTFT quantile ``q`` (0..1) estimated from the histogram, seconds."""
        return None if self.ttft_buckets is None else histogram_quantile(self.ttft_buckets, q)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Counts) if f.name != "source")
"""The counters that add up: over replicas, and as differences between two snapshots."""


def _bucket_delta(before: Buckets | None, after: Buckets | None) -> tuple[Buckets | None, bool]:
    """Per-bound difference of two cumulative histograms; (None, went_down?) if not comparable."""
    if before is None or after is None:
        return None, False
    old = dict(before)
    if set(old) != {le for le, _ in after}:
        return None, False  # bucket bounds changed (custom buckets after a restart)
    diff = tuple((le, count - old[le]) for le, count in after)
    return diff, any(d < 0 for _, d in diff)


def delta(before: CacheCounters, after: CacheCounters) -> CounterDelta:
    """What the server counted between two snapshots, with restart detection.

    Args:
        before: Counters read before the run.
        after: Counters read after it, from the same server.

    Returns:
        The differences. If any counter went down, or the counters' ``_created`` time
        changed, the server restarted: ``reset`` is True and every difference is None.
        A counter missing from either snapshot gives None; note that SGLang creates its
        series at the first request, so an idle, just-started SGLang has none yet.
    """
    diffs: dict[str, float | None] = {}
    reset = before.started_at is not None and after.started_at is not None and before.started_at != after.started_at
    for name in COUNTER_FIELDS:
        old, new = getattr(before, name), getattr(after, name)
        if old is None or new is None:
            diffs[name] = None
            continue
        diffs[name] = new - old
        reset = reset or new < old
    buckets, buckets_went_down = _bucket_delta(before.ttft_buckets, after.ttft_buckets)
    reset = reset or buckets_went_down
    if reset:
        return CounterDelta(source=after.source, reset=True)
    return CounterDelta(source=after.source, reset=False, ttft_buckets=buckets, **diffs)


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Estimate quantile ``q`` of a cumulative histogram, as PromQL's ``histogram_quantile``.

    The value is interpolated linearly inside the bucket where the rank ``q * total``
    falls; the first bucket starts at 0 (if its bound is positive). A rank in the
    ``+Inf`` bucket gives the highest finite bound. The estimate is only as fine as the
    buckets: vLLM's TTFT buckets near 0.1 s are 0.06, 0.08, 0.1, 0.25.

    Args:
        buckets: ``(le, cumulative count)`` pairs, any order, with an ``le = +Inf`` bucket
            (the total), e.g. :attr:`CounterDelta.ttft_buckets`.
        q: The quantile, from 0 to 1 (0.5 for the median).

    Returns:
        The estimate, or None if there are no observations, no ``+Inf`` bucket or fewer
        than two buckets.

    Raises:
        ValueError: ``q`` is outside [0, 1].
    """
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"q must be between 0 and 1, got {q}")
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    # Counts can be non-monotonic after float sums or scrapes mid-update; PromQL
    # repairs that the same way, by carrying the running maximum.
    bounds = [le for le, _ in ordered]
    counts: list[float] = []
    for _, c in ordered:
        counts.append(max(c, counts[-1]) if counts else c)
    total = counts[-1]
    if not total > 0:
        return None
    rank = q * total
    b = next((i for i, c in enumerate(counts[:-1]) if c >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = bounds[b - 1] if b > 0 else 0.0
    below = counts[b - 1] if b > 0 else 0.0
    in_bucket = counts[b] - below
    return start + (bounds[b] - start) * ((rank - below) / in_bucket)
