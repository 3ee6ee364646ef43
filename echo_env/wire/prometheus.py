"""Per-replica counters read through a Prometheus server's HTTP API (``prometheus_url=``).

Production fleets let a Prometheus scrape the replicas. :class:`PrometheusReader` asks it
for the series :class:`MetricsReader` reads from a ``/metrics`` page (``METRIC_BASES`` and
llama.cpp's counters), summed inside Prometheus over the labels a reading does not need
(engine, finish reason...) and split by ``instance``; the server kind's ``read_counters``
reads each instance's series. The result is one :class:`Snapshot` per replica, the type
the direct path produces, so :func:`~echo_env.wire.metrics.delta` and
:func:`~echo_env.measure.fleet.replica_figures` work unchanged::

    reader = PrometheusReader("http://prometheus:9090", kind=VllmKind())
    before = reader.snapshots(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    ...  # the phase
    after = reader.snapshots([...])  # waits for a scrape newer than this call

Prometheus knows what it scraped, up to one interval ago; so that no snapshot misses the
end of a phase, :meth:`~PrometheusReader.snapshots` waits (and logs that it waits) until
every replica has a scrape that started after ``not_before``. Replicas are named by URL
(reduced to ``host:port``) or by their ``instance`` label, and must be Prometheus's own
active targets (not federated or remote-written series); a missing or unhealthy one is
named in the error. Pure functions build the queries and parse the answers.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from echo_env.errors import MetricsError
from echo_env.wire import http
from echo_env.wire.counters import METRIC_BASES, read_cache_config, read_counters
from echo_env.wire.kinds.llamacpp import CACHED_TOKENS, PROMPT_TOKENS
from echo_env.wire.metrics import Snapshot
from echo_env.wire.metrics_text import Sample

log = logging.getLogger(__name__)

CACHE_CONFIG_INFO = "vllm:cache_config_info"
"""vLLM's info gauge of the cache configuration (read raw: its labels are the data)."""

_COUNTER_BASES = (*METRIC_BASES, PROMPT_TOKENS.removesuffix("_total"), CACHED_TOKENS.removesuffix("_total"))
# Labels a reading needs (model filter, histogram bounds, vLLM's prompt-token source);
# Prometheus sums over all others. __name__ keeps each series' own name.
_KEEP = ("instance", "job", "__name__", "model_name", "le", "source")
_PROM_FIX = "prometheus_url= should be the Prometheus server's root, e.g. http://127.0.0.1:9090"
_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")

# --------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------


def instance_label(replica: str) -> str:
    """The ``instance`` label Prometheus gives a replica: ``host:port`` of a URL, else the text as is.

    ``http://127.0.0.1:8001/v1`` becomes ``127.0.0.1:8001``; a name without a scheme
    (``10.0.0.1:8000``, a pod name from relabelling) is taken as the label itself.
    """
    parts = urlsplit(replica.strip())
    if parts.scheme in ("http", "https") and parts.netloc:
        return parts.netloc.rsplit("@", 1)[-1]
    return replica.strip()


def _matchers(instances: Iterable[str], job: str | None) -> str:
    # Backtick strings are raw in PromQL: the regex needs no second escaping.
    alternation = "|".join(_REGEX_SPECIAL.sub(r"\\\1", i) for i in sorted(set(instances)))
    return f"instance=~`{alternation}`" + (f", job=`{job}`" if job else "")


def counter_queries(instances: Iterable[str], job: str | None = None) -> dict[str, str]:
    """The instant queries that read the counters of ``instances``, by purpose.

    Args:
        instances: ``instance`` labels.
        job: Only series of this scrape job (None: any).

    Returns:
        ``counters``: every counter and histogram series summed by the labels a reading
        needs; ``created``: the earliest ``_created`` time per series name (summing
        creation times would break restart detection); ``info``: vLLM's cache-config
        gauge as scraped; ``up``: whether each target's last scrape succeeded.
    """
    where = _matchers(instances, job)
    names = "|".join(_COUNTER_BASES)
    return {
        "counters": f"sum by ({', '.join(_KEEP)}) ({{__name__=~`({names})(_total|_bucket|_sum|_count)?`, {where}}})",
        "created": f"min by (instance, job, __name__) ({{__name__=~`({names})_created`, {where}}})",
        "info": f"{{__name__=`{CACHE_CONFIG_INFO}`, {where}}}",
        "up": f"up{{{where}}}",
    }


