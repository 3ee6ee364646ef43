"""Prompts into token ids with a local ``transformers`` tokenizer, as a vLLM server builds them."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from typing import Any, Protocol

from echo_env.errors import ModelError


class Tokenizer(Protocol):
    """The part of a ``transformers`` tokenizer this module uses."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt as a vLLM server would build them.

    A string is a plain completion prompt (the tokenizer adds its special tokens, such as
    Gemma's ``<bos>``, as vLLM's ``/v1/completions`` does); a list of messages goes through
    the tokenizer's chat template with the generation prompt, as ``/v1/chat/completions``.
    """
    out: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


@functools.cache
def load_local_tokenizer(source: str) -> Any:
    """The ``transformers`` tokenizer in a folder or of a hub id, loaded once per process.

    It only loads: a model that must first be prepared (the default model's conversion) is
    the launching side's job (:func:`echo_env.launch.model.load_tokenizer`).

    Raises:
        ModelError: ``transformers`` is missing or the tokenizer cannot be loaded.
    """
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("loading a tokenizer needs transformers: pip install transformers")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        raise ModelError(
            f"cannot load the tokenizer of {source!r}: {exc}. Check the model name, or network access "
            "for a hub id (HF_HUB_OFFLINE=1 blocks downloads)"
        ) from exc
