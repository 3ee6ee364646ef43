"""Evidence of the answer checks: does the cache change what the model says?

Pure data and pure comparisons, no I/O: :mod:`echo_env.cachetest.answers` and
:mod:`echo_env.cachetest.isolation` measure and fill these, the verdict's checks read
them, and the tests build them by hand. Kept apart from the measuring modules so that
:mod:`echo_env.cachetest.results` can carry them without an import cycle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    """One greedy request of an answer check: what it generated and what the cache gave it."""

    label: str
    """Which request (``fresh``, ``cached``, ``fresh_again``, ``after_update``...)."""
    token_ids: tuple[int, ...]
    """The generated token ids."""
    logprobs: tuple[float | None, ...]
    """Each generated token's logprob, in the order generated."""
    text: str
    """The generated text."""
    cached_tokens: int | None
    """Prompt tokens the server served from its cache (``usage.prompt_tokens_details``)."""
    ttft_s: float | None
    """Time to its first token."""
    salt: str | None = None
    """The ``cache_salt`` it was sent with (None: none)."""


@dataclass(frozen=True)
class Divergence:
    """Where two answers to the same prompt part: a different token, or a logprob beyond the allowance."""

    position: int
    """Index of the generated token where they part."""
    token_a: int | None
    """The first answer's token there (None: it had ended)."""
    token_b: int | None
    """The second answer's token there."""
    logprob_a: float | None
    """The first answer's logprob there."""
    logprob_b: float | None
    """The second answer's logprob there."""
    kind: str
    """``token`` (a different greedy token), ``logprob`` (same token, logprob beyond the allowance), or
    ``text`` (a server that sends no token ids answered a different text)."""

    def describe(self, a: Answer, b: Answer) -> str:
        """One line: where, which tokens, which logprobs, and both texts."""
        lp = f"logprobs {_lp(self.logprob_a)} vs {_lp(self.logprob_b)}"
        if self.kind == "text":
            return f"texts {a.text!r} ({a.label}) vs {b.text!r} ({b.label})"
        if self.kind == "token":
            return (
                f"generated token {self.position}: {self.token_a} ({a.label}) vs {self.token_b} ({b.label}), {lp}; "
                f"texts {a.text!r} vs {b.text!r}"
            )
        return f"generated token {self.position} ({self.token_a}): {lp} ({a.label} vs {b.label})"


def _lp(x: float | None) -> str:
    return "none" if x is None else f"{x:.3f}"


def max_logprob_gap(a: Answer, b: Answer) -> float | None:
    """The largest logprob difference over the tokens both answers share from the start (None: no logprobs)."""
    gaps = []
    for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs, strict=False):
        if ta != tb:
            break
        if la is not None and lb is not None:
            gaps.append(abs(la - lb))
    return max(gaps) if gaps else None


def first_divergence(a: Answer, b: Answer, allowance: float) -> Divergence | None:
    """Where ``a`` and ``b`` part: the first different token, or the first logprob gap over ``allowance``.

    Args:
        a: One answer.
        b: The other, to the same prompt at temperature 0.
        allowance: The logprob difference (nats) still taken as the same computation.

    Returns:
        None when every token matches and every logprob is within ``allowance``.
    """
    if not a.token_ids and not b.token_ids:  # a server that sends no token ids: the texts decide
        return None if a.text == b.text else Divergence(0, None, None, None, None, "text")
    n = max(len(a.token_ids), len(b.token_ids))
    for i in range(n):
        ta, tb = _token(a, i), _token(b, i)
        la, lb = _logprob(a, i), _logprob(b, i)
        if ta != tb:
            return Divergence(i, ta, tb, la, lb, "token")
        if la is not None and lb is not None and abs(la - lb) > allowance:
            return Divergence(i, ta, tb, la, lb, "logprob")
    return None


def _token(a: Answer, i: int) -> int | None:
    return a.token_ids[i] if i < len(a.token_ids) else None


def _logprob(a: Answer, i: int) -> float | None:
    return a.logprobs[i] if i < len(a.logprobs) else None


