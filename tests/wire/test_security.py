"""Security: the embedded engine listens on loopback only, and an API key goes to the
server as a bearer token and nowhere else: not to logs, the console, reports, JSON,
CSV or plots (the tests grep every output for it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeOpenAIServer

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.commands.rollout import RolloutConfig
from echo_env.config import build
from echo_env.launch.engine import EmbeddedEngine, group_members
from echo_env.wire.client import ClientConfig
from echo_env.wire.info import ServerFacts

SECRET = "sk-echo-test-5ecr3t-9f8e7d6c5b4a"
"""A key no output may contain."""

_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def _listening_sockets() -> dict[str, str]:
    """Socket inode -> local address (hex, as in /proc/net/tcp{,6}) of every TCP listener."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[fields[9]] = fields[1]
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        pass
    return inodes


@pytest.mark.engine
def test_no_process_of_the_engine_listens_beyond_loopback(engine: Any) -> None:
    """Every TCP socket any process of the engine listens on (API server and EngineCore
    alike) is bound to 127.0.0.1 or ::1, never to all interfaces."""
    if not isinstance(engine, EmbeddedEngine) or engine.pid is None:
        pytest.skip("the server under test was started outside the test session")
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    listeners = _listening_sockets()
    ours = {inode: listeners[inode] for pid in group_members(engine.pid) for inode in _socket_inodes(pid)
            if inode in listeners}  # fmt: skip
    port = f"{int(engine.server_url.rsplit(':', 1)[1]):04X}"
    assert any(addr.endswith(f":{port}") for addr in ours.values()), "the API port should be among them"
    exposed = {addr for addr in ours.values() if addr.split(":")[0] not in _LOOPBACK}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_configs_keep_the_key_out_of_their_repr() -> None:
    configs = [
        ClientConfig(base_url="http://127.0.0.1:1/v1", api_key=SECRET),
        build(PrefixTestConfig, base_url="http://127.0.0.1:1/v1", api_key=SECRET),
        build(RolloutConfig, base_url="http://127.0.0.1:1/v1", api_key=SECRET),
        ServerFacts(base_url="http://127.0.0.1:1/v1", metrics_url=None, model="m", api_key=SECRET),
    ]
    for config in configs:
        assert SECRET not in repr(config) and SECRET not in str(config)
    assert build(PrefixTestConfig, api_key=SECRET).public()["api_key"] == "***"
    assert SECRET not in str(ServerFacts("http://x/v1", None, "m", api_key=SECRET).to_json())


def _run(command: str, fake: FakeOpenAIServer, out: Path, env: dict[str, str], *extra: str) -> str:
    args = [command, f"base_url={fake.base_url}", "batch_size=2", "group_size=2", f"out_dir={out}", "debug=true"]
    if command == "test":
        args += ["max_repeats=2", "min_repeats=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "echo_env", *args, *extra], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode in (0, 1, 2), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _assert_nowhere(secret: str, console: str, out: Path) -> None:
    assert secret not in console, "the key reached the console or the logs"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".jsonl"}
    for path in files:
        assert secret.encode() not in path.read_bytes(), f"the key was written to {path.name}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("source", ["config", "environment"])
def test_api_key_is_sent_as_bearer_and_never_written(fake: FakeOpenAIServer, tmp_path: Path, source: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    extra: tuple[str, ...] = ()
    if source == "config":
        extra = (f"api_key={SECRET}",)
    else:
        env["OPENAI_API_KEY"] = SECRET
    console = _run("test", fake, tmp_path / "test", env, *extra)
    console += _run("rollout", fake, tmp_path / "rollout", env, *extra)
    # Sent: on every kind of request the two commands make, and only as a bearer token.
    assert fake.authorizations == {f"Bearer {SECRET}"}
    for path in ("POST /v1/completions", "GET /v1/models", "GET /metrics", "POST /tokenize"):
        assert fake.paths[path] > 0, f"no {path} request was made"
        assert fake.unauthenticated[path] == 0, f"{path} went without the key"
    # Never written.
    _assert_nowhere(SECRET, console, tmp_path)
    assert (tmp_path / "test" / "ttft_by_phase.png").exists() or "plots" in console  # the plots were checked too
