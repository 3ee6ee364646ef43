"""A real Prometheus run as a child process, to test reading counters through one.

:func:`prometheus_binary` finds the ``prometheus`` binary: ``$ECHO_ENV_PROMETHEUS``,
else the copy in ``<cache>/prometheus/``, fetched there once from Debian's package
(``apt-get download prometheus``, then ``dpkg-deb -x``; no root needed). That is
Prometheus 2.42 on Debian bookworm, a 19 MB download.

:class:`EmbeddedPrometheus` writes a config that scrapes the given ``/metrics`` URLs,
starts Prometheus on 127.0.0.1 and a free port with its storage in a temporary folder,
waits until it is ready and has every target listed, and on exit stops its process
group and removes the folder.

``python -m echo_env.launch.prometheus_server`` only fetches the binary and prints its path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from echo_env.errors import EchoEnvError, EngineError
from echo_env.launch.model import default_cache_dir
from echo_env.launch.process import HOST, ServerProcess, find_free_port, log_path, read_tail
from echo_env.wire import http

BINARY_ENV = "ECHO_ENV_PROMETHEUS"
"""Environment variable naming a ``prometheus`` binary to use instead of the fetched one."""

DEBIAN_PACKAGE = "prometheus"
"""The Debian package the binary comes from."""

_FETCH_TIMEOUT_S = 300.0
_READY_TIMEOUT_S = 30.0
_POLL_S = 0.2
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 20
_FIX = f"or set {BINARY_ENV}=/path/to/prometheus (any Prometheus 2.x or 3.x binary)"


def _binary_in(folder: Path) -> Path:
    return folder / "usr" / "bin" / "prometheus"


def prometheus_binary(cache_dir: Path | None = None, fetch: bool = True) -> Path:
    """The ``prometheus`` binary: ``$ECHO_ENV_PROMETHEUS``, else the cached copy, else fetched now.

    Args:
        cache_dir: The cache folder (None: :func:`~echo_env.launch.model.default_cache_dir`).
        fetch: Fetch Debian's package when there is no cached copy.

    Returns:
        The binary's path.

    Raises:
        EngineError: The variable names no executable file, or the binary is missing and
            cannot be fetched (no ``apt-get``/``dpkg-deb``, no package list, no network);
            the message names the fix.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EngineError(f"{BINARY_ENV}={override} is not an executable file; point it at a prometheus binary.")
        return path
    folder = (cache_dir or default_cache_dir()) / "prometheus"
    if _binary_in(folder).is_file():
        return _binary_in(folder)
    if not fetch:
        raise EngineError(f"no Prometheus in {folder}: run `python -m echo_env.launch.prometheus_server`, {_FIX}.")
    return _fetch(folder)


