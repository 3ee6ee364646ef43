"""The tiny random-weight GGUF, offline: its layout, its copied tokenizer, the same bytes every time.

A stand-in for the default model's GGUF (a 300-token vocabulary) is put where the cache
keeps the default one, so nothing is downloaded or assembled. The real one, served by
llama-server, is in tests/launch/test_llamacpp_tiny.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from echo_env.errors import ConfigError, ModelError  # noqa: E402
from echo_env.launch.llamacpp_server import DEFAULT_GGUF_NAME  # noqa: E402
from echo_env.launch.tiny_gguf import TinyModelSpec, tensor_shapes, tiny_gguf  # noqa: E402

VOCAB = 300


def fake_default(cache: Path, tokens: bool = True) -> Path:
    """A GGUF with a tokenizer of ``VOCAB`` tokens and one tensor, where the default model's GGUF goes."""
    models = cache / "models"
    models.mkdir(parents=True)
    path = models / DEFAULT_GGUF_NAME
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_string("tokenizer.ggml.model", "llama")
    if tokens:
        writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.scores", [float(-i) for i in range(VOCAB)])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("gemma3.block_count", 18)  # a model key: not copied
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_tokenizer_and_the_same_bytes_every_time(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    fake_default(first), fake_default(second)
    path = tiny_gguf(first)
    assert sha256(path) == sha256(tiny_gguf(second))  # seeded: the same file on every machine
    assert tiny_gguf(first) == path  # cached
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "qwen3"
    assert fields["tokenizer.ggml.tokens"].contents()[:3] == ["t0", "t1", "t2"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert "gemma3.block_count" not in fields and fields["qwen3.block_count"].contents() == 1
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    assert shapes == dict(tensor_shapes(TinyModelSpec(), VOCAB))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert 0.01 < float(np.std(embedding.data.astype(np.float32))) < 0.03  # random, not zeros


def test_another_seed_is_another_model(tmp_path: Path) -> None:
    fake_default(tmp_path)
    assert sha256(tiny_gguf(tmp_path)) != sha256(tiny_gguf(tmp_path, TinyModelSpec(seed=1)))


def test_a_source_without_tokens_names_the_fix(tmp_path: Path) -> None:
    fake_default(tmp_path, tokens=False)
    with pytest.raises(ModelError, match=r"no tokenizer\.ggml\.tokens"):
        tiny_gguf(tmp_path)


@pytest.mark.parametrize(("changes", "match"), [({"width": 0}, "width"), ({"width": 64, "heads": 3}, "divide")])
def test_spec_rejects_shapes_llama_cpp_cannot_load(changes: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TinyModelSpec(**changes)