@dataclass(frozen=True)
class OutputsEvidence:
    """The same prompt, computed afresh and served from the cache, greedy with logprobs."""

    method: str
    """How a fresh computation was had: ``cache_salt`` (another salt) or ``first_send`` (the prompt's first send)."""
    fresh: Answer | None
    """A fresh computation (no cached tokens; None: its request failed)."""
    cached: Answer | None
    """The same prompt served from the cache."""
    fresh_again: Answer | None
    """A second fresh computation, for the noise floor (None: the server takes no salt)."""
    prompt_tokens: int | None = None
    """Prompt length, as the server counted it."""
    error: str | None = None
    """Why the check could not be made (a failed request); then the answers may be empty."""
    seconds: float | None = None
    """What the check cost the run, in wall-clock seconds."""

    def to_json(self) -> dict[str, Any]:
        """The evidence with its derived figures (``summary.json``)."""
        return {**asdict(self), "noise_floor": self.noise_floor, "divergence": self.divergence}

    @property
    def noise_floor(self) -> float | None:
        """Largest logprob gap between the two fresh computations (None: only one)."""
        if self.fresh is None or self.fresh_again is None or self.fresh_again.cached_tokens:
            return None  # a salt the server ignored gives no second fresh computation
        return max_logprob_gap(self.fresh, self.fresh_again)

    @property
    def divergence(self) -> float | None:
        """Largest logprob gap between the fresh and the cached answer, over their shared tokens."""
        if self.fresh is None or self.cached is None:
            return None
        return max_logprob_gap(self.fresh, self.cached)


@dataclass(frozen=True)
class WeightUpdateEvidence:
    """A prefix warmed, the weights updated, the same prompt sent again and computed afresh."""

    method: str
    """How the weights were updated (``reload``, ``pause_reload_resume``, ``reload_reset``, or the command)."""
    before: Answer | None
    """The warmed prompt again, before the update (its hits and TTFT)."""
    after: Answer | None
    """The same prompt just after the update, served however the server chose (None: not reached)."""
    fresh: Answer | None
    """The same prompt computed afresh under the new weights (another salt, or after a cache reset)."""
    fresh_method: str
    """``cache_salt`` or ``reset_prefix_cache``."""
    version_before: str | None
    """The server's weight version before (vLLM ``/weight_info``; None: it does not say)."""
    version_after: str | None
    """And after."""
    update_s: float
    """Seconds the update took."""
    weights_path: str | None = None
    """Where the new weights came from (the path handed to the server)."""
    error: str | None = None
    """Why the update could not be made (then the answers after it are empty)."""

    def to_json(self) -> dict[str, Any]:
        """The evidence with its derived figures (``summary.json``)."""
        return {**asdict(self), "weights_changed": self.weights_changed}

    @property
    def weights_changed(self) -> bool:
        """Whether the new weights answer differently from the old ones (else stale cannot be told from fresh)."""
        if self.before is None or self.fresh is None:
            return False
        return (self.before.token_ids, self.before.text) != (self.fresh.token_ids, self.fresh.text)


@dataclass(frozen=True)
class IsolationEvidence:
    """Who shares cached blocks with whom, and what TTFT shows an observer."""

    salted: bool
    """Whether the server takes ``cache_salt`` (vLLM does)."""
    first_salt_a: Answer | None
    """A new prompt, first sent with salt A (nothing to hit)."""
    again_salt_a: Answer | None
    """The same prompt, salt A again: should hit."""
    salt_b: Answer | None
    """The same prompt, salt B: should not hit."""
    no_salt_first: Answer | None
    """The same prompt without a salt, first time: a salted tenant's blocks must not serve it."""
    no_salt_again: Answer | None
    """Without a salt again: unsalted tenants share (this is the side channel)."""
    skipped: str | None = None
    """Why isolation could not be checked (a server without ``cache_salt``, a failed request)."""

    def to_json(self) -> dict[str, Any]:
        """The evidence with its derived figures (``summary.json``)."""
        return {**asdict(self), "side_channel_ms": self.side_channel_ms, "side_channel_ratio": self.side_channel_ratio}

    @property
    def side_channel_ms(self) -> float | None:
        """TTFT an unsalted observer saves when someone sent the prompt before (ms)."""
        a, b = self.no_salt_first, self.no_salt_again
        if a is None or b is None or a.ttft_s is None or b.ttft_s is None:
            return None
        return (a.ttft_s - b.ttft_s) * 1000

    @property
    def side_channel_ratio(self) -> float | None:
        """First over again TTFT without a salt (above 1: visible)."""
        a, b = self.no_salt_first, self.no_salt_again
        if a is None or b is None or not a.ttft_s or not b.ttft_s:
            return None
        return a.ttft_s / b.ttft_s
