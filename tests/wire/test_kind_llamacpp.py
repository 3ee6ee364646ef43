"""llama.cpp offline: the server-kind adapter, the embedded server's settings, the build's cache.

The metrics page in tests/data/llamacpp_metrics_sample.txt was read from a real
llama-server (llama-cpp-python 0.3.36's llama.cpp, Gemma 3 270M, ``--metrics -np 4``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from echo_env.cachetest.results import Rules
from echo_env.errors import ConfigError, EngineError, ModelError
from echo_env.launch import llamacpp_build
from echo_env.launch.llamacpp_server import EmbeddedLlamaServer, LlamaServerConfig, resolve_gguf
from echo_env.measure.tokens import plan_tokens, slot_cold_requests
from echo_env.wire.kinds import ServerKind, ServerProps, plausible_tokenization
from echo_env.wire.kinds.llamacpp import (
    LlamaCppKind,
    apply_template_request,
    detect_llamacpp,
    metrics_status_hint,
    parse_apply_template,
    read_props,
)
from echo_env.wire.metrics import delta, parse_prometheus

DATA = Path(__file__).parent.parent / "data"
KIND = LlamaCppKind()
PROMPT = "User: Please echo the following word: apple\nAssistant:"

# The shape of a real /props answer, cut down (the full one has ~30 keys).
LLAMA_PROPS: dict[str, Any] = {
    "default_generation_settings": {"id": 0, "n_ctx": 4096, "params": {"temperature": 0.8}},
    "total_slots": 4,
    "model_alias": "echo-gemma3-270m",
    "model_path": "/cache/models/gemma-3-270m-q4_k_m.gguf",
    "build_info": "b1-0c1e570",
    "endpoint_metrics": True,
}


def test_is_a_server_kind() -> None:
    kind: ServerKind = KIND
    assert kind.name == "llamacpp"


# ----- request shapes --------------------------------------------------------------------


def test_tokenize_sends_content_with_special_tokens() -> None:
    # "prompt" gets 200 {"tokens": []} from llama-server, and without add_special the
    # ids lack the <bos> that /v1/completions puts first.
    assert KIND.tokenize_request("m", PROMPT) == (
        "/tokenize",
        {"content": PROMPT, "add_special": True, "parse_special": True},
    )


def test_chat_prompts_need_the_template_first() -> None:
    messages = [{"role": "system", "content": "Echo."}, {"role": "user", "content": "apple"}]
    assert KIND.tokenize_request("m", messages) is None
    assert apply_template_request(messages) == ("/apply-template", {"messages": messages})
    assert parse_apply_template({"prompt": "<start_of_turn>user\napple"}) == "<start_of_turn>user\napple"
    with pytest.raises(ValueError, match="no prompt"):
        parse_apply_template({"error": {"code": 500}})


def test_detokenize_sends_tokens() -> None:
    assert KIND.detokenize_request("m", (2, 818)) == ("/detokenize", {"tokens": [2, 818]})


# ----- parsing answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "ids"),
    [
        ({"tokens": [2, 818, 5279]}, [2, 818, 5279]),
        ({"tokens": [{"id": 2, "piece": "<bos>"}, {"id": 818, "piece": "User"}]}, [2, 818]),  # with_pieces
    ],
)
def test_parse_tokenize(body: Any, ids: list[int]) -> None:
    assert KIND.parse_tokenize(body) == ids


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": []},  # what a {"prompt": ...} body gets: never evidence about the prefix
        {},
        {"error": {"code": 400, "message": "bad"}},
        [2, 818],
        None,
        {"tokens": ["2", "818"]},
        {"tokens": [True]},
        {"tokens": [{"piece": "x"}]},
    ],
)
def test_parse_tokenize_rejects_answers_without_ids(body: Any) -> None:
    with pytest.raises(ValueError):
        KIND.parse_tokenize(body)


def test_a_handful_of_ids_for_a_long_prompt_is_implausible() -> None:
    long_prompt = PROMPT * 40
    assert not plausible_tokenization(len(long_prompt), KIND.parse_tokenize({"tokens": [2, 818, 5279]}))
    assert plausible_tokenization(len(PROMPT), KIND.parse_tokenize({"tokens": list(range(14))}))


def test_parse_detokenize() -> None:
    assert KIND.parse_detokenize({"content": " Echo: apple"}) == " Echo: apple"
    assert KIND.parse_detokenize({"content": ""}) == ""
    for body in ({"prompt": "x"}, {"text": "x"}, None, "x"):
        with pytest.raises(ValueError, match="no text"):
            KIND.parse_detokenize(body)


# ----- counters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> str:
    return (DATA / "llamacpp_metrics_sample.txt").read_text()


def test_counters_from_a_real_page(recorded: str) -> None:
    samples = parse_prometheus(recorded)
    computed = next(s.value for s in samples if s.name == "llamacpp:prompt_tokens_total")
    cached = next(s.value for s in samples if s.name == "llamacpp:prompt_tokens_cached_total")
    counters = KIND.read_counters(samples, "any-model-name")
    assert counters.source == "llamacpp"
    # Computed and cached tokens are disjoint: every prompt token is looked up once.
    assert counters.queries == computed + cached == counters.prompt_tokens
    assert counters.hits == cached == counters.cached_prompt_tokens
    assert (counters.queries, counters.hits) == (14545, 10427)  # the recorded run's prompt tokens, all and reused


def test_counter_delta_gives_the_hit_rate_of_a_repeat() -> None:
    # A 506-token prompt sent twice: +506 computed, then +1 computed and +505 cached.
    def page(computed: int, cached: int) -> str:
        return (
            "# TYPE llamacpp:prompt_tokens_total counter\n"
            f"llamacpp:prompt_tokens_total {computed}\n"
            "# TYPE llamacpp:prompt_tokens_cached_total counter\n"
            f"llamacpp:prompt_tokens_cached_total {cached}\n"
        )

    first = KIND.read_counters(parse_prometheus(page(506, 0)), None)
    second = KIND.read_counters(parse_prometheus(page(507, 505)), None)
    diff = delta(first, second)
    assert (diff.queries, diff.hits) == (506, 505)
    assert diff.hit_rate == pytest.approx(505 / 506)


def test_counters_missing_without_the_cache_counters(recorded: str) -> None:
    text = "\n".join(line for line in recorded.splitlines() if "prompt_tokens_cached" not in line)
    counters = KIND.read_counters(parse_prometheus(text), None)
    assert counters.source == "none"
    assert counters.queries is None and counters.hits is None


def test_metrics_501_means_the_flag_is_missing() -> None:
    hint = metrics_status_hint(501)
    assert hint is not None and "--metrics" in hint
    assert metrics_status_hint(404) is None and metrics_status_hint(200) is None


# ----- /props --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "is_llamacpp"),
    [
        (LLAMA_PROPS, True),
        ({"total_slots": 1, "build_info": "b6000"}, True),
        ({"total_slots": 4}, False),  # one key alone proves nothing
        ({"version": "0.32.0"}, False),  # vLLM's /version
        ({"page_size": 1, "disable_radix_cache": False}, False),  # SGLang
        ({"detail": "Not Found"}, False),
        ([], False),
        (None, False),
        ({"total_slots": "4", "build_info": "b1"}, False),
    ],
)
def test_detect_llamacpp(props: Any, is_llamacpp: bool) -> None:
    assert detect_llamacpp(props) is is_llamacpp


def test_read_props() -> None:
    props = read_props(LLAMA_PROPS)
    assert (props.slots, props.version, props.prefix_caching_enabled) == (4, "b1-0c1e570", None)
    assert props.raw["props"]["model_alias"] == "echo-gemma3-270m"


@pytest.mark.parametrize(
    ("settings", "enabled"),
    [
        ({"params": {"cache_prompt": False}}, False),
        ({"params": {"cache_prompt": True}}, True),
        ({"cache_prompt": True}, True),
        ({"params": {}}, None),
    ],
)
def test_read_props_cache_prompt_when_said(settings: dict[str, Any], enabled: bool | None) -> None:
    assert read_props({**LLAMA_PROPS, "default_generation_settings": settings}).prefix_caching_enabled is enabled


def test_granularity_is_one_token_per_slot() -> None:
    granularity = KIND.granularity(ServerProps(slots=4))
    assert granularity is not None
    assert (granularity.unit_tokens, granularity.slots) == (1, 4)
    unknown = KIND.granularity(ServerProps())
    assert unknown is not None and (unknown.unit_tokens, unknown.slots) == (1, None)


# ----- the per-slot ceiling -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("burst", "slots", "cold"),
    [
        (3, 4, 2),  # 2x2 agents on -np 4: one request takes the cold request's slot, two miss
        (15, 4, 3),  # 4x4 on -np 4: three empty slots, each misses once
        (4, 4, 3),
        (5, 4, 3),
        (1, 4, 0),  # one warm request: it takes the slot that holds the prefix
        (127, 1, 0),  # one slot: everything after the cold request hits
        (127, None, 0),  # one cache shared by every request (vLLM, SGLang)
        (0, 4, 0),
    ],
)
def test_slot_cold_requests(burst: int, slots: int | None, cold: int) -> None:
    assert slot_cold_requests(burst, slots) == cold


def _agent_prompts(n: int, shared: int = 519, length: int = 525) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens sharing their first ``shared`` (the test's ~525-token prompts)."""
    return [list(range(shared)) + [10_000 + i * 100 + k for k in range(length - shared)] for i in range(n)]


