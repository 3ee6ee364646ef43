"""Token-in multi-turn prompts: the last prompt's ids + the generated ids + the new turn's ids.

Rendering the conversation as text and tokenizing it again can give other tokens than the
model generated (BPE merges across the answer's boundary), and every token after the
difference misses the prefix cache. RL frameworks that fixed this keep token ids: each
turn's prompt is the previous turn's prompt ids, the ids the server generated, then the
environment's new text, tokenized alone. :class:`TokenHistory` keeps that per agent for
:class:`~echo_env.rollout.worker.RolloutWorker` (``prompt_format="tokens"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from echo_env.envs.task import transcript_reply
from echo_env.wire.tokenizer import Tokenizer, encode_prompts


@dataclass(frozen=True)
class _Last:
    text: str
    """The prompt text of the agent's last turn."""
    ids: list[int]
    """The ids sent for it."""
    reply: str
    """The generated text."""
    generated: list[int]
    """The generated ids (the server's own when it sent them)."""


class TokenHistory:
    """Each agent's last prompt ids and answer ids, to build its next prompt by appending.

    Args:
        tokenizer: The served model's tokenizer (for the new turn's text and first prompts).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder: Any = tokenizer  # a transformers tokenizer: its decode is not in the Protocol
        self._last: dict[str, _Last] = {}

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, agent: str, text: str) -> list[int]:
        """The ids to send for ``agent``'s prompt ``text``.

        When ``text`` continues the agent's last prompt and reply (as the transcript shows
        them), the last prompt's ids + the generated ids + the rest of ``text`` tokenized
        alone; otherwise ``text`` tokenized whole (a first turn, or another conversation).
        A reply whose tokens already end in a newline (the stop, generated) takes the place
        of the newline the transcript puts after a reply.
        """
        last = self._last.get(agent)
        if last is not None:
            head = last.text + transcript_reply(last.reply)
            if text.startswith(head):
                rest = text[len(head) :]
                decoded = str(self._decoder.decode(last.generated)) if last.generated else ""
                if rest.startswith("\n") and decoded.endswith("\n") and not last.reply.endswith("\n"):
                    rest = rest[1:]
                return [*last.ids, *last.generated, *self._encode(rest)]
        return encode_prompts(self.tokenizer, [text])[0]

    def record(self, agent: str, text: str, ids: list[int], reply: str, generated: list[int] | None) -> None:
        """Keep ``agent``'s turn: the prompt sent and what came back (``generated`` None: tokenize the reply)."""
        gen = list(generated) if generated else self._encode(reply)
        self._last[agent] = _Last(text, list(ids), reply, gen)

    def forget(self) -> None:
        """Drop every agent's history (a new episode)."""
        self._last.clear()


def prompt_ids(output: Any) -> list[int] | None:
    """The prompt's ids as the server took them, when it sent them (vLLM ``return_token_ids``)."""
    ids = getattr(output, "prompt_token_ids", None) if output is not None else None
    return list(ids) if ids else None


def output_ids(output: Any) -> list[int] | None:
    """The generated ids of a completion's output, when the server sent them."""
    ids = getattr(output, "token_ids", None) if output is not None else None
    return list(ids) if ids else None


class ReuseLog:
    """Per agent: whether each request's prompt began with the agent's last prompt + generated ids.

    What :class:`~echo_env.rollout.worker.RolloutWorker` puts in every step's
    ``info["history_reuse"]`` (``turn``, ``cached_tokens``, ``extended``), so an RL library
    logs history reuse next to the reward. ``extended`` is None on an agent's first request
    and when the prompt's ids are unknown (text prompts to a server that does not return
    them: ask for vLLM's ``return_token_ids``).
    """

    def __init__(self) -> None:
        self._last: dict[str, list[int]] = {}
        self._turns: dict[str, int] = {}

    def observe(
        self, agent: str, prompt_ids: list[int] | None, generated: list[int] | None, cached: int | None
    ) -> dict[str, Any]:
        """Record one request of ``agent``; returns its ``info["history_reuse"]``."""
        last = self._last.pop(agent, None)
        extended = None if prompt_ids is None or last is None else prompt_ids[: len(last)] == last
        turn = self._turns[agent] = self._turns.get(agent, -1) + 1
        if prompt_ids is not None and generated:
            self._last[agent] = [*prompt_ids, *generated]
        return {"turn": turn, "cached_tokens": cached, "extended": extended}

    def forget(self) -> None:
        """A new episode: turns count from 0 again."""
        self._last.clear()
        self._turns.clear()