def freshness_query(instances: Iterable[str], job: str | None = None) -> str:
    """The instant query that gives, per instance, the start time of its newest scrape (Unix s)."""
    return f"max by (instance) (timestamp(up{{{_matchers(instances, job)}}}))"


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------


def api_data(status: int, body_text: str, where: str) -> Any:
    """The ``data`` of a Prometheus HTTP API answer, or the error that names the fix.

    Args:
        status: The HTTP status.
        body_text: The body.
        where: The URL asked, for messages.

    Raises:
        MetricsError: Credentials missing, not Prometheus's API, or an API error.
    """
    if status in (401, 403):
        raise MetricsError(f"{where} answered {status}: this Prometheus needs credentials; pass its bearer token.")
    try:
        body = json.loads(body_text)
    except ValueError:
        body = None
    if not isinstance(body, Mapping) or body.get("status") not in ("success", "error"):
        raise MetricsError(
            f"{where} answered HTTP {status} with {body_text[:80]!r}, not Prometheus's JSON API; {_PROM_FIX} "
            "(not a replica's /metrics, Grafana or the Pushgateway; include any path prefix it is served under)."
        )
    if body["status"] == "error":
        kind, error = body.get("errorType", "error"), body.get("error", "")
        if kind in ("timeout", "canceled", "unavailable"):
            raise MetricsError(f"Prometheus could not answer {where} ({kind}: {error}); it may be overloaded: retry.")
        raise MetricsError(f"Prometheus rejected the query at {where} ({kind}: {error}); check prometheus_url.")
    return body.get("data")


def vector_series(data: Any) -> list[tuple[dict[str, str], float, float]]:
    """``(labels, value, evaluation time)`` of each element of an instant-vector answer.

    Raises:
        MetricsError: ``data`` is not an instant vector.
    """
    if not isinstance(data, Mapping) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise MetricsError(f"Prometheus answered a query with {str(data)[:120]!r}, not an instant vector.")
    out = []
    for item in data["result"]:
        try:
            labels = {str(k): str(v) for k, v in item["metric"].items()}
            at, value = float(item["value"][0]), float(item["value"][1])  # "NaN", "+Inf" parse too
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise MetricsError(f"Prometheus answered a malformed vector element: {str(item)[:120]!r}") from None
        out.append((labels, value, at))
    return out


def samples_by_instance(series: Iterable[tuple[dict[str, str], float, float]]) -> dict[str, list[Sample]]:
    """Series grouped by their ``instance`` label, as :class:`Sample`s without ``instance`` and ``job``."""
    out: dict[str, list[Sample]] = {}
    for labels, value, _ in series:
        instance = labels.get("instance")
        name = labels.get("__name__")
        if instance is None or name is None:
            continue
        rest = {k: v for k, v in labels.items() if k not in ("__name__", "instance", "job")}
        out.setdefault(instance, []).append(Sample(name=name, labels=rest, value=value))
    return out


@dataclass(frozen=True)
class Target:
    """One of Prometheus's active scrape targets (``/api/v1/targets``)."""

    instance: str
    """Its ``instance`` label."""
    job: str
    """Its ``job`` label."""
    health: str
    """``up``, ``down`` or ``unknown`` (not scraped yet)."""
    last_error: str
    """Why the last scrape failed (empty when it did not)."""
    scrape_url: str
    """The URL Prometheus scrapes."""
    scrape_interval_s: float | None
    """Its scrape interval in seconds (None: Prometheus does not say)."""