@pytest.mark.parametrize(
    ("agents", "measured"),
    [
        (4, 0.333),  # llama-server -np 4, 2x2 agents: the hit rate seen (was UNKNOWN not_above_ceiling vs 0.000)
        (16, 0.796),  # 4x4 agents: the hit rate seen (PASS, 0.796 of 0.797)
    ],
)
def test_slot_ceiling_holds_what_llama_server_measured(agents: int, measured: float) -> None:
    prompts = _agent_prompts(agents)
    cold, warm = prompts[:1], prompts[1:]
    plan = plan_tokens(warm, 1, warm=cold, extra_cold=slot_cold_requests(len(warm), 4))
    rules = Rules()
    assert measured <= plan.hit_rate_ceiling + rules.ceiling_tolerance  # not above the ceiling
    assert measured >= rules.hit_fraction * plan.hit_rate_ceiling  # and reaches it


def test_fixes_name_the_flags() -> None:
    assert "--no-cache-prompt" in KIND.caching_disabled_fix()
    assert "--metrics" in KIND.no_counters_fix()


# ----- the embedded server's settings --------------------------------------------------------


def test_command_line_carries_the_settings(tmp_path: Path) -> None:
    server = EmbeddedLlamaServer(LlamaServerConfig(cache_prompt=False, parallel=2, ctx_size=4096, threads=2))
    cmd = server.command(tmp_path / "llama-server", tmp_path / "m.gguf", 8123)
    line = " ".join(cmd)
    assert cmd[0] == str(tmp_path / "llama-server")
    for part in ("--metrics", "-np 2", "-c 4096", "-t 2", "--no-cache-prompt", "--host 127.0.0.1", "--port 8123"):
        assert part in line
    assert "--alias echo-gemma3-270m" in line
    cached = " ".join(EmbeddedLlamaServer().command(tmp_path / "s", tmp_path / "m.gguf", 1))
    assert "--no-cache-prompt" not in cached and "-np 4" in cached and "-c 16384" in cached


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 0}, "port"),
        ({"parallel": 0}, "parallel"),
        ({"parallel": 8, "ctx_size": 1024}, "ctx_size"),
        ({"threads": 0}, "threads"),
        ({"startup_timeout_s": 0}, "startup_timeout_s"),
        ({"extra_args": "--seed 0"}, "separate arguments"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LlamaServerConfig(**kwargs)


def test_served_model_name() -> None:
    assert LlamaServerConfig().resolved_served_model_name == "echo-gemma3-270m"
    assert LlamaServerConfig(model="/m/qwen2-0.5b.gguf").resolved_served_model_name == "qwen2-0.5b"
    assert LlamaServerConfig(served_model_name="x").resolved_served_model_name == "x"


def test_addresses_need_a_started_server() -> None:
    with pytest.raises(EngineError, match="start"):
        _ = EmbeddedLlamaServer().base_url


def test_model_must_be_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="GGUF"):
        resolve_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="GGUF"):
        resolve_gguf(str(tmp_path))


