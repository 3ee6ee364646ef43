"""llama.cpp's llama-server as a real target: tokenizing, per-slot caching, counters, the verdict.

Every test here is marked ``llamacpp``: it needs the ``llama-server`` binary (built once
into the cache by ``python -m echo_env.launch.llamacpp_build``, 8-13 minutes; or
``ECHO_ENV_LLAMA_SERVER=/path/to/llama-server``) and starts it with the default Gemma 3
270M GGUF. The session starts one server with prompt caching on and one with
``--no-cache-prompt``, each once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from echo_env.envs.task import EchoTask
from echo_env.errors import MetricsError
from echo_env.launch.engine import group_members
from echo_env.launch.llamacpp_server import EmbeddedLlamaServer, LlamaServerConfig
from echo_env.wire.kinds.llamacpp import LlamaCppKind, detect_llamacpp, metrics_status_hint, read_props
from echo_env.wire.metrics import CacheCounters, delta, fetch_metrics, parse_prometheus

pytestmark = pytest.mark.llamacpp

KIND = LlamaCppKind()
BOS = 2
SLOTS = 4


@pytest.fixture(scope="session")
def llama() -> Iterator[EmbeddedLlamaServer]:
    """llama-server with prompt caching on (``-np 4 -c 16384 --metrics``)."""
    with EmbeddedLlamaServer(LlamaServerConfig(parallel=SLOTS)) as server:
        yield server


@pytest.fixture(scope="session")
def llama_no_cache() -> Iterator[EmbeddedLlamaServer]:
    """llama-server started with ``--no-cache-prompt``."""
    with EmbeddedLlamaServer(LlamaServerConfig(parallel=SLOTS, cache_prompt=False)) as server:
        yield server


def fresh_prompt(word: str = "river") -> str:
    """The echo transcript behind a unique first line: nothing of it is cached yet."""
    return f"[run {time.time_ns()}]\n{EchoTask().transcript(word)}"


def complete(server: EmbeddedLlamaServer, prompt: str | list[int], max_tokens: int = 4) -> dict[str, Any]:
    body = {"model": server.served_model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{server.base_url}/completions", json=body, timeout=300)
    response.raise_for_status()
    return dict(response.json())


def cached_tokens(reply: dict[str, Any]) -> int:
    return int((reply["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def counters(server: EmbeddedLlamaServer) -> CacheCounters:
    return KIND.read_counters(parse_prometheus(fetch_metrics(server.metrics_url)), server.served_model_name)


def tokenize(server: EmbeddedLlamaServer, prompt: str) -> list[int]:
    request = KIND.tokenize_request(server.served_model_name, prompt)
    assert request is not None
    response = httpx.post(server.server_url + request[0], json=request[1], timeout=30)
    response.raise_for_status()
    return KIND.parse_tokenize(response.json())


# ----- the server and what it says about itself --------------------------------------------


def test_serves_the_model_and_says_it_is_llamacpp(llama: EmbeddedLlamaServer) -> None:
    assert llama.base_url.startswith("http://127.0.0.1:")
    models = httpx.get(f"{llama.base_url}/models", timeout=10).json()
    assert llama.served_model_name in [m["id"] for m in models["data"]]
    props_json = httpx.get(f"{llama.server_url}/props", timeout=10).json()
    assert detect_llamacpp(props_json)
    props = read_props(props_json)
    assert props.slots == SLOTS
    granularity = KIND.granularity(props)
    assert granularity is not None and (granularity.unit_tokens, granularity.slots) == (1, SLOTS)


def test_base_model_echoes_the_word(llama: EmbeddedLlamaServer) -> None:
    reply = complete(llama, EchoTask().transcript("apple"), max_tokens=8)
    assert "apple" in reply["choices"][0]["text"]


# ----- tokenizing as the server does -------------------------------------------------------


def test_tokenize_gives_the_ids_a_completion_uses(llama: EmbeddedLlamaServer) -> None:
    prompt = fresh_prompt("apple")
    ids = tokenize(llama, prompt)
    assert ids[0] == BOS and ids[1] != BOS
    reply = complete(llama, prompt)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    # The same ids sent as a token prompt are the same prompt to the cache: all but the last hit.
    again = complete(llama, ids)
    assert again["usage"]["prompt_tokens"] == len(ids)
    assert cached_tokens(again) == len(ids) - 1


def test_detokenize_round_trip(llama: EmbeddedLlamaServer) -> None:
    text = "User: Please echo the following word: apple"
    ids = tokenize(llama, text)
    request = KIND.detokenize_request(llama.served_model_name, ids[1:])
    assert request is not None
    body = httpx.post(llama.server_url + request[0], json=request[1], timeout=30).json()
    assert KIND.parse_detokenize(body).strip() == text


def test_chat_template_endpoint_exists(llama: EmbeddedLlamaServer) -> None:
    from echo_env.wire.kinds.llamacpp import apply_template_request, parse_apply_template

    messages = [{"role": "user", "content": "Please echo: apple"}]
    path, body = apply_template_request(messages)
    text = parse_apply_template(httpx.post(llama.server_url + path, json=body, timeout=30).json())
    assert "Please echo: apple" in text


# ----- the cache ---------------------------------------------------------------------------


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Without --swa-full (llama-server's default) Gemma 3's sliding-window layers can only be
# rolled back to a context checkpoint: a hit falls a few tokens short of the common prefix
# (measured: 495 of a repeated 500-token prompt, 498 of a 500-token common prefix).
SWA_SHORTFALL = 8


def test_repeated_prompt_hits_and_counters_count_it(llama: EmbeddedLlamaServer) -> None:
    prompt = fresh_prompt()
    before = counters(llama)
    first = complete(llama, prompt)
    middle = counters(llama)
    second = complete(llama, prompt)
    after = counters(llama)
    p = first["usage"]["prompt_tokens"]
    assert cached_tokens(first) == 0 and first["timings"]["cache_n"] == 0
    hit = cached_tokens(second)
    assert hit == second["timings"]["cache_n"]
    # The last prompt token is always computed again, for its logits.
    assert p - 1 - SWA_SHORTFALL <= hit <= p - 1
    cold, warm = delta(before, middle), delta(middle, after)
    # Every prompt token is counted once, as computed or as cached.
    assert (cold.queries, cold.hits) == (p, 0)
    assert (warm.queries, warm.hits) == (p, hit)


def test_with_swa_full_a_repeat_hits_all_but_its_last_token() -> None:
    with EmbeddedLlamaServer(LlamaServerConfig(parallel=1, ctx_size=4096, swa_full=True)) as server:
        prompt = fresh_prompt()
        first = complete(server, prompt)
        second = complete(server, prompt)
    assert cached_tokens(second) == first["usage"]["prompt_tokens"] - 1


def test_burst_misses_in_the_empty_slots_at_most(llama: EmbeddedLlamaServer) -> None:
    """A cold request, then a burst sharing its prefix: only the slots still empty miss.

    This bounds the hit rate the verdict can expect on llama.cpp: the first wave of a
    burst lands in ``slots - 1`` slots that hold nothing of the prefix (measured: 3 of 8
    requests missed with 4 slots, the other 5 hit the whole common prefix but 2 tokens).
    """
    cold = fresh_prompt("cold")
    prompts = [cold.replace("word: cold", f"word: w{i}") for i in range(8)]
    cold_ids = tokenize(llama, cold)
    ids = [tokenize(llama, p) for p in prompts]
    shared = [common_prefix(cold_ids, i) for i in ids]
    # A later wave may land in a slot that served another burst prompt ("w1" and "w2" share " w").
    bound = [max(common_prefix(i, other) for other in [cold_ids, *ids] if other is not i) for i in ids]
    complete(llama, cold)

    async def burst() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=llama.base_url, timeout=300) as http:
            bodies = [{"model": llama.served_model_name, "prompt": p, "max_tokens": 4} for p in prompts]
            replies = await asyncio.gather(*(http.post("/completions", json=b) for b in bodies))
            return [r.json() for r in replies]

    hits = [cached_tokens(r) for r in asyncio.run(burst())]
    missed = [h < s // 2 for h, s in zip(hits, shared)]
    assert 1 <= sum(missed) <= SLOTS - 1, (hits, shared)
    for hit, common, most, miss in zip(hits, shared, bound, missed):
        # Never more than a common prefix; a miss may still match the start of a slot's old prompt.
        assert hit <= most, (hits, bound)
        assert miss or hit >= common - SWA_SHORTFALL, (hits, shared)


def test_no_cache_prompt_never_hits(llama_no_cache: EmbeddedLlamaServer) -> None:
    prompt = fresh_prompt()
    before = counters(llama_no_cache)
    replies = [complete(llama_no_cache, prompt) for _ in range(3)]
    after = counters(llama_no_cache)
    assert [cached_tokens(r) for r in replies] == [0, 0, 0]
    assert [r["timings"]["cache_n"] for r in replies] == [0, 0, 0]
    diff = delta(before, after)
    assert diff.hits == 0 and diff.queries == 3 * replies[0]["usage"]["prompt_tokens"]


# ----- without --metrics, and stopping -------------------------------------------------------


def test_metrics_without_the_flag_answer_501_with_the_fix() -> None:
    config = LlamaServerConfig(parallel=1, ctx_size=2048, metrics=False)
    with EmbeddedLlamaServer(config) as server, pytest.raises(MetricsError) as caught:
        fetch_metrics(server.metrics_url)
    status = getattr(caught.value, "status", None) or 501
    hint = metrics_status_hint(int(status))
    assert hint is not None and "--metrics" in hint
    assert "501" in str(caught.value)


def test_stop_leaves_no_process() -> None:
    server = EmbeddedLlamaServer(LlamaServerConfig(parallel=1, ctx_size=2048))
    server.start()
    pid = server.pid
    assert pid is not None and group_members(pid)
    server.stop()
    assert group_members(pid) == []
    server.stop()  # a second stop is harmless


# ----- the whole prefix-cache test on llama.cpp -----------------------------------------------


def _run_test(server: EmbeddedLlamaServer, out_dir: Path, max_repeats: int = 8, ttft_burst: int = 8) -> Any:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.commands.test import run_prefix_test
    from echo_env.launch.target import ServerTarget

    config = PrefixTestConfig(
        server=ServerTarget(base_url=server.base_url, model_name=server.served_model_name),
        batch_size=4,
        group_size=4,
        max_tokens=8,
        ttft_burst=ttft_burst,
        max_repeats=max_repeats,
        out_dir=str(out_dir),
    )
    return run_prefix_test(config, show_progress=False)


def test_prefix_test_passes_on_llamacpp(llama: EmbeddedLlamaServer, tmp_path: Path) -> None:
    result = _run_test(llama, tmp_path)
    assert result.verdict == "PASS", result.decision.reason
    assert (tmp_path / "summary.json").exists()


def test_prefix_test_fails_on_no_cache_prompt(llama_no_cache: EmbeddedLlamaServer, tmp_path: Path) -> None:
    # The hit rate decides this verdict; three small TTFT repeats are enough for its table. (With
    # caching on, bursts must outnumber the 4 slots: a burst of 4 after a control burst finds
    # every slot holding a control prompt, and its TTFT ratios swing from 1x to 39x.)
    result = _run_test(llama_no_cache, tmp_path, max_repeats=3, ttft_burst=4)
    assert result.verdict == "FAIL", result.decision.reason
    # /props does not say that caching is off, so it is the zero hits that decide.
    assert result.decision.reason_id == "hits_nonzero", result.decision.reason
