"""What one generation request was and how it went: :class:`RequestRecord` and its :class:`Output` s.

Every request the client sends, finished or failed, becomes one record; nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Api", "Output", "Prompt", "RequestRecord", "unreachable"]

Api = Literal["completions", "chat"]
Prompt = str | Sequence[int] | Sequence[dict[str, str]]
"""A text prompt, a list of token ids, or chat messages."""


@dataclass
class Output:
    """One generated sequence of a request (a request has several with ``n`` or a list prompt)."""

    index: int
    """The choice index the server gave it."""
    text: str = ""
    """The generated text."""
    ttft_s: float | None = None
    """Seconds from send to this sequence's first text."""
    e2e_s: float | None = None
    """Seconds from send to this sequence's last chunk."""
    chunks: int = 0
    """Streamed chunks that carried text (close to the token count on vLLM)."""
    finish_reason: str | None = None
    """Why generation stopped (``stop``, ``length``...)."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between this sequence's successive text chunks."""
    token_ids: list[int] | None = None
    """Generated token ids, when the server sends them (vLLM's ``return_token_ids``)."""
    logprobs: list[float | None] | None = None
    """Logprob of each generated token, when asked for (``logprobs`` on completions)."""
    prompt_token_ids: list[int] | None = None
    """The prompt as the server tokenized it, when it sends it (vLLM's ``return_token_ids``)."""


@dataclass
class RequestRecord:
    """Everything measured about one request; ``ok`` False means it finally failed."""

    request_id: str
    """Unique within the process."""
    api: Api
    """Which endpoint served it."""
    num_prompts: int
    """Prompts in the request (more than one in ``batched`` mode)."""
    n: int
    """Completions asked per prompt."""
    tag: str = ""
    """The caller's label (agent id, group, phase)."""
    sent_at: float = 0.0
    """Unix time of the (last) attempt's send."""
    queue_s: float = 0.0
    """Wait for a concurrency slot before the first attempt."""
    ttft_s: float | None = None
    """Seconds to the first text of any sequence."""
    e2e_s: float | None = None
    """Seconds from send to the end of the stream."""
    prompt_tokens: int | None = None
    """From the server's usage (summed over prompts)."""
    completion_tokens: int | None = None
    """From the server's usage."""
    cached_tokens: int | None = None
    """``usage.prompt_tokens_details.cached_tokens``; None when the server did not say."""
    outputs: list[Output] = field(default_factory=list)
    """The generated sequences, by choice index."""
    attempts: int = 0
    """How many times it was sent."""
    ok: bool = False
    """True when the stream ended normally."""
    error: str | None = None
    """Why it failed (after the last attempt)."""
    status: int | None = None
    """HTTP status of the failure, when there was one."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for the per-request JSONL records)."""
        return asdict(self)

    @property
    def itl_s(self) -> list[float]:
        """All inter-token gaps of all sequences."""
        return [gap for out in self.outputs for gap in out.itl_s]


def unreachable(record: RequestRecord) -> bool:
    """Whether a failed request failed because the server could not be reached.

    A timeout alone does not count: a busy server is slow, not gone.
    """
    return not record.ok and record.error is not None and record.error.startswith("connection failed")
