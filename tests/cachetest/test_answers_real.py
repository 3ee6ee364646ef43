"""The answer checks on the real engine: output equivalence, stale KV across weight updates, tenant isolation.

Each test measures with the same functions ``echo-prefix test`` uses and judges with the
real verdict (the rest of the evidence is the healthy one of ``test_verdict.good()``),
one request at a time, on prompts of its own so the shared session engine's cache holds
nothing they could hit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from test_verdict import good

from echo_env.cachetest.answer_run import measure_isolation, measure_outputs, measure_weight_update
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.results import Decision
from echo_env.cachetest.verdict import decide
from echo_env.cachetest.weights import perturbed_weights_dir
from echo_env.cachetest.workload import build_workload
from echo_env.wire.client import ClientConfig, LLMClient
from echo_env.wire.control import VllmControl

pytestmark = pytest.mark.engine


def new_prompt() -> str:
    """The test's cold prompt (about 500 tokens) under a run tag no other request used."""
    work = build_workload(PrefixTestConfig(batch_size=1, group_size=2), f"{uuid.uuid4().hex[:8]}-answers")
    prompt = next(iter(work.cold.values()))
    assert isinstance(prompt, str)
    return prompt


def client_of(engine: Any, base_url: str | None = None) -> LLMClient:
    return LLMClient(ClientConfig(base_url=base_url or engine.base_url, model=engine.served_model_name))


def judged(**evidence: Any) -> Decision:
    return decide(dataclasses.replace(good(), **evidence))


def test_answers_from_the_cache_equal_fresh_ones(engine: Any) -> None:
    async def go() -> Any:
        async with client_of(engine) as client:
            return await measure_outputs(client, new_prompt(), salted=True)

    outputs = asyncio.run(go())
    decision = judged(outputs=outputs)
    assert decision.verdict == "PASS", decision.reason
    assert outputs.cached.cached_tokens > 0 and outputs.fresh.cached_tokens == 0
    assert outputs.noise_floor is not None and len(outputs.fresh.token_ids) > 0
    print(f"noise floor {outputs.noise_floor:.4f}, cached vs fresh {outputs.divergence:.4f}")


# ----- weight updates ----------------------------------------------------------------------


@pytest.fixture
def weights(engine: Any) -> Iterator[tuple[str, VllmControl]]:
    """The perturbed default model's folder; afterwards the original weights are back and the cache empty.

    The session engine is shared by every later test, which expects the default model's
    answers: a test that leaves perturbed weights (or blocks computed with them) behind
    would change theirs, so the finalizer reloads the original folder and resets the cache.
    """
    from echo_env.launch.model import default_cache_dir, prepare_default_model

    if not hasattr(engine, "config"):
        pytest.skip("weight updates need the embedded engine (its model folder is local)")
    original = prepare_default_model()
    control = VllmControl(engine.server_url)
    yield str(perturbed_weights_dir(original, default_cache_dir())), control

    async def restore() -> None:
        await control.reload_weights(str(original))
        await control.reset_prefix_cache()

    asyncio.run(restore())


def _update(engine: Any, method: str, path: str, control: VllmControl) -> Any:
    async def go() -> Any:
        async with client_of(engine) as client:
            return await measure_weight_update(client, control, new_prompt(), method, path, salted=True)

    return asyncio.run(go())


def test_a_reload_that_keeps_the_cache_serves_stale_kv(engine: Any, weights: tuple[str, VllmControl]) -> None:
    update = _update(engine, "reload", *weights)
    decision = judged(weight_update=update)
    assert (decision.verdict, decision.reason_id, decision.exit_code) == ("FAIL", "weight_update", 1), decision.reason
    assert "stale KV" in decision.reason
    assert update.after.cached_tokens > 0 and update.weights_changed
    print(
        f"after {update.after.token_ids} {update.after.text!r} vs fresh {update.fresh.token_ids} {update.fresh.text!r}"
    )


@pytest.mark.parametrize("method", ["pause_reload_resume", "reload_reset"])
def test_an_update_that_clears_the_cache_passes(engine: Any, weights: tuple[str, VllmControl], method: str) -> None:
    update = _update(engine, method, *weights)
    decision = judged(weight_update=update)
    assert decision.verdict == "PASS", decision.reason
    assert update.after.cached_tokens == 0 and update.weights_changed


# ----- isolation ---------------------------------------------------------------------------


@asynccontextmanager
async def salt_dropping_proxy(upstream: str) -> AsyncIterator[str]:
    """A real HTTP proxy in front of the engine that removes ``cache_salt`` from every request body."""
    from aiohttp import ClientSession, web

    session = ClientSession()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        body.pop("cache_salt", None)
        async with session.post(upstream + request.path.removeprefix("/v1"), json=body) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/v1/completions", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        await session.close()


def test_cache_salt_keeps_tenants_apart(engine: Any) -> None:
    async def go() -> Any:
        async with client_of(engine) as client:
            return await measure_isolation(client, new_prompt(), "vllm")

    isolation = asyncio.run(go())
    decision = judged(isolation=isolation)
    assert decision.verdict == "PASS", decision.reason
    assert isolation.again_salt_a.cached_tokens > 0 and isolation.no_salt_again.cached_tokens > 0
    print(f"side channel {isolation.side_channel_ms:.0f} ms, {isolation.side_channel_ratio:.2f}x")


def test_a_proxy_that_drops_the_salt_fails(engine: Any) -> None:
    async def go() -> Any:
        async with salt_dropping_proxy(engine.base_url) as url, client_of(engine, url) as client:
            return await measure_isolation(client, new_prompt(), "vllm")

    decision = judged(isolation=asyncio.run(go()))
    assert (decision.verdict, decision.reason_id, decision.exit_code) == ("FAIL", "isolation", 1), decision.reason
    assert "cache_salt is ignored" in decision.reason
