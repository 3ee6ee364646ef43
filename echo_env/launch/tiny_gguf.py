"""A tiny random-weight GGUF with Gemma 3's real tokenizer: a fast-prefill server for the tests.

On a big GPU a sub-1B model prefills the test's ~525-token prompt in well under a
millisecond, so TTFT is mostly HTTP, scheduling and the first decode step, and a working
prefix cache buys almost no TTFT. That regime is rare on a CPU with a real model; this
module makes it on any machine: a GGUF in Qwen3's layout, one block 64 wide, with
Gemma 3's 262k-token vocabulary copied from the default model's GGUF (tokens, scores,
types, special ids), so the prompts tokenize exactly as the default model's do. Most of
its parameters are the embedding; the per-step cost of the 262k-wide output dominates
and prefill of the whole prompt costs about what one token does.

The weights are random (seeded, so the file is the same on every machine). Random
weights compute exactly like trained ones of the same shape, so TTFT, cache hits and the
verdict are real; the generated text means nothing (rewards of the echo task are noise).

:func:`tiny_gguf` writes it once into ``<cache>/models`` (40 MB; 15-45 s on 2 cores, nearly
all of it ``GGUFReader`` parsing the default GGUF's 262k-token vocabulary) and returns the
cached file after that; serve it with
:class:`~echo_env.launch.llamacpp_server.EmbeddedLlamaServer` (``model=str(path)``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_env.errors import ConfigError, ModelError
from echo_env.launch.llamacpp_server import MODEL_INSTALL_HINT, default_gguf
from echo_env.launch.model import default_cache_dir

TOKENIZER_KEY_PREFIX = "tokenizer."
"""Metadata keys copied from the default GGUF: the whole tokenizer, nothing of the model."""

ARCH = "qwen3"
"""The layout written: Qwen3's blocks (per-head q/k norms, gated FFN), which llama.cpp loads with any vocabulary."""


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape and seed of a tiny random-weight model."""

    layers: int = 1
    """Transformer blocks."""
    width: int = 64
    """Hidden size (``embedding_length``)."""
    heads: int = 2
    """Query heads."""
    kv_heads: int = 1
    """Key/value heads."""
    ffn: int = 128
    """Feed-forward width."""
    seed: int = 0
    """Seeds the weights: the same spec gives the same file."""
    context: int = 32768
    """Context length written into the metadata."""

    def __post_init__(self) -> None:
        for key in ("layers", "width", "heads", "kv_heads", "ffn"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be at least 1")
        if self.width % self.heads or self.heads % self.kv_heads:
            raise ConfigError(
                f"width={self.width}, heads={self.heads}, kv_heads={self.kv_heads}: width must divide into heads and "
                "heads into kv_heads (e.g. width=64 heads=2 kv_heads=1)"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.heads

    @property
    def file_name(self) -> str:
        """The cached file's name, unique per spec."""
        return (
            f"tiny-{ARCH}-{self.layers}x{self.width}-h{self.heads}kv{self.kv_heads}-f{self.ffn}-seed{self.seed}-"
            "gemma3vocab.gguf"
        )


