"""The embedded vLLM engine: start-up, what it serves, failure messages and a clean stop.

Tests marked ``engine`` use the real server (the session ``engine`` fixture, one per
run); the others check the configuration and command line without starting anything.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from echo_env.envs.task import EchoTask, grade
from echo_env.errors import ConfigError, EngineError
from echo_env.launch.engine import (
    HOST,
    EmbeddedEngine,
    EngineConfig,
    _last_error_line,
    find_free_port,
    group_members,
)
from echo_env.launch.model import DEFAULT_SERVED_MODEL_NAME
from echo_env.launch.process import cpu_list


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return int(response.status), response.read().decode("utf-8")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.load(response))


def _complete(engine: Any, prompt: str) -> dict[str, Any]:
    body = {"model": engine.served_model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["\n"]}
    return _post(f"{engine.base_url}/completions", body)


def _bogus_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]}')
    return folder


# ----- without a server -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"kv_cache_gib": 0}, "kv_cache_gib"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"block_size": 0}, "block_size"),
        ({"extra_args": "--seed 0"}, "extra_args"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_config_cannot_listen_beyond_localhost() -> None:
    assert EngineConfig().host == HOST == "127.0.0.1"
    with pytest.raises(TypeError):
        EngineConfig(host="0.0.0.0")  # type: ignore[call-arg]


def test_config_accepts_lists_and_strings_from_a_command_line(tmp_path: Path) -> None:
    config = EngineConfig(extra_args=["--seed", "0"], cache_dir=str(tmp_path))  # type: ignore[arg-type]
    assert config.extra_args == ("--seed", "0")
    assert config.resolved_cache_dir == tmp_path


def test_served_name_defaults() -> None:
    assert EngineConfig().resolved_served_model_name == DEFAULT_SERVED_MODEL_NAME
    assert EngineConfig(model="default").resolved_served_model_name == DEFAULT_SERVED_MODEL_NAME
    assert EngineConfig(model="org/name").resolved_served_model_name == "org/name"
    assert EngineConfig(model="org/name", served_model_name="x").resolved_served_model_name == "x"


def test_command_line_carries_the_settings() -> None:
    on = EmbeddedEngine(EngineConfig(block_size=16, extra_args=("--seed", "0"))).command("/m", 1234)
    assert on[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(on)
    for part in ("--model /m", "--host 127.0.0.1", "--port 1234", "--max-model-len 2048", "--block-size 16",
                 "--enable-prompt-tokens-details", "--enable-prefix-caching", "--enforce-eager"):  # fmt: skip
        assert part in joined
    assert on[-2:] == ["--seed", "0"]
    off = EmbeddedEngine(EngineConfig(prefix_caching=False)).command("/m", 1234)
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off


@pytest.mark.parametrize(
    ("flags", "cpu_only", "expected"),
    [
        ("flags\t: fpu sse avx2 fma", True, "float32"),  # AVX2 only: bf16 is emulated, 4x slower here
        ("flags\t: fpu avx2 avx512f avx512_bf16", True, None),
        ("flags\t: fpu avx2 amx_bf16 amx_tile", True, None),
        ("flags\t: fpu sse avx2 fma", False, None),  # a GPU: the model's own dtype
    ],
)
def test_auto_dtype_is_float32_only_on_cpus_without_bf16(flags: str, cpu_only: bool, expected: str | None) -> None:
    from echo_env.launch.engine import cpu_has_bf16, resolve_dtype

    assert resolve_dtype("auto", cpu_only=cpu_only, bf16=cpu_has_bf16(flags)) == expected
    assert resolve_dtype("bfloat16", cpu_only=True, bf16=False) == "bfloat16"
    cmd = EmbeddedEngine(EngineConfig(dtype="float16")).command("/m", 1234)
    assert cmd[cmd.index("--dtype") + 1] == "float16"
    with pytest.raises(ConfigError, match="dtype='fp8' is not one of"):
        EngineConfig(dtype="fp8")


def test_addresses_need_a_started_engine() -> None:
    with pytest.raises(EngineError, match="not been started"):
        _ = EmbeddedEngine().base_url


def test_free_port_is_bindable() -> None:
    import socket

    port = find_free_port()
    with socket.socket() as sock:
        sock.bind((HOST, port))


def test_cpu_list_is_compact() -> None:
    assert cpu_list([0, 1]) == "0-1"
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_list([3]) == "3"


def test_error_headline_names_the_cause() -> None:
    tail = "Traceback (most recent call last):\n  File 'x'\nValueError: max_model_len is too big\nbye\n"
    assert _last_error_line(tail) == "ValueError: max_model_len is too big"
    assert _last_error_line("all fine\n") == ""


# ----- with the real engine -----------------------------------------------------------------


@pytest.mark.engine
def test_health_and_models(engine: Any) -> None:
    status, _ = _get(f"{engine.server_url}/health")
    assert status == 200
    _, body = _get(f"{engine.base_url}/models")
    assert engine.served_model_name in [m["id"] for m in json.loads(body)["data"]]


@pytest.mark.engine
def test_base_model_echoes_the_word(engine: Any) -> None:
    reply = _complete(engine, EchoTask().transcript("apple"))
    text = reply["choices"][0]["text"]
    assert grade(text, "apple").outcome == "correct", text
    assert reply["usage"]["prompt_tokens"] > 128


@pytest.mark.engine
def test_repeated_prompt_is_served_from_the_prefix_cache(engine: Any) -> None:
    prompt = f"{time.time_ns()}\n{EchoTask().transcript('river')}"  # new text: nothing cached yet
    first = _complete(engine, prompt)
    second = _complete(engine, prompt)
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert (first["usage"]["prompt_tokens_details"] or {}).get("cached_tokens", 0) == 0
    # Only whole 128-token blocks are cached (16 on a GPU) and the last token is always recomputed.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128 * ((prompt_tokens - 1) // 128)
    _, metrics = _get(engine.metrics_url)
    assert "vllm:prefix_cache_queries" in metrics
    assert "vllm:prefix_cache_hits" in metrics


@pytest.mark.engine
def test_listens_on_loopback_only(engine: Any) -> None:
    assert engine.base_url.startswith("http://127.0.0.1:")
    assert engine.base_url == f"{engine.server_url}/v1"
    port = int(engine.server_url.rsplit(":", 1)[1])
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    # Columns: sl local_address rem_address st ...; 0A is LISTEN, 0100007F is 127.0.0.1.
    listening = [
        fields[1]
        for fields in (line.split() for line in tcp.read_text().splitlines()[1:])
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port
    ]
    assert listening == [f"0100007F:{port:04X}"]


@pytest.mark.engine
def test_bogus_model_fails_fast_with_the_log(tmp_path: Path) -> None:
    engine = EmbeddedEngine(EngineConfig(model=str(_bogus_model(tmp_path / "bogus")), startup_timeout_s=240))
    start = time.perf_counter()
    with pytest.raises(EngineError) as info:
        engine.start()
    assert time.perf_counter() - start < 180
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert "exited during start-up" in first_line and "no_such_arch" in first_line
    assert "check the model name" in first_line
    assert "--- last lines ---" in message and len(message.splitlines()) > 10
    assert not engine.is_running()


@pytest.mark.engine
def test_interrupt_during_start_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while vLLM is still starting must take the half-started server down."""
    launched: list[int] = []

    def interrupted(self: EmbeddedEngine) -> None:
        assert self.pid is not None
        launched.append(self.pid)
        time.sleep(3.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(EmbeddedEngine, "_wait_healthy", interrupted)
    engine = EmbeddedEngine(EngineConfig(model=str(_bogus_model(tmp_path / "bogus"))))
    with pytest.raises(KeyboardInterrupt):
        engine.start()
    assert launched and group_members(launched[0]) == []
    assert engine.pid is None


@pytest.mark.engine
def test_stop_leaves_no_process_and_restart_keeps_the_address(engine: Any) -> None:
    if not isinstance(engine, EmbeddedEngine):
        pytest.skip("the server under test was started outside the test session")
    pid, base_url = engine.pid, engine.base_url
    assert pid is not None
    assert len(group_members(pid)) >= 2, "expected the API server and its EngineCore"
    start = time.perf_counter()
    engine.stop()
    assert time.perf_counter() - start < 30
    assert group_members(pid) == []
    engine.stop()  # a second stop is harmless
    # Restart, so the tests after this one still have a server, at the same address.
    engine.start()
    assert engine.base_url == base_url
    assert _get(f"{engine.server_url}/health")[0] == 200
