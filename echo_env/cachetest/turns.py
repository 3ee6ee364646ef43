"""The later turns of multi-turn episodes: send them, count what the cache can serve, check extension.

After the single-turn phases the env's live agents ask their next word, each with its
conversation so far. Before each later turn the ceiling counts the full cache blocks of
every earlier prompt *and* of the tokens generated for it (vLLM, SGLang and llama.cpp's
slots all keep the KV of generated tokens), and a second, prompt-only ceiling is kept, so
the verdict can tell a server that drops the answer's blocks from one that drops history.
After each turn every agent's new prompt, as the server tokenized it, is compared with its
last prompt plus the generated tokens (:mod:`echo_env.measure.extension`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from echo_env.cachetest.workload import Prompt, Workload, key_of
from echo_env.envs.parallel import EchoPrefixParallelEnv
from echo_env.envs.wrappers import ParallelTimingWrapper
from echo_env.errors import ConfigError
from echo_env.measure.extension import (
    ExtensionEvidence,
    GeneratedBy,
    TurnReuse,
    TurnTokens,
    break_of,
    check_extension,
    slices_to_decode,
)
from echo_env.measure.tokens import plan_tokens
from echo_env.rollout.worker import SamplingConfig
from echo_env.wire.info import ServerFacts, tokenize_prompts

if TYPE_CHECKING:
    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.measure.figures import PhaseFigures
    from echo_env.rollout.worker import RolloutWorker


class TurnRun(Protocol):
    """What the turn loop needs of the runner's per-server state (the runner's ``_Run`` has it)."""

    config: PrefixTestConfig
    facts: ServerFacts
    worker: RolloutWorker
    ids: dict[str, list[int]]
    sent: list[list[int]]
    answers: list[list[int]]

    async def phase(
        self,
        name: str,
        prompts: dict[str, Prompt],
        repeat: int | None = None,
        extra_cold: int = 0,
        sessions: dict[str, str] | None = None,
    ) -> tuple[PhaseFigures, dict[str, Any]]: ...

    def graded(self, name: str, rewards: list[float]) -> None: ...


log = logging.getLogger(__name__)


class Episode:
    """The hit-rate burst's env: grading steps it with every live agent's answer; its observations are the next turn.

    Args:
        config: The test's settings (the burst's size, ``turns``, ``api``, ``seed``).
        work: The workload: its task and the words its hit-rate prompts ask for.
    """

    def __init__(self, config: PrefixTestConfig, work: Workload) -> None:
        self.api = config.api
        env = EchoPrefixParallelEnv(
            batch_size=config.batch_size, group_size=config.group_size, turns=config.turns, task=work.task
        )
        self.env = ParallelTimingWrapper(env)
        words = [list(ws) if config.turns > 1 else ws[0] for ws in work.words]
        self.observations, self.infos = self.env.reset(seed=config.seed, options={"words": words})
        self.answered: dict[str, Any] = {}
        """Each agent's last completion (its text, and its token ids when the server sent them)."""

    def grade(self, completions: Mapping[str, Any]) -> list[float]:
        """Step the env with one answer of every live agent; the rewards of the answers that came back.

        A failed request's empty reply is graded too (the env needs every live agent's action),
        but its reward says nothing about the model, so it is left out.
        """
        self.env.set_request_timings({a: c.timing for a, c in completions.items()})
        obs, rewards, _, _, infos = self.env.step({a: c.text for a, c in completions.items()})
        live = set(self.env.agents)
        self.observations = {a: o for a, o in obs.items() if a in live}
        self.infos = {a: i for a, i in infos.items() if a in live}
        self.answered = dict(completions)
        return [rewards[a] for a, c in completions.items() if c.error is None]

    def prompts(self) -> dict[str, Prompt]:
        """The live agents' next prompts: their observations (``api=chat``: their chat messages)."""
        if self.api == "chat":
            return {a: self.infos[a]["messages"] for a in self.observations}
        return dict(self.observations)

    def sessions(self, agents: Mapping[str, Any]) -> dict[str, str]:
        """Each agent's session key (a router keeps an agent's turns on one replica by it)."""
        return {a: str(self.infos[a].get("session_id", "")) for a in agents}


def request_fields(config: PrefixTestConfig, facts: ServerFacts) -> dict[str, Any]:
    """Extra request fields for multi-turn runs: the server's generated ids, the chat template.

    Single-turn runs ask for nothing more, so they stay as fast as before.
    """
    fields: dict[str, Any] = {}
    if config.turns > 1 and facts.kind.name == "vllm":
        fields["return_token_ids"] = True
    if config.chat_template is not None:
        template = config.chat_template
        if "{" not in template:  # a path, not template text
            try:
                with open(template, encoding="utf-8") as f:
                    template = f.read()
            except OSError as exc:
                raise ConfigError(
                    f"chat_template={template!r}: cannot read it ({exc}); give template text or a file"
                ) from None
        fields["chat_template"] = template
    return fields


def stop_strings(config: PrefixTestConfig) -> tuple[str, ...]:
    """The newline stop of a one-line answer; none for ``long_answer``."""
    return () if config.long_answer else ("\n",)