def tensor_shapes(spec: TinyModelSpec, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model and its numpy shape (rows, columns), in the order written.

    The output projection is left out: llama.cpp ties it to ``token_embd`` when absent.
    """
    h, d = spec.width, spec.head_dim
    q, kv = spec.heads * d, spec.kv_heads * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, h)), ("output_norm.weight", (h,))]
    for i in range(spec.layers):
        b = f"blk.{i}."
        shapes += [
            (b + "attn_norm.weight", (h,)),
            (b + "attn_q.weight", (q, h)),
            (b + "attn_k.weight", (kv, h)),
            (b + "attn_v.weight", (kv, h)),
            (b + "attn_output.weight", (h, q)),
            (b + "attn_q_norm.weight", (d,)),
            (b + "attn_k_norm.weight", (d,)),
            (b + "ffn_norm.weight", (h,)),
            (b + "ffn_gate.weight", (spec.ffn, h)),
            (b + "ffn_up.weight", (spec.ffn, h)),
            (b + "ffn_down.weight", (h, spec.ffn)),
        ]
    return shapes


def tiny_gguf(cache_dir: Path | None = None, spec: TinyModelSpec | None = None) -> Path:
    """The tiny model's GGUF, written once into ``<cache>/models`` and reused.

    Args:
        cache_dir: The cache folder; None means :func:`~echo_env.launch.model.default_cache_dir`
            (``ECHO_ENV_CACHE``).
        spec: The shape and seed; None means :class:`TinyModelSpec` ``()`` (one block, 64 wide).

    Returns:
        The GGUF's path.

    Raises:
        ModelError: The ``gguf`` package or the default model's GGUF (for the tokenizer) is
            missing, or the file cannot be written.
    """
    spec = spec or TinyModelSpec()
    models = (cache_dir or default_cache_dir()) / "models"
    target = models / spec.file_name
    if target.is_file():
        return target  # only ever renamed into place once complete
    try:
        import gguf
    except ImportError:
        raise ModelError(f"writing the tiny model needs the gguf package: {MODEL_INSTALL_HINT}") from None
    tokenizer = _tokenizer_fields(gguf, default_gguf(cache_dir))
    fd, partial = tempfile.mkstemp(prefix=f".{spec.file_name}.tmp-", dir=models)
    os.close(fd)
    try:
        _write(gguf, Path(partial), spec, tokenizer)
        os.chmod(partial, 0o644)  # mkstemp makes it private; a model file is not
        os.rename(partial, target)  # concurrent writers write the same bytes: the last rename wins
    except OSError as exc:
        raise ModelError(
            f"cannot write the tiny model to {target}: {exc}; set ECHO_ENV_CACHE to a writable folder"
        ) from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _tokenizer_fields(gguf: Any, source: Path) -> list[tuple[str, Any, Any, Any]]:
    """``(key, value, type, sub_type)`` of every tokenizer key of ``source`` (no tensor data is read)."""
    reader = gguf.GGUFReader(str(source))
    fields = []
    for name, field in reader.fields.items():
        if not name.startswith(TOKENIZER_KEY_PREFIX):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        fields.append((name, field.contents(), kind, sub))
    if not any(name == "tokenizer.ggml.tokens" for name, *_ in fields):
        raise ModelError(f"{source} has no tokenizer.ggml.tokens: delete it so the default GGUF is assembled again")
    return fields


def _write(gguf: Any, path: Path, spec: TinyModelSpec, tokenizer: list[tuple[str, Any, Any, Any]]) -> None:
    import numpy as np

    vocab = next(len(value) for name, value, _, _ in tokenizer if name == "tokenizer.ggml.tokens")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string("general.name", f"tiny random-weight {ARCH} ({spec.layers}x{spec.width}), Gemma 3 tokenizer")
    writer.add_uint32("general.file_type", 1)  # mostly F16
    for key, value in (
        ("context_length", spec.context),
        ("embedding_length", spec.width),
        ("block_count", spec.layers),
        ("feed_forward_length", spec.ffn),
        ("attention.head_count", spec.heads),
        ("attention.head_count_kv", spec.kv_heads),
        ("attention.key_length", spec.head_dim),
        ("attention.value_length", spec.head_dim),
    ):
        writer.add_uint32(f"{ARCH}.{key}", value)
    writer.add_float32(f"{ARCH}.rope.freq_base", 1_000_000.0)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    for name, value, kind, sub in tokenizer:
        writer.add_key_value(name, value, kind, sub)
    shapes = tensor_shapes(spec, vocab)
    for name, shape in shapes:
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(spec.seed)
    for _, shape in shapes:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))  # RMS norms at identity
        else:
            writer.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    writer.close()