def test_default_gguf_is_reused(tmp_path: Path) -> None:
    existing = tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    existing.parent.mkdir()
    existing.write_bytes(b"GGUF")
    assert resolve_gguf(None, tmp_path) == existing


# ----- the build's cache -----------------------------------------------------------------------


def fake_binary(path: Path, exit_code: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'version: 1 (fake)' >&2\nexit {exit_code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_env_var_names_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_binary(tmp_path / "bin" / "llama-server")
    monkeypatch.setenv(llamacpp_build.BINARY_ENV, str(binary))
    assert llamacpp_build.llama_server_binary(build=False, cache_dir=tmp_path / "cache") == binary


def test_env_var_pointing_at_nothing_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(llamacpp_build.BINARY_ENV, str(tmp_path / "nope"))
    with pytest.raises(EngineError, match=llamacpp_build.BINARY_ENV):
        llamacpp_build.llama_server_binary(cache_dir=tmp_path)


def test_cached_binary_is_used_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(llamacpp_build.BINARY_ENV, raising=False)
    binary = fake_binary(llamacpp_build.cached_binary_path(tmp_path))

    def no_build(*args: Any) -> Path:
        raise AssertionError("a cached binary that runs must not be rebuilt")

    monkeypatch.setattr(llamacpp_build, "_build", no_build)
    assert llamacpp_build.llama_server_binary(cache_dir=tmp_path) == binary
    assert llamacpp_build.build_llama_server(tmp_path) == binary


def test_missing_binary_without_build_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(llamacpp_build.BINARY_ENV, raising=False)
    fake_binary(llamacpp_build.cached_binary_path(tmp_path), exit_code=1)  # there, but does not run
    with pytest.raises(EngineError, match=r"python -m echo_env\.launch\.llamacpp_build"):
        llamacpp_build.llama_server_binary(build=False, cache_dir=tmp_path)


def test_failed_build_reports_the_log_and_leaves_no_partial_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(llamacpp_build.BINARY_ENV, raising=False)

    def failing_build(work: Path, version: str, log: Any) -> Path:
        script = "echo 'fatal error: no compiler here'; exit 3"
        llamacpp_build._run(["sh", "-c", script], log, "compiling", fix="fix it")
        raise AssertionError("unreachable")

    monkeypatch.setattr(llamacpp_build, "_build", failing_build)
    with pytest.raises(EngineError) as caught:
        llamacpp_build.build_llama_server(tmp_path)
    message = str(caught.value)
    assert "exit status 3" in message and "fix it" in message
    assert "no compiler here" in message  # the log's last lines
    assert str(llamacpp_build.build_log_path(tmp_path)) in message
    assert not llamacpp_build.cached_binary_path(tmp_path).exists()
    assert not [p for p in (tmp_path / "llama.cpp").iterdir() if p.name.startswith(".") and p.is_dir()]


def test_build_moves_the_binary_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(llamacpp_build.BINARY_ENV, raising=False)

    def quick_build(work: Path, version: str, log: Any) -> Path:
        return fake_binary(work / "src" / "build" / "bin" / "llama-server")

    monkeypatch.setattr(llamacpp_build, "_build", quick_build)
    binary = llamacpp_build.llama_server_binary(cache_dir=tmp_path)
    assert binary == tmp_path / "llama.cpp" / llamacpp_build.LLAMA_CPP_PYTHON_VERSION / "bin" / "llama-server"
    assert os.access(binary, os.X_OK)
    assert llamacpp_build.binary_version(binary) == "version: 1 (fake)"
