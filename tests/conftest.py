"""Fixtures shared by the whole test suite.

Tests that need the real vLLM engine are marked ``engine`` (``pytest -m "not engine"``
skips them) and take the session-scoped :func:`engine` fixture, so the suite starts one
server at most. Set ``ECHO_ENV_TEST_BASE_URL=http://127.0.0.1:8000/v1`` to run them
against a server that is already up instead (``ECHO_ENV_TEST_MODEL`` names its model
when it serves several).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

BASE_URL_ENV = "ECHO_ENV_TEST_BASE_URL"
"""Environment variable: the ``/v1`` address of a running server to test against."""

MODEL_ENV = "ECHO_ENV_TEST_MODEL"
"""Environment variable: the served model name on that server (default: its first model)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine: needs the real embedded vLLM engine")
    config.addinivalue_line(
        "markers", "faults: kills, stalls, restarts or loads servers of its own (slow; `make test` runs them)"
    )
    config.addinivalue_line("markers", "llamacpp: needs llama.cpp's llama-server (built by `make llama-server`)")
    config.addinivalue_line("markers", "fleet: starts two vLLM replicas behind vllm-router (about 10 GB)")


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


# Adapter tests need their RL library (`make install-rl`; `make test` installs them). Run
# by hand without them, they are not collected; `make test` sets ECHO_ENV_REQUIRE_RL=1 so
# that CI fails instead of passing without them.
collect_ignore = [
    path
    for path, module in (
        ("integrations/test_integrations_trl.py", "trl"),
        ("commands/test_train.py", "trl"),
        ("integrations/test_integrations_tinker.py", "tinker_cookbook"),
        ("integrations/test_integrations_verifiers.py", "verifiers"),
    )
    if _missing(module)
]
if collect_ignore and os.environ.get("ECHO_ENV_REQUIRE_RL") == "1":
    raise pytest.UsageError(
        f"ECHO_ENV_REQUIRE_RL=1 but {', '.join(collect_ignore)} cannot run: their RL library is not installed; "
        "run `make install-rl`"
    )


def _llama_server_missing() -> bool:
    try:
        from echo_env.launch.llamacpp_build import llama_server_binary

        llama_server_binary(build=False)
    except Exception:
        return True
    return False


# The llama.cpp and fleet tests need parts `make test` installs (the llama-server build,
# vllm-router); with ECHO_ENV_REQUIRE_* set, their absence stops the run instead of
# letting it pass with those tests skipped.
if os.environ.get("ECHO_ENV_REQUIRE_LLAMACPP") == "1" and _llama_server_missing():
    raise pytest.UsageError("ECHO_ENV_REQUIRE_LLAMACPP=1 but llama-server is not built: run `make llama-server`")
if os.environ.get("ECHO_ENV_REQUIRE_FLEET") == "1":
    import shutil
    import sys

    if (
        shutil.which("vllm-router", path=os.path.dirname(sys.executable)) is None
        and shutil.which("vllm-router") is None
    ):
        raise pytest.UsageError("ECHO_ENV_REQUIRE_FLEET=1 but vllm-router is not installed: run `make install-fleet`")

# The report's browser test opens report.html in Debian's chromium (`make chromium`).
if os.environ.get("ECHO_ENV_REQUIRE_CHROMIUM") == "1" and not os.path.isfile("/usr/bin/chromium"):
    raise pytest.UsageError("ECHO_ENV_REQUIRE_CHROMIUM=1 but /usr/bin/chromium is missing: run `make chromium`")


# ----- the engine ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunningServer:
    """A server someone else started: the addresses of an ``EmbeddedEngine``, nothing to stop."""

    base_url: str
    """``http://host:port/v1``."""
    served_model_name: str
    """The model name the server answers to."""

    @property
    def server_url(self) -> str:
        """The server root, without ``/v1``."""
        return self.base_url.removesuffix("/v1")

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"{self.server_url}/metrics"


def _running_server(url: str) -> RunningServer:
    base_url = url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    model = os.environ.get(MODEL_ENV)
    if not model:
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            model = str(json.load(response)["data"][0]["id"])
    return RunningServer(base_url=base_url, served_model_name=model)


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """One vLLM server with prefix caching on, for the whole session.

    Yields an ``EmbeddedEngine`` (started here, stopped at the end of the session), or a
    :class:`RunningServer` when ``ECHO_ENV_TEST_BASE_URL`` is set. Both have
    ``base_url``, ``server_url``, ``metrics_url`` and ``served_model_name``. The embedded
    one runs in dev mode, so tests may ``POST /reset_prefix_cache``.
    """
    url = os.environ.get(BASE_URL_ENV)
    if url:
        yield _running_server(url)
        return
    from echo_env.launch.engine import EmbeddedEngine, EngineConfig

    # Request chat templates are trusted so tests/cachetest/test_turns_real.py can send a stripping one.
    config = EngineConfig(prefix_caching=True, dev_mode=True, trust_request_chat_template=True)
    with EmbeddedEngine(config) as server:
        yield server
