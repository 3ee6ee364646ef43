"""The answer checks' place in a run: after the phases, on prompts of their own, one request at a time.

The runner calls :func:`measure_answer_checks` once the cache-on server's phases are done
(the TTFT repeats included, so nothing here disturbs their timing). Each check gets its
own prompt (the cold agent's under a run tag of its own, built with the workload), so none
hits what another sent: output equivalence (``check_outputs``), then isolation (``isolation``), then the
weight update last (``weight_update``), since it changes the server's weights for good.

Every request of these checks is sent here (:func:`ask`); what they mean is judged by the pure
checks of :mod:`echo_env.cachetest.answers` and :mod:`echo_env.cachetest.isolation`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_env.cachetest.answer_evidence import Answer, IsolationEvidence, OutputsEvidence, WeightUpdateEvidence
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.weights import BUILT_IN_UPDATES, apply_update, perturbed_weights_dir
from echo_env.errors import EchoEnvError
from echo_env.wire.client import LLMClient
from echo_env.wire.control import VllmControl
from echo_env.wire.info import ServerFacts


@dataclass(frozen=True)
class AnswerChecks:
    """What the answer checks measured (None: not asked for)."""

    outputs: OutputsEvidence | None = None
    """Cached vs fresh answers."""
    isolation: IsolationEvidence | None = None
    """``cache_salt`` isolation."""
    weight_update: WeightUpdateEvidence | None = None
    """Answers across a weight update."""


def default_weights_path(config: PrefixTestConfig, embedded: bool) -> str | None:
    """The new weights for a built-in ``weight_update``: ``weights_path``, or the default model perturbed."""
    if config.weights_path is not None or config.weight_update not in BUILT_IN_UPDATES:
        return config.weights_path
    if not embedded or config.server.model_name not in (None, "default"):
        return None
    from echo_env.launch.model import default_cache_dir, prepare_default_model

    return str(perturbed_weights_dir(prepare_default_model(), Path(default_cache_dir())))


async def measure_answer_checks(
    config: PrefixTestConfig, client: LLMClient, facts: ServerFacts, prompts: Mapping[str, str]
) -> AnswerChecks:
    """Run the answer checks the config asks for, one request at a time.

    Args:
        config: The test's settings.
        client: The client of the server under test.
        facts: What the server is (its kind decides whether it takes ``cache_salt``).
        prompts: Each check's prompt by purpose (``answers``, ``tenants``, ``weights``:
            :attr:`~echo_env.cachetest.workload.Workload.checks`), sent to completions as text
            whatever ``api`` says: token ids and logprobs come with completions only, and what
            is checked is the cache, not the chat template.
    """
    salted = facts.kind.name == "vllm"
    outputs = isolation = update = None
    if config.check_outputs:
        outputs = await measure_outputs(client, prompts["answers"], salted)
    if config.isolation:
        isolation = await measure_isolation(client, prompts["tenants"], facts.kind.name)
    if config.weight_update is not None:
        control = VllmControl(facts.root, facts.headers())
        path = default_weights_path(config, facts.embedded)
        update = await measure_weight_update(client, control, prompts["weights"], config.weight_update, path, salted)
    return AnswerChecks(outputs, isolation, update)


ANSWER_TOKENS = 8
"""Tokens generated per answer: enough to show a changed answer, few enough to stay cheap."""


class RequestFailed(EchoEnvError):
    """A request of an answer check failed; the check cannot be made."""


async def ask(client: LLMClient, prompt: Any, label: str, salt: str | None, token_ids: bool) -> Answer:
    """Send ``prompt`` alone, greedily, with logprobs; the answer as the server gave it.

    Args:
        client: The client of the server under test.
        prompt: Transcript text or token ids (completions).
        label: What this request is, kept in the answer.
        salt: ``cache_salt`` to send (None: none).
        token_ids: Ask for the generated token ids (vLLM's ``return_token_ids``).

    Raises:
        RequestFailed: The request failed.
    """
    body: dict[str, Any] = {}
    if token_ids:
        body["return_token_ids"] = True
    if salt is not None:
        body["cache_salt"] = salt
    record = await client.generate(
        prompt, max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=1, extra_body=body or None,
        tag=f"answers/{label}", want_tokens=True, want_itl=False,
    )  # fmt: skip
    if not record.ok or not record.outputs:
        raise RequestFailed(f"the {label} request failed: {record.error}")
    out = record.outputs[0]
    return Answer(
        label=label, token_ids=tuple(out.token_ids or ()), logprobs=tuple(out.logprobs or ()), text=out.text,
        cached_tokens=record.cached_tokens, ttft_s=record.ttft_s, salt=salt,
    )  # fmt: skip


def new_salt(name: str) -> str:
    """A salt no other request has used."""
    return f"echo-{name}-{uuid.uuid4().hex[:8]}"


async def measure_outputs(client: LLMClient, prompt: Any, salted: bool) -> OutputsEvidence:
    """Fresh, cached and (with a salt) fresh again: the evidence of output equivalence.

    Args:
        client: The client of the server under test.
        prompt: A prompt no request has sent yet.
        salted: The server takes ``cache_salt`` (vLLM): a second fresh computation gives the floor.
    """
    method = "cache_salt" if salted else "first_send"
    fresh = cached = again = None
    error = None
    started = time.perf_counter()
    try:
        fresh = await ask(client, prompt, "fresh", None, salted)
        cached = await ask(client, prompt, "cached", None, salted)
        if salted:
            again = await ask(client, prompt, "fresh_again", new_salt("fresh"), salted)
    except RequestFailed as exc:
        error = str(exc)
    return OutputsEvidence(method, fresh, cached, again, error=error, seconds=time.perf_counter() - started)


async def measure_weight_update(
    client: LLMClient, control: VllmControl, prompt: Any, method: str, weights_path: str | None, salted: bool
) -> WeightUpdateEvidence:
    """Warm, update, ask again, compute afresh: the evidence of the stale-KV check.

    Args:
        client: The client of the server under test.
        control: Its control endpoints.
        prompt: A prompt no request has sent yet.
        method: ``weight_update`` (see :mod:`echo_env.cachetest.weights`).
        weights_path: The new weights' folder, for the built-in methods.
        salted: Compute afresh under another ``cache_salt`` (else reset the prefix cache).
    """
    fresh_method = "cache_salt" if salted else "reset_prefix_cache"
    before = after = fresh = None
    versions: tuple[str | None, str | None] = (None, None)
    seconds = 0.0
    try:
        await ask(client, prompt, "warm", None, salted)
        before = await ask(client, prompt, "before_update", None, salted)
        done = await apply_update(method, control, weights_path)
        versions, seconds = (done.version_before, done.version_after), done.seconds
        after = await ask(client, prompt, "after_update", None, salted)
        if not salted:
            await control.reset_prefix_cache()
        fresh = await ask(client, prompt, "fresh_new_weights", new_salt("fresh") if salted else None, salted)
        error = None
    except EchoEnvError as exc:
        error = str(exc)
    return WeightUpdateEvidence(
        method, before, after, fresh, fresh_method, *versions, update_s=seconds, weights_path=weights_path,
        error=error,
    )  # fmt: skip


async def measure_isolation(client: LLMClient, prompt: Any, kind: str) -> IsolationEvidence:
    """The five sends of the module doc, on a prompt no request has sent yet.

    Args:
        client: The client of the server under test.
        prompt: A new prompt (transcript text or token ids).
        kind: The server kind (``vllm`` takes ``cache_salt``).
    """
    if kind != "vllm":
        return IsolationEvidence(False, None, None, None, None, None, skipped=f"a {kind} server takes no cache_salt")
    salt_a, salt_b = new_salt("tenant-a"), new_salt("tenant-b")
    plan = (
        ("salt_a_first", salt_a), ("salt_a_again", salt_a), ("salt_b", salt_b), ("no_salt", None),
        ("no_salt_again", None),
    )  # fmt: skip
    got: list[Answer | None] = [None] * len(plan)
    error = None
    try:
        for i, (label, salt) in enumerate(plan):
            got[i] = await ask(client, prompt, label, salt, token_ids=False)
    except RequestFailed as exc:
        error = str(exc)
    first_a, again_a, b, plain, plain_again = got
    return IsolationEvidence(True, first_a, again_a, b, plain, plain_again, skipped=error)
