"""Weight updates for the stale-KV check: perturbed weights of the default model, and the ways to load them.

``weight_update=`` names how the server's weights change mid-test:

- ``reload``: dev-mode ``collective_rpc`` ``reload_weights`` from ``weights_path`` (vLLM
  keeps the prefix cache: the blocks computed with the old weights stay);
- ``pause_reload_resume``: the RL API's ``/pause``, the same reload, ``/resume`` (the pause
  clears the caches);
- ``reload_reset``: the reload, then ``/reset_prefix_cache``;
- anything else: a shell command of yours that updates the weights (it must exit 0).

Without ``weights_path``, the embedded engine's default model is perturbed here (noise on
the seven weight matrices of one decoder layer) and written once into the cache folder,
so the new weights surely answer differently from the old ones.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from echo_env.errors import ConfigError, EchoEnvError, ModelError
from echo_env.wire.control import VllmControl

BUILT_IN_UPDATES = ("reload", "pause_reload_resume", "reload_reset")
"""The ``weight_update`` values this package performs itself; any other value is a command."""

PERTURBED_LAYER = 9
"""The decoder layer whose matrices get the noise (of the default model's 18)."""

PERTURB_SCALE = 1.0
"""Noise standard deviation as a multiple of each tensor's own (enough to change greedy answers)."""

_MARKER = ".perturbed-complete"


def perturbed_weights_dir(model_dir: Path, cache_dir: Path) -> Path:
    """The default model with one layer perturbed, written once into ``cache_dir/models``; returns its folder.

    Args:
        model_dir: The converted model (safetensors and config).
        cache_dir: The package's cache folder.

    Raises:
        ModelError: The model has no safetensors or no layer :data:`PERTURBED_LAYER`, or
            the folder cannot be written.
    """
    out = cache_dir / "models" / f"{model_dir.name}-perturbed-l{PERTURBED_LAYER}"
    if (out / _MARKER).exists():
        return out
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError as exc:
        raise ModelError(f"perturbing the weights needs torch and safetensors ({exc}): make install-engine") from exc
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors in {model_dir}: pass weights_path= (a folder your server can read)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    generator = torch.Generator().manual_seed(0)
    changed = 0
    try:
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        for path in files:
            tensors = load_file(str(path))
            for name, t in tensors.items():
                if f"layers.{PERTURBED_LAYER}." in name and name.endswith("proj.weight"):
                    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
                    tensors[name] = (t.float() + noise * PERTURB_SCALE * t.float().std()).to(t.dtype)
                    changed += 1
            save_file(tensors, str(tmp / path.name), metadata={"format": "pt"})
        if changed == 0:
            raise ModelError(f"{model_dir} has no layers.{PERTURBED_LAYER}.*proj.weight tensors to perturb")
        (tmp / _MARKER).write_text(f"{changed} tensors of layer {PERTURBED_LAYER}\n", "utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as exc:
        raise ModelError(
            f"cannot write perturbed weights to {out}: {exc}; free disk space or set ECHO_ENV_CACHE"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True)
class UpdateDone:
    """A weight update as it happened."""

    seconds: float
    """How long it took."""
    version_before: str | None
    """``/weight_info`` before (None: not served)."""
    version_after: str | None
    """And after."""


async def apply_update(method: str, control: VllmControl, weights_path: str | None) -> UpdateDone:
    """Update the server's weights by ``method`` (see the module doc).

    Raises:
        ConfigError: A built-in method without ``weights_path``.
        ServerResponseError: The server refused a control call (dev mode off).
        EchoEnvError: The user's command failed.
    """
    if method in BUILT_IN_UPDATES and weights_path is None:
        raise ConfigError(f"weight_update={method} needs weights_path= (a folder of safetensors the server can read)")
    before = await control.weight_version()
    started = time.perf_counter()
    if method == "reload":
        assert weights_path is not None
        await control.reload_weights(weights_path)
    elif method == "pause_reload_resume":
        assert weights_path is not None
        await control.pause("abort")
        try:
            await control.reload_weights(weights_path)
        finally:
            await control.resume()
    elif method == "reload_reset":
        assert weights_path is not None
        await control.reload_weights(weights_path)
        await control.reset_prefix_cache()
    else:
        await _run_command(method)
    seconds = time.perf_counter() - started
    return UpdateDone(seconds, before, await control.weight_version())


async def _run_command(command: str) -> None:
    proc = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise EchoEnvError(
            f"weight_update command exited {proc.returncode} ({tail[0][:200]}): fix the command, or use "
            f"one of {', '.join(BUILT_IN_UPDATES)}"
        )