def _fetch(folder: Path) -> Path:
    """Download Debian's package and unpack it into ``folder`` (atomically: a half-done fetch leaves nothing)."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise EngineError(f"cannot fetch Prometheus: {' and '.join(missing)} not found (not Debian/Ubuntu?); {_FIX}.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"echo_env: fetching Prometheus (Debian package {DEBIAN_PACKAGE}) into {folder}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".prometheus-", dir=folder.parent) as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", DEBIAN_PACKAGE], work, "apt-get download prometheus")
        debs = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise EngineError(f"apt-get download left no {DEBIAN_PACKAGE}_*.deb in {work}; {_FIX}.")
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], work, "dpkg-deb -x")
        if not _binary_in(work / "root").is_file():
            raise EngineError(f"{debs[0].name} holds no usr/bin/prometheus; {_FIX}.")
        (work / "root" / "usr" / "bin" / "promtool").unlink(missing_ok=True)  # 46 MB nothing here runs
        with contextlib.suppress(OSError):
            (work / "root").rename(folder)  # another process may have won the race: theirs is as good
    if not _binary_in(folder).is_file():
        raise EngineError(f"could not put Prometheus into {folder}; check that it is writable, {_FIX}.")
    return _binary_in(folder)


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{what} failed ({exc}); {_FIX}.") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-500:]
        hint = " Run `sudo apt-get update` first," if "locate package" in tail or "no installation" in tail else ""
        raise EngineError(f"{what} failed (exit status {done.returncode}): {tail}.{hint} {_FIX}.")


def scrape_config(targets: Sequence[str], scrape_interval_s: float, job: str) -> str:
    """A Prometheus config (YAML; JSON is valid YAML) that scrapes ``targets`` every interval.

    Args:
        targets: Metrics URLs (``http://host:port/metrics``) or server roots (``/metrics`` is added).
        scrape_interval_s: Seconds between scrapes.
        job: The job name; targets with another scheme or path get a job of their own
            (``job-2``...), as one scrape job has one scheme and path.

    Raises:
        EngineError: A target is not an http(s) URL.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for url in targets:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EngineError(f"Prometheus target {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000")
        path = parts.path.rstrip("/") or "/metrics"
        path = path if path.endswith("/metrics") else path + "/metrics"
        groups.setdefault((parts.scheme, path), []).append(parts.netloc)
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    jobs = [
        {"job_name": job if i == 0 else f"{job}-{i + 1}", "scheme": scheme, "metrics_path": path,
         "static_configs": [{"targets": hosts}]}
        for i, ((scheme, path), hosts) in enumerate(groups.items())
    ]  # fmt: skip
    config = {"global": {"scrape_interval": interval, "scrape_timeout": interval}, "scrape_configs": jobs}
    return json.dumps(config, indent=2) + "\n"


class EmbeddedPrometheus:
    """A Prometheus scraping ``targets``, for as long as the ``with`` block runs.

    Args:
        targets: The replicas' metrics URLs (or roots).
        scrape_interval_s: Seconds between scrapes.
        job: The scrape job's name (the ``job`` label).
        cache_dir: Where the binary is cached and the log goes (None: the default cache).
        ready_timeout_s: Longest wait for readiness and for every target to be listed.

    Attributes:
        url: The Prometheus root, ``http://127.0.0.1:PORT``, once started.
        log_path: Its log file.
    """

    def __init__(
        self,
        targets: Sequence[str],
        scrape_interval_s: float = 1.0,
        job: str = "replicas",
        cache_dir: Path | None = None,
        ready_timeout_s: float = _READY_TIMEOUT_S,
    ) -> None:
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.cache_dir = cache_dir or default_cache_dir()
        self.ready_timeout_s = ready_timeout_s
        self.url = ""
        self.log_path = self.cache_dir / "logs" / "prometheus.log"
        self._process: ServerProcess | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> EmbeddedPrometheus:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Prometheus and wait until it is ready with every target listed.

        Raises:
            EngineError: No binary, a bad target, or it exited or did not get ready in
                time; the message holds the log's last lines.
        """
        binary = prometheus_binary(self.cache_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="echo-prometheus-")
        folder = Path(self._tmp.name)
        (folder / "prometheus.yml").write_text(scrape_config(self.targets, self.scrape_interval_s, self.job))
        port = find_free_port()
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path(self.cache_dir, f"prometheus-{port}.log")
        cmd = [
            str(binary), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=1d",
        ]  # fmt: skip
        try:
            self._process = ServerProcess(cmd, self.log_path, stop_timeout_s=_STOP_TIMEOUT_S)
        except OSError as exc:
            self.stop()
            raise EngineError(f"could not start {binary} ({exc}); {_FIX}.") from None
        try:
            self._wait_ready(self._process)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, process: ServerProcess) -> None:
        """Wait for ``/-/ready`` and then for every target in ``/api/v1/targets`` (listed ~5 s after start)."""
        ready = False

        def scraped() -> bool:
            nonlocal ready
            with contextlib.suppress(EchoEnvError, ValueError):
                if not ready:
                    ready = http.answers_ok(f"{self.url}/-/ready", follow_redirects=False)
                else:
                    body = http.get_json(f"{self.url}/api/v1/targets", timeout_s=http.HEALTH_TIMEOUT_S)
                    # Targets are listed together, once discovery runs; each is "unknown" until scraped.
                    listed = body["data"]["activeTargets"]
                    return bool(listed) and all(t.get("health") != "unknown" for t in listed)
            return False

        def failed(code: int | None) -> EngineError:
            if code is not None:
                return self._error(f"Prometheus exited during start-up (status {code})")
            what = "every target to be scraped once" if ready else "/-/ready"
            return self._error(f"Prometheus at {self.url} did not get {what} within {self.ready_timeout_s:g} s")

        process.wait_ready(scraped, self.ready_timeout_s, _POLL_S, failed)

    def _error(self, what: str) -> EngineError:
        tail = read_tail(self.log_path, _LOG_TAIL_LINES).rstrip()
        return EngineError(f"{what}. Log: {self.log_path}\n--- last lines ---\n{tail}")

    def stop(self) -> None:
        """Stop Prometheus (its whole process group) and remove its storage. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            process.stop()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch Prometheus (once) and print the binary's path; 2 when it cannot be fetched."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        print(prometheus_binary())
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
