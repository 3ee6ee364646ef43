"""How the worker maps agents to requests and answers back, against the local stand-in server.

The stand-in (``tests/fake_servers.py``) stands in only to count requests and choices: which
agent gets which answer is the worker's doing, the same on any server. The real engine runs
the three batching modes in ``test_worker.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fake_servers import MODEL, FakeOpenAIServer

from echo_env.rollout.worker import RolloutWorker, SamplingConfig
from echo_env.wire.client import ClientConfig, LLMClient


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def _complete(fake: FakeOpenAIServer, sampling: SamplingConfig, prompts: dict[str, str]) -> tuple[Any, Any]:
    async def go() -> tuple[Any, Any]:
        async with LLMClient(ClientConfig(base_url=fake.base_url, model=MODEL)) as client:
            return await RolloutWorker(client, sampling).complete(prompts)

    return asyncio.run(go())


PROMPTS = {"g0_a0": "Say: apple", "g0_a1": "Say: apple", "g0_a2": "Say: apple", "g1_a0": "Say: pear"}


def test_a_sampled_group_asks_once_with_n_and_each_agent_gets_its_own_choice(fake: FakeOpenAIServer) -> None:
    done, records = _complete(fake, SamplingConfig(batching="per_group", temperature=0.7), PROMPTS)
    assert len(records) == 2 == fake.completions_received  # one request per distinct prompt
    group, single = records
    assert [o.index for o in group.outputs] == [0, 1, 2] and len(single.outputs) == 1
    for i, agent in enumerate(("g0_a0", "g0_a1", "g0_a2")):
        assert done[agent].output is group.outputs[i] and done[agent].request_id == group.request_id
        # One prompt, three choices: the prompt's tokens are each agent's, the completion tokens its own choice's.
        assert done[agent].timing["prompt_tokens"] == group.prompt_tokens
        assert done[agent].timing["completion_tokens"] == group.outputs[i].chunks
    assert done["g1_a0"].output is single.outputs[0]


def test_a_greedy_group_asks_once_and_hands_the_one_answer_to_every_agent(fake: FakeOpenAIServer) -> None:
    done, records = _complete(fake, SamplingConfig(batching="per_group", temperature=0.0), PROMPTS)
    group = records[0]
    assert len(group.outputs) == 1
    assert all(done[a].output is group.outputs[0] for a in ("g0_a0", "g0_a1", "g0_a2"))
    assert done["g0_a0"].text == done["g0_a2"].text != ""


def test_batched_sends_every_prompt_in_one_request_and_answers_in_order(fake: FakeOpenAIServer) -> None:
    done, records = _complete(fake, SamplingConfig(batching="batched"), PROMPTS)
    (record,) = records
    assert [o.index for o in record.outputs] == [0, 1, 2, 3]
    assert [done[a].output for a in PROMPTS] == record.outputs
    # One request for four prompts: per-agent prompt and cached token counts are unknown, not the total.
    assert all(c.timing["prompt_tokens"] is None and c.timing["cached_tokens"] is None for c in done.values())


def test_per_agent_sends_one_request_each(fake: FakeOpenAIServer) -> None:
    done, records = _complete(fake, SamplingConfig(), PROMPTS)
    assert len(records) == 4 and [r.tag for r in records] == list(PROMPTS)
    assert all(done[a].timing["prompt_tokens"] == len(PROMPTS[a]) for a in PROMPTS)
