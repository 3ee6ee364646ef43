"""The answer checks' place in a run: after the phases, on prompts of their own, one request at a time.

The runner calls :func:`measure_answer_checks` once the cache-on server's phases are done
(the TTFT repeats included, so nothing here disturbs their timing). Each check gets its
own prompt (the cold agent's under a run tag of its own, built with the workload), so none
hits what another sent: output equivalence (``check_outputs``), then isolation (``isolation``), then the
weight update last (``weight_update``), since it changes the server's weights for good.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from echo_env.cachetest.answer_evidence import IsolationEvidence, OutputsEvidence, WeightUpdateEvidence
from echo_env.cachetest.answers import measure_outputs, measure_weight_update
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.isolation import measure_isolation
from echo_env.cachetest.weights import BUILT_IN_UPDATES, perturbed_weights_dir
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
        update = await measure_weight_update(
            client, control, prompts["weights"], config.weight_update, path, salted
        )
    return AnswerChecks(outputs, isolation, update)
