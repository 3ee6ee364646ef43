"""Reading a server's prefix-cache counters from its Prometheus page, offline.

The vLLM page in tests/data was produced by vLLM 0.32's own metric loggers; the SGLang
and legacy-vLLM pages were written by hand after those servers' sources.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from echo_env.errors import MetricsError
from echo_env.wire.metrics import (
    CacheConfig,
    CacheCounters,
    MetricsReader,
    Sample,
    check_prometheus_text,
    delta,
    fetch_metrics,
    histogram_quantile,
    model_names,
    parse_prometheus,
    read_cache_config,
    read_counters,
)

DATA = Path(__file__).parent.parent / "data"
MODEL = "gemma-3-270m"


def load(name: str) -> str:
    return (DATA / name).read_text()


@pytest.fixture(scope="module")
def vllm_text() -> str:
    return load("vllm_metrics_sample.txt")


@pytest.fixture(scope="module")
def vllm_samples(vllm_text: str) -> list[Sample]:
    return parse_prometheus(vllm_text)


def without(text: str, *prefixes: str) -> str:
    """``text`` minus the sample lines whose name starts with one of ``prefixes``."""
    return "\n".join(line for line in text.splitlines() if not line.startswith(prefixes))


# --------------------------------------------------------------------------------------
# parse_prometheus
# --------------------------------------------------------------------------------------


def test_parses_real_vllm_page(vllm_samples: list[Sample]) -> None:
    by_name = {s.name: s for s in vllm_samples}
    queries = by_name["vllm:prefix_cache_queries_total"]
    assert queries.labels == {"engine": "0", "model_name": MODEL}
    assert queries.value == 16063.0
    # _created series are ordinary samples holding a Unix time.
    assert by_name["vllm:prefix_cache_queries_created"].value > 1.7e9
    assert not any(s.name.startswith("#") for s in vllm_samples)


def test_agrees_with_prometheus_client_parser(vllm_text: str, vllm_samples: list[Sample]) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    theirs = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in parser.text_string_to_metric_families(vllm_text)
        for s in family.samples
    )
    ours = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in vllm_samples)
    assert ours == theirs


def test_parses_special_values_timestamps_and_escapes() -> None:
    text = "\r\n".join(
        [
            "# HELP odd A help line with a trailing space ",
            "# TYPE odd gauge",
            "# just a comment",
            "",
            'odd{path="C:\\\\dir",quote="say \\"hi\\", then {go}",nl="a\\nb",} +Inf 1712345678000',
            "odd_neg -Inf",
            "odd_nan NaN",
            'odd_exp{ a = "1" , b="2" } 1.5e+09',
            'odd_int 42 # {trace_id="abc"} 1.0',
            '{"weird.name", job="x"} 7',
        ]
    )
    samples = parse_prometheus(text)
    first = samples[0]
    assert first.name == "odd"
    assert first.labels == {"path": "C:\\dir", "quote": 'say "hi", then {go}', "nl": "a\nb"}
    assert first.value == math.inf
    assert first.timestamp == 1712345678000
    assert samples[1].value == -math.inf
    assert math.isnan(samples[2].value)
    assert samples[3].labels == {"a": "1", "b": "2"}
    assert samples[3].value == 1.5e9
    assert (samples[4].name, samples[4].value, samples[4].timestamp) == ("odd_int", 42.0, None)
    assert (samples[5].name, samples[5].labels, samples[5].value) == ("weird.name", {"job": "x"}, 7.0)


def test_comments_only_page_has_no_samples() -> None:
    assert parse_prometheus("# HELP x y\n# TYPE x counter\n# EOF\n") == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("  \n\n", "empty"),
        ("<!DOCTYPE html><html><body>Grafana</body></html>", "HTML"),
        ("\n<html><head><title>Login</title></head></html>", "HTML"),
        ('{"detail":"Not Found"}', "JSON"),
        ("Not Found", "line 1"),
        ("ok 1\nInternal Server Error", "line 2"),
        ('bad{label="unterminated} 1', "line 1"),
        ("metric{a=1} 2", "line 1"),
        ("metric 1 2 3", "line 1"),
    ],
)
def test_rejects_what_is_not_prometheus_text(text: str, why: str) -> None:
    with pytest.raises(MetricsError, match="is not Prometheus text") as info:
        parse_prometheus(text, origin="http://h:1/metrics")
    message = str(info.value)
    assert why in message
    assert "http://h:1/metrics" in message
    assert "/metrics" in message.split("Prometheus text:", 1)[1]  # names the fix


def test_check_prometheus_text_passes_real_page(vllm_text: str) -> None:
    check_prometheus_text(vllm_text)


def test_samples_are_hashable() -> None:
    (sample,) = parse_prometheus('a{b="c"} 1')
    assert len({sample, sample}) == 1


# --------------------------------------------------------------------------------------
# read_counters
# --------------------------------------------------------------------------------------


def test_reads_vllm_counters(vllm_samples: list[Sample]) -> None:
    c = read_counters(vllm_samples)
    assert c.source == "vllm"
    assert (c.queries, c.hits) == (16063.0, 11520.0)
    assert c.prompt_tokens == 16014.0
    assert c.cached_prompt_tokens == 11520.0
    assert (c.external_queries, c.external_hits) == (0.0, 0.0)
    assert c.requests == 34.0
    assert c.ttft_count == 34.0
    assert c.ttft_sum is not None and 2.0 < c.ttft_sum < 4.0
    assert c.ttft_buckets is not None
    assert c.ttft_buckets[-1] == (math.inf, 34.0)
    assert [le for le, _ in c.ttft_buckets] == sorted(le for le, _ in c.ttft_buckets)
    assert c.started_at is not None and c.started_at > 1.7e9


def test_cached_tokens_fall_back_to_prompt_tokens_by_source(vllm_text: str) -> None:
    text = without(vllm_text, "vllm:prompt_tokens_cached_total")
    c = read_counters(parse_prometheus(text))
    assert c.cached_prompt_tokens == 11520.0  # local_cache_hit + external_kv_transfer


def test_histogram_named_total_is_not_a_counter(vllm_samples: list[Sample]) -> None:
    # vLLM's iteration-tokens histogram is called vllm:iteration_tokens_total, so its
    # series end in _total_bucket/_total_sum: they must not be read as counters.
    names = {s.name for s in vllm_samples}
    assert "vllm:iteration_tokens_total_sum" in names
    assert "vllm:iteration_tokens_total" not in names


def test_multi_engine_counters_are_summed() -> None:
    text = "\n".join(
        [
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100',
            'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 300',
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 50',
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 250',
            'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3',
            'vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 4',
            'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1',
            'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3',
            'vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 4',
            'vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 4',
            'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3',
            'vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 4',
        ]
    )
    c = read_counters(parse_prometheus(text))
    assert (c.queries, c.hits, c.requests, c.ttft_count) == (400.0, 300.0, 7.0, 7.0)
    assert c.ttft_buckets == ((0.1, 5.0), (math.inf, 7.0))
    assert c.prompt_tokens is None and c.ttft_sum is None  # not exposed here


def test_reads_legacy_vllm_names() -> None:
    c = read_counters(parse_prometheus(load("vllm_legacy_metrics_sample.txt")))
    assert c.source == "vllm-legacy"
    assert (c.queries, c.hits) == (10000.0, 8000.0)  # two engines
    assert c.requests == 25.0  # every finish reason on both engines
    assert c.cached_prompt_tokens is None  # that counter came later
    assert c.ttft_buckets == ((0.02, 0.0), (0.04, 10.0), (0.06, 20.0), (0.08, 25.0), (math.inf, 25.0))


def test_current_vllm_names_win_over_deprecated_ones() -> None:
    text = "\n".join(
        [
            'vllm:prefix_cache_queries_total{model_name="m"} 100',
            'vllm:prefix_cache_hits_total{model_name="m"} 40',
            'vllm:gpu_prefix_cache_queries_total{model_name="m"} 999',
            'vllm:gpu_prefix_cache_hits_total{model_name="m"} 1',
        ]
    )
    c = read_counters(parse_prometheus(text))
    assert (c.source, c.queries, c.hits) == ("vllm", 100.0, 40.0)


def test_counters_without_total_suffix_are_read() -> None:
    c = read_counters(parse_prometheus("vllm:prefix_cache_queries 10\nvllm:prefix_cache_hits 4\n"))
    assert (c.source, c.queries, c.hits) == ("vllm", 10.0, 4.0)


def test_reads_sglang_names() -> None:
    c = read_counters(parse_prometheus(load("sglang_metrics_sample.txt")), model_name=MODEL)
    assert c.source == "sglang"
    assert c.queries == c.prompt_tokens == 16063.0
    assert c.hits == c.cached_prompt_tokens == 11520.0  # device + host + storage tiers
    assert c.requests == 34.0
    assert c.ttft_count == 34.0
    assert c.external_queries is None


def test_unknown_server_reads_as_none() -> None:
    text = 'process_cpu_seconds_total 1.5\npython_info{version="3.11"} 1\n'
    c = read_counters(parse_prometheus(text))
    assert c == CacheCounters(source="none")


def test_model_name_filter_keeps_one_model() -> None:
    text = "\n".join(
        [
            'vllm:prefix_cache_queries_total{engine="0",model_name="a"} 100',
            'vllm:prefix_cache_queries_total{engine="0",model_name="b"} 7',
            'vllm:prefix_cache_hits_total{engine="0",model_name="a"} 60',
            'vllm:prefix_cache_hits_total{engine="0",model_name="b"} 1',
        ]
    )
    samples = parse_prometheus(text)
    assert model_names(samples) == ["a", "b"]
    assert (read_counters(samples, "a").queries, read_counters(samples, "a").hits) == (100.0, 60.0)
    assert read_counters(samples, "b").queries == 7.0
    assert read_counters(samples).queries == 107.0


def test_unknown_model_name_is_an_error_naming_the_served_ones(vllm_samples: list[Sample]) -> None:
    with pytest.raises(MetricsError, match="gemma-3-270m") as info:
        read_counters(vllm_samples, model_name="google/gemma-3-270m")
    assert "model_name" in str(info.value)


def test_model_name_is_ignored_when_series_carry_none() -> None:
    samples = parse_prometheus("vllm:prefix_cache_queries_total 10\nvllm:prefix_cache_hits_total 5\n")
    assert read_counters(samples, model_name="anything").hits == 5.0


# --------------------------------------------------------------------------------------
# read_cache_config
# --------------------------------------------------------------------------------------


def test_reads_vllm_cache_config(vllm_samples: list[Sample]) -> None:
    cfg = read_cache_config(vllm_samples)
    assert cfg.prefix_caching_enabled is True
    assert cfg.block_size == 128
    assert cfg.hit_alignment_tokens is None  # written as "None"
    assert cfg.hit_granularity == 128
    assert cfg.labels["prefix_caching_hash_algo"] == "sha256"


def test_legacy_cache_config_has_gpu_block_size() -> None:
    cfg = read_cache_config(parse_prometheus(load("vllm_legacy_metrics_sample.txt")))
    assert (cfg.prefix_caching_enabled, cfg.block_size) == (True, 16)


@pytest.mark.parametrize(
    ("labels", "enabled", "block", "granularity"),
    [
        ('enable_prefix_caching="False",block_size="16"', False, 16, 16),
        ('enable_prefix_caching="unknown",block_size="unknown"', None, None, None),
        ('enable_prefix_caching="None",block_size="None"', None, None, None),
        ('enable_prefix_caching="True",block_size="1024",cache_hit_alignment_tokens="64"', True, 1024, 64),
    ],
)
def test_cache_config_values(labels: str, enabled: bool | None, block: int | None, granularity: int | None) -> None:
    cfg = read_cache_config(parse_prometheus(f'vllm:cache_config_info{{engine="0",{labels}}} 1.0'))
    assert (cfg.prefix_caching_enabled, cfg.block_size, cfg.hit_granularity) == (enabled, block, granularity)


def test_cache_config_absent_on_sglang() -> None:
    cfg = read_cache_config(parse_prometheus(load("sglang_metrics_sample.txt")))
    assert cfg == CacheConfig(prefix_caching_enabled=None, block_size=None)


# --------------------------------------------------------------------------------------
# delta
# --------------------------------------------------------------------------------------

BEFORE = CacheCounters(
    source="vllm",
    queries=1000.0,
    hits=200.0,
    prompt_tokens=1000.0,
    cached_prompt_tokens=200.0,
    requests=2.0,
    ttft_sum=0.4,
    ttft_count=2.0,
    ttft_buckets=((0.1, 0.0), (0.25, 2.0), (math.inf, 2.0)),
    started_at=1.75e9,
)
AFTER = replace(
    BEFORE,
    queries=1000.0 + 30 * 486,
    hits=200.0 + 30 * 384,
    prompt_tokens=1000.0 + 30 * 486,
    cached_prompt_tokens=200.0 + 30 * 384,
    requests=32.0,
    ttft_sum=0.4 + 30 * 0.072,
    ttft_count=32.0,
    ttft_buckets=((0.1, 30.0), (0.25, 32.0), (math.inf, 32.0)),
)


def test_delta_of_a_run() -> None:
    d = delta(BEFORE, AFTER)
    assert not d.reset
    assert (d.queries, d.hits, d.requests) == (30 * 486, 30 * 384, 30.0)
    assert d.hit_rate == pytest.approx(384 / 486)
    assert d.cached_fraction == pytest.approx(384 / 486)
    assert d.ttft_mean == pytest.approx(0.072)
    assert d.ttft_buckets == ((0.1, 30.0), (0.25, 30.0), (math.inf, 30.0))
    assert d.ttft_quantile(0.5) == pytest.approx(0.05)  # rank 15 of 30 in [0, 0.1]


def test_delta_on_real_page_from_zero(vllm_samples: list[Sample]) -> None:
    after = read_counters(vllm_samples)
    zero = CacheCounters(
        source="vllm",
        queries=0.0,
        hits=0.0,
        prompt_tokens=0.0,
        cached_prompt_tokens=0.0,
        external_queries=0.0,
        external_hits=0.0,
        requests=0.0,
        ttft_sum=0.0,
        ttft_count=0.0,
        ttft_buckets=tuple((le, 0.0) for le, _ in after.ttft_buckets or ()),
        started_at=after.started_at,
    )
    d = delta(zero, after)
    assert d.hit_rate == pytest.approx(11520 / 16063)
    assert d.ttft_quantile(0.5) is not None and 0.06 < d.ttft_quantile(0.5) < 0.08  # type: ignore[operator]


def test_counter_going_down_means_restart_and_no_numbers() -> None:
    # The server restarted and served more requests than before: hits went down, but
    # queries and requests grew past their old values. None of them is a valid difference.
    restarted = replace(AFTER, hits=50.0, started_at=None)
    d = delta(AFTER, restarted)
    assert d.reset
    for name in ("queries", "hits", "prompt_tokens", "requests", "ttft_sum", "ttft_count", "ttft_buckets"):
        assert getattr(d, name) is None
    assert d.hit_rate is None and d.cached_fraction is None and d.ttft_mean is None


def test_changed_created_time_means_restart_even_if_counters_grew() -> None:
    restarted = replace(AFTER, queries=AFTER.queries * 2, started_at=BEFORE.started_at + 3600)  # type: ignore[operator]
    d = delta(AFTER, restarted)
    assert d.reset and d.queries is None


def test_histogram_going_down_means_restart() -> None:
    d = delta(AFTER, replace(AFTER, ttft_buckets=((0.1, 1.0), (0.25, 32.0), (math.inf, 32.0))))
    assert d.reset


def test_missing_counter_gives_none_without_reset() -> None:
    d = delta(replace(BEFORE, cached_prompt_tokens=None), AFTER)
    assert not d.reset
    assert d.cached_prompt_tokens is None and d.cached_fraction is None
    assert d.hit_rate is not None


def test_changed_bucket_bounds_drop_the_histogram_only() -> None:
    d = delta(BEFORE, replace(AFTER, ttft_buckets=((0.2, 30.0), (math.inf, 32.0))))
    assert d.ttft_buckets is None and d.ttft_quantile(0.5) is None
    assert d.requests == 30.0


def test_no_queries_gives_no_hit_rate() -> None:
    d = delta(BEFORE, BEFORE)
    assert (d.queries, d.hit_rate, d.cached_fraction, d.ttft_mean) == (0.0, None, None, None)


# --------------------------------------------------------------------------------------
# histogram_quantile
# --------------------------------------------------------------------------------------


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(1.0, 10.0), (2.0, 30.0), (4.0, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(buckets, 0.25) == pytest.approx(1.0)  # rank 10: end of the first bucket
    assert histogram_quantile(buckets, 0.5) == pytest.approx(1.5)  # rank 20: half-way through (1, 2]
    assert histogram_quantile(buckets, 0.875) == pytest.approx(3.0)  # rank 35 of (30, 40] in (2, 4]
    assert histogram_quantile(buckets, 0.1) == pytest.approx(0.4)  # the first bucket starts at 0
    assert histogram_quantile(list(reversed(buckets)), 0.5) == pytest.approx(1.5)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile([(1.0, 1.0), (2.0, 2.0), (math.inf, 10.0)], 0.99) == 2.0


def test_quantile_matches_numpy_on_fine_buckets() -> None:
    np = pytest.importorskip("numpy")
    values = np.random.default_rng(0).uniform(0, 1, 20000)
    bounds = [i / 100 for i in range(1, 101)]
    buckets = [(b, float((values <= b).sum())) for b in bounds] + [(math.inf, float(values.size))]
    for q in (0.5, 0.9, 0.99):
        assert histogram_quantile(buckets, q) == pytest.approx(float(np.quantile(values, q)), abs=0.01)


def test_quantile_repairs_non_monotonic_counts() -> None:
    assert histogram_quantile([(1.0, 5.0), (2.0, 4.0), (math.inf, 10.0)], 0.4) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "buckets",
    [
        [],
        [(math.inf, 3.0)],
        [(1.0, 0.0), (math.inf, 0.0)],
        [(1.0, 2.0), (2.0, 3.0)],  # no +Inf bucket: the total is unknown
    ],
)
def test_quantile_without_data_is_none(buckets: list[tuple[float, float]]) -> None:
    assert histogram_quantile(buckets, 0.5) is None


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_rejects_q_outside_unit_interval(q: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile([(1.0, 1.0), (math.inf, 1.0)], q)


# --------------------------------------------------------------------------------------
# fetch_metrics and MetricsReader, against a local HTTP server
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, tuple[int, str, str]]] = {}

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", "/metrics/")
            self.end_headers()
            return
        if self.path == "/auth" and self.headers.get("Authorization") != "Bearer sekret":
            self.send_response(401)
            self.end_headers()
            return
        status, content_type, body = self.pages.get(self.path, (404, "application/json", '{"detail":"Not Found"}'))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(vllm_text: str) -> Iterator[str]:
    prom = "text/plain; version=0.0.4; charset=utf-8"
    _Handler.pages = {
        "/metrics": (200, prom, vllm_text),
        "/metrics/": (200, prom, vllm_text),
        "/auth": (200, prom, vllm_text),
        "/slow": (200, prom, vllm_text),
        "/html": (200, "text/html", "<html><body>Sign in</body></html>"),
        "/html-as-text": (200, "text/plain", "<!doctype html><p>proxy</p>"),
        "/empty": (200, prom, ""),
        "/boom": (500, "text/plain", "Internal Server Error"),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_returns_the_page(server: str, vllm_text: str) -> None:
    assert fetch_metrics(f"{server}/metrics") == vllm_text


def test_fetch_follows_vllm_redirect(server: str, vllm_text: str) -> None:
    assert fetch_metrics(f"{server}/redirect") == vllm_text


def test_fetch_sends_api_key(server: str, vllm_text: str) -> None:
    assert fetch_metrics(f"{server}/auth", api_key="sekret") == vllm_text
    with pytest.raises(MetricsError, match="api_key"):
        fetch_metrics(f"{server}/auth")


def test_fetch_404_names_the_fix(server: str) -> None:
    with pytest.raises(MetricsError, match=r"404.*no /metrics.*metrics_url="):
        fetch_metrics(f"{server}/v1/metrics")


@pytest.mark.parametrize(("path", "match"), [("/html", "HTML"), ("/html-as-text", "HTML"), ("/empty", "empty")])
def test_fetch_rejects_pages_that_are_not_prometheus(server: str, path: str, match: str) -> None:
    with pytest.raises(MetricsError, match=rf"is not Prometheus text: .*{match}"):
        fetch_metrics(f"{server}{path}")


def test_fetch_server_error(server: str) -> None:
    with pytest.raises(MetricsError, match="HTTP 500"):
        fetch_metrics(f"{server}/boom")


def test_fetch_timeout(server: str) -> None:
    with pytest.raises(MetricsError, match="did not answer within"):
        fetch_metrics(f"{server}/slow", timeout_s=0.2)


def test_fetch_connection_refused_asks_if_server_runs() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(MetricsError, match=f"is the server running\\? metrics_url={url}"):
        fetch_metrics(url, timeout_s=2)


def test_fetch_invalid_url() -> None:
    with pytest.raises(MetricsError, match="not a valid http"):
        fetch_metrics("localhost:8000/metrics")


def test_reader_snapshot(server: str) -> None:
    reader = MetricsReader(f"{server}/metrics", model_name=MODEL)
    t0 = time.time()
    snap = reader.snapshot()
    assert t0 <= snap.taken_at <= time.time()
    assert snap.counters.source == "vllm"
    assert snap.counters.hits == 11520.0
    assert snap.cache_config.block_size == 128
    again = reader.snapshot()
    d = delta(snap.counters, again.counters)
    assert not d.reset and d.queries == 0.0


def test_reader_wrong_model_name(server: str) -> None:
    with pytest.raises(MetricsError, match="model_name"):
        MetricsReader(f"{server}/metrics", model_name="other").snapshot()
