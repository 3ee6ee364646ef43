"""GRPO on the trainer's own model (transformers): stop ids, shared-prefix generation, the timed trainer.

What runs next to the weights rather than on a server: :func:`stop_at_newline` makes
generation end where the answer line ends (as the server's ``stop=["\\n"]`` does),
:class:`SharedPrefixRollout` generates with a prefix cache built once per batch, and
:func:`grpo_trainer_class` is ``GRPOTrainer`` with rollout and step timings. All are
re-exported by :mod:`echo_env.integrations.trl_grpo`. Only :func:`grpo_trainer_class`
and :class:`SharedPrefixRollout` import a library (``trl``, ``torch``, ``transformers``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from echo_env.errors import ConfigError
from echo_env.measure.tokens import reusable_prefix_length


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Every token id whose text contains a line break.

    The answer is one line, and the server stops at ``"\\n"``; transformers' generation
    stops only at end-of-sequence ids, so these ids play that part.

    Args:
        tokenizer: A ``transformers`` tokenizer.

    Returns:
        The ids, sorted.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    # Vocabularies spell a line break as itself (SentencePiece), as "Ċ"/"č" (byte-level
    # BPE) or as a byte token; decoding each candidate settles which are line breaks.
    marks = ("\n", "\r", "Ċ", "č", "<0x0A>", "<0x0D>")
    candidates = sorted(i for piece, i in vocab.items() if any(m in piece for m in marks))
    texts = tokenizer.batch_decode([[i] for i in candidates])
    return [i for i, text in zip(candidates, texts) if "\n" in text or "\r" in text]


def stop_at_newline(model: Any, tokenizer: Any) -> list[int]:
    """Make a transformers model's generation (and TRL's completion mask) end at a line break.

    TRL reads ``model.generation_config.eos_token_id`` when the trainer is built, both to
    stop generation and to mask what follows the end, so call this before building it.

    Returns:
        The end-of-sequence ids now in effect.
    """
    current = model.generation_config.eos_token_id
    eos = [current] if isinstance(current, int) else list(current or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    merged = sorted(set(eos) | set(newline_token_ids(tokenizer)))
    model.generation_config.eos_token_id = merged
    return merged


def _cut_at_stop(tokens: Sequence[int], stop_ids: set[int], pad_id: int | None) -> list[int]:
    """The generated tokens up to and including the first stop token (padding dropped)."""
    out: list[int] = []
    for token in tokens:
        if token in stop_ids:
            out.append(token)
            return out
        out.append(token)
    # No stop token: generation hit max_new_tokens; finished rows of a batch are padded.
    while out and pad_id is not None and out[-1] == pad_id:
        out.pop()
    return out


@dataclass
class SharedPrefixRollout:
    """A TRL ``rollout_func`` generating with the trainer's own model, with a prefix cache.

    TRL's built-in generation runs the whole ~500-token prompt through the model for every
    completion. Here the prefix all prompts of the batch share (the system prompt) goes
    through once, its KV cache is copied to each group, each group's distinct prompt end
    goes through once more, and the group's completions are sampled from that: the
    trainer-side version of what a server's prefix cache does. Sampling follows the
    trainer's generation settings (``temperature``, ``top_p``, ``top_k``,
    ``max_completion_length``, and the stop ids set by :func:`stop_at_newline`).
    """

    history: list[dict[str, float]] = field(default_factory=list, init=False)
    """Per batch: ``wall_s``, ``prefix_tokens`` (shared), ``groups``."""

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Sample one completion per prompt; the shape ``GRPOTrainer`` expects."""
        import copy

        import torch
        from transformers import DynamicCache

        start = time.perf_counter()
        tokenizer = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = [self._ids(p, tokenizer) for p in prompts]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            groups.setdefault(tuple(ids), []).append(i)
        shared = reusable_prefix_length(list(groups))
        generation_config = self._generation_config(trainer, model, tokenizer)
        eos = generation_config.eos_token_id
        stop_ids = {eos} if isinstance(eos, int) else set(eos or ())
        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(trainer.args.bf16))
        completion_ids: list[list[int]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast:
                prefix_cache = DynamicCache(config=model.config)
                if shared:
                    first = next(iter(groups))
                    model(
                        input_ids=torch.tensor([first[:shared]], device=device),
                        past_key_values=prefix_cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                for key, members in groups.items():
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(members))
                    batch = torch.tensor([list(key)] * len(members), device=device)
                    out = model.generate(
                        input_ids=batch,
                        attention_mask=torch.ones_like(batch),
                        past_key_values=cache,
                        generation_config=generation_config,
                    )
                    for row, index in enumerate(members):
                        generated = out[row, len(key) :].tolist()
                        completion_ids[index] = _cut_at_stop(generated, stop_ids, tokenizer.pad_token_id)
        finally:
            model.train(was_training)
        self.history.append(
            {"wall_s": time.perf_counter() - start, "prefix_tokens": float(shared), "groups": float(len(groups))}
        )
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    @staticmethod
    def _generation_config(trainer: Any, model: Any, tokenizer: Any) -> Any:
        """The trainer's generation settings; TRL builds them only for its own transformers path."""
        generation_config = getattr(trainer, "generation_config", None)
        if generation_config is not None:
            return generation_config
        from transformers import GenerationConfig

        args = trainer.args
        return GenerationConfig(
            max_new_tokens=args.max_completion_length,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    @staticmethod
    def _ids(prompt: Any, tokenizer: Any) -> list[int]:
        if isinstance(prompt, str):
            return [int(t) for t in tokenizer(prompt)["input_ids"]]
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]


@contextlib.contextmanager
def _score_completion_positions_only() -> Iterator[None]:
    """Make TRL's fused LM head score only the completion positions, on every device.

    TRL (1.x) projects only the positions with a label onto the vocabulary when Triton
    runs the kernel, and every position elsewhere, to keep tile shapes fixed for compilers
    such as Neuron's. On a CPU that means the ~500 prompt positions of each sequence go
    through Gemma's 262k-token head too, forward and backward: most of a training step.
    The flag that picks the compact path is read only there, so it is switched for the
    duration of a step and put back.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # another TRL version: leave it alone
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def grpo_trainer_class() -> type[Any]:
    """``trl.GRPOTrainer`` with two timings added to its logged metrics.

    ``time/rollout_s`` is the time spent producing each batch's completions (by
    transformers, vLLM or a ``rollout_func``) and ``time/step_s`` the time of each
    training step; TRL logs them with its own metrics (console, wandb).

    Raises:
        ConfigError: TRL is not installed.
    """
    try:
        from trl import GRPOTrainer
    except ImportError as exc:
        raise ConfigError(f"training needs TRL: pip install 'echo-prefix-env[trl]' ({exc})") from exc

    class EchoGRPOTrainer(GRPOTrainer):  # type: ignore[misc, valid-type]
        """GRPOTrainer logging ``time/rollout_s`` and ``time/step_s``."""

        def _generate(self, prompts: list[Any]) -> Any:
            start = time.perf_counter()
            result = super()._generate(prompts)
            mode = "train" if getattr(self.model, "training", True) else "eval"
            self._metrics[mode]["time/rollout_s"].append(time.perf_counter() - start)
            return result

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            with _score_completion_positions_only():
                loss = super().training_step(*args, **kwargs)
            self._metrics["train"]["time/step_s"].append(time.perf_counter() - start)
            return loss

    return EchoGRPOTrainer