def parse_duration(text: str) -> float | None:
    """Seconds in a Prometheus duration (``15s``, ``1m30s``, ``500ms``); None if unreadable."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * units[u] for n, u in parts)


def parse_targets(data: Any) -> list[Target]:
    """The active targets in a ``/api/v1/targets`` answer.

    Raises:
        MetricsError: The answer has no ``activeTargets`` list.
    """
    active = data.get("activeTargets") if isinstance(data, Mapping) else None
    if not isinstance(active, list):
        raise MetricsError(f"Prometheus's /api/v1/targets answered {str(data)[:120]!r}, with no activeTargets.")
    targets = []
    for t in active:
        if isinstance(t, Mapping) and isinstance(labels := t.get("labels"), Mapping):
            instance, job = str(labels.get("instance", "")), str(labels.get("job", ""))
            health, error, url = str(t.get("health", "unknown")), str(t.get("lastError") or ""), str(t.get("scrapeUrl"))
            targets.append(Target(instance, job, health, error, url, parse_duration(str(t.get("scrapeInterval")))))
    return targets


def check_targets(wanted: Sequence[str], targets: Sequence[Target], job: str | None, where: str) -> list[Target]:
    """The target of each ``wanted`` instance label among ``targets`` (of ``job``, if given).

    Raises:
        MetricsError: An instance is not a target, is down, or is scraped by several jobs
            (its counters would be counted twice); the message names each and the fix.
    """
    found, problems = [], []
    for instance in wanted:
        mine = [t for t in targets if t.instance == instance and (job is None or t.job == job)]
        if not mine:
            known = sorted({f"{t.instance} (job {t.job})" for t in targets}) or ["none"]
            problems.append(
                f"{instance} is not among its targets{f' of job {job}' if job else ''} (it scrapes: "
                f"{', '.join(known[:10])}); add it to a scrape job's static_configs targets, or name the "
                "replica by the instance label Prometheus gives it"
            )
        elif len(mine) > 1:
            jobs = ", ".join(sorted(t.job for t in mine))
            problems.append(f"{instance} is scraped by several jobs ({jobs}); pick one with job=NAME")
        elif mine[0].health == "down":
            t = mine[0]
            problems.append(
                f"{instance} is down for it (job {t.job}, {t.scrape_url}: {t.last_error or 'no error given'}); "
                "is the replica running and serving /metrics?"
            )
        else:
            found.append(mine[0])
    if problems:
        raise MetricsError(f"Prometheus at {where} cannot give every replica's counters: " + "; ".join(problems) + ".")
    return found


# --------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------


class PrometheusReader:
    """Reads replicas' cache counters from a Prometheus server, one :class:`Snapshot` per replica.

    Args:
        url: The Prometheus root, e.g. ``http://127.0.0.1:9090`` (``/api/v1`` or ``/graph``
            at the end is dropped; keep any path prefix it is served under).
        kind: The replicas' server-kind adapter (its ``read_counters`` reads the series;
            None: vLLM and SGLang names, as :class:`MetricsReader`).
        model_name: Count only this model's series.
        job: Read only series of this scrape job (None: any; an instance scraped by two
            jobs is then an error, since its counters would be counted twice).
        api_key: Bearer token for a Prometheus behind an authenticating proxy.
        timeout_s: Seconds to wait for each HTTP answer.
        wait_s: Longest wait for a scrape newer than ``not_before``; None: three scrape
            intervals plus 5 s.
        transport: An httpx transport to use instead of the network (tests).
    """

    def __init__(
        self,
        url: str,
        kind: Any = None,
        *,
        model_name: str | None = None,
        job: str | None = None,
        api_key: str | None = None,
        timeout_s: float = http.SCRAPE_TIMEOUT_S,
        wait_s: float | None = None,
        transport: http.Transport | None = None,
    ) -> None:
        self.url = re.sub(r"/(api/v1|graph)/?$", "", url.strip().rstrip("/"))
        self.kind = kind
        self.model_name = model_name
        self.job = job
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.poll_s = 0.2
        """Seconds between checks while waiting for a scrape."""
        self._transport = transport

    def snapshots(self, replicas: Sequence[str], *, not_before: float | None = None) -> dict[str, Snapshot]:
        """Each replica's counters from its first scrape that started at or after ``not_before``.

        Args:
            replicas: Replica URLs or ``instance`` labels (see :func:`instance_label`).
            not_before: Unix seconds; None: now, so the counters include everything the
                replicas counted before this call (the end of a phase).

        Returns:
            A snapshot per replica, keyed as given; ``taken_at`` is the scrape's start.

        Raises:
            MetricsError: Prometheus cannot be reached or rejects a query; a replica is not
                a target, is down or is scraped twice; or no new enough scrape came in time.
        """
        if not replicas:
            raise MetricsError("No replicas to read from Prometheus: pass their URLs or instance labels.")
        since = time.time() if not_before is None else not_before
        wanted = {r: instance_label(r) for r in replicas}
        labels = list(dict.fromkeys(wanted.values()))
        with self._client() as client:
            targets = check_targets(labels, self._targets(client), self.job, self.url)
            scraped, at = self._wait_for_scrapes(client, targets, since)
            found = {purpose: self._query(client, q, at) for purpose, q in counter_queries(labels, self.job).items()}
            failed = sorted(lab.get("instance", "?") for lab, value, _ in found["up"] if value != 1)
            if failed:  # went down while we waited: the targets say why
                check_targets(labels, self._targets(client), self.job, self.url)
                raise MetricsError(f"Prometheus's last scrape of {', '.join(failed)} failed; retry.")
        series = samples_by_instance(found["counters"] + found["created"] + found["info"])
        read = self.kind.read_counters if self.kind is not None else read_counters
        out = {}
        for replica, label in wanted.items():
            samples = series.get(label, [])
            out[replica] = Snapshot(read(samples, self.model_name), read_cache_config(samples), scraped[label])
        return out

    def snapshot(self, replica: str, *, not_before: float | None = None) -> Snapshot:
        """One replica's counters (see :meth:`snapshots`)."""
        return self.snapshots([replica], not_before=not_before)[replica]

    def targets(self) -> list[Target]:
        """Prometheus's active scrape targets.

        Raises:
            MetricsError: Prometheus cannot be reached or answers oddly.
        """
        with self._client() as client:
            return self._targets(client)

    def _client(self) -> http.Http:
        failures = http.Failures(
            refused=f"Could not connect to Prometheus at {self.url}: is it running? {_PROM_FIX}.",
            timeout=f"Prometheus at {self.url} did not answer within {{timeout_s}} s; it may be overloaded: retry.",
            bad_url=f"prometheus_url={self.url!r} is not a valid http(s) URL ({{error}}); {_PROM_FIX}.",
            other="Asking Prometheus at {url} failed ({error_type}: {error}).",
            error=MetricsError,
            bad_url_error=MetricsError,
        )
        return http.Http(timeout_s=self.timeout_s, api_key=self.api_key, failures=failures, transport=self._transport)

    def _wait_for_scrapes(
        self, client: http.Http, targets: Sequence[Target], since: float
    ) -> tuple[dict[str, float], float]:
        """Each instance's newest scrape start once all are at or after ``since``, and Prometheus's time then."""
        intervals = [t.scrape_interval_s for t in targets if t.scrape_interval_s]
        interval = max(intervals) if intervals else 15.0
        wait = self.wait_s if self.wait_s is not None else 3 * interval + 5.0
        deadline = time.monotonic() + wait
        labels = [t.instance for t in targets]
        said = False
        while True:
            sent = time.time()
            found = self._query(client, freshness_query(labels, self.job), None)
            scraped = {lab.get("instance", ""): value for lab, value, _ in found}
            prom_now = found[0][2] if found else None
            # A Prometheus whose clock runs ahead stamps scrapes ahead too; compare on its clock.
            offset = prom_now - (sent + time.time()) / 2 if prom_now is not None else 0.0
            offset = offset if abs(offset) > 0.5 else 0.0
            stale = [i for i in labels if scraped.get(i, float("-inf")) < since + offset]
            if not stale:
                return {i: scraped[i] - offset for i in labels}, prom_now or time.time()
            if time.monotonic() >= deadline:
                raise self._lag_error(stale, scraped, since + offset, wait, interval)
            if not said:
                log.info(
                    "waiting up to %.0f s for Prometheus to scrape %s after %s (scrape interval %g s)",
                    wait, ", ".join(stale), time.strftime("%H:%M:%S", time.localtime(since)), interval,
                )  # fmt: skip
                said = True
            time.sleep(self.poll_s)

    def _lag_error(
        self, stale: Sequence[str], scraped: Mapping[str, float], since: float, wait: float, interval: float
    ) -> MetricsError:
        ages = ", ".join(
            f"{i}: last scrape {since - scraped[i]:.1f} s before" if i in scraped else f"{i}: no scrape at all"
            for i in stale
        )
        return MetricsError(
            f"Prometheus at {self.url} has no scrape newer than the phase end after waiting {wait:.0f} s ({ages}; "
            f"scrape interval {interval:g} s). Check that Prometheus keeps scraping these targets, lower the job's "
            "scrape_interval, or allow a longer wait (wait_s=); the machine's and Prometheus's clocks must agree."
        )

    def _targets(self, client: http.Http) -> list[Target]:
        return parse_targets(self._call(client, "GET", "/api/v1/targets", {"state": "active"}))

    def _query(self, client: http.Http, query: str, at: float | None) -> list[tuple[dict[str, str], float, float]]:
        params = {"query": query} | ({"time": f"{at:.3f}"} if at is not None else {})
        return vector_series(self._call(client, "POST", "/api/v1/query", params))

    def _call(self, client: http.Http, method: str, path: str, params: Mapping[str, str]) -> Any:
        where = self.url + path
        # POST is form-encoded: long selectors do not fit every proxy's URL limit.
        if method == "POST":
            response = client.request("POST", where, data=dict(params))
        else:
            response = client.request("GET", where, params=dict(params))
        return api_data(response.status_code, response.text, where)