def sampling(config: PrefixTestConfig, facts: ServerFacts) -> SamplingConfig:
    """How the test's worker asks for answers: one streamed request per agent, the test's sampling keys."""
    return SamplingConfig(
        api=config.api, batching="per_agent", max_tokens=config.max_tokens, temperature=config.temperature,
        seed=config.seed, prompt_format=config.prompt_format, stop=stop_strings(config),
        extra_body=request_fields(config, facts),
    )  # fmt: skip


async def _with_text(
    facts: ServerFacts, ext: ExtensionEvidence, turns: list[TurnTokens], unit: int
) -> ExtensionEvidence:
    """``ext`` with its first break's tokens decoded (by the server, else a local tokenizer) and its cause named."""
    first = ext.first_break
    t = next((t for t in turns if first is not None and t.agent == first.agent), None)
    if t is None:
        return ext
    table = {ids: await facts.decode(ids) for ids in set(slices_to_decode(t))}
    named = break_of(t, unit, lambda ids: table.get(tuple(ids), ""))
    return replace(ext, first_break=named)


async def _generated(
    facts: ServerFacts, prompt: Prompt, prompt_ids: list[int], completion: Any
) -> tuple[list[int], GeneratedBy] | None:
    """The generated ids: the server's own, else the text tokenized after the prompt (weaker)."""
    out = completion.output
    if out is not None and out.token_ids:
        return list(out.token_ids), "server"
    if not isinstance(prompt, str) or completion.error is not None:
        return None
    tokenized = await tokenize_prompts(facts, [prompt + completion.text])
    if tokenized is None or tokenized.ids[0][: len(prompt_ids)] != prompt_ids:
        return None
    return tokenized.ids[0][len(prompt_ids) :], "retokenized"


def _sent_ids(run: TurnRun, prompt: Prompt, completion: Any) -> list[int] | None:
    """A prompt's ids as the server took them: its own ``prompt_token_ids``, else the plan's."""
    out = completion.output if completion is not None else None
    if out is not None and out.prompt_token_ids:
        return list(out.prompt_token_ids)
    return run.ids.get(key_of(prompt))


async def _answers(
    run: TurnRun, prompts: Mapping[str, Prompt], episode: Episode
) -> dict[str, tuple[list[int], list[int], GeneratedBy]]:
    """Each agent's last prompt ids and generated ids, where both are known."""
    out: dict[str, tuple[list[int], list[int], GeneratedBy]] = {}
    for agent, completion in episode.answered.items():
        prompt = prompts.get(agent)
        ids = _sent_ids(run, prompt, completion) if prompt is not None else None
        if ids is None:
            continue
        gen = await _generated(run.facts, prompt, ids, completion)
        if gen is not None:
            out[agent] = (ids, *gen)
    return out


async def _next_prompts(run: TurnRun, episode: Episode) -> dict[str, Prompt]:
    """The live agents' next prompts, with their ids in ``run.ids`` for the plan."""
    prompts = episode.prompts()
    if run.config.prompt_format == "tokens":
        # Token-in: the worker sends the last prompt's ids + the generated ids + the new turn's ids.
        run.ids.update({key_of(p): run.worker.token_prompt(a, p) for a, p in prompts.items()})
        return prompts
    tokenized = await tokenize_prompts(run.facts, list(prompts.values()))
    if tokenized is not None and run.ids:
        run.ids.update({key_of(p): ids for p, ids in zip(prompts.values(), tokenized.ids, strict=True)})
    return prompts


async def later_turns(run: TurnRun, work: Workload, episode: Episode) -> list[TurnReuse]:
    """Each later turn of the episodes: every live agent's conversation so far, all in flight, then graded."""
    reuse: list[TurnReuse] = []
    previous: dict[str, Prompt] = work.prompts
    unit = run.facts.block_size
    for turn in range(1, run.config.turns):
        if not episode.observations:
            break
        answers = await _answers(run, previous, episode)
        prompts = await _next_prompts(run, episode)
        run.answers = [[*ids, *gen] for ids, gen, _ in answers.values()]
        name = f"turn{turn}"
        prompt_only = None
        if unit is not None and all(key_of(p) in run.ids for p in prompts.values()):
            seqs = [run.ids[key_of(p)] for p in prompts.values()]
            prompt_only = plan_tokens(seqs, unit, warm=run.sent).hit_rate_ceiling
        figures, done = await run.phase(name, prompts, sessions=episode.sessions(prompts))
        run.graded(name, episode.grade(done))
        if unit is not None:
            tokens = []
            for agent, (ids, gen, by) in answers.items():
                sent = _sent_ids(run, prompts[agent], episode.answered.get(agent)) if agent in prompts else None
                if sent is not None:
                    tokens.append(TurnTokens(agent, turn - 1, ids, gen, by, sent))
            ext = await _with_text(run.facts, check_extension(name, tokens, unit), tokens, unit)
            reuse.append(TurnReuse(name, ext, prompt_only, figures.hit.ceiling))
        previous = prompts
    return reuse
