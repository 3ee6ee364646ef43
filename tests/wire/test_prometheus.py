"""Reading per-replica counters through Prometheus's HTTP API (``echo_env.wire.prometheus``).

Offline tests drive :class:`PrometheusReader` against a scripted API (an httpx mock
transport); the last test runs the real Prometheus (Debian's package, fetched once).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from echo_env.errors import EngineError, MetricsError
from echo_env.launch.engine import find_free_port
from echo_env.launch.prometheus_server import EmbeddedPrometheus, prometheus_binary, scrape_config
from echo_env.measure.fleet import replica_figures
from echo_env.wire.kinds.llamacpp import LlamaCppKind
from echo_env.wire.metrics import delta
from echo_env.wire.prometheus import (
    PrometheusReader,
    api_data,
    check_targets,
    counter_queries,
    instance_label,
    parse_duration,
    parse_targets,
    vector_series,
)

R1, R2 = "http://127.0.0.1:8001", "http://127.0.0.1:8002"

# --------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "label"),
    [
        ("http://127.0.0.1:8001", "127.0.0.1:8001"),
        ("http://127.0.0.1:8001/v1/", "127.0.0.1:8001"),
        ("https://user:pw@replica-0.svc:443/metrics", "replica-0.svc:443"),
        ("10.0.0.7:8000", "10.0.0.7:8000"),
        ("vllm-pod-abc", "vllm-pod-abc"),
    ],
)
def test_replicas_are_named_by_the_instance_label_prometheus_gives_them(given: str, label: str) -> None:
    assert instance_label(given) == label


def test_queries_sum_by_instance_and_escape_instance_labels() -> None:
    queries = counter_queries(["127.0.0.1:8001", "a+b"], job="vllm")
    counters = queries["counters"]
    assert counters.startswith("sum by (instance, job, __name__, model_name, le, source) (")
    assert "vllm:prefix_cache_hits" in counters and "llamacpp:prompt_tokens_cached" in counters
    assert r"instance=~`127\.0\.0\.1:8001|a\+b`" in counters and "job=`vllm`" in counters
    assert queries["created"].startswith("min by (instance, job, __name__)") and "_created`" in queries["created"]
    assert queries["info"].startswith("{__name__=`vllm:cache_config_info`")


def test_api_errors_name_the_cause() -> None:
    assert api_data(200, '{"status":"success","data":{"x":1}}', "P") == {"x": 1}
    with pytest.raises(MetricsError, match=r"rejected the query.*bad_data: parse error"):
        api_data(400, '{"status":"error","errorType":"bad_data","error":"parse error"}', "P")
    with pytest.raises(MetricsError, match="overloaded"):
        api_data(503, '{"status":"error","errorType":"timeout","error":"query timed out"}', "P")
    with pytest.raises(MetricsError, match=r"not Prometheus's JSON API.*prometheus_url="):
        api_data(200, "<html><body>Grafana</body></html>", "P")
    with pytest.raises(MetricsError, match=r"not Prometheus's JSON API"):
        api_data(200, "vllm:prefix_cache_hits_total 3\n", "P")
    with pytest.raises(MetricsError, match="credentials"):
        api_data(401, "Unauthorized", "P")


def test_vector_answers_parse_special_values_and_reject_other_shapes() -> None:
    data = {"resultType": "vector", "result": [{"metric": {"instance": "a"}, "value": [1700.5, "+Inf"]}]}
    assert vector_series(data) == [({"instance": "a"}, float("inf"), 1700.5)]
    with pytest.raises(MetricsError, match="not an instant vector"):
        vector_series({"resultType": "matrix", "result": []})
    with pytest.raises(MetricsError, match="malformed"):
        vector_series({"resultType": "vector", "result": [{"metric": {}, "value": [1]}]})


def test_prometheus_durations() -> None:
    assert parse_duration("15s") == 15 and parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5
    assert parse_duration("soon") is None and parse_duration("") is None


def _target(instance: str, health: str = "up", job: str = "replicas", error: str = "") -> dict[str, Any]:
    return {
        "labels": {"instance": instance, "job": job},
        "health": health,
        "lastError": error,
        "scrapeUrl": f"http://{instance}/metrics",
        "scrapeInterval": "1s",
    }


def test_missing_down_and_doubly_scraped_replicas_are_each_named() -> None:
    targets = parse_targets(
        {
            "activeTargets": [
                _target("127.0.0.1:8002", "down", error="connect: connection refused"),
                _target("127.0.0.1:8003"),
                _target("127.0.0.1:8003", job="node"),
            ]
        }
    )
    with pytest.raises(MetricsError) as err:
        check_targets(["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"], targets, None, "P")
    message = str(err.value)
    assert "127.0.0.1:8001 is not among its targets" in message and "static_configs" in message
    assert "127.0.0.1:8002 is down" in message and "connection refused" in message
    assert "several jobs (node, replicas)" in message and "job=NAME" in message
    assert [t.job for t in check_targets(["127.0.0.1:8003"], targets, "node", "P")] == ["node"]


def test_scrape_config_groups_targets_by_scheme_and_path() -> None:
    config = json.loads(scrape_config([R1, R2 + "/metrics", "https://h:1/prom/metrics"], 0.5, "replicas"))
    assert config["global"] == {"scrape_interval": "500ms", "scrape_timeout": "500ms"}
    jobs = config["scrape_configs"]
    assert jobs[0]["job_name"] == "replicas" and jobs[0]["static_configs"] == [
        {"targets": ["127.0.0.1:8001", "127.0.0.1:8002"]}
    ]
    assert (jobs[1]["job_name"], jobs[1]["scheme"], jobs[1]["metrics_path"]) == ("replicas-2", "https", "/prom/metrics")
    with pytest.raises(EngineError, match="not an http"):
        scrape_config(["127.0.0.1:8001"], 1, "replicas")


def test_a_binary_named_by_the_environment_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_ENV_PROMETHEUS", "/nonexistent/prometheus")
    with pytest.raises(EngineError, match="not an executable file"):
        prometheus_binary()


# --------------------------------------------------------------------------------------
# The reader against a scripted Prometheus API
# --------------------------------------------------------------------------------------


class ScriptedPrometheus:
    """Answers the reader's queries from plain per-instance state, as Prometheus would."""

    def __init__(self) -> None:
        self.targets = [_target("127.0.0.1:8001"), _target("127.0.0.1:8002")]
        self.scraped = {"127.0.0.1:8001": time.time() + 0.3, "127.0.0.1:8002": time.time() + 0.3}
        self.up = {"127.0.0.1:8001": 1.0, "127.0.0.1:8002": 1.0}
        self.sums: dict[str, dict[str, float]] = {
            "127.0.0.1:8001": {"vllm:prefix_cache_queries_total": 1000, "vllm:prefix_cache_hits_total": 600},
            "127.0.0.1:8002": {"vllm:prefix_cache_queries_total": 400, "vllm:prefix_cache_hits_total": 0},
        }
        self.queries: list[str] = []

    def _vector(self, rows: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        now = time.time()
        result = [{"metric": m, "value": [now, repr(v)]} for m, v in rows]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def _answer(self, query: str) -> dict[str, Any]:
        if query.startswith("max by (instance) (timestamp(up"):
            return self._vector([({"instance": i}, ts) for i, ts in self.scraped.items()])
        if query.startswith("sum by"):
            rows = [
                ({"__name__": n, "instance": i, "job": "replicas"}, v)
                for i, s in self.sums.items()
                for n, v in s.items()
            ]
            return self._vector(rows)
        if query.startswith("up{"):
            return self._vector([({"__name__": "up", "instance": i, "job": "replicas"}, v) for i, v in self.up.items()])
        return self._vector([])

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/targets":
            return httpx.Response(200, json={"status": "success", "data": {"activeTargets": self.targets}})
        if request.url.path == "/api/v1/query":
            query = parse_qs(request.content.decode())["query"][0]
            self.queries.append(query)
            return httpx.Response(200, json=self._answer(query))
        return httpx.Response(404, text="404 page not found")

    def reader(self, **kwargs: Any) -> PrometheusReader:
        return PrometheusReader("http://prom:9090/", transport=httpx.MockTransport(self.handler), **kwargs)


def test_snapshots_split_by_instance_and_feed_the_direct_path_types() -> None:
    prom = ScriptedPrometheus()
    before = prom.reader().snapshots([R1, R2], not_before=0)
    prom.sums["127.0.0.1:8001"] = {"vllm:prefix_cache_queries_total": 1300, "vllm:prefix_cache_hits_total": 840}
    prom.scraped["127.0.0.1:8001"] += 1
    after = prom.reader().snapshots([R1, R2], not_before=0)
    figures = replica_figures(R1, before[R1].counters, after[R1].counters)
    assert figures.counters is not None and (figures.counters.queries, figures.counters.hits) == (300, 240)
    assert figures.hit_rate == pytest.approx(0.8)
    assert delta(before[R2].counters, after[R2].counters).queries == 0
    assert after[R1].taken_at == pytest.approx(prom.scraped["127.0.0.1:8001"], abs=0.002)


def test_a_kind_reads_its_own_names() -> None:
    prom = ScriptedPrometheus()
    prom.sums["127.0.0.1:8001"] = {"llamacpp:prompt_tokens_total": 30, "llamacpp:prompt_tokens_cached_total": 70}
    counters = prom.reader(kind=LlamaCppKind()).snapshot(R1, not_before=0).counters
    assert (counters.source, counters.queries, counters.hits) == ("llamacpp", 100, 70)


def test_the_reader_waits_for_a_scrape_after_the_phase_end_and_then_says_why_it_gave_up() -> None:
    prom = ScriptedPrometheus()
    phase_end = time.time()
    prom.scraped = {i: phase_end - 5 for i in prom.scraped}
    late = threading.Timer(0.5, lambda: prom.scraped.update({"127.0.0.1:8001": phase_end + 0.1}))
    late.start()
    started = time.monotonic()
    with pytest.raises(MetricsError) as err:
        prom.reader(wait_s=1.0).snapshots([R1, R2], not_before=phase_end)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert "no scrape newer than the phase end after waiting 1 s" in str(err.value)
    assert "127.0.0.1:8002: last scrape 5.0 s before" in str(err.value) and "8001" not in str(err.value).split("(")[1]
    prom.scraped["127.0.0.1:8002"] = phase_end + 0.2
    assert set(prom.reader(wait_s=1.0).snapshots([R1, R2], not_before=phase_end)) == {R1, R2}


def test_a_replica_that_went_down_while_waiting_is_named() -> None:
    prom = ScriptedPrometheus()
    prom.up["127.0.0.1:8002"] = 0.0
    with pytest.raises(MetricsError, match=r"last scrape of 127\.0\.0\.1:8002 failed"):
        prom.reader().snapshots([R1, R2], not_before=0)
    prom.targets[1] = _target("127.0.0.1:8002", "down", error="server returned HTTP status 500")
    with pytest.raises(MetricsError, match=r"8002 is down.*HTTP status 500"):
        prom.reader().snapshots([R1, R2], not_before=0)


def test_an_address_that_is_not_prometheus_or_not_listening_names_the_fix() -> None:
    with pytest.raises(MetricsError, match=r"Could not connect to Prometheus.*prometheus_url="):
        PrometheusReader(f"http://127.0.0.1:{find_free_port()}").snapshots([R1])
    with pytest.raises(MetricsError, match="not a valid http"):
        PrometheusReader("ftp://prom:9090").snapshots([R1])
    vllm_like = httpx.MockTransport(lambda r: httpx.Response(404, text='{"detail":"Not Found"}'))
    with pytest.raises(MetricsError, match="not Prometheus's JSON API"):
        PrometheusReader("http://127.0.0.1:8000/v1", transport=vllm_like).snapshots([R1])
    with pytest.raises(MetricsError, match="No replicas"):
        PrometheusReader("http://prom:9090").snapshots([])


# --------------------------------------------------------------------------------------
# The real Prometheus, scraping stand-in replicas
# --------------------------------------------------------------------------------------


class StandInReplica:
    """A stand-in for a vLLM replica's ``/metrics`` only (no engine): vLLM-named counters the test sets.

    Two engines (data-parallel ranks) per replica, so Prometheus's ``sum by`` has work to do.
    """

    def __init__(self) -> None:
        self.counters = {"queries": 0.0, "hits": 0.0, "requests": 0.0}
        self.created = 1_700_000_000.0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = replica.page().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def page(self) -> str:
        lines = []
        for name, key in (("prefix_cache_queries", "queries"), ("prefix_cache_hits", "hits")):
            lines.append(f"# TYPE vllm:{name} counter")
            for engine, share in (("0", 0.75), ("1", 0.25)):
                labels = f'engine="{engine}",model_name="m"'
                lines.append(f"vllm:{name}_total{{{labels}}} {self.counters[key] * share}")
                lines.append(f"vllm:{name}_created{{{labels}}} {self.created}")
        lines.append("# TYPE vllm:request_success counter")
        for reason, share in (("stop", 0.5), ("length", 0.5)):
            lines.append(f'vllm:request_success_total{{finished_reason="{reason}",model_name="m"}} '
                         f"{self.counters['requests'] * share}")  # fmt: skip
        lines.append('vllm:cache_config_info{block_size="128",enable_prefix_caching="True",engine="0"} 1.0')
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def real_prometheus() -> Iterator[tuple[EmbeddedPrometheus, list[StandInReplica], str]]:
    try:
        prometheus_binary()
    except EngineError as exc:
        if os.environ.get("ECHO_ENV_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"ECHO_ENV_REQUIRE_PROMETHEUS=1 but Prometheus is unavailable: {exc}")
        pytest.skip(f"Prometheus unavailable ({exc}); `make prometheus` fetches it")
    replicas = [StandInReplica(), StandInReplica()]
    dead = f"http://127.0.0.1:{find_free_port()}"
    try:
        with EmbeddedPrometheus([r.url for r in replicas] + [dead], scrape_interval_s=1) as prom:
            yield prom, replicas, dead
    finally:
        for r in replicas:
            r.close()


def test_real_prometheus_gives_each_replica_its_own_deltas(
    real_prometheus: tuple[EmbeddedPrometheus, list[StandInReplica], str],
) -> None:
    prom, (one, two), _ = real_prometheus
    reader = PrometheusReader(prom.url, model_name="m", wait_s=10)
    urls = [one.url, two.url]
    before = reader.snapshots(urls)
    one.counters.update(queries=1280.0, hits=1024.0, requests=4.0)
    two.counters.update(queries=640.0, hits=128.0, requests=2.0)
    phase_end = time.time()
    after = reader.snapshots(urls)
    waited = time.time() - phase_end
    assert all(s.taken_at >= phase_end for s in after.values())
    assert waited < 3.5, f"a 1 s scrape interval should not make the reader wait {waited:.1f} s"
    figures = [replica_figures(u, before[u].counters, after[u].counters) for u in urls]
    assert [(f.counters.queries, f.counters.hits) for f in figures if f.counters] == [(1280, 1024), (640, 128)]
    assert [f.requests for f in figures] == [4, 2]
    assert [f.hit_rate for f in figures] == [pytest.approx(0.8), pytest.approx(0.2)]
    assert after[one.url].counters.started_at == 1_700_000_000.0
    assert after[one.url].cache_config.block_size == 128


def test_real_prometheus_shows_a_restart_and_names_missing_replicas(
    real_prometheus: tuple[EmbeddedPrometheus, list[StandInReplica], str],
) -> None:
    prom, (one, _), dead = real_prometheus
    reader = PrometheusReader(prom.url, wait_s=10)
    before = reader.snapshot(one.url)
    # Restarted and already past its old counts: only the counters' _created time tells.
    one.counters.update(queries=one.counters["queries"] + 500, hits=one.counters["hits"] + 10)
    one.created += 60.0
    assert replica_figures(one.url, before.counters, reader.snapshot(one.url).counters).note == (
        f"{one.url} restarted during the phase (its counters went back)"
    )
    with pytest.raises(MetricsError, match=rf"{dead.removeprefix('http://')} is down.*connection refused"):
        reader.snapshots([one.url, dead])
    with pytest.raises(MetricsError, match=r"127\.0\.0\.1:1 is not among its targets"):
        reader.snapshot("http://127.0.0.1:1")
    with pytest.raises(MetricsError, match="no scrape newer than the phase end after waiting 1 s"):
        PrometheusReader(prom.url, wait_s=1).snapshot(one.url, not_before=time.time() + 60)
